"""HTTP serving: hypercorn on the TCP listen address and on the local Unix socket.

Sockets are bound here (so port 0 works and the socket gets mode 0660 before anyone can
connect) and handed to hypercorn as file descriptors. Hypercorn stops through
`shutdown_trigger`, which is how the daemon's task group ends it; it never touches signals.
`HttpLimits` refuses what h11 lets through: a header block over `MAX_HEADER_BYTES` that
arrives in one read (h11 bounds only a block still incomplete), and a request framed by both
`Content-Length` and `Transfer-Encoding` (400, connection closed: RFC 9112 §6.1).
A connection its client closed is released at once, not at the end of the keep-alive time
(`_hypercorn.py`).
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import secrets
import socket
import stat
from pathlib import Path

import anyio
import structlog
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Receive, Scope, Send

from gastown_sandboxd._hypercorn import Config, serve
from gastown_sandboxd.http.errors import error_response
from gastown_sandboxd.options import Listen

log = structlog.get_logger(__name__)

SOCKET_MODE = 0o660
HEADER_TIMEOUT = 5.0  # keep-alive timer: also how long a request head may take to arrive
MAX_HEADER_BYTES = 16 * 1024


# Listening from the moment of binding: a client that connects once `daemon_ready` is logged
# (or READY=1 sent) queues in the backlog rather than being refused before hypercorn starts.
BACKLOG = 128
# Random temporary names tried for a bind before giving up (each taken one: EADDRINUSE).
_TEMPORARY_NAMES = 5


def bind_tcp(listen: Listen) -> socket.socket:
    """A bound, listening TCP socket; port 0 picks a free port."""
    sock = socket.socket(listen.family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    try:
        sock.bind((listen.host, listen.port))
    except OSError as exc:
        sock.close()
        # Name the address: "Address already in use" alone does not say which.
        raise OSError(exc.errno, exc.strerror, str(listen)) from None
    sock.listen(BACKLOG)
    return sock


def bind_unix(path: Path, mode: int = SOCKET_MODE) -> socket.socket:
    """A listening Unix socket at `path` with `mode`, replacing a stale socket but nothing
    else (OSError EADDRINUSE, and it is left as it is).

    The caller holds the socket's lock (`ops.socket_lock`), so a socket already there is
    stale. The socket is bound at a short temporary name beside `path`, given `mode`, then
    renamed over `path`: it has its mode from the moment it has its name, and the process's
    umask is never changed. The umask is shared by every thread: set for a bind while the
    daemon runs (`local_socket.py` binds again), a folder a worker thread made meanwhile would
    have taken the socket's mask and lost its x bits. The temporary name is no longer than
    the socket's own name once that has 5 characters or more, so a path that fits fits both.
    """
    found = _lstat(path)
    if found is not None and not stat.S_ISSOCK(found.st_mode):
        raise OSError(errno.EADDRINUSE, "something that is not a socket is there", str(path))
    path.parent.mkdir(parents=True, exist_ok=True)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    hexes = max(4, min(12, len(path.name) - 1))  # the temporary name's length, less its dot
    temporary = path
    try:
        for attempt in range(_TEMPORARY_NAMES):
            temporary = path.with_name("." + secrets.token_hex(6)[:hexes])
            try:
                sock.bind(str(temporary))
                break
            except OSError as exc:
                if exc.errno != errno.EADDRINUSE or attempt == _TEMPORARY_NAMES - 1:
                    raise
        os.chmod(temporary, mode)
        os.rename(temporary, path)
    except OSError as exc:
        sock.close()
        if temporary != path:
            with contextlib.suppress(OSError):
                temporary.unlink()
        raise OSError(exc.errno, exc.strerror, str(path)) from None
    sock.listen(BACKLOG)
    return sock


def _lstat(path: Path) -> os.stat_result | None:
    try:
        return path.lstat()
    except FileNotFoundError:
        return None


def hypercorn_config(fd: int, *, graceful_timeout: float = 1.0) -> Config:
    """Limits chosen for a daemon that only talks to a few local peers."""
    config = Config()
    config.bind = [f"fd://{fd}"]
    config.accesslog = None
    config.errorlog = logging.getLogger("hypercorn.error")
    config.graceful_timeout = graceful_timeout
    config.keep_alive_timeout = HEADER_TIMEOUT
    # No read timeout: hypercorn applies it to every read, so it would cut SSE clients that only
    # listen. A peer that sends headers slowly is cut off by the keep-alive timer, which runs
    # until a request's headers are complete.
    config.read_timeout = None
    config.h11_max_incomplete_size = MAX_HEADER_BYTES  # header block limit
    config.backlog = BACKLOG
    config.include_server_header = False
    return config


async def serve_socket(
    app: ASGIApp,
    sock: socket.socket,
    shutdown: anyio.Event,
    *,
    graceful_timeout: float = 1.0,
) -> None:
    """Serve `app` on `sock` until `shutdown` is set; hypercorn takes ownership of `sock`."""
    config = hypercorn_config(sock.detach(), graceful_timeout=graceful_timeout)
    await serve(HttpLimits(app), config, shutdown_trigger=shutdown.wait)


class HttpLimits:
    """ASGI middleware: 431 for a header block over `max_header_bytes`, 400 for a request
    framed by both Content-Length and Transfer-Encoding; both close the connection."""

    def __init__(self, app: ASGIApp, max_header_bytes: int = MAX_HEADER_BYTES) -> None:
        self.app = app
        self.max_header_bytes = max_header_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            headers = scope["headers"]
            # Each header line is "name: value\r\n".
            size = sum(len(name) + len(value) + 4 for name, value in headers)
            names = {name for name, _ in headers}
            if size > self.max_header_bytes:
                message = f"the header block is larger than {self.max_header_bytes} bytes"
                await _refusal(431, "headers_too_large", message)(scope, receive, send)
                return
            if b"content-length" in names and b"transfer-encoding" in names:
                message = "send Content-Length or Transfer-Encoding, not both"
                await _refusal(400, "ambiguous_framing", message)(scope, receive, send)
                return
        await self.app(scope, receive, send)


def _refusal(status: int, code: str, message: str) -> JSONResponse:
    return error_response(status, code, message, headers={"connection": "close"})


def describe(sock: socket.socket) -> str:
    """A URL-ish name of a bound socket, for logs."""
    if sock.family == socket.AF_UNIX:
        return f"unix:{sock.getsockname()}"
    host, port = sock.getsockname()[:2]
    host = f"[{host}]" if ":" in host else host
    return f"http://{host}:{port}"
