"""HTTP plumbing shared by the routes: the key check, bounded bodies, strict JSON models."""

from __future__ import annotations

import hmac
import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import anyio
import pydantic
from starlette.requests import Request
from starlette.responses import JSONResponse

from gastown_sandboxd._types import all_unicode
from gastown_sandboxd.gtsettings.json_text import reject_constant

from .admission import RefreshAdmission
from .errors import ApiError, TokenInvalid
from .settings import CloudSettings
from .store import Store, Town
from .tokens import GastownClaims, verify_gastown_token

_M = TypeVar("_M", bound=pydantic.BaseModel)
_DRAIN_BYTES = 4 * 1024 * 1024
_DRAIN_SECONDS = 2.0


@dataclass(frozen=True, slots=True)
class AppContext:
    """What every route reads: settings, the store, the clock (Unix seconds), and the refresh
    routes' admission control (None: every refresh is admitted) with its own clock, one that
    never steps back (a wall clock stepped back would hold its one-second window still, and
    every refresh after the first `rate` would be refused for as long as the step)."""

    settings: CloudSettings
    store: Store
    clock: Callable[[], float]
    admission: RefreshAdmission | None = None
    monotonic: Callable[[], float] = time.monotonic

    def require_key(self, request: Request) -> None:
        """401 unless `x-internal-api-key` equals the key (constant time, no detail why)."""
        given = request.headers.get("x-internal-api-key", "").encode()
        if not hmac.compare_digest(given, self.settings.internal_api_key.encode()):
            raise ApiError(401, "unauthorized", "A valid x-internal-api-key header is required.")

    async def town(self, town_id: str) -> Town:
        town = await self.store.get_town(town_id)
        if town is None:
            raise ApiError(404, "town_not_found", "No town has this id.")
        return town

    async def read_model(self, request: Request, model: type[_M]) -> _M:
        return validate(model, await self.read_json(request))

    async def read_json(self, request: Request) -> dict[str, Any]:
        return parse_object(await read_body(request, self.settings.max_body_bytes))


async def read_body(request: Request, limit: int) -> bytes:
    """The body, or 413 once it is declared or found to exceed `limit` bytes."""
    declared = request.headers.get("content-length")
    if declared is not None:
        if not declared.isdigit():
            raise ApiError(400, "bad_request", "The Content-Length header is not a number.")
        if int(declared) > limit:
            if int(declared) <= _DRAIN_BYTES:
                await _drain(request)
            raise _too_large(limit)
    chunks, size, more = [], 0, True
    while more:
        message = await request.receive()
        if message["type"] != "http.request":
            raise ApiError(400, "client_disconnected", "The client left mid-request.")
        chunk, more = message.get("body", b""), message.get("more_body", False)
        size += len(chunk)
        if size > limit:
            if more:
                await _drain(request)
            raise _too_large(limit)
        chunks.append(chunk)
    return b"".join(chunks)


async def _drain(request: Request) -> None:
    """Read and drop what the client still sends (bounded), so it reads our 413, not a reset."""
    budget = _DRAIN_BYTES
    with anyio.move_on_after(_DRAIN_SECONDS):
        while budget > 0:
            message = await request.receive()
            if message["type"] != "http.request" or not message.get("more_body", False):
                return
            budget -= len(message.get("body", b""))


# Deeper than any body a route takes (a town's settings are ~5 levels, a chat message ~5),
# and shallow enough for every recursive step after parsing (a deep copy, pydantic's
# serializer), which a body of a few hundred levels would take past the stack.
MAX_DEPTH = 64


def parse_object(body: bytes) -> dict[str, Any]:
    """The body as a JSON object that can be stored and answered back, or 400: JSON (no NaN
    or Infinity, which no answer can carry), nested at most `MAX_DEPTH` levels, and Unicode
    text (no lone surrogate, which `"\\ud800"` decodes to and no UTF-8 can hold)."""
    try:
        data = json.loads(body, parse_constant=reject_constant)
    except (ValueError, RecursionError) as exc:
        raise ApiError(400, "malformed_json", "The request body is not valid JSON.") from exc
    if not isinstance(data, dict):
        raise ApiError(400, "malformed_json", "The request body must be a JSON object.")
    problem = _shape_problem(data)
    if problem is not None:
        raise ApiError(400, "malformed_json", problem)
    return data


def _shape_problem(data: dict[str, Any]) -> str | None:
    # The depth walk is iterative: the check must not itself run out of stack on what it is
    # there to refuse. Lone surrogates by the sandbox's own test, once the depth is known
    # to be small enough for it.
    stack: list[tuple[Any, int]] = [(data, 1)]
    while stack:
        value, depth = stack.pop()
        if depth > MAX_DEPTH:
            return f"The request body is nested deeper than {MAX_DEPTH} levels."
        if isinstance(value, dict):
            stack.extend((item, depth + 1) for item in value.values())
        elif isinstance(value, list):
            stack.extend((item, depth + 1) for item in value)
    return None if all_unicode(data) else _LONE_SURROGATE


_LONE_SURROGATE = "The request body holds a lone surrogate (an unpaired \\ud800-\\udfff escape)."


def validate(model: type[_M], data: dict[str, Any]) -> _M:
    """`data` as `model`, or 400 with one `{"path", "message"}` detail per problem."""
    try:
        return model.model_validate(data)
    except pydantic.ValidationError as exc:
        details = [
            {"path": "/" + "/".join(str(part) for part in err["loc"]), "message": err["msg"]}
            for err in exc.errors(include_url=False, include_input=False)
        ]
        first = details[0]
        message = f"Field {first['path']}: {first['message']}."
        raise ApiError(400, "invalid_request", message, details) from exc


def error_json(exc: ApiError) -> JSONResponse:
    body: dict[str, Any] = {"error": exc.code, "message": exc.message}
    if exc.details:
        body["details"] = list(exc.details)
    return JSONResponse(body, status_code=exc.status, headers=dict(exc.headers))


def _too_large(limit: int) -> ApiError:
    message = f"The request body exceeds {limit // 1024} KiB."
    # The connection is closed after a 413: what is left of the body is not worth reading.
    return ApiError(413, "body_too_large", message, headers={"connection": "close"})


def bearer_token(authorization: str | None) -> str | None:
    """The token of an `Authorization: Bearer <token>` header; None for none or another scheme."""
    scheme, _, token = (authorization or "").partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return None
    return token.strip()


OTHER_TOWN = "The Bearer token belongs to another town or user."


def town_binding_problem(ctx: AppContext, town: Town, token: str) -> tuple[str, str] | None:
    """None when `token` is well signed (expired is fine) for `town` and its owner; else the
    reason and the message of the 403 (the refresh binding of CONTRACT §7)."""
    claims, problem = signed_for(ctx, town.id, token)
    if problem is not None:
        return problem
    if claims is None or claims.sub != town.user_id:
        return "other_town", OTHER_TOWN
    return None


def signed_for(
    ctx: AppContext, town_id: str, token: str
) -> tuple[GastownClaims | None, tuple[str, str] | None]:
    """The claims of `token` when it is well signed (expired is fine) for the town `town_id`,
    checked without the database; else the reason and the message of the 403."""
    try:
        claims = verify_gastown_token(
            token, secret=ctx.settings.nextauth_secret, verify_exp=False, now=int(ctx.clock())
        )
    except TokenInvalid as exc:
        return None, (exc.reason, f"The Bearer token is refused: {exc.message}.")
    if claims.town_id != town_id:
        return None, ("other_town", OTHER_TOWN)
    return claims, None
