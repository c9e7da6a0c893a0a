"""The gateway: OpenAI chat completions paid by a town's token, and the usage they recorded.

A token that is missing, badly signed, expired or of another type gets 401 (with
`--token-claims kilo` also one without Kilo's `kiloUserId` and `version: 3`); a well-signed
token whose town is unknown, owned by someone else, stopped or destroyed gets 403
(`permission_error`): the token is genuine but the town may not spend. Errors here use
OpenAI's shape `{"error": {"message", "type", "param", "code"}}` so OpenAI clients show them.
"""

from __future__ import annotations

import structlog
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from ._http import AppContext, bearer_token, validate
from ._time import rfc3339
from .completions import complete
from .errors import ApiError, GatewayError, TokenInvalid
from .models import ChatRequest
from .store import Usage
from .tokens import GastownClaims, TokenClaims, verify_gastown_token

log = structlog.get_logger(__name__)
_TOKEN_CODES = {"expired": "token_expired", "wrong_type": "wrong_token_type"}


def gateway_routes(ctx: AppContext) -> list[Route]:
    async def chat_completions(request: Request) -> Response:
        claims = _authenticate(ctx, request)
        try:
            body = validate(ChatRequest, await ctx.read_json(request))
        except ApiError as exc:
            raise GatewayError(exc.status, "invalid_request_error", exc.code, exc.message) from exc
        if body.stream:
            raise GatewayError(
                400, "invalid_request_error", "stream_unsupported", "Streaming is not supported."
            )
        town = await ctx.store.get_town(claims.town_id)
        if town is None or town.user_id != claims.sub or town.status != "active":
            log.warning("gateway_refused", town_id=claims.town_id, reason="town_not_active")
            raise GatewayError(
                403, "permission_error", "town_not_active", "The token's town is not active."
            )
        now = ctx.clock()
        answer = complete(body, created=int(now))
        # Charged as the cloud records the town: its owner and organization, not what the
        # token says (one with another organization_id was charged to that one).
        usage = Usage(
            user_id=town.user_id,
            organization_id=town.organization_id,
            town_id=town.id,
            model=body.model,
            prompt_tokens=answer["usage"]["prompt_tokens"],
            completion_tokens=answer["usage"]["completion_tokens"],
            at=rfc3339(now),
        )
        await ctx.store.record_usage(usage)
        log.info("gateway_completion", town_id=town.id, user_id=claims.sub, model=body.model)
        return JSONResponse(answer)

    async def usage(request: Request) -> Response:
        ctx.require_key(request)
        town_id = request.query_params.get("townId", "")
        if not town_id:
            raise ApiError(400, "invalid_request", "The query parameter townId is required.")
        await ctx.town(town_id)
        records = await ctx.store.list_usage(town_id)
        return JSONResponse({"usage": [record.as_json() for record in records]})

    return [
        Route("/api/gateway/chat/completions", chat_completions, methods=["POST"]),
        Route("/api/gastown/usage", usage, methods=["GET"]),
    ]


def _authenticate(ctx: AppContext, request: Request) -> GastownClaims:
    """The verified claims of the Bearer token, or 401 in OpenAI's shape."""
    token = bearer_token(request.headers.get("authorization"))
    if token is None:
        raise GatewayError(
            401, "authentication_error", "missing_token", "A Bearer gateway token is required."
        )
    try:
        claims = verify_gastown_token(
            token, secret=ctx.settings.nextauth_secret, now=int(ctx.clock())
        )
    except TokenInvalid as exc:
        log.warning("gateway_refused", reason=exc.reason)
        code = _TOKEN_CODES.get(exc.reason, "invalid_token")
        raise GatewayError(
            401, "authentication_error", code, f"The gateway token is refused: {exc.message}."
        ) from exc
    if ctx.settings.token_claims is TokenClaims.KILO and not claims.kilo_rule_met():
        log.warning("gateway_refused", reason="not_kilo_claims")
        raise GatewayError(
            401,
            "authentication_error",
            "invalid_token",
            "The gateway token is refused: it lacks kiloUserId or version 3.",
        )
    return claims
