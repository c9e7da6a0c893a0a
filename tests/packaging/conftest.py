"""A stand-in cloud whose answers each test chooses, served by hypercorn on an ephemeral port.

The real cloud (tests/fixtures/cloud.py) proves the script against gastown_cloud; this stand-in
plays the broken, hostile and slow clouds the real one will never be.
"""

from __future__ import annotations

import os
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, cast

import anyio
import pytest
from hypercorn.asyncio import serve
from hypercorn.config import Config
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Route

if TYPE_CHECKING:
    from hypercorn.typing import ASGIFramework

Answer = Callable[[Request], Awaitable[Response]]


@dataclass(frozen=True)
class Recorded:
    """One request the stand-in received."""

    path: str
    headers: dict[str, str]
    body: bytes


@dataclass
class StandInCloud:
    """The refresh route of a cloud; `answer` decides each reply, `requests` records them."""

    url: str
    answer: Answer
    requests: list[Recorded] = field(default_factory=list)
    # Set at teardown so a handler that plays a hung cloud lets go.
    release: anyio.Event = field(default_factory=anyio.Event)

    def answer_text(self, body: str | bytes, status: int = 200) -> None:
        """Answer every request with `body` as text/plain and `status`."""

        async def answer(request: Request) -> Response:
            return PlainTextResponse(body, status_code=status)

        self.answer = answer


@pytest.fixture
async def standin_cloud() -> AsyncIterator[StandInCloud]:
    """A running stand-in cloud on 127.0.0.1; answers 500 until a test sets `answer`."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    sock.listen(64)
    port = sock.getsockname()[1]

    async def unset(request: Request) -> Response:
        return PlainTextResponse("no answer set", status_code=500)

    cloud = StandInCloud(url=f"http://127.0.0.1:{port}", answer=unset)

    async def refresh(request: Request) -> Response:
        cloud.requests.append(
            Recorded(request.url.path, dict(request.headers), await request.body())
        )
        return await cloud.answer(request)

    app = Starlette(routes=[Route("/api/gastown/refresh-token", refresh, methods=["POST"])])
    config = Config()
    # Hypercorn owns the listening socket from here on; detach so it is closed only once.
    config.bind = [f"fd://{sock.detach()}"]
    config.graceful_timeout = 1.0
    config.errorlog = None
    stop = anyio.Event()
    async with anyio.create_task_group() as tg:
        tg.start_soon(lambda: serve(cast("ASGIFramework", app), config, shutdown_trigger=stop.wait))
        try:
            yield cloud
        finally:
            cloud.release.set()
            stop.set()


@pytest.fixture
def proc_cmdlines() -> Callable[[], list[bytes]]:
    """Read the argv of every process on this machine (what `ps` shows to any user)."""

    def read() -> list[bytes]:
        found = []
        for entry in os.listdir("/proc"):
            if entry.isdigit():
                try:
                    with open(f"/proc/{entry}/cmdline", "rb") as handle:
                        found.append(handle.read())
                except OSError:
                    continue
        return found

    return read
