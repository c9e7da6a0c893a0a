"""The cloud server: the app on hypercorn, over a socket bound before serving (so port 0 works)."""

from __future__ import annotations

import logging
import socket
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import anyio
import anyio.abc
import structlog
from starlette.types import ASGIApp

from gastown_sandboxd._hypercorn import Config, serve

from .app import create_app
from .settings import CloudSettings
from .store import Store

log = structlog.get_logger(__name__)


def bind_socket(host: str, port: int) -> socket.socket:
    """A listening TCP socket on (host, port); port 0 picks a free one."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(128)
    except OSError:
        sock.close()
        raise
    return sock


def socket_url(sock: socket.socket, *, tls: bool = False) -> str:
    """`http://HOST:PORT` (`https://` with `tls`) of a bound socket (IPv6 hosts in brackets)."""
    host, port = sock.getsockname()[:2]
    scheme = "https" if tls else "http"
    return f"{scheme}://[{host}]:{port}" if ":" in host else f"{scheme}://{host}:{port}"


async def serve_app(
    app: ASGIApp,
    sock: socket.socket,
    *,
    shutdown_trigger: Callable[[], Awaitable[object]],
    tls: tuple[Path, Path] | None = None,
    graceful_timeout: float = 5.0,
) -> None:
    """Serve `app` with hypercorn on `sock` (hypercorn takes the socket over) until the
    trigger; over TLS with `tls`, a (certificate chain, key) pair of PEM files. Requests
    under way at the trigger get `graceful_timeout` seconds to end."""
    config = Config()
    config.bind = [f"fd://{sock.detach()}"]
    if tls is not None:
        config.certfile, config.keyfile = str(tls[0]), str(tls[1])
    config.accesslog = None
    config.errorlog = logging.getLogger("hypercorn.error")  # through the JSON lines (logs.py)
    config.graceful_timeout = graceful_timeout
    # A sandbox's refresh connection is released when it closes, not 5 s later (`_hypercorn`).
    await serve(app, config, shutdown_trigger=shutdown_trigger)


class Server:
    """Binds, opens the store, then serves until `stop()` (graceful) or cancellation."""

    def __init__(self, settings: CloudSettings, *, clock: Callable[[], float] = time.time) -> None:
        self.settings = settings
        self.url: str | None = None
        self._clock = clock
        self._stop = anyio.Event()

    def stop(self) -> None:
        self._stop.set()

    async def run(
        self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED
    ) -> None:
        sock = bind_socket(self.settings.host, self.settings.port)
        try:
            self.url = socket_url(sock, tls=self.settings.tls is not None)
            async with Store(self.settings.db) as store:
                app = create_app(self.settings, store, clock=self._clock)
                log.info(
                    "cloud_listening",
                    url=self.url,
                    db=str(self.settings.db),
                    token_claims=str(self.settings.token_claims),
                    refresh_rate=self.settings.refresh_rate,
                )
                if self.settings.allow_unbound_refresh:
                    log.warning(
                        "refresh_binding_off",
                        detail="--allow-unbound-refresh: the internal key alone refreshes any "
                        "town; use it only for the seed's key-only cron line",
                    )
                task_status.started()
                # A push to a sandbox under way at a stop takes up to `sandbox_timeout`: its
                # dashboard gets the answer instead of an empty 500.
                await serve_app(
                    app,
                    sock,
                    shutdown_trigger=self._stop.wait,
                    tls=self.settings.tls,
                    graceful_timeout=self.settings.sandbox_timeout + 5.0,
                )
                log.info("cloud_stopped")
        finally:
            sock.close()
