"""One daemon per socket: the lock beside the socket, its pid, stale locks and foreign servers."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from gastown_sandboxd.ops.socket_lock import (
    SocketInUse,
    SocketLock,
    check_free,
    lock_path,
    owner_pid,
    serving_pid,
)


@pytest.fixture
def held(short_tmp: Path) -> Iterator[SocketLock]:
    lock = SocketLock(short_tmp / "d.sock")
    lock.acquire()
    yield lock
    lock.release()


def test_the_lock_holds_our_pid_and_refuses_a_second_holder(held: SocketLock) -> None:
    """The lock file names its holder; a second acquire (another open file) is refused."""
    assert held.path.read_text() == f"{os.getpid()}\n"
    assert owner_pid(held.socket_path) == os.getpid()
    with pytest.raises(SocketInUse) as caught:
        SocketLock(held.socket_path).acquire()
    assert caught.value.pid == os.getpid()
    assert f"socket {held.socket_path} is in use by pid {os.getpid()}" in str(caught.value)
    with pytest.raises(SocketInUse):
        check_free(held.socket_path)


def test_release_removes_the_lock_file_and_frees_the_socket(short_tmp: Path) -> None:
    """After release nobody owns the socket and the lock file is gone."""
    lock = SocketLock(short_tmp / "d.sock")
    lock.acquire()
    lock.release()
    assert not lock.path.exists()
    assert owner_pid(lock.socket_path) is None
    check_free(lock.socket_path)
    lock.release()  # twice is harmless


def test_a_lock_file_left_by_a_killed_process_is_taken_over(short_tmp: Path) -> None:
    """A lock file whose holder died (SIGKILL) holds a pid but no lock: the next one takes it."""
    path = short_tmp / "d.sock"
    script = (
        "import sys; from pathlib import Path; from gastown_sandboxd.ops.socket_lock import "
        "SocketLock; SocketLock(Path(sys.argv[1])).acquire(); print('held', flush=True); "
        "sys.stdin.read()"
    )
    with subprocess.Popen(
        [sys.executable, "-c", script, str(path)], stdin=subprocess.PIPE, stdout=subprocess.PIPE
    ) as holder:
        assert holder.stdout is not None
        assert holder.stdout.readline() == b"held\n"
        assert owner_pid(path) == holder.pid
        holder.kill()
        holder.wait(10)
    assert lock_path(path).read_text() == f"{holder.pid}\n"
    assert owner_pid(path) is None
    lock = SocketLock(path)
    lock.acquire()
    assert lock.path.read_text() == f"{os.getpid()}\n"
    lock.release()


def test_a_socket_served_without_the_lock_is_refused_with_its_pid(
    short_tmp: Path,
) -> None:
    """Something accepting on the socket, no lock file: its pid comes from SO_PEERCRED."""
    path = short_tmp / "d.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as server:
        server.bind(str(path))
        server.listen()
        assert serving_pid(path) == os.getpid()
        with pytest.raises(SocketInUse) as caught:
            SocketLock(path).acquire()
    assert caught.value.pid == os.getpid()
    assert not lock_path(path).exists()
    assert serving_pid(path) is None  # a stale socket file: nobody accepts
