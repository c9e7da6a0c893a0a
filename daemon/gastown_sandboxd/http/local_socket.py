"""The local socket, kept at its path for the daemon's life.

A clean-up of its folder can remove the socket while the daemon runs: systemd-tmpfiles'
ageing of /tmp, the removal of `XDG_RUNTIME_DIR` when the user's last session ends, a person
tidying up. Agents' shims, Claude Code's helper and the command line then cannot reach the
daemon until it restarts. So every `SOCKET_CHECK_S`, and at once on SIGHUP (`check_now`),
the path is looked at (one `lstat`). When it no longer names the socket served and the lock
is still this daemon's (taken again if its file went too, `SocketLock.reclaim`), a new
socket is bound there and served, and the old listener stops: nobody can reach it by its
path any more, and what is in flight on it gets the grace hypercorn gives at shutdown (an
event stream is then closed, and its client resumes with `Last-Event-ID` on the new one).

Anything else found at the path is left as it is, logged once: a socket another process
serves, a file, a folder, or a lock another daemon took meanwhile.

Cost: one wake-up and one `lstat` every 30 s, as often as the refresher looks at the clock.
"""

from __future__ import annotations

import contextlib
import socket
import stat
from pathlib import Path

import anyio
import anyio.abc
import structlog
from starlette.types import ASGIApp

from gastown_sandboxd.http.server import bind_unix, serve_socket
from gastown_sandboxd.ops.socket_lock import SocketLock, owner_pid, serving_pid
from gastown_sandboxd.options import not_a_socket

log = structlog.get_logger(__name__)

SOCKET_CHECK_S = 30.0


class LocalSocket:
    """Serves an app on the local socket `sock`, bound at `lock.socket_path`, and binds it
    again when its path stops naming it (see the module's docstring)."""

    def __init__(
        self, sock: socket.socket, lock: SocketLock, *, interval: float = SOCKET_CHECK_S
    ) -> None:
        self.path = lock.socket_path
        self.checks = 0  # how many times the path was looked at
        self.bound_again = 0
        self._sock: socket.socket | None = sock
        self._lock = lock
        self._interval = interval
        self._identity = _identity(self.path)
        self._wake = anyio.Event()
        self._told: dict[str, object] | None = None  # what the last look found in its way

    def status(self) -> dict[str, object]:
        """For `/status`: the path, the looks, the bindings again, and what the last look
        found in its way (None while the path names the socket served)."""
        return {
            "path": str(self.path),
            "checks": self.checks,
            "bound_again": self.bound_again,
            "problem": self._told,
        }

    def check_now(self) -> None:
        """Look at the path now, not at the next check."""
        self._wake.set()

    async def run(
        self,
        app: ASGIApp,
        shutdown: anyio.Event,
        *,
        task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED,
    ) -> None:
        """Serve `app` until `shutdown` is set, binding the socket again as needed; returns
        once every listener has stopped."""
        sock, self._sock = self._sock, None
        if sock is None:
            raise RuntimeError("the local socket is already served")
        async with anyio.create_task_group() as tg:
            tg.start_soon(self._wake_at, shutdown)
            # Each listener stops on an event of its own, set at shutdown or once replaced.
            stop = anyio.Event()
            tg.start_soon(serve_socket, app, sock, stop)
            task_status.started()
            while True:
                with anyio.move_on_after(self._interval):
                    await self._wake.wait()
                if shutdown.is_set():
                    stop.set()
                    return
                self._wake = anyio.Event()
                new = self._bind_again()
                if new is not None:
                    stop.set()  # the old listener, which nobody can reach by its path
                    stop = anyio.Event()
                    tg.start_soon(serve_socket, app, new, stop)

    def remove(self) -> None:
        """Remove the socket at the path if it is the one served (at the end: ours to remove,
        and nothing another process put there)."""
        if self._identity is not None and _identity(self.path) == self._identity:
            with contextlib.suppress(OSError):
                self.path.unlink()

    async def _wake_at(self, shutdown: anyio.Event) -> None:
        await shutdown.wait()
        self._wake.set()

    def _bind_again(self) -> socket.socket | None:
        """A new socket at the path when it no longer names ours and may be taken; else None."""
        self.checks += 1
        try:
            found = self.path.lstat()
        except FileNotFoundError:
            found = None
        except OSError as exc:
            self._tell("local_socket_unreadable", error=exc.strerror)
            return None
        if found is not None and (found.st_dev, found.st_ino) == self._identity:
            self._told = None
            return None
        if found is not None and not stat.S_ISSOCK(found.st_mode):
            self._tell("local_socket_path_taken", what=f"a {not_a_socket(found.st_mode)}")
            return None
        if found is not None and (pid := serving_pid(self.path)) is not None:
            self._tell("local_socket_path_taken", what="a socket another process serves", pid=pid)
            return None
        try:
            ours = self._lock.reclaim()
        except OSError as exc:
            self._tell("local_socket_lock_failed", error=exc.strerror)
            return None
        if not ours:
            self._tell("local_socket_lock_taken", pid=owner_pid(self.path))
            return None
        try:
            sock = bind_unix(self.path)  # replaces a socket nobody serves, nothing else
        except OSError as exc:
            self._tell("local_socket_bind_failed", error=exc.strerror)
            return None
        self._identity = _identity(self.path)
        self._told = None
        self.bound_again += 1
        log.warning(
            "local_socket_bound_again",
            socket=str(self.path),
            found="nothing" if found is None else "a socket nobody serves",
        )
        return sock

    def _tell(self, event: str, **fields: object) -> None:
        """Log `event` once while it stays what the looks find."""
        told = {"event": event, **fields}
        if told != self._told:
            self._told = told
            log.warning(event, socket=str(self.path), effect="left as it is", **fields)


def _identity(path: Path) -> tuple[int, int] | None:
    try:
        found = path.lstat()
    except OSError:
        return None
    return (found.st_dev, found.st_ino)
