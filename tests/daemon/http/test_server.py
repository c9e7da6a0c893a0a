"""The daemon's sockets accept connections from the moment they are bound, and hypercorn
releases a connection as soon as its client has closed it, stops its keep-alive timer
without a trip through the event loop, and runs that timer in one task (`_hypercorn.py`)."""

from __future__ import annotations

import asyncio
import errno
import json
import os
import socket
import subprocess
import sys
import time
import types
from collections.abc import AsyncIterator, Callable, Coroutine
from contextlib import asynccontextmanager
from functools import partial
from pathlib import Path
from typing import Any

import anyio
import anyio.to_thread
import pytest
from hypercorn.asyncio import serve
from hypercorn.asyncio.tcp_server import TCPServer
from hypercorn.asyncio.worker_context import AsyncioSingleTask, EventWrapper
from starlette.types import Receive, Scope, Send

from gastown_sandboxd._hypercorn import (
    Config,
    idle_wait_in_one_task,
    load_deferred,
    stop_timers_in_place,
)
from gastown_sandboxd.http import server
from gastown_sandboxd.http.server import bind_tcp, bind_unix, hypercorn_config, serve_socket
from gastown_sandboxd.options import parse_listen
from tests.fixtures.net import read_answer, seconds_to_release


def test_a_bound_tcp_socket_already_listens() -> None:
    """A client that connects before hypercorn runs waits in the backlog, never refused."""
    server = bind_tcp(parse_listen("127.0.0.1:0"))
    try:
        with socket.create_connection(server.getsockname()[:2], timeout=5) as client:
            accepted, _ = server.accept()
            client.sendall(b"x")
            assert accepted.recv(1) == b"x"
            accepted.close()
    finally:
        server.close()


def test_a_bound_unix_socket_already_listens(tmp_path: Path) -> None:
    """The local socket takes connections at once too, with its 0660 mode."""
    path = tmp_path / "d.sock"
    server = bind_unix(path)
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as client:
            client.settimeout(5)
            client.connect(str(path))
            accepted, _ = server.accept()
            accepted.close()
        assert path.stat().st_mode & 0o777 == 0o660
    finally:
        server.close()


def test_the_local_socket_is_bound_without_touching_the_umask(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The umask is the whole process's: `bind_unix` never sets it (a folder a worker thread
    makes meanwhile would take the socket's mask), and leaves no temporary name behind."""
    calls: list[int] = []

    def umask(mask: int) -> int:
        calls.append(mask)
        return 0o022

    monkeypatch.setattr(os, "umask", umask)
    server = bind_unix(tmp_path / "d.sock")
    server.close()
    assert calls == []
    assert (tmp_path / "d.sock").stat().st_mode & 0o777 == 0o660
    assert sorted(entry.name for entry in tmp_path.iterdir()) == ["d.sock"]


def test_a_stale_socket_is_replaced_in_one_step_and_anything_else_is_refused(
    tmp_path: Path,
) -> None:
    """A socket nobody serves is replaced by a rename (its path never missing); a file at
    the path is refused with EADDRINUSE and kept with its bytes."""
    path = tmp_path / "d.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as stale:
        stale.bind(str(path))
    inode = path.stat().st_ino
    server = bind_unix(path)
    try:
        assert path.stat().st_ino != inode
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as client:
            client.settimeout(5)
            client.connect(str(path))
    finally:
        server.close()
    path.unlink()
    path.write_text("notes")
    with pytest.raises(OSError, match="not a socket") as refused:
        bind_unix(path)
    assert (refused.value.errno, refused.value.filename) == (errno.EADDRINUSE, str(path))
    assert path.read_text() == "notes"
    assert sorted(entry.name for entry in tmp_path.iterdir()) == ["d.sock"]


async def _hello(scope: Scope, receive: Receive, send: Send) -> None:
    if scope["type"] != "http":
        return
    await send(
        {"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"2")]}
    )
    await send({"type": "http.response.body", "body": b"ok"})


Serve = Callable[[socket.socket, anyio.Event], Coroutine[Any, Any, None]]


@asynccontextmanager
async def _serving(tmp_path: Path, serve_on: Serve) -> AsyncIterator[Path]:
    path = tmp_path / "s.sock"
    sock = bind_unix(path)
    stop = anyio.Event()
    async with anyio.create_task_group() as group:
        group.start_soon(serve_on, sock, stop)
        try:
            yield path
        finally:
            stop.set()


async def _released(path: Path, *, before_the_answer: bool) -> float:
    # `seconds_to_release` in a worker thread: the server runs on this test's loop.
    request = b"GET / HTTP/1.1\r\nHost: s\r\n\r\n"
    release = partial(seconds_to_release, before_the_answer=before_the_answer)
    return await anyio.to_thread.run_sync(release, str(path), request, 20.0)


@pytest.mark.anyio
@pytest.mark.parametrize("before_the_answer", [False, True], ids=["after", "before"])
async def test_a_connection_its_client_closed_is_released_at_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, before_the_answer: bool
) -> None:
    """The daemon's server answers, then closes a connection as soon as the client has closed
    its side, whether before or after the answer, not after the keep-alive time (set to 60 s
    here, so that the two cannot be confused)."""
    monkeypatch.setattr(server, "HEADER_TIMEOUT", 60.0)

    async def serve_on(sock: socket.socket, stop: anyio.Event) -> None:
        await serve_socket(_hello, sock, stop)

    async with _serving(tmp_path, serve_on) as path:
        with anyio.fail_after(20):
            for _ in range(3):
                waited = await _released(path, before_the_answer=before_the_answer)
                print(f"closed by the server {waited * 1000:.1f} ms after the client's close")


@pytest.mark.anyio
@pytest.mark.parametrize("before_the_answer", [False, True], ids=["after", "before"])
async def test_hypercorn_alone_keeps_a_closed_connection_for_the_keep_alive_time(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, before_the_answer: bool
) -> None:
    """The fault `_hypercorn.py` mends, shown on the pinned hypercorn with its own methods:
    the connection lives until the keep-alive timer ends. When a hypercorn release fixes the
    fault, this test fails, and the mend can go."""
    keep_alive = 1.0
    for name in ("_read_data", "protocol_send"):
        method = getattr(TCPServer, name)
        monkeypatch.setattr(TCPServer, name, getattr(method, "__wrapped__", method))

    async def serve_on(sock: socket.socket, stop: anyio.Event) -> None:
        config = hypercorn_config(sock.detach())
        config.keep_alive_timeout = keep_alive
        await serve(_hello, config, shutdown_trigger=stop.wait, mode="asgi")  # type: ignore[arg-type]

    async with _serving(tmp_path, serve_on) as path:
        with anyio.fail_after(20):
            waited = await _released(path, before_the_answer=before_the_answer)
    print(f"closed by hypercorn alone {waited:.2f} s after the client's close")
    assert waited >= keep_alive * 0.9


async def _others_ran_during(mended: bool) -> list[str]:
    """What ran while a keep-alive timer was restarted and stopped: hypercorn's single task,
    mended or with its own methods, and one other ready task per call."""
    stop_timers_in_place()
    single = AsyncioSingleTask()
    if not mended:
        for name in ("restart", "stop"):
            method = getattr(AsyncioSingleTask, name)
            setattr(single, name, types.MethodType(method.__wrapped__, single))
    ran: list[str] = []

    async def other(name: str) -> None:
        ran.append(name)

    async with asyncio.TaskGroup() as group:
        holder = types.SimpleNamespace(_task_group=group)
        await single.restart(holder, partial(asyncio.sleep, 3600))
        await asyncio.sleep(0)  # the timer is running
        group.create_task(other("during restart"))
        await single.restart(holder, partial(asyncio.sleep, 3600))
        group.create_task(other("during stop"))
        await single.stop()
        return list(ran)  # before the group's end lets the other tasks run


@pytest.mark.anyio
async def test_the_keep_alive_timer_is_stopped_without_a_trip_through_the_loop() -> None:
    """Restarting or stopping a connection's keep-alive timer returns at once; with
    hypercorn's own methods each waits for the cancelled task, so the loop runs whatever
    else is ready first (a second callback for every request's head)."""
    assert await _others_ran_during(mended=True) == []
    assert await _others_ran_during(mended=False) == ["during restart", "during stop"]


class _IdleConnection:
    """What hypercorn's keep-alive timer uses of its `TCPServer`."""

    def __init__(self, keep_alive: float) -> None:
        self.config = types.SimpleNamespace(keep_alive_timeout=keep_alive)
        self.context = types.SimpleNamespace(terminated=EventWrapper())
        self.closed = 0

    async def _initiate_server_close(self) -> None:
        self.closed += 1


async def _idle_wait(mended: bool, *, server_ends: bool) -> tuple[int, int]:
    """(tasks made, closes) while one keep-alive timer waits, mended or as hypercorn has it,
    until the server ends (`server_ends`) or its keep-alive time (10 ms) has passed."""
    idle_wait_in_one_task()
    method: Any = TCPServer._idle_timeout
    wait = method if mended else method.__wrapped__
    connection = _IdleConnection(keep_alive=3600.0 if server_ends else 0.01)
    loop = asyncio.get_running_loop()
    made: list[object] = []

    def counting(loop: asyncio.AbstractEventLoop, coro: Any, **kwargs: Any) -> asyncio.Task[Any]:
        made.append(coro)
        return asyncio.Task(coro, loop=loop, **kwargs)

    timer = asyncio.create_task(wait(connection))
    loop.set_task_factory(counting)
    try:
        await asyncio.sleep(0)  # the timer is waiting
        if server_ends:
            await connection.context.terminated.set()
        with anyio.fail_after(20):
            await timer
    finally:
        loop.set_task_factory(None)
    return len(made), connection.closed


@pytest.mark.anyio
@pytest.mark.parametrize("server_ends", [True, False], ids=["server-ends", "keep-alive-time"])
async def test_the_keep_alive_timer_waits_in_one_task(server_ends: bool) -> None:
    """The mended timer ends as hypercorn's does (the connection closed once, when the server
    ends or when the keep-alive time has passed) and makes one task, the shielded close, as
    hypercorn's does; hypercorn's makes one more for `wait_for` on Python 3.11 (3.12's
    `wait_for` makes none)."""
    own = 2 if sys.version_info < (3, 12) else 1
    assert await _idle_wait(mended=True, server_ends=server_ends) == (1, 1)
    assert await _idle_wait(mended=False, server_ends=server_ends) == (own, 1)


def _answered(path: Path) -> socket.socket:
    client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    client.settimeout(20.0)
    client.connect(str(path))
    client.sendall(b"GET / HTTP/1.1\r\nHost: s\r\n\r\n")
    answer, close = read_answer(client)
    assert answer.startswith(b"HTTP/1.1 200 "), answer[:200]
    assert not close, "the server closed it itself"
    return client


def _seconds_until_closed(client: socket.socket) -> float:
    started = time.monotonic()
    with client:
        try:
            while client.recv(65536):
                pass
        except TimeoutError:
            pytest.fail("the server kept an idle connection open for 20 s")
    return time.monotonic() - started


@pytest.mark.anyio
async def test_the_server_closes_an_idle_connection_after_the_keep_alive_time(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Through the daemon's server (every mend applied): a connection left idle after its
    answer is closed by the server once the keep-alive time has passed, not before."""
    keep_alive = 0.3
    monkeypatch.setattr(server, "HEADER_TIMEOUT", keep_alive)

    async def serve_on(sock: socket.socket, stop: anyio.Event) -> None:
        await serve_socket(_hello, sock, stop)

    async with _serving(tmp_path, serve_on) as path:
        client = await anyio.to_thread.run_sync(_answered, path)
        waited = await anyio.to_thread.run_sync(_seconds_until_closed, client)
    print(f"closed by the server {waited:.2f} s after the answer")
    assert waited >= keep_alive * 0.8


@pytest.mark.anyio
async def test_stopping_the_server_closes_an_idle_connection_at_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A connection idle in its keep-alive time (60 s here) is closed as soon as the server
    stops, not when that time or the server's grace time (30 s here) runs out."""
    monkeypatch.setattr(server, "HEADER_TIMEOUT", 60.0)
    grace = 30.0

    async def serve_on(sock: socket.socket, stop: anyio.Event) -> None:
        await serve_socket(_hello, sock, stop, graceful_timeout=grace)

    async with _serving(tmp_path, serve_on) as path:  # its end stops the server and waits
        client = await anyio.to_thread.run_sync(_answered, path)
        stopping = time.monotonic()
    stopped_in = time.monotonic() - stopping
    waited = await anyio.to_thread.run_sync(_seconds_until_closed, client)
    print(f"stopped in {stopped_in:.2f} s; the connection closed {waited:.3f} s after that")
    assert stopped_in < grace


DEFERRED_PROBE = """
import json, sys
import gastown_sandboxd.daemon, gastown_cloud.server
from gastown_sandboxd import _hypercorn
unused = ("wsproto", "h2.connection", "hpack", "priority")
placeholders = [hasattr(sys.modules[m], "_sandboxd_placeholder") for m in _hypercorn.DEFERRED]
loaded = [m for m in unused if m in sys.modules]
real = _hypercorn.load_deferred("hypercorn.protocol.ws_stream")
print(json.dumps([placeholders, loaded, real.WSStream.__module__, "wsproto" in sys.modules]))
"""


def test_the_servers_import_hypercorn_without_http2_and_websocket() -> None:
    """Importing the daemon and the cloud's server leaves placeholders for hypercorn's HTTP/2
    protocol and WebSocket stream, so h2, hpack, priority and wsproto stay unloaded;
    `load_deferred` then brings in the real module (the e2e test serves both through curl)."""
    done = subprocess.run(
        [sys.executable, "-c", DEFERRED_PROBE],
        capture_output=True, text=True, timeout=60, check=True,
    )  # fmt: skip
    placeholders, loaded, loaded_from, wsproto_after = json.loads(done.stdout)
    assert (placeholders, loaded) == ([True, True], [])
    assert (loaded_from, wsproto_after) == ("hypercorn.protocol.ws_stream", True)


def test_a_deferred_module_that_fails_to_load_keeps_its_placeholder(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """`load_deferred` of a module that cannot be imported raises, and the placeholder stays."""
    placeholder = types.ModuleType("gastown_no_such_module")
    placeholder._sandboxd_placeholder = True  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "gastown_no_such_module", placeholder)
    with pytest.raises(ModuleNotFoundError):
        load_deferred("gastown_no_such_module")
    assert sys.modules["gastown_no_such_module"] is placeholder
    assert load_deferred("hypercorn.config") is sys.modules["hypercorn.config"]


@pytest.mark.anyio
async def test_a_reader_that_stops_reading_is_cut_after_the_send_timeout(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A client that asks for an endless stream and never reads: once the socket's buffers
    are full the server's send waits, and after `send_timeout` (0.3 s here) the connection
    is aborted and the app learns that its client is gone (its send raises, or `receive`
    says `http.disconnect`), where hypercorn waited for as long as the client stayed."""
    monkeypatch.setattr(Config, "send_timeout", 0.3)
    ended = anyio.Event()
    chunk = b"x" * 65536

    async def endless(scope: Scope, receive: Receive, send: Send) -> None:
        # As Starlette's StreamingResponse does: one task sends, one waits for the disconnect.
        if scope["type"] != "http":
            return

        async def stream() -> None:
            await send({"type": "http.response.start", "status": 200, "headers": []})
            while True:
                await send({"type": "http.response.body", "body": chunk, "more_body": True})

        async with anyio.create_task_group() as group:
            group.start_soon(stream)
            while (await receive())["type"] != "http.disconnect":
                pass
            ended.set()
            group.cancel_scope.cancel()

    async def serve_on(sock: socket.socket, stop: anyio.Event) -> None:
        await serve_socket(endless, sock, stop)

    async with _serving(tmp_path, serve_on) as path:
        client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        try:
            client.connect(str(path))
            client.sendall(b"GET /events HTTP/1.1\r\nHost: s\r\n\r\n")
            started = time.monotonic()
            with anyio.fail_after(20):
                await ended.wait()
            print(f"the app saw its client gone {time.monotonic() - started:.2f} s on")
            client.setblocking(False)
            received = 0
            with anyio.fail_after(20):
                while True:  # what the buffers held, then the end the abort made
                    try:
                        data = client.recv(1 << 20)
                    except BlockingIOError:
                        await anyio.sleep(0.01)
                        continue
                    except ConnectionResetError:
                        break
                    if not data:
                        break
                    received += len(data)
            assert received > 0
        finally:
            client.close()
