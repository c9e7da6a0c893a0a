"""hypercorn as both servers (the daemon's and the cloud's) use it: `serve` and `Config` come
from here, with HTTP/2 and WebSocket loaded on first use, and `serve` applies five mends: a
connection its client closed is released at once, the keep-alive timer is stopped without a
trip through the event loop, it waits in one task, not two, the answers hypercorn sends
itself for a request h11 refuses (400, 431, 501) carry the JSON error body every other error
has (they had no body: `error_answers_in_json`), and a client that stops reading is cut after
`Config.send_timeout` (30 s) rather than kept for as long as it stays (`cut_stalled_readers`).

**HTTP/2 and WebSocket load on first use.** hypercorn's protocol package imports its HTTP/2
protocol (h2's connection, hpack, priority; its type hints still load h2's events) and its
WebSocket stream (wsproto) whenever it is imported,
though both servers speak HTTP/1.1 to every client we have. Importing this module first puts
a placeholder in their place: the first connection that needs one (HTTP/2 with prior
knowledge, an `Upgrade: h2c`, a WebSocket handshake) loads the real module and is served by
it as before. Measured on 2 cores, median of 12 interleaved fresh processes importing the
daemon: CPU 336 → 301 ms, RSS 35.7 → 34.3 MiB. Nothing changes if hypercorn's protocol package
was imported before this module.

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

**The keep-alive timer costs a trip through the event loop on every request.** hypercorn
keeps a connection's keep-alive timer as a task (`AsyncioSingleTask`): each request stops it
(cancel, then wait for the cancelled task) and each answer starts a new one. The wait ends
only once the loop has run the cancelled task, so every request's head was handled in two
loop callbacks (160-210 us each, timed in the daemon) and everything else ready ran between
them. Cancelling is enough: the cancelled task ends on its own at its next step, inside the
connection's task group, which waits for it as it did, and a timer that had already fired
closes the connection under `asyncio.shield` either way. Side by side on 2 cores, three
runs of 4 interleaved rounds each (medians): wrk `GET /healthz` 2,468 -> 2,617, 2,463 ->
2,582 and 2,524 -> 2,654/s; wrk PATCHes 540 -> 607, 577 -> 551 and 555 -> 632/s; CPU per
`GET /healthz` one every 50 ms 1.13 -> 1.03, 1.13 -> 1.10 and 1.10 -> 1.10 ms; a paced
PATCH moved less than the host's noise. The first run mended by a `sitecustomize`, the other
two this module against the tree before it.

**The keep-alive timer waits in two tasks.** Each answer starts the timer as a task that
waits for the server's end with `asyncio.wait_for(..., keep_alive_timeout)`, and Python
3.11's `wait_for` runs what it waits for in a task of its own: two tasks made, run and
cancelled for every request on a connection, and their steps took loop iterations of their
own. The mended timer waits in its one task under `asyncio.timeout` (the same deadline, no
second task) and then closes the connection as before. Measured on the daemon, 1,000
`GET /healthz` on one connection (cProfile of the event loop's thread): loop iterations 6,989
-> 4,008, tasks made 3,002 -> 2,002. Instructions of the event loop's thread per request
(callgrind; 200 requests one every 20 ms, or 4 clients' 50 PATCHes each), the tree before
against this one: `GET /healthz` 1,177k -> 1,095k, PATCH 2,168k -> 2,093k, PATCHes of 4
clients 1,935k -> 1,854k. Timed, the host's noise (5-8 % between runs) is larger than that:
raw PATCH p50 1.68 -> 1.60 and 1.60 -> 1.58 ms, daemon CPU per paced PATCH 2.60 -> 2.81 and
2.68 -> 2.59 ms (two sets of 8 and 10 alternating rounds).
"""

from __future__ import annotations

import asyncio
import importlib
import json
import sys
import types
from collections.abc import Awaitable, Callable
from typing import Any

from starlette.types import ASGIApp

# The modules left unloaded until first use, each with the one name hypercorn takes from it.
DEFERRED = {"hypercorn.protocol.h2": "H2Protocol", "hypercorn.protocol.ws_stream": "WSStream"}
# Set on a placeholder module; on the class once mended, and on a connection once its client
# has closed.
_PLACEHOLDER = "_sandboxd_placeholder"
_MENDED = "_sandboxd_mended"
_READ_ENDED = "_sandboxd_read_ended"


def defer_unused_protocols() -> None:
    """Put a placeholder for each of `DEFERRED` in `sys.modules`, unless hypercorn's protocol
    package is already imported. Done once, when this module is imported."""
    if "hypercorn.protocol" in sys.modules:
        return
    for module, name in DEFERRED.items():
        placeholder = types.ModuleType(module, "loaded on first use (gastown_sandboxd._hypercorn)")
        setattr(placeholder, _PLACEHOLDER, True)
        setattr(placeholder, name, _loads_on_first_call(module, name))
        sys.modules.setdefault(module, placeholder)


def _loads_on_first_call(module: str, name: str) -> Callable[..., Any]:
    """A stand-in for the class `module.name`: calling it loads `module` and makes one."""

    def make(*args: Any, **kwargs: Any) -> Any:
        return getattr(load_deferred(module), name)(*args, **kwargs)

    make.__qualname__ = make.__name__ = name
    return make


def load_deferred(module: str) -> types.ModuleType:
    """The real `module`, imported in the placeholder's place if it has not been yet."""
    current = sys.modules.get(module)
    if current is not None and not getattr(current, _PLACEHOLDER, False):
        return current
    sys.modules.pop(module, None)
    try:
        return importlib.import_module(module)
    except BaseException:
        if current is not None:
            sys.modules[module] = current
        raise


defer_unused_protocols()

# After the placeholders: these import hypercorn's protocol package.
import h11  # noqa: E402  # hypercorn's HTTP/1.1 parser, loaded by the protocol above
from hypercorn.asyncio import serve as hypercorn_serve  # noqa: E402
from hypercorn.asyncio.tcp_server import TCPServer  # noqa: E402
from hypercorn.asyncio.worker_context import AsyncioSingleTask  # noqa: E402
from hypercorn.config import Config as HypercornConfig  # noqa: E402
from hypercorn.events import Closed, Event, RawData, Updated  # noqa: E402
from hypercorn.protocol.h11 import H11Protocol  # noqa: E402

# How long a send may wait for its peer to read (`cut_stalled_readers`).
SEND_TIMEOUT = 30.0


class Config(HypercornConfig):
    """hypercorn's `Config`, with `send_timeout`: the seconds a send may wait for its peer to
    read before the connection is cut (`cut_stalled_readers`; None: for ever, as hypercorn
    does)."""

    send_timeout: float | None = SEND_TIMEOUT


__all__ = [
    "SEND_TIMEOUT",
    "Config",
    "cut_stalled_readers",
    "error_answers_in_json",
    "idle_wait_in_one_task",
    "load_deferred",
    "release_closed_idle_connections",
    "serve",
    "stop_timers_in_place",
]


async def serve(
    app: ASGIApp, config: Config, *, shutdown_trigger: Callable[[], Awaitable[object]]
) -> None:
    """hypercorn's `serve` of an ASGI app until `shutdown_trigger` returns, with `TCPServer`
    mended first (`release_closed_idle_connections`, `stop_timers_in_place`,
    `idle_wait_in_one_task`, `error_answers_in_json`, `cut_stalled_readers`)."""
    release_closed_idle_connections()
    stop_timers_in_place()
    idle_wait_in_one_task()
    error_answers_in_json()
    cut_stalled_readers()
    # hypercorn's type hints predate Starlette's ASGIApp protocol; the app is plain ASGI 3.
    await hypercorn_serve(app, config, shutdown_trigger=shutdown_trigger, mode="asgi")  # type: ignore[arg-type]


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


def stop_timers_in_place() -> None:
    """Mend `AsyncioSingleTask` (once per process): `stop` and `restart` cancel the running
    task and return without waiting for it to end (see the module's docstring)."""
    if getattr(AsyncioSingleTask, _MENDED, False):
        return
    restart: Callable[..., Awaitable[None]] = AsyncioSingleTask.restart
    stop: Callable[[Any], Awaitable[None]] = AsyncioSingleTask.stop

    async def _restart(self: Any, task_group: Any, action: Callable[[], Awaitable[None]]) -> None:
        if self._handle is not None:
            self._handle.cancel()
        self._handle = task_group._task_group.create_task(action())

    async def _stop(self: Any) -> None:
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None

    _restart.__wrapped__ = restart  # type: ignore[attr-defined]
    _stop.__wrapped__ = stop  # type: ignore[attr-defined]
    AsyncioSingleTask.restart = _restart  # type: ignore[method-assign]
    AsyncioSingleTask.stop = _stop  # type: ignore[method-assign]
    setattr(AsyncioSingleTask, _MENDED, True)


def idle_wait_in_one_task() -> None:
    """Mend `TCPServer` (once per process): a connection's keep-alive timer waits for the
    server's end under `asyncio.timeout`, in its own task, where hypercorn's `wait_for` made a
    second; when either comes, the connection is closed as hypercorn closes it."""
    if getattr(TCPServer._idle_timeout, _MENDED, False):
        return
    idle_timeout: Callable[[Any], Awaitable[None]] = TCPServer._idle_timeout

    async def _idle_timeout(self: Any) -> None:
        try:
            async with asyncio.timeout(self.config.keep_alive_timeout):
                await self.context.terminated.wait()
        except TimeoutError:
            pass
        await asyncio.shield(self._initiate_server_close())

    _idle_timeout.__wrapped__ = idle_timeout  # type: ignore[attr-defined]
    setattr(_idle_timeout, _MENDED, True)
    TCPServer._idle_timeout = _idle_timeout  # type: ignore[method-assign]


# hypercorn's own refusals, before any request reaches the app: a head h11 cannot parse (or
# one past its buffer), a transfer coding it does not serve.
_HTTP_REFUSALS = {
    400: ("bad_request", "the request could not be read as HTTP/1.1 (malformed, or cut short)"),
    431: ("headers_too_large", "the request's header block is too large"),
    501: ("not_implemented", "the request's transfer coding is not served"),
}


def error_answers_in_json() -> None:
    """Mend `H11Protocol` (once per process): the answers hypercorn sends itself when h11
    refuses a request (400, 431, 501) carry the JSON error body every other error has
    (CONTRACT §4, §7: errors are JSON), where hypercorn's had none."""
    if getattr(H11Protocol._send_error_response, _MENDED, False):
        return
    send_error_response: Callable[[Any, int], Awaitable[None]] = H11Protocol._send_error_response

    async def _send_error_response(self: Any, status_code: int) -> None:
        code, message = _HTTP_REFUSALS.get(status_code, ("http_error", "the request is refused"))
        body = json.dumps({"error": code, "message": message, "details": []}).encode()
        headers = [
            (b"content-type", b"application/json"),
            (b"content-length", str(len(body)).encode()),
            (b"connection", b"close"),
            *self.config.response_headers("h11"),
        ]
        await self._send_h11_event(h11.Response(status_code=status_code, headers=headers))
        await self._send_h11_event(h11.Data(data=body))
        await self._send_h11_event(h11.EndOfMessage())

    _send_error_response.__wrapped__ = send_error_response  # type: ignore[attr-defined]
    setattr(_send_error_response, _MENDED, True)
    H11Protocol._send_error_response = _send_error_response  # type: ignore[method-assign]


def cut_stalled_readers() -> None:
    """Mend `TCPServer` (once per process): a send that waits longer than the config's
    `send_timeout` for its peer to read (the socket's buffers full, hypercorn in `drain`)
    aborts the connection, and the app sees the client gone.

    Without it, a client that stops reading but stays connected (an SSE reader stopped with
    Ctrl-Z, a peer whose process hangs, a slow-reading client on purpose) kept its socket, its
    tasks and the stream's buffers for as long as it stayed: the event bus drops such a
    subscriber 256 events behind, but its stream waited in the send for ever and never got to
    say `lagged` or end. A reader that reads, however slowly, never waits that long: a send
    waits only once the kernel's buffers and asyncio's (64 KiB) are full.
    """
    if getattr(TCPServer.protocol_send, "_sandboxd_cuts_stalled", False):
        return
    protocol_send: Callable[[Any, Event], Awaitable[None]] = TCPServer.protocol_send

    async def _protocol_send(self: Any, event: Event) -> None:
        timeout = getattr(self.config, "send_timeout", None)
        if timeout is None or not isinstance(event, RawData) or _cannot_wait(self, event.data):
            await protocol_send(self, event)
            return
        try:
            async with asyncio.timeout(timeout):
                await protocol_send(self, event)
        except TimeoutError:
            self.writer.transport.abort()
            await self.protocol.handle(Closed())

    _protocol_send.__wrapped__ = protocol_send  # type: ignore[attr-defined]
    _protocol_send._sandboxd_cuts_stalled = True  # type: ignore[attr-defined]
    TCPServer.protocol_send = _protocol_send  # type: ignore[method-assign]


def _cannot_wait(server: Any, data: bytes) -> bool:
    # asyncio's drain waits only once the transport's buffer passes its high mark: below it,
    # no timer is armed (`asyncio.timeout` costs ~5 us a send, the check ~0.3 us).
    transport = server.writer.transport
    return bool(
        transport.get_write_buffer_size() + len(data) <= transport.get_write_buffer_limits()[1]
    )
