"""One daemon per socket: an exclusive `flock` on `<socket>.lock`, which holds the owner's pid.

The lock is taken before anything is bound, so a second `run` on the same socket exits 2
naming the first one's pid and never touches its socket. The lock dies with its process
(the kernel drops a `flock` when the descriptor closes), so a socket left by a killed daemon
is stale and reclaimed. A socket that still answers though nobody holds the lock (an older
daemon, another program) is refused too, naming its pid from `SO_PEERCRED`.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import socket
import stat
import struct
from pathlib import Path

from gastown_sandboxd.errors import OptionsError

SETTING = "local socket (GASTOWN_SANDBOXD_SOCKET)"
LOCK_MODE = 0o644  # others may read the owner's pid; only the owner writes it
_PEERCRED = struct.Struct("3i")  # struct ucred: pid, uid, gid


def lock_path(socket_path: Path) -> Path:
    return socket_path.with_name(socket_path.name + ".lock")


class SocketInUse(OptionsError):
    """Another process serves, or holds the lock of, the socket; `pid` when known."""

    def __init__(self, socket_path: Path, pid: int | None) -> None:
        self.path = socket_path
        self.pid = pid
        owner = f"pid {pid}" if pid else "another process"
        super().__init__(
            SETTING,
            f"socket {socket_path} is in use by {owner}",
            "stop that daemon, or give this one another socket (--socket)",
        )


class SocketLock:
    """Held for the daemon's life: `acquire()` at start, `release()` after the socket is gone."""

    def __init__(self, socket_path: Path) -> None:
        self.socket_path = socket_path
        self.path = lock_path(socket_path)
        self._fd: int | None = None

    def acquire(self) -> None:
        """Take the lock and write our pid; raise `SocketInUse` when another daemon has it."""
        self._fd = fd = self._lock_file()
        peer = serving_pid(self.socket_path)
        if peer is not None:
            self.release()
            raise SocketInUse(self.socket_path, peer or None)
        _write_pid(fd)

    def reclaim(self) -> bool:
        """Whether the lock is still ours: True while its file is the one we locked; if that
        file was removed (a clean-up of its folder), the lock is taken again on a new one,
        its folder made again if need be. False when another daemon has taken it meanwhile;
        OSError when it cannot be made."""
        if self._fd is None:
            return False
        if _same_file(self._fd, self.path):
            return True
        try:
            fd = self._lock_file()
        except SocketInUse:
            return False
        os.close(self._fd)
        self._fd = fd
        _write_pid(fd)
        return True

    def _lock_file(self) -> int:
        """A descriptor of the lock file at `path`, locked; `SocketInUse` when it is held."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, LOCK_MODE)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                pid = _read_pid(fd)
                os.close(fd)
                raise SocketInUse(self.socket_path, pid) from None
            except BaseException:
                os.close(fd)
                raise
            # The file we locked may have been unlinked by an owner that was just leaving.
            if _same_file(fd, self.path):
                return fd
            os.close(fd)

    def release(self) -> None:
        """Remove the lock file, then drop the lock (so no waiter locks an unlinked file)."""
        fd, self._fd = self._fd, None
        if fd is None:
            return
        with contextlib.suppress(OSError):
            if _same_file(fd, self.path):
                self.path.unlink()
        os.close(fd)


def check_free(socket_path: Path) -> None:
    """Raise `SocketInUse` when a daemon holds the socket's lock or anything serves it.

    A check before start-up, for a clean message; `SocketLock.acquire` is what decides.
    """
    pid = owner_pid(socket_path)
    if pid is None:
        pid = serving_pid(socket_path)
    if pid is not None:
        raise SocketInUse(socket_path, pid or None)


def owner_pid(socket_path: Path) -> int | None:
    """The pid of the daemon that holds the socket's lock now, or None when nobody does."""
    try:
        fd = os.open(lock_path(socket_path), os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return _read_pid(fd)
        return None
    finally:
        os.close(fd)


def serving_pid(socket_path: Path) -> int | None:
    """The pid of whatever accepts connections on the socket (0 if unknown), or None."""
    try:
        if not stat.S_ISSOCK(socket_path.lstat().st_mode):
            return None
    except OSError:
        return None
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        probe.settimeout(1.0)
        try:
            probe.connect(str(socket_path))
        except OSError:
            return None
        try:
            pid, _, _ = _PEERCRED.unpack(
                probe.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _PEERCRED.size)
            )
        except OSError:
            return 0
        return int(pid)


def _write_pid(fd: int) -> None:
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)


def _read_pid(fd: int) -> int | None:
    try:
        text = os.pread(fd, 32, 0).decode("ascii", errors="replace").strip()
    except OSError:
        return None
    return int(text) if text.isdecimal() and int(text) > 0 else None


def _same_file(fd: int, path: Path) -> bool:
    try:
        on_disk = path.stat()
    except OSError:
        return False
    held = os.fstat(fd)
    return (held.st_dev, held.st_ino) == (on_disk.st_dev, on_disk.st_ino)
