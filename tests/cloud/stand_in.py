"""A stand-in sandbox: a real HTTP server on 127.0.0.1 that records each `PATCH /config`
(over HTTPS with a test CA's certificate: `running_stand_in(tls=…)`).

It answers with `reply` (a Response, or a function of the request count giving one), after
`delay` seconds (to widen the window in which two pushes could overlap: `most_in_flight` counts
them); while `hold` is set to an unset event, it answers only once the event is set (hung).
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import anyio
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from gastown_cloud.server import bind_socket, serve_app, socket_url
from tests.fixtures.net import LocalCA

APPLIED = {"changed": True, "revision": "r2", "files": ["settings/config.json"]}


def applied_reply() -> Response:
    return JSONResponse(APPLIED, headers={"etag": '"r2"'})


@dataclass
class StandIn:
    """The stand-in's URL, what it received (headers, body) and what it answers."""

    url: str = ""
    received: list[tuple[dict[str, str], bytes]] = field(default_factory=list)
    reply: Response | Callable[[int], Response] = field(default_factory=applied_reply)
    hold: anyio.Event | None = None
    delay: float = 0.0
    in_flight: int = 0
    most_in_flight: int = 0

    def bodies(self) -> list[Any]:
        """Each received body as JSON, in order."""
        return [json.loads(body) for _, body in self.received]


@pytest.fixture
async def sandbox() -> AsyncIterator[StandIn]:
    """A stand-in for the daemon's PATCH /config on an ephemeral port."""
    async with running_stand_in() as stand_in:
        yield stand_in


@contextlib.asynccontextmanager
async def running_stand_in(tls: LocalCA | None = None) -> AsyncIterator[StandIn]:
    """A stand-in sandbox serving until the block ends; over HTTPS with `tls`'s certificate."""
    stand_in = StandIn()

    async def patch_config(request: Request) -> Response:
        stand_in.received.append((dict(request.headers), await request.body()))
        stand_in.in_flight += 1
        stand_in.most_in_flight = max(stand_in.most_in_flight, stand_in.in_flight)
        try:
            if stand_in.hold is not None:
                await stand_in.hold.wait()
            await anyio.sleep(stand_in.delay)
        finally:
            stand_in.in_flight -= 1
        reply = stand_in.reply
        return reply if isinstance(reply, Response) else reply(len(stand_in.received))

    app = Starlette(routes=[Route("/config", patch_config, methods=["PATCH"])])
    sock = bind_socket("127.0.0.1", 0)
    stand_in.url = socket_url(sock, tls=tls is not None)
    served = None if tls is None else (tls.cert, tls.key)
    stop = anyio.Event()
    async with anyio.create_task_group() as tg:
        tg.start_soon(lambda: serve_app(app, sock, shutdown_trigger=stop.wait, tls=served))
        try:
            yield stand_in
        finally:
            if stand_in.hold is not None:
                stand_in.hold.set()
            stop.set()


def closed_url() -> str:
    """The URL of a port on 127.0.0.1 where nothing listens (bound, then closed)."""
    sock = bind_socket("127.0.0.1", 0)
    url = socket_url(sock)
    sock.close()
    return url
