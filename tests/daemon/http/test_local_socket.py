"""The local socket kept at its path: removed, it is bound again; anything else found there,
or a lock another daemon took, is left as it is. Real sockets, real hypercorn, real files."""

from __future__ import annotations

import errno
import os
import shutil
import socket
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest
from structlog.testing import capture_logs

from gastown_sandboxd.http import local_socket
from gastown_sandboxd.http.local_socket import LocalSocket
from gastown_sandboxd.http.server import bind_unix
from gastown_sandboxd.ops.socket_lock import SocketLock, owner_pid
from tests.waiting import eventually


async def hello(
    scope: dict[str, Any], receive: Callable[..., Any], send: Callable[..., Any]
) -> None:
    """The smallest ASGI app: 200 "hello" to every request."""
    if scope["type"] == "lifespan":
        while (await receive())["type"] != "lifespan.shutdown":
            await send({"type": "lifespan.startup.complete"})
        await send({"type": "lifespan.shutdown.complete"})
        return
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": b"hello"})


async def answers(path: Path) -> bool:
    """Whether a new connection to `path` gets the app's answer."""
    transport = httpx.AsyncHTTPTransport(uds=str(path))
    async with httpx.AsyncClient(transport=transport, base_url="http://sandboxd") as client:
        try:
            return (await client.get("/", timeout=5)).text == "hello"
        except httpx.TransportError:
            return False


@asynccontextmanager
async def serving(path: Path, interval: float = 3600.0) -> AsyncIterator[LocalSocket]:
    """A `LocalSocket` at `path`, its lock held, served until the block ends."""
    lock = SocketLock(path)
    lock.acquire()
    local = LocalSocket(bind_unix(path), lock, interval=interval)
    shutdown = anyio.Event()
    try:
        async with anyio.create_task_group() as tg:
            await tg.start(local.run, hello, shutdown)
            assert await answers(path)
            yield local
            shutdown.set()
    finally:
        local.remove()
        lock.release()


async def looked(local: LocalSocket, times: int = 1) -> None:
    """Ask for a look at the path `times` times, each one done before the next."""
    for _ in range(times):
        await _look(local)


async def _look(local: LocalSocket) -> None:
    before = local.checks
    local.check_now()
    await eventually(lambda: local.checks > before)


async def test_a_removed_socket_and_lock_are_made_again_on_the_next_look(short_tmp: Path) -> None:
    """Its folder cleaned (socket and lock file gone): the next look binds a new socket that
    answers, takes the lock again on a new file with our pid, and says so once."""
    path = short_tmp / "d.sock"
    with capture_logs() as logs:
        async with serving(path) as local:
            path.unlink()
            (short_tmp / "d.sock.lock").unlink()
            await looked(local)
            assert await answers(path)
            assert owner_pid(path) == os.getpid()
            assert (short_tmp / "d.sock.lock").read_text() == f"{os.getpid()}\n"
            await looked(local, 2)  # ours again: nothing more to do
    told = [log for log in logs if log["event"].startswith("local_socket")]
    assert [(log["event"], log["found"]) for log in told] == [
        ("local_socket_bound_again", "nothing")
    ]
    assert local.bound_again == 1
    assert not path.exists()  # removed at the end: it was the one served


async def test_without_a_signal_the_path_is_looked_at_every_interval(short_tmp: Path) -> None:
    """Nobody asks: the check every `interval` finds the socket gone and binds it again."""
    path = short_tmp / "d.sock"
    async with serving(path, interval=0.05) as local:
        path.unlink()
        await eventually(lambda: local.bound_again == 1)
        assert await answers(path)


async def test_a_socket_nobody_serves_at_the_path_is_replaced(short_tmp: Path) -> None:
    """A socket file left by a process that is gone (bound, never served, closed) is stale:
    the daemon holds the lock, so it binds its own in its place."""
    path = short_tmp / "d.sock"
    with capture_logs() as logs:
        async with serving(path) as local:
            path.unlink()
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as stale:
                stale.bind(str(path))
            await looked(local)
            assert await answers(path)
    assert [log.get("found") for log in logs if log["event"] == "local_socket_bound_again"] == [
        "a socket nobody serves"
    ]


async def test_a_file_put_at_the_path_is_left_as_it_is_and_told_once(short_tmp: Path) -> None:
    """A file where the socket was is not the daemon's to remove: left with its bytes, and
    logged once over three looks; `status()` names it. Once the file is gone, the next look
    binds the socket again and the problem is cleared."""
    path = short_tmp / "d.sock"
    with capture_logs() as logs:
        async with serving(path) as local:
            path.unlink()
            path.write_text("someone's notes")
            await looked(local, 3)
            assert path.read_text() == "someone's notes"
            assert local.status() == {
                "path": str(path),
                "checks": 3,
                "bound_again": 0,
                "problem": {"event": "local_socket_path_taken", "what": "a file"},
            }
            path.unlink()
            await looked(local)
            assert local.status()["bound_again"] == 1
            assert local.status()["problem"] is None
    told = [(log["event"], log.get("what")) for log in logs if log["event"].startswith("local_")]
    assert told == [("local_socket_path_taken", "a file"), ("local_socket_bound_again", None)]


async def test_a_socket_another_process_serves_is_left_to_it(short_tmp: Path) -> None:
    """Another server listening at the path (the socket file replaced) keeps it: the daemon
    binds nothing there, names the server's pid once, and does not remove it at the end."""
    path = short_tmp / "d.sock"
    with capture_logs() as logs:
        async with serving(path) as local:
            path.unlink()
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as other:
                other.bind(str(path))
                other.listen(1)
                inode = path.stat().st_ino
                await looked(local, 2)
                assert path.stat().st_ino == inode
    told = [(log["event"], log.get("pid")) for log in logs if log["event"].startswith("local_")]
    assert told == [("local_socket_path_taken", os.getpid())]
    assert local.bound_again == 0
    assert path.exists()  # not ours: left at the end


async def test_a_lock_another_daemon_took_meanwhile_is_left_to_it(short_tmp: Path) -> None:
    """Socket and lock file removed, then another daemon takes the lock before the look: it
    owns the path now, so nothing is bound, and its pid is named once."""
    path = short_tmp / "d.sock"
    with capture_logs() as logs:
        async with serving(path) as local:
            path.unlink()
            (short_tmp / "d.sock.lock").unlink()
            other = SocketLock(path)  # another open file: flock refuses us as another process
            other.acquire()
            try:
                await looked(local, 2)
                assert not path.exists()
                assert owner_pid(path) == os.getpid()  # the other lock's pid file
            finally:
                other.release()
    told = [log["event"] for log in logs if log["event"].startswith("local_")]
    assert told == ["local_socket_lock_taken"]
    assert local.bound_again == 0


def test_reclaim_keeps_a_lock_whose_file_is_there_and_takes_a_removed_one_again(
    short_tmp: Path,
) -> None:
    """`reclaim`: True with nothing to do while the file is the one locked; its file removed,
    a new one is locked with our pid; False once another holder has the new file."""
    lock = SocketLock(short_tmp / "d.sock")
    lock.acquire()
    try:
        inode = lock.path.stat().st_ino
        assert lock.reclaim()
        assert lock.path.stat().st_ino == inode
        lock.path.unlink()
        assert lock.reclaim()
        assert lock.path.read_text() == f"{os.getpid()}\n"
        lock.path.unlink()
        other = SocketLock(short_tmp / "d.sock")
        other.acquire()
        assert not lock.reclaim()
        other.release()
    finally:
        lock.release()
    assert not SocketLock(short_tmp / "d.sock").reclaim()  # never acquired


async def test_a_path_that_cannot_be_looked_at_is_told_once(short_tmp: Path) -> None:
    """The socket's folder replaced by a file: the path cannot be looked at (ENOTDIR), which
    is logged once over two looks, and nothing is bound or removed."""
    path = short_tmp / "sub" / "d.sock"
    path.parent.mkdir()
    with capture_logs() as logs:
        async with serving(path) as local:
            shutil.rmtree(path.parent)
            path.parent.write_text("not a folder")
            await looked(local, 2)
            assert path.parent.read_text() == "not a folder"
    told = [(log["event"], log.get("error")) for log in logs if log["event"].startswith("local_")]
    assert told == [("local_socket_unreadable", "Not a directory")]


async def test_a_bind_that_fails_is_told_and_tried_again_at_the_next_look(
    short_tmp: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A bind refused (here: no space left) is logged with its reason; the next look binds."""

    def no_space(path: Path) -> socket.socket:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))

    path = short_tmp / "d.sock"
    with capture_logs() as logs:
        async with serving(path) as local:
            path.unlink()
            monkeypatch.setattr(local_socket, "bind_unix", no_space)
            await looked(local)
            monkeypatch.undo()
            await looked(local)
            assert await answers(path)
    told = [(log["event"], log.get("error")) for log in logs if log["event"].startswith("local_")]
    assert told == [
        ("local_socket_bind_failed", os.strerror(errno.ENOSPC)),
        ("local_socket_bound_again", None),
    ]


async def test_a_socket_folder_removed_with_all_in_it_is_made_again(short_tmp: Path) -> None:
    """The socket's whole folder removed (as a runtime folder is at logout): the next look
    makes the folder, the lock and the socket again, and the socket answers."""
    path = short_tmp / "run" / "d.sock"
    path.parent.mkdir()
    async with serving(path) as local:
        shutil.rmtree(path.parent)
        await looked(local)
        assert await answers(path)
        assert (path.parent / "d.sock.lock").read_text() == f"{os.getpid()}\n"


async def test_a_lock_that_cannot_be_made_again_is_told_and_tried_at_the_next_look(
    short_tmp: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Its lock file gone and not to be made (here: permission refused) is logged with its
    reason, and nothing is bound without it; the next look, allowed, binds."""
    path = short_tmp / "d.sock"
    real_open = os.open

    def refused(file: object, flags: int, *args: object, **kwargs: object) -> int:
        if str(file).endswith(".lock"):
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(file))
        return real_open(file, flags, *args, **kwargs)  # type: ignore[arg-type]

    with capture_logs() as logs:
        async with serving(path) as local:
            path.unlink()
            (short_tmp / "d.sock.lock").unlink()
            monkeypatch.setattr(os, "open", refused)
            await looked(local)
            monkeypatch.undo()
            assert not path.exists()
            await looked(local)
            assert await answers(path)
    told = [(log["event"], log.get("error")) for log in logs if log["event"].startswith("local_")]
    assert told == [
        ("local_socket_lock_failed", os.strerror(errno.EACCES)),
        ("local_socket_bound_again", None),
    ]
