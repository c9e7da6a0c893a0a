"""Town routes: create (mints the first token), read, stop, start, destroy, config forward."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import httpx
import structlog
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from ._http import AppContext, parse_object, read_body
from .errors import ApiError
from .models import CreateTown
from .store import TownStatus
from .tokens import fingerprint, mint_gastown_token

log = structlog.get_logger(__name__)

# action -> (new status, statuses it may start from); a destroyed town stays destroyed.
TRANSITIONS: dict[str, tuple[TownStatus, tuple[TownStatus, ...]]] = {
    "stop": ("stopped", ("active", "stopped")),
    "start": ("active", ("active", "stopped")),
    "destroy": ("destroyed", ("active", "stopped", "destroyed")),
}
_FORWARDED_HEADERS = ("content-type", "if-match")


def town_routes(ctx: AppContext) -> list[Route]:
    async def create(request: Request) -> Response:
        ctx.require_key(request)
        body = await ctx.read_model(request, CreateTown)
        now = ctx.clock()
        town = await ctx.store.create_town(
            user_id=body.user_id,
            organization_id=body.organization_id,
            name=body.name,
            sandbox_url=body.sandbox_url,
            now=now,
        )
        token = mint_gastown_token(
            town.user_id,
            town.id,
            town.organization_id,
            secret=ctx.settings.nextauth_secret,
            lifetime=ctx.settings.token_lifetime,
            now=int(now),
            claims=ctx.settings.token_claims,
        )
        log.info("town_created", town_id=town.id, user_id=town.user_id, token=fingerprint(token))
        return JSONResponse({"town": town.as_json(), "token": token}, status_code=201)

    async def read(request: Request) -> Response:
        ctx.require_key(request)
        town = await ctx.town(request.path_params["town_id"])
        return JSONResponse({"town": town.as_json()})

    def change(action: str) -> Callable[[Request], Awaitable[Response]]:
        status, allowed_from = TRANSITIONS[action]

        async def endpoint(request: Request) -> Response:
            ctx.require_key(request)
            town_id = request.path_params["town_id"]
            changed = await ctx.store.set_status(
                town_id, status, allowed_from=allowed_from, now=ctx.clock()
            )
            if changed is None:
                await ctx.town(town_id)  # 404 when unknown; else it is destroyed
                raise ApiError(410, "town_destroyed", f"A destroyed town cannot {action}.")
            log.info("town_status_changed", town_id=town_id, status=status)
            return JSONResponse({"town": changed.as_json()})

        return endpoint

    async def patch_config(request: Request) -> Response:
        ctx.require_key(request)
        town = await ctx.town(request.path_params["town_id"])
        if town.status != "active":
            raise ApiError(409, "town_not_active", f"The town is {town.status}, not active.")
        body = await read_body(request, ctx.settings.max_body_bytes)
        parse_object(body)
        if not town.sandbox_url:
            raise ApiError(502, "no_sandbox_url", "The town has no sandboxUrl to forward to.")
        return await _forward(ctx, request, town.id, town.sandbox_url, body)

    path = "/api/gastown/towns/{town_id}"
    return [
        Route("/api/gastown/towns", create, methods=["POST"]),
        Route(path, read, methods=["GET"]),
        Route(path, change("destroy"), methods=["DELETE"]),
        Route(path + "/stop", change("stop"), methods=["POST"]),
        Route(path + "/start", change("start"), methods=["POST"]),
        Route(path + "/config", patch_config, methods=["PATCH"]),
    ]


async def _forward(
    ctx: AppContext, request: Request, town_id: str, sandbox_url: str, body: bytes
) -> Response:
    """PATCH the sandbox's /config with the body; answer with its status and JSON.

    502 when it cannot be reached, refuses our key, or does not answer JSON.
    """
    headers = {name: value for name in _FORWARDED_HEADERS if (value := request.headers.get(name))}
    headers.setdefault("content-type", "application/json")
    headers["x-internal-api-key"] = ctx.settings.internal_api_key
    url = sandbox_url.rstrip("/") + "/config"
    try:
        async with httpx.AsyncClient(timeout=ctx.settings.sandbox_timeout) as client:
            answer = await client.patch(url, content=body, headers=headers)
    except httpx.HTTPError as exc:
        log.warning("config_forward_failed", town_id=town_id, error=type(exc).__name__)
        message = f"The town's sandbox could not be reached ({type(exc).__name__})."
        raise ApiError(502, "sandbox_unreachable", message) from exc
    if answer.status_code in (401, 403):
        # Passed through, it would read as the dashboard's key being wrong; it is ours.
        log.warning("config_forward_refused", town_id=town_id, status=answer.status_code)
        message = "The sandbox refused the cloud's internal key; compare INTERNAL_API_KEY."
        raise ApiError(502, "sandbox_refused_key", message)
    try:
        data = answer.json()
    except ValueError as exc:
        raise ApiError(502, "bad_sandbox_answer", "The sandbox did not answer JSON.") from exc
    log.info("config_forwarded", town_id=town_id, status=answer.status_code)
    etag = {"etag": answer.headers["etag"]} if "etag" in answer.headers else None
    return JSONResponse(data, status_code=answer.status_code, headers=etag)
