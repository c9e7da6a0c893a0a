"""What both servers (the daemon's and the cloud's) mend in hypercorn before serving.

**A connection its client closed stays open for the whole keep-alive time.** hypercorn
(0.18.0, the pinned version, and its main branch as of this writing) reads a connection in
`TCPServer._read_data` inside the connection's task group, and once an answer is sent, an
idle task waits out `keep_alive_timeout` in that group. When the client closes, the read
loop ends, but the group waits for the idle task before the connection is closed: the
socket, its tasks and its buffers live on for the rest of that time (5 s here). Two ways in:

- The client closes after its answer. A client that shuts down its side first (httpx and
  anyio do) always hit it; a plain close hit it for 27 of 300 connections.
- The client shuts down its side right after sending its request. It got its answer, and
  then the idle wait started anyway: 20 of 20 were closed 5.0 s after the answer.

Measured on the daemon before the mend (`bench/daemon_bench.py` keeps a row of it): 300
httpx connections one after another, each closed after its answer, were all still open
0.2 s later; RSS went 38 → 70 MiB after 8,000 PATCHes on connections of their own (32 at a
time), and 38 → 77 MiB after 8,000 `GET /healthz`. The cloud would keep every sandbox's
refresh connection 5 s longer than it needs: at the ~400,000 calls a minute of 100,000
sandboxes late in a long outage (`bench/fleet.py`), some 33,000 descriptors at a time.

The mend: once the read loop has ended, stop the idle task, and start none after that.
Nothing can come on a connection whose client has closed. An answer still being sent is
not cut: the group ends once its task is done, and hypercorn closes the connection then.
After the mend, each connection was closed within a few milliseconds of its client's close,
in both ways, and RSS was 45 / 42 MiB after the same 8,000 PATCHes / `GET /healthz`.

`tests/daemon/http/test_server.py` shows the fault against the real hypercorn without the mend
(hypercorn's own methods stay at `__wrapped__`). That test fails once a hypercorn release
fixes the fault; this module can go then.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from hypercorn.asyncio.tcp_server import TCPServer
from hypercorn.events import Event, Updated

# Set on the class once mended, and on a connection once its client has closed.
_MENDED = "_sandboxd_mended"
_READ_ENDED = "_sandboxd_read_ended"


def release_closed_idle_connections() -> None:
    """Mend `TCPServer` (once per process) so that a connection whose client has closed is
    closed as soon as it is idle: the idle wait ends with the read loop, and none starts later."""
    if getattr(TCPServer, _MENDED, False):
        return
    read_data: Callable[[Any], Awaitable[None]] = TCPServer._read_data
    protocol_send: Callable[[Any, Event], Awaitable[None]] = TCPServer.protocol_send

    async def _read_data(self: Any) -> None:
        await read_data(self)
        setattr(self, _READ_ENDED, True)
        await self.idle_task.stop()

    async def _protocol_send(self: Any, event: Event) -> None:
        if isinstance(event, Updated) and event.idle and getattr(self, _READ_ENDED, False):
            return  # an answer sent after the client's close: no idle wait, the group ends
        await protocol_send(self, event)

    _read_data.__wrapped__ = read_data  # type: ignore[attr-defined]
    _protocol_send.__wrapped__ = protocol_send  # type: ignore[attr-defined]
    TCPServer._read_data = _read_data  # type: ignore[method-assign]
    TCPServer.protocol_send = _protocol_send  # type: ignore[method-assign]
    setattr(TCPServer, _MENDED, True)
