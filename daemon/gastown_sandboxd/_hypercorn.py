"""What both servers (the daemon's and the cloud's) mend in hypercorn before serving.

**A connection its client closed while idle stays open for the whole keep-alive time.**
hypercorn (0.18.0, the pinned version, and its main branch as of this writing) reads a
connection in `TCPServer._read_data` inside the connection's task group. Once an answer is
sent, an idle task waits out `keep_alive_timeout` in that group. When the client then closes,
the read loop ends, but the group waits for the idle task before the connection is closed.
So the socket, its tasks and its buffers live on for the rest of that time (5 s here).

A client that shuts down its side before closing (httpx and anyio do this) always hits it.
A plain close hit it for 27 of 300 connections. Measured on the daemon before this fix
(`bench/daemon_bench.py` keeps the row):

- 300 httpx connections one after another, each closed after its answer: all 300 file
  descriptors still open 0.2 s later.
- RSS 38 → 70 MiB after 8,000 PATCHes, each on a connection of its own (32 at a time).
- RSS 38 → 77 MiB after 8,000 `GET /healthz`, each on a connection of its own.

The cloud would keep every sandbox's refresh connection 5 s longer than it needs. During
a fleet's recovery that is tens of thousands of descriptors.

The mend: once the read loop has ended, stop the idle task too. Nothing can come on a
connection whose client has closed. An answer still being sent is not affected: the idle
task does not run while a request is in flight, and hypercorn closes the connection itself
when that answer is done. With the mend, every connection was released within 0.01 s of its
client's close. RSS was 45 / 42 MiB after the same 8,000 PATCHes / `GET /healthz`.

`tests/daemon/http/test_server.py` shows the fault against the real hypercorn without the mend
(hypercorn's own method stays at `__wrapped__`). That test fails once a hypercorn release
fixes the fault; this module can go then.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from hypercorn.asyncio.tcp_server import TCPServer

_MENDED = "_sandboxd_releases_closed_idle_connections"


def release_closed_idle_connections() -> None:
    """Mend `TCPServer._read_data` so that a client's close also ends the idle wait (once)."""
    read_data: Callable[[Any], Awaitable[None]] = TCPServer._read_data
    if getattr(read_data, _MENDED, False):
        return

    async def _read_data(self: Any) -> None:
        await read_data(self)
        await self.idle_task.stop()

    setattr(_read_data, _MENDED, True)
    _read_data.__wrapped__ = read_data  # type: ignore[attr-defined]
    TCPServer._read_data = _read_data  # type: ignore[method-assign]
