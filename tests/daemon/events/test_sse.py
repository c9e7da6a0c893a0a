"""The SSE encoding of the bus, alone and over a real HTTP server."""

from __future__ import annotations

import gc
import json
import os
import socket
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from functools import partial

import anyio
import httpx
import pytest
from httpx_sse import ServerSentEvent, aconnect_sse
from hypercorn.asyncio import serve
from hypercorn.config import Config
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import StreamingResponse
from starlette.routing import Route

from gastown_sandboxd._hypercorn import Config as DaemonConfig
from gastown_sandboxd._hypercorn import serve as daemon_serve
from gastown_sandboxd.events.bus import EventBus
from gastown_sandboxd.events.sse import CONNECTED, HEARTBEAT, parse_last_event_id, sse_stream
from gastown_sandboxd.http.app import EventStreamResponse


@pytest.mark.parametrize(
    ("header", "expected"),
    [
        (None, None),
        ("", None),
        ("12", 12),
        (" 7 ", 7),
        ("0", 0),
        ("-1", None),
        ("1e3", None),
        ("abc", None),
        ("١٢", None),
        ("9" * 19, None),
    ],
)
def test_parse_last_event_id(header: str | None, expected: int | None) -> None:
    """Only a plain decimal number is an event id; garbage counts as no header."""
    assert parse_last_event_id(header) == expected


async def _frames(bus: EventBus, count: int, **kwargs: object) -> list[bytes]:
    stream = sse_stream(bus, **kwargs)  # type: ignore[arg-type]
    frames = []
    try:
        with anyio.fail_after(5):
            async for frame in stream:
                frames.append(frame)
                if len(frames) == count:
                    break
    finally:
        await stream.aclose()
    return frames


async def test_stream_encodes_events_as_frames() -> None:
    """Each event is an id/event/data frame with the event's one-line JSON."""
    bus = EventBus(now=lambda: 0.0)
    bus.emit("config.changed", {"scope": "rig", "rig": "frontend", "keys": ["role_agents"]})
    frames = await _frames(bus, 2, last_event_id=0)
    assert frames[0] == CONNECTED
    assert frames[1] == (
        b"id: 1\nevent: config.changed\ndata: "
        b'{"id":1,"type":"config.changed","time":"1970-01-01T00:00:00.000Z",'
        b'"scope":"rig","rig":"frontend","keys":["role_agents"]}\n\n'
    )


async def test_stream_sends_heartbeats_when_idle() -> None:
    """With no events, a `: heartbeat` comment comes every `heartbeat` seconds."""
    frames = await _frames(EventBus(), 3, last_event_id=None, heartbeat=0.05)
    assert frames == [CONNECTED, HEARTBEAT, HEARTBEAT]


async def test_stream_reports_a_gap() -> None:
    """An incomplete replay starts with an id-less `gap` frame."""
    bus = EventBus(history=2)
    for _ in range(4):
        bus.emit("token.refreshed", {})
    frames = await _frames(bus, 3, last_event_id=1)
    assert frames[1] == b'event: gap\ndata: {"last_event_id":1,"first_available_id":3}\n\n'
    assert frames[2].startswith(b"id: 3\n")


async def test_stream_ends_with_lagged_when_dropped() -> None:
    """A dropped reader gets its buffer, then `event: lagged` naming the last id, then the end."""
    bus = EventBus(subscriber_buffer=2)
    stream = sse_stream(bus, last_event_id=None)
    assert await anext(stream) == CONNECTED
    for _ in range(5):
        bus.emit("token.refreshed", {})
    rest = [chunk async for chunk in stream]
    assert len(rest) == 1  # what was waiting goes out as one chunk
    frames = [frame + b"\n\n" for frame in rest[0].split(b"\n\n") if frame]
    assert [frame.split(b"\n")[0] for frame in frames] == [b"id: 1", b"id: 2", b"event: lagged"]
    assert frames[-1] == b'event: lagged\ndata: {"last_event_id":2}\n\n'


async def test_a_burst_goes_out_as_one_chunk_in_order() -> None:
    """Events emitted together (a group of PATCHes) are one write, each frame as encoded once
    by the bus; a later event is the next chunk."""
    bus = EventBus()
    stream = sse_stream(bus, last_event_id=None)
    assert await anext(stream) == CONNECTED
    burst = [bus.emit("token.refreshed", {"n": n}) for n in range(3)]
    assert await anext(stream) == b"".join(event.frame for event in burst)
    later = bus.emit("token.refreshed", {"n": 3})
    assert await anext(stream) == later.frame


async def test_stream_ends_when_the_bus_closes() -> None:
    """Shutdown (bus.close) ends the stream without a lagged frame."""
    bus = EventBus()
    stream = sse_stream(bus, last_event_id=None)
    assert await anext(stream) == CONNECTED
    bus.close()
    assert [frame async for frame in stream] == []


async def test_the_stream_counts_itself_open_until_it_ends_however_it_ends() -> None:
    """`count` hears +1 at the first frame and -1 at the end: by the bus closing, by lagging,
    and by the reader leaving (the generator closed mid-stream)."""
    changes: list[int] = []
    bus = EventBus(subscriber_buffer=2)
    for ending in ("left", "lagged", "closed"):
        stream = sse_stream(bus, last_event_id=None, count=changes.append)
        assert changes.count(1) == changes.count(-1)
        assert await anext(stream) == CONNECTED
        assert sum(changes) == 1
        if ending == "left":
            await stream.aclose()
        elif ending == "lagged":
            for _ in range(5):
                bus.emit("token.refreshed", {})
            assert [chunk async for chunk in stream]
        else:
            bus.close()
            assert [chunk async for chunk in stream] == []
        assert sum(changes) == 0
    assert changes == [1, -1] * 3


def _app(bus: EventBus, heartbeat: float) -> Starlette:
    async def events(request: Request) -> StreamingResponse:
        last = parse_last_event_id(request.headers.get("last-event-id"))
        return StreamingResponse(
            sse_stream(bus, last_event_id=last, heartbeat=heartbeat),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache"},
        )

    return Starlette(routes=[Route("/events", events)])


@asynccontextmanager
async def _served(bus: EventBus, *, heartbeat: float = 15.0) -> AsyncIterator[str]:
    """Serve the SSE app with hypercorn on an ephemeral 127.0.0.1 port; yield its URL."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    sock.listen(16)
    port = sock.getsockname()[1]
    config = Config()
    # Hypercorn takes ownership of the descriptor it is given and closes it.
    config.bind = [f"fd://{os.dup(sock.fileno())}"]
    config.graceful_timeout = 0.2
    config.accesslog = None
    config.errorlog = None
    stop = anyio.Event()
    try:
        async with anyio.create_task_group() as tg:
            app = _app(bus, heartbeat)
            tg.start_soon(partial(serve, app, config, shutdown_trigger=stop.wait))  # type: ignore[arg-type]
            async with httpx.AsyncClient() as probe:
                with anyio.fail_after(10):
                    while True:
                        try:
                            await probe.get(f"http://127.0.0.1:{port}/missing")
                            break
                        except httpx.ConnectError:
                            await anyio.sleep(0.01)
            try:
                yield f"http://127.0.0.1:{port}/events"
            finally:
                bus.close()
                stop.set()
    finally:
        sock.close()


async def _collect(
    client: httpx.AsyncClient,
    url: str,
    until: Callable[[list[ServerSentEvent]], bool],
    *,
    last_event_id: int | None = None,
    connected: anyio.Event | None = None,
) -> list[ServerSentEvent]:
    headers = {} if last_event_id is None else {"Last-Event-ID": str(last_event_id)}
    seen: list[ServerSentEvent] = []
    async with aconnect_sse(client, "GET", url, headers=headers) as source:
        assert source.response.headers["content-type"].startswith("text/event-stream")
        assert source.response.headers["cache-control"] == "no-cache"
        if connected is not None:
            connected.set()
        async for sse in source.aiter_sse():
            seen.append(sse)
            if until(seen):
                break
    return seen


async def _until_subscribers(bus: EventBus, count: int) -> None:
    with anyio.fail_after(5):
        while bus.subscriber_count != count:
            await anyio.sleep(0.005)


async def test_sse_over_http_with_reconnect_loses_nothing() -> None:
    """Three clients get all events in order; one reconnects with Last-Event-ID and misses none."""
    bus = EventBus()
    results: dict[str, list[ServerSentEvent]] = {}
    async with _served(bus) as url, httpx.AsyncClient(timeout=10) as client:

        async def listen(name: str, total: int) -> None:
            results[name] = await _collect(client, url, lambda seen: len(seen) == total)

        async def reconnecting() -> None:
            first = await _collect(client, url, lambda seen: len(seen) == 20)
            again = await _collect(
                client, url, lambda seen: seen[-1].id == "60", last_event_id=int(first[-1].id)
            )
            results["reconnecting"] = first + again

        with anyio.fail_after(20):
            async with anyio.create_task_group() as tg:
                tg.start_soon(listen, "a", 60)
                tg.start_soon(listen, "b", 60)
                tg.start_soon(reconnecting)
                await _until_subscribers(bus, 3)
                for index in range(60):
                    bus.emit("config.changed", {"scope": "town", "n": index})
                    if index == 30:
                        await anyio.sleep(0.05)
    for name in ("a", "b", "reconnecting"):
        events = results[name]
        assert [int(sse.id) for sse in events] == list(range(1, 61)), name
        assert all(sse.event == "config.changed" for sse in events)
        assert [sse.json()["n"] for sse in events] == list(range(60))


async def test_sse_over_http_heartbeat() -> None:
    """An idle stream carries `: heartbeat` comments on the wire."""
    bus = EventBus()
    async with _served(bus, heartbeat=0.05) as url, httpx.AsyncClient(timeout=10) as client:
        body = b""
        with anyio.fail_after(10):
            async with client.stream("GET", url) as response:
                async for chunk in response.aiter_bytes():
                    body += chunk
                    if body.count(HEARTBEAT) >= 2:
                        break
    assert body.startswith(CONNECTED)


async def test_sse_over_http_lagged_then_resume() -> None:
    """A client dropped for lagging gets `event: lagged` and resumes after its last id."""
    bus = EventBus(subscriber_buffer=4)
    async with _served(bus) as url, httpx.AsyncClient(timeout=10) as client:
        connected = anyio.Event()
        results: list[ServerSentEvent] = []

        async def listen() -> None:
            results.extend(await _collect(client, url, lambda seen: False, connected=connected))

        with anyio.fail_after(10):
            async with anyio.create_task_group() as tg:
                tg.start_soon(listen)
                await connected.wait()
                for _ in range(20):
                    bus.emit("token.refreshed", {"exp": 1})
        assert [sse.event for sse in results] == ["token.refreshed"] * 4 + ["lagged"]
        last = json.loads(results[-1].data)["last_event_id"]
        assert last == 4
        with anyio.fail_after(10):
            rest = await _collect(client, url, lambda seen: seen[-1].id == "20", last_event_id=last)
        assert [int(sse.id) for sse in rest] == list(range(5, 21))


async def test_sse_client_disconnect_unsubscribes() -> None:
    """Closing the connection removes the subscriber from the bus."""
    bus = EventBus()
    async with _served(bus) as url, httpx.AsyncClient(timeout=10) as client:
        async with client.stream("GET", url) as response:
            await anext(response.aiter_bytes())
            assert bus.subscriber_count == 1
        await _until_subscribers(bus, 0)


async def test_a_reader_that_stops_reading_never_slows_the_others() -> None:
    """A client whose socket is never read fills its buffers and is dropped; a reader beside
    it gets every event, each as soon as it is emitted."""
    bus = EventBus(subscriber_buffer=8)
    padding = "x" * 100_000
    count = 160  # 16 MB: more than the stalled connection's socket buffers hold
    async with _served(bus) as url, httpx.AsyncClient(timeout=10) as client:
        host, port = url.removeprefix("http://").split("/")[0].split(":")
        stalled = socket.create_connection((host, int(port)))
        try:
            stalled.sendall(f"GET /events HTTP/1.1\r\nHost: {host}\r\n\r\n".encode())
            got = 0
            arrived = anyio.Event()

            def note(seen: list[ServerSentEvent]) -> bool:
                nonlocal got
                got = len(seen)
                arrived.set()
                return got == count

            with anyio.fail_after(30):
                async with anyio.create_task_group() as tg:
                    tg.start_soon(partial(_collect, client, url, note))
                    await _until_subscribers(bus, 2)
                    for index in range(count):
                        arrived = anyio.Event()
                        bus.emit("config.changed", {"n": index, "padding": padding})
                        await arrived.wait()
            assert got == count
            assert bus.dropped_subscribers == 1
        finally:
            stalled.close()


async def test_a_reader_cut_for_not_reading_is_unsubscribed_at_once(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Through the daemon's hypercorn (its mends, a send timeout of 0.3 s here) and its
    `EventStreamResponse`: a reader that never reads is cut once a send has waited that
    long, and its subscription goes with it. With Starlette's own StreamingResponse the
    generator stayed suspended and subscribed until a garbage collection found it (the
    collector is off here, as it may well be between its runs)."""
    monkeypatch.setattr(DaemonConfig, "send_timeout", 0.3)
    bus = EventBus()

    async def events(request: Request) -> StreamingResponse:
        stream = sse_stream(bus, last_event_id=None)
        return EventStreamResponse(stream, media_type="text/event-stream")

    app = Starlette(routes=[Route("/events", events)])
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    config = DaemonConfig()
    config.bind = [f"fd://{listener.detach()}"]
    config.graceful_timeout = 0.2
    config.accesslog = config.errorlog = None
    stop = anyio.Event()
    collecting = gc.isenabled()
    gc.disable()
    stalled = socket.socket()
    try:
        async with anyio.create_task_group() as tg:
            tg.start_soon(partial(daemon_serve, app, config, shutdown_trigger=stop.wait))
            stalled.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            with anyio.fail_after(10):
                while stalled.connect_ex(("127.0.0.1", port)) != 0:
                    await anyio.sleep(0.01)
            stalled.sendall(b"GET /events HTTP/1.1\r\nHost: d\r\n\r\n")
            try:
                await _until_subscribers(bus, 1)
                for index in range(40):  # ~4 MB, far past the buffers; fewer than would lag it
                    bus.emit("config.changed", {"n": index, "padding": "x" * 100_000})
                    await anyio.sleep(0)
                await _until_subscribers(bus, 0)
            finally:
                bus.close()
                stop.set()
    finally:
        stalled.close()
        if collecting:
            gc.enable()
