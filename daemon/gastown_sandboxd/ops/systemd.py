"""sd_notify: READY=1, STATUS=…, WATCHDOG=1 and STOPPING=1 to the service manager.

The protocol is one datagram to the socket named by NOTIFY_SOCKET; it is small enough that a
dependency (the sdnotify package, unmaintained since 2019) would cost more than it saves.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Mapping

import anyio
import structlog

log = structlog.get_logger(__name__)


class SystemdNotifier:
    """Talks to systemd when NOTIFY_SOCKET is set; does nothing otherwise."""

    def __init__(self, env: Mapping[str, str] | None = None) -> None:
        env = os.environ if env is None else env
        address = env.get("NOTIFY_SOCKET", "")
        # An abstract socket is named with a leading "@" in the environment.
        self._address = "\0" + address[1:] if address.startswith("@") else address
        self._watchdog_usec = _watchdog_usec(env)
        self._status: str | None = None

    @property
    def enabled(self) -> bool:
        return bool(self._address)

    @property
    def watchdog_interval(self) -> float | None:
        """Half the watchdog timeout, as sd_watchdog_enabled(3) advises; None when off."""
        if not self.enabled or not self._watchdog_usec:
            return None
        return self._watchdog_usec / 2_000_000

    def notify(self, *lines: str) -> bool:
        """Send `lines` (e.g. "READY=1", "STATUS=fresh") as one message; False when it failed."""
        if not self.enabled:
            return False
        payload = "\n".join(lines).encode()
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
                sock.connect(self._address)
                sock.sendall(payload)
        except OSError as exc:
            log.warning("sd_notify_failed", error=exc.strerror)
            return False
        return True

    def report_state(self, state: str) -> None:
        """Send `STATUS=token <state>` when it differs from the last one sent (event-driven:
        the refresher calls this on every state it publishes; nothing polls)."""
        status = f"token {state}"
        if status != self._status and self.notify(f"STATUS={status}"):
            self._status = status

    async def run_watchdog(
        self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED
    ) -> None:
        """Ping WATCHDOG=1 at half the interval for as long as the event loop runs."""
        task_status.started()
        interval = self.watchdog_interval
        if interval is None:
            return
        while True:
            self.notify("WATCHDOG=1")
            await anyio.sleep(interval)


def _watchdog_usec(env: Mapping[str, str]) -> int:
    pid = env.get("WATCHDOG_PID")
    if pid and pid.isdigit() and int(pid) != os.getpid():
        return 0
    value = env.get("WATCHDOG_USEC", "")
    return int(value) if value.isdigit() else 0
