"""Town routes: create (mints the first token), read, stop, start, destroy (config: api_config)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import structlog
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from ._http import AppContext
from .errors import ApiError
from .models import CreateTown
from .store import Store, Town, TownStatus
from .tokens import TokenClaims, fingerprint, mint_gastown_token

log = structlog.get_logger(__name__)

# action -> (new status, statuses it may start from); a destroyed town stays destroyed.
TRANSITIONS: dict[str, tuple[TownStatus, tuple[TownStatus, ...]]] = {
    "stop": ("stopped", ("active", "stopped")),
    "start": ("active", ("active", "stopped")),
    "destroy": ("destroyed", ("active", "stopped", "destroyed")),
}


async def create_town(
    store: Store,
    body: CreateTown,
    *,
    secret: str,
    lifetime: int,
    claims: TokenClaims,
    now: float,
) -> tuple[Town, str]:
    """createTown: the town in the store and its first token (route and terminal alike)."""
    town = await store.create_town(
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
        secret=secret,
        lifetime=lifetime,
        now=int(now),
        claims=claims,
    )
    return town, token


def town_routes(ctx: AppContext) -> list[Route]:
    async def create(request: Request) -> Response:
        ctx.require_key(request)
        body = await ctx.read_model(request, CreateTown)
        town, token = await create_town(
            ctx.store,
            body,
            secret=ctx.settings.nextauth_secret,
            lifetime=ctx.settings.token_lifetime,
            claims=ctx.settings.token_claims,
            now=ctx.clock(),
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

    path = "/api/gastown/towns/{town_id}"
    return [
        Route("/api/gastown/towns", create, methods=["POST"]),
        Route(path, read, methods=["GET"]),
        Route(path, change("destroy"), methods=["DELETE"]),
        Route(path + "/stop", change("stop"), methods=["POST"]),
        Route(path + "/start", change("start"), methods=["POST"]),
    ]
