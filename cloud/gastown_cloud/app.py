"""The cloud's Starlette application: every route of the contract, JSON errors throughout."""

from __future__ import annotations

import time
from collections.abc import Callable

import structlog
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Match, Route

from ._http import AppContext, error_json
from .admission import RefreshAdmission
from .api_config import config_routes
from .api_gateway import gateway_routes
from .api_refresh import refresh_routes
from .api_towns import town_routes
from .errors import ApiError, GatewayError
from .openapi import openapi_document
from .settings import CloudSettings
from .store import Store

log = structlog.get_logger(__name__)


def create_app(
    settings: CloudSettings,
    store: Store,
    *,
    clock: Callable[[], float] = time.time,
    monotonic: Callable[[], float] = time.monotonic,
) -> Starlette:
    """The app serving `store` (already open); `clock` gives Unix seconds, `monotonic` the
    seconds of admission control (never stepping back)."""
    rate = settings.refresh_rate
    admission = None if rate is None else RefreshAdmission(rate)
    ctx = AppContext(
        settings=settings, store=store, clock=clock, admission=admission, monotonic=monotonic
    )
    document = openapi_document()

    async def openapi(request: Request) -> Response:
        ctx.require_key(request)
        return JSONResponse(document)

    routes = [
        Route("/openapi.json", openapi, methods=["GET"]),
        *town_routes(ctx),
        *config_routes(ctx),
        *refresh_routes(ctx),
        *gateway_routes(ctx),
    ]
    return Starlette(
        routes=routes,
        exception_handlers={
            ApiError: _api_error,
            GatewayError: _gateway_error,
            HTTPException: _http_error,
            Exception: _internal_error,
        },
    )


async def _api_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, ApiError)
    return error_json(exc)


async def _gateway_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, GatewayError)
    error = {"message": exc.message, "type": exc.type, "param": None, "code": exc.code}
    return JSONResponse({"error": error}, status_code=exc.status)


async def _http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
    message = {
        404: "No route matches this path.",
        405: "This route does not accept this method.",
    }.get(exc.status_code, "The request cannot be served.")
    headers = dict(exc.headers or {})
    if exc.status_code == 405:
        # RFC 9110 wants every method of the path in `Allow`; Starlette names one route's.
        allowed = {
            method
            for route in request.app.routes
            if isinstance(route, Route) and route.matches(request.scope)[0] is not Match.NONE
            for method in route.methods or ()
        }
        headers["allow"] = ", ".join(sorted(allowed))
    return JSONResponse(
        {"error": code, "message": message}, status_code=exc.status_code, headers=headers
    )


async def _internal_error(request: Request, exc: Exception) -> Response:
    log.error("request_failed", path=request.url.path, error=type(exc).__name__)
    body = {"error": "internal_error", "message": "The cloud failed to handle the request."}
    return JSONResponse(body, status_code=500)
