"""The internal API's error answers: one body, and one handler per error, registered once.

Every error answer is `{"error": code, "message": sentence, "details": [...]}` (CONTRACT §4).
Routes raise `RequestRefused` for a request refused as sent and let the errors of
`gastown_sandboxd.errors` propagate; `exception_handlers` answers each:

    RequestRefused            its status and code (415, 400 invalid_json, 413, 408…)
    ConfigError               its status and code, a detail per problem at its JSON pointer
    AtomicWriteError          503 storage_unavailable: the env file, the one file a route
                              writes itself (gt's files fail as ConfigError)
    RefreshError              409 town_inactive, or 502 refresh_failed, naming the cloud
    TokenError                422 token_not_acceptable, a detail per reason
    DesiredConfigUnavailable  its status (502, 503, 504), cloud_unavailable
    404, 405                  not_found; method_not_allowed with `Allow`

The key check (401) and the HTTP limits (431, 400) answer before any route, with
`error_response` too.
"""

from __future__ import annotations

import errno
from collections.abc import Callable, Mapping, Sequence
from typing import Any, TypeVar

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Match, Route
from starlette.types import ExceptionHandler

from gastown_sandboxd.errors import (
    AtomicWriteError,
    ConfigError,
    DesiredConfigUnavailable,
    RefreshError,
    RequestRefused,
    TokenError,
)
from gastown_sandboxd.ops.logs import JWT_WITH_HEADER, Redactor

_E = TypeVar("_E", bound=Exception)


def error_response(
    status: int,
    code: str,
    message: str,
    details: Sequence[Mapping[str, Any]] = (),
    *,
    headers: Mapping[str, str] | None = None,
) -> JSONResponse:
    """The error body with `status` (and `headers`, before the content headers).

    A JWT in it is shown by its fingerprint, as in the log (its header must be JSON here:
    a host name of three long labels in a message stays as it is): a checker's
    message or pointer names what the request sent, and a token sent as a crew member's name
    or an env variable's came back whole in the 422 (CONTRACT §2: no token in error bodies).
    """
    body = _REDACT.scrub_value({"error": code, "message": message, "details": list(details)})
    return JSONResponse(body, status_code=status, headers=headers)


_REDACT = Redactor(jwt=JWT_WITH_HEADER)


def exception_handlers(*, cloud_url: Callable[[], str]) -> dict[Any, ExceptionHandler]:
    """The handlers for `Starlette(exception_handlers=…)`.

    `cloud_url` names the cloud a failed refresh went to ("" when unknown); it is read at each
    answer, so the app can be built before its context is.
    """

    def refresh_failed(exc: RefreshError) -> JSONResponse:
        inactive = exc.kind == "inactive"
        detail = {"kind": exc.kind, "reason": exc.reason, "status": exc.status}
        url = cloud_url()
        cloud = f"the cloud at {url}" if url else "the cloud"
        message = f"{cloud} gave no new token ({exc.kind}: {exc.reason})"
        return error_response(
            409 if inactive else 502,
            "town_inactive" if inactive else "refresh_failed",
            message,
            [detail],
        )

    return {
        RequestRefused: _handler(RequestRefused, _refused),
        ConfigError: _handler(ConfigError, _config_error),
        AtomicWriteError: _handler(AtomicWriteError, _env_file_unwritten),
        RefreshError: _handler(RefreshError, refresh_failed),
        TokenError: _handler(TokenError, _token_not_acceptable),
        DesiredConfigUnavailable: _handler(DesiredConfigUnavailable, _cloud_unavailable),
        404: _not_found,
        405: _method_not_allowed,
    }


def _handler(kind: type[_E], answer: Callable[[_E], Response]) -> ExceptionHandler:
    """A Starlette handler answering errors of `kind` with `answer`."""

    async def handle(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, kind)
        return answer(exc)

    return handle


def _refused(exc: RequestRefused) -> JSONResponse:
    return error_response(exc.status, exc.code, exc.message, exc.details)


def _config_error(exc: ConfigError) -> JSONResponse:
    return error_response(exc.status, exc.code, exc.message, [p.as_json() for p in exc.details])


def _env_file_unwritten(exc: AtomicWriteError) -> JSONResponse:
    reason = errno.errorcode.get(exc.errno or 0, "an I/O error")
    message = f"the env file could not be written ({reason}); the old token is kept"
    return error_response(503, "storage_unavailable", message)


def _token_not_acceptable(exc: TokenError) -> JSONResponse:
    details = [{"path": "/token", "message": reason} for reason in exc.reasons]
    return error_response(422, "token_not_acceptable", "the token is not acceptable", details)


def _cloud_unavailable(exc: DesiredConfigUnavailable) -> JSONResponse:
    message = f"{exc.message}; nothing was written"
    return error_response(exc.status, "cloud_unavailable", message, [{"reason": exc.reason}])


async def _not_found(request: Request, exc: Exception) -> Response:
    return error_response(404, "not_found", f"no route {request.url.path}")


async def _method_not_allowed(request: Request, exc: Exception) -> Response:
    # RFC 9110 wants `Allow`; several routes may share the path (GET and PATCH /config).
    allowed = {
        method
        for route in request.app.routes
        if isinstance(route, Route) and route.matches(request.scope)[0] is not Match.NONE
        for method in route.methods or ()
    }
    message = f"{request.method} is not allowed here"
    headers = {"Allow": ", ".join(sorted(allowed))}
    return error_response(405, "method_not_allowed", message, headers=headers)
