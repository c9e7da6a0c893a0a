"""Refresh routes: `POST /api/gastown/refresh-token` and tRPC's `gastown.refreshToken`.

In order: the key (401), the body (400), a Bearer token (401 without one, unless
`--allow-unbound-refresh`) well signed (expired is fine) for the town asked for (403),
admission control when `--refresh-rate` is set (503 with `Retry-After`), the town (404), the
Bearer's owner (403), and the town's status (stopped 409, destroyed 410). Admission comes
after the checks that need no database: a request that can refresh no town (a made-up town
id, a junk Bearer) took a slot and booked the waits of real towns minutes out (a reviewer:
a 5 s flood at `--refresh-rate 5` told four real towns `Retry-After: 281`-`313`).
The answer is the bare JWT as text/plain, `{"token", "expiresAt"}` for
`Accept: application/json`, or `{"result": {"data": jwt}}` on the tRPC route.
"""

from __future__ import annotations

from typing import NoReturn

import structlog
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route

from ._http import OTHER_TOWN, AppContext, bearer_token, signed_for, validate
from ._time import rfc3339
from .errors import ApiError
from .models import RefreshInput
from .tokens import fingerprint, mint_gastown_token

log = structlog.get_logger(__name__)
_NO_STORE = {"cache-control": "no-store"}


def refresh_routes(ctx: AppContext) -> list[Route]:
    async def refresh(request: Request) -> Response:
        return await _refresh(ctx, request, trpc=False)

    async def refresh_trpc(request: Request) -> Response:
        return await _refresh(ctx, request, trpc=True)

    return [
        Route("/api/gastown/refresh-token", refresh, methods=["POST"]),
        Route("/api/trpc/gastown.refreshToken", refresh_trpc, methods=["POST"]),
    ]


async def _refresh(ctx: AppContext, request: Request, *, trpc: bool) -> Response:
    ctx.require_key(request)
    data = await ctx.read_json(request)
    wrapped = data.get("json")
    town_id = validate(RefreshInput, wrapped if isinstance(wrapped, dict) else data).town_id
    bearer = bearer_token(request.headers.get("authorization"))
    if bearer is None and not ctx.settings.allow_unbound_refresh:
        log.warning("refresh_refused", town_id=town_id, reason="no_bearer")
        raise ApiError(
            401,
            "token_required",
            "A Bearer token of the town is required: the internal key alone refreshes no town.",
        )
    claims = None
    if bearer is not None:
        claims, problem = signed_for(ctx, town_id, bearer)
        if problem is not None:
            _refuse(town_id, *problem)
    _admit(ctx, town_id)
    town = await ctx.town(town_id)
    if claims is not None and claims.sub != town.user_id:
        _refuse(town.id, "other_town", OTHER_TOWN)
    if town.status == "stopped":
        raise ApiError(409, "town_stopped", "The town is stopped; start it to refresh its token.")
    if town.status == "destroyed":
        raise ApiError(410, "town_destroyed", "The town is destroyed; its token is not renewed.")
    now = int(ctx.clock())
    lifetime = ctx.settings.token_lifetime
    token = mint_gastown_token(
        town.user_id,
        town.id,
        town.organization_id,
        secret=ctx.settings.nextauth_secret,
        lifetime=lifetime,
        now=now,
        claims=ctx.settings.token_claims,
    )
    log.info("token_refreshed", town_id=town.id, user_id=town.user_id, token=fingerprint(token))
    if trpc:
        return JSONResponse({"result": {"data": token}}, headers=_NO_STORE)
    if wants_json(request.headers.get("accept", "")):
        body = {"token": token, "expiresAt": rfc3339(now + lifetime)}
        return JSONResponse(body, headers=_NO_STORE)
    return PlainTextResponse(token, headers=_NO_STORE)


def _admit(ctx: AppContext, town_id: str) -> None:
    """503 with `Retry-After` when admission control refuses this refresh now."""
    if ctx.admission is None:
        return
    wait = ctx.admission.admit(town_id, ctx.monotonic())
    if wait is not None:
        message = (
            f"The cloud admits {ctx.admission.rate} refreshes per second; retry after {wait} s."
        )
        raise ApiError(503, "busy", message, headers={"retry-after": str(wait)})


def _refuse(town_id: str, reason: str, message: str) -> NoReturn:
    log.warning("refresh_refused", town_id=town_id, reason=reason)
    raise ApiError(403, "token_binding", message)


def wants_json(accept: str) -> bool:
    """True when the Accept header prefers application/json to text/plain."""
    json_q = text_q = 0.0
    for entry in accept.split(","):
        media, *params = (part.strip() for part in entry.split(";"))
        q = 1.0
        for param in params:
            name, _, value = param.partition("=")
            if name.strip() == "q":
                try:
                    q = float(value)
                except ValueError:
                    q = 0.0
        if media.lower() == "application/json":
            json_q = max(json_q, q)
        elif media.lower() in ("text/plain", "text/*"):
            text_q = max(text_q, q)
    return json_q > 0 and json_q >= text_q
