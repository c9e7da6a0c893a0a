"""The internal API (CONTRACT §4): routes and the key check.

One Starlette app per listener: the TCP one demands `x-internal-api-key`, the Unix-socket one
trusts the socket's file mode instead. Routes let errors propagate; `http/errors.py` answers
them.
"""

from __future__ import annotations

import hmac
import json
import os
from collections.abc import AsyncGenerator, Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from gastown_sandboxd._types import Clock, rfc3339
from gastown_sandboxd.errors import Problem, RequestRefused
from gastown_sandboxd.events import EventBus, parse_last_event_id, sse_stream
from gastown_sandboxd.gtsettings import ConfigSync, SettingsStore
from gastown_sandboxd.gtsettings.json_text import reject_constant
from gastown_sandboxd.http.errors import error_response, exception_handlers
from gastown_sandboxd.http.openapi import openapi_document
from gastown_sandboxd.ops import MetricsRegistry, SseClients
from gastown_sandboxd.token import LastError, TokenRefresher

MAX_PATCH_BYTES = 64 * 1024
MAX_TOKEN_BODY_BYTES = 16 * 1024
BODY_TIMEOUT = 10.0  # a peer that dribbles its body cannot hold a PATCH slot forever
_PATCH_TYPES = frozenset({"application/json", "application/merge-patch+json"})
_OPEN_PATHS = frozenset({"/healthz", "/readyz"})


@dataclass(frozen=True, kw_only=True)
class ApiContext:
    """What the routes read and drive."""

    town_id: str
    town_root: Path
    refresher: TokenRefresher
    store: SettingsStore
    bus: EventBus
    registry: MetricsRegistry
    clock: Clock
    watcher_status: Callable[[], Mapping[str, Any]]
    count_patch: Callable[[int], None] | None = None
    heartbeat: float = 15.0
    sse_clients: SseClients = field(default_factory=SseClients)
    config_sync: ConfigSync | None = None
    # For /status and for messages that must say which cloud failed.
    cloud_url: str = ""
    env_file: Path | None = None
    shim_dir: Path | None = None
    local_socket_status: Callable[[], Mapping[str, Any]] | None = None


def _time(timestamp: float | None) -> str | None:
    """RFC 3339 (None stays None)."""
    return None if timestamp is None else rfc3339(timestamp)


class KeyRequired:
    """ASGI middleware: every path but /healthz and /readyz needs the internal key."""

    def __init__(self, app: ASGIApp, key: str) -> None:
        self.app = app
        self._key = key.encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"] not in _OPEN_PATHS:
            given = b""
            for name, value in scope["headers"]:
                if name == b"x-internal-api-key":
                    given = value
                    break
            # compare_digest takes constant time for equal-length inputs and never short-cuts.
            if not hmac.compare_digest(given, self._key):
                response = error_response(
                    401, "unauthorized", "missing or wrong x-internal-api-key"
                )
                if _has_body(scope):
                    # The body stays unread: see CloseUnreadBody.
                    response.headers["connection"] = "close"
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)


class CloseUnreadBody:
    """ASGI middleware: an answer sent before the request body was read closes the connection.

    The server cannot reuse a connection whose request body is unread (a 401, 413 or 415
    answered early) and drops it; `Connection: close` tells the client not to send its next
    request into it.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not _has_body(scope):
            await self.app(scope, receive, send)
            return
        read = False

        async def tracked_receive() -> Message:
            nonlocal read
            message = await receive()
            if message["type"] == "http.disconnect" or not message.get("more_body", False):
                read = True
            return message

        async def tracked_send(message: Message) -> None:
            if message["type"] == "http.response.start" and not read:
                headers = [*message.get("headers", []), (b"connection", b"close")]
                message = {**message, "headers": headers}
            await send(message)

        await self.app(scope, tracked_receive, tracked_send)


class CountAnswers:
    """ASGI middleware of one route: `count(status)` for every answer it sends, the error
    answers of `http/errors.py` included."""

    def __init__(self, app: ASGIApp, count: Callable[[int], None]) -> None:
        self.app = app
        self._count = count

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        async def counted_send(message: Message) -> None:
            if message["type"] == "http.response.start":
                self._count(message["status"])
            await send(message)

        await self.app(scope, receive, counted_send)


def _has_body(scope: Scope) -> bool:
    for name, value in scope["headers"]:
        if name == b"transfer-encoding":
            return True
        if name == b"content-length":
            return value.strip() not in (b"", b"0")
    return False


def create_app(ctx: ApiContext, *, key: str | None) -> ASGIApp:
    """The API; `key` None serves without the key check (the Unix socket)."""
    api = _Routes(ctx)
    app = Starlette(
        routes=[
            Route("/healthz", api.healthz, methods=["GET"]),
            Route("/readyz", api.readyz, methods=["GET"]),
            Route("/status", api.status, methods=["GET"]),
            Route("/config", api.get_config, methods=["GET"]),
            Route(
                "/config",
                api.patch_config,
                methods=["PATCH"],
                middleware=[Middleware(CountAnswers, count=api.count_patch)],
            ),
            Route("/config/sync", api.sync_config, methods=["POST"]),
            Route("/token/refresh", api.refresh_token, methods=["POST"]),
            Route("/token", api.put_token, methods=["PUT"]),
            Route("/events", api.events, methods=["GET"]),
            Route("/metrics", api.metrics, methods=["GET"]),
            Route("/openapi.json", api.openapi, methods=["GET"]),
        ],
        exception_handlers=exception_handlers(cloud_url=lambda: ctx.cloud_url),
        middleware=[Middleware(CloseUnreadBody)],
    )
    return app if key is None else KeyRequired(app, key)


def _token_reason(state: str, *, has_token: bool) -> str:
    """Why /readyz is not ready on the token side, in words an operator can act on."""
    if not has_token:
        # The cloud refreshes only for a Bearer of the town: a first token must be given.
        return (
            "no token on disk: the cloud refreshes a town only for a Bearer of that town, so "
            "the first token must come from provisioning (createTown's token in the env file) "
            "or PUT /token"
        )
    return f"no unexpired acceptable token on disk (state {state})"


class _Routes:
    def __init__(self, ctx: ApiContext) -> None:
        self.ctx = ctx

    async def healthz(self, request: Request) -> Response:
        return JSONResponse({"status": "ok"})

    async def readyz(self, request: Request) -> Response:
        reasons = []
        status = self.ctx.refresher.status()
        if not status.token_on_disk_ok:
            reasons.append(_token_reason(status.state, has_token=status.token is not None))
        if not await anyio.to_thread.run_sync(_writable_folder, self.ctx.town_root):
            reasons.append("town root is not a writable folder")
        if reasons:
            return JSONResponse({"ready": False, "reasons": reasons}, status_code=503)
        return JSONResponse({"ready": True, "reasons": []})

    async def status(self, request: Request) -> Response:
        now = self.ctx.clock.time()
        status = self.ctx.refresher.status()
        body = {
            "town_id": self.ctx.town_id,
            "state": status.state,
            "token": status.token.as_json(now) if status.token is not None else None,
            "next_refresh_at": _time(status.next_refresh_at),
            "last_refresh_at": _time(status.last_refresh_at),
            "consecutive_failures": status.consecutive_failures,
            "last_error": _last_error(status.last_error),
            "config_revision": self.ctx.store.revision,
            "config_sync": self._sync_status(),
            "watcher": dict(self.ctx.watcher_status()),
            "subscribers": self.ctx.sse_clients.count,
            "last_event_id": self.ctx.bus.last_id,
            "env_file": str(self.ctx.env_file) if self.ctx.env_file else None,
            "shim_dir": str(self.ctx.shim_dir) if self.ctx.shim_dir else None,
            "local_socket": (
                dict(self.ctx.local_socket_status()) if self.ctx.local_socket_status else None
            ),
        }
        return JSONResponse(body)

    async def get_config(self, request: Request) -> Response:
        view = await self.ctx.store.view()
        return _json_answer(view.json_bytes(), etag=view.revision)

    async def patch_config(self, request: Request) -> Response:
        media_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if media_type not in _PATCH_TYPES:
            raise RequestRefused(
                415,
                "unsupported_media_type",
                "send application/json or application/merge-patch+json",
            )
        generation = _generation(request.headers.get("x-gastown-generation"))
        body = await _read_json_object(request, MAX_PATCH_BYTES)
        result = await self.ctx.store.patch(
            body, if_match=request.headers.get("if-match"), generation=generation
        )
        return _json_answer(result.json_bytes(), etag=result.revision)

    async def sync_config(self, request: Request) -> Response:
        if self.ctx.config_sync is None:
            raise RequestRefused(503, "sync_unavailable", "this daemon does not sync with a cloud")
        result = await self.ctx.config_sync.sync_now()
        return JSONResponse(result.as_json())

    def _sync_status(self) -> dict[str, Any]:
        if self.ctx.config_sync is None:
            generation = self.ctx.store.last_applied.applied.generation
            return {"generation": generation, "state": "pending", "last_sync_at": None}
        status = self.ctx.config_sync.status()
        return {**status, "last_sync_at": _time(status["last_sync_at"])}

    def count_patch(self, status: int) -> None:
        if self.ctx.count_patch is not None:
            self.ctx.count_patch(status)

    async def refresh_token(self, request: Request) -> Response:
        view = await self.ctx.refresher.refresh_now()
        return JSONResponse({"token": view.as_json(self.ctx.clock.time())})

    async def put_token(self, request: Request) -> Response:
        body = await _read_json_object(request, MAX_TOKEN_BODY_BYTES)
        token = body.get("token")
        if set(body) != {"token"} or not isinstance(token, str):
            raise RequestRefused(
                422,
                "invalid_body",
                'send {"token": "<jwt>"} and nothing else',
                [{"path": "/token", "message": "must be a string"}],
            )
        view = await self.ctx.refresher.accept(token)
        return JSONResponse({"token": view.as_json(self.ctx.clock.time())})

    async def events(self, request: Request) -> Response:
        headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
        if request.method == "HEAD":
            # Starlette answers HEAD on a GET route with the GET's handler: a stream, whose
            # body is never sent, held the connection and a subscription open for good.
            return Response(media_type="text/event-stream", headers=headers)
        last = parse_last_event_id(
            request.headers.get("last-event-id") or request.query_params.get("last_event_id")
        )
        # The stream counts itself as an SSE client (the bus also serves the hook dispatcher,
        # which is not one): no generator wrapped around it on every chunk.
        stream = sse_stream(
            self.ctx.bus,
            last_event_id=last,
            heartbeat=self.ctx.heartbeat,
            count=self._count_clients,
        )
        return EventStreamResponse(stream, media_type="text/event-stream", headers=headers)

    def _count_clients(self, change: int) -> None:
        self.ctx.sse_clients.count += change

    async def metrics(self, request: Request) -> Response:
        body, content_type = self.ctx.registry.exposition()
        return Response(body, media_type=content_type)

    async def openapi(self, request: Request) -> Response:
        return JSONResponse(openapi_document())


def _last_error(error: LastError | None) -> dict[str, str] | None:
    if error is None:
        return None
    return {"reason": str(error.reason), "at": _time(error.at) or "", "detail": error.detail}


def _generation(value: str | None) -> int | None:
    """`X-Gastown-Generation`: the cloud's generation of a pushed change, or 400."""
    if value is None:
        return None
    text = value.strip()
    if not text.isdigit() or not text.isascii() or len(text) > 18:
        raise RequestRefused(
            400,
            "invalid_generation",
            "X-Gastown-Generation must be a whole number (the cloud's generation)",
        )
    return int(text)


def _json_answer(body: bytes, *, etag: str) -> Response:
    # The bytes `JSONResponse` would send (`ANSWER_JSON`), assembled by the store from texts
    # each file's view keeps: the views are not encoded again on the event loop.
    return Response(body, media_type="application/json", headers={"ETag": f'"{etag}"'})


async def _read_json_object(request: Request, limit: int) -> dict[str, Any]:
    """The body as a JSON object, or 400/413 with a clear message."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise RequestRefused(413, "body_too_large", f"the body is larger than {limit} bytes")
    chunks: list[bytes] = []
    size = 0
    with anyio.move_on_after(BODY_TIMEOUT) as deadline:
        try:
            async for chunk in request.stream():
                size += len(chunk)
                if size > limit:
                    message = f"the body is larger than {limit} bytes"
                    raise RequestRefused(413, "body_too_large", message)
                chunks.append(chunk)
        except ClientDisconnect:
            # The peer closed before the whole body came (a 500 otherwise): nothing applies.
            raise RequestRefused(
                400, "incomplete_body", "the body ended before it was complete"
            ) from None
    if deadline.cancelled_caught:
        message = f"the body did not arrive within {BODY_TIMEOUT:.0f} s"
        raise RequestRefused(408, "body_timeout", message)
    try:
        # NaN and Infinity are Python's, not JSON's: 400 as any other body that is not JSON.
        body = json.loads(b"".join(chunks), parse_constant=reject_constant)
    except (UnicodeDecodeError, ValueError) as exc:  # json.JSONDecodeError is a ValueError
        problem = Problem("", f"not JSON: {exc}")
        raise RequestRefused(
            400, "invalid_json", "the body is not JSON", [problem.as_json()]
        ) from None
    except RecursionError:
        # ~60,000 `[` fit in the 64 KiB a body may have; the parser's recursion ends first.
        problem = Problem("", "not JSON this daemon reads: nested too deeply")
        raise RequestRefused(
            400, "invalid_json", "the body is not JSON", [problem.as_json()]
        ) from None
    if not isinstance(body, dict):
        raise RequestRefused(400, "invalid_json", "the body must be a JSON object")
    return body


def _writable_folder(path: Path) -> bool:
    return path.is_dir() and os.access(path, os.W_OK | os.X_OK)


class EventStreamResponse(StreamingResponse):
    """Starlette's `StreamingResponse` of an SSE stream, which it closes however the response
    ends, so that the subscription is gone with the connection.

    Starlette leaves the generator as it was when the response ends by an exception: a
    stream cut while its send waited (a reader that stopped reading, `cut_stalled_readers`)
    stayed subscribed, with its events, until a garbage collection found the generator (a
    reviewer: 5 such readers kept `subscribers` at 5 and RSS went from 38 to 108 MB)."""

    def __init__(self, stream: AsyncGenerator[bytes, None], **kwargs: Any) -> None:
        super().__init__(stream, **kwargs)
        self._stream = stream

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            with anyio.CancelScope(shield=True):
                await self._stream.aclose()
