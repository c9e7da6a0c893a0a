"""sd_notify: real datagrams to a real Unix socket, and silence without NOTIFY_SOCKET."""

from __future__ import annotations

import contextlib
import os
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from gastown_sandboxd.ops.metrics import MetricsRegistry
from gastown_sandboxd.ops.systemd import SystemdNotifier
from gastown_sandboxd.token.refresher import token_metrics


@pytest.fixture
def notify_socket(short_tmp: Path) -> Iterator[tuple[socket.socket, str]]:
    path = str(short_tmp / "notify")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(path)
    sock.settimeout(5)
    yield sock, path
    sock.close()


def test_ready_and_status_arrive_as_one_datagram(notify_socket: tuple[socket.socket, str]) -> None:
    """notify() sends its lines in one message to NOTIFY_SOCKET."""
    sock, path = notify_socket
    notifier = SystemdNotifier({"NOTIFY_SOCKET": path})
    assert notifier.notify("READY=1", "STATUS=fresh")
    assert sock.recv(4096) == b"READY=1\nSTATUS=fresh"


def test_watchdog_interval_is_half_the_timeout(notify_socket: tuple[socket.socket, str]) -> None:
    """WATCHDOG_USEC for this pid gives half of it as the ping interval."""
    _, path = notify_socket
    env = {"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "30000000", "WATCHDOG_PID": str(os.getpid())}
    assert SystemdNotifier(env).watchdog_interval == 15.0
    other = {**env, "WATCHDOG_PID": "1"}
    assert SystemdNotifier(other).watchdog_interval is None


async def test_watchdog_pings(notify_socket: tuple[socket.socket, str]) -> None:
    """run_watchdog sends WATCHDOG=1 right away."""
    import anyio

    sock, path = notify_socket
    notifier = SystemdNotifier({"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "10000000"})
    async with anyio.create_task_group() as tg:
        await tg.start(notifier.run_watchdog)
        assert await anyio.to_thread.run_sync(sock.recv, 4096) == b"WATCHDOG=1"
        tg.cancel_scope.cancel()


def test_without_notify_socket_nothing_is_sent() -> None:
    """Outside systemd the notifier is off and says so."""
    notifier = SystemdNotifier({})
    assert not notifier.enabled
    assert notifier.watchdog_interval is None
    assert notifier.notify("READY=1") is False


def test_a_dead_socket_is_reported_not_raised(short_tmp: Path) -> None:
    """A NOTIFY_SOCKET nobody listens on makes notify() return False."""
    notifier = SystemdNotifier({"NOTIFY_SOCKET": str(short_tmp / "nobody")})
    assert notifier.notify("READY=1") is False


def test_state_changes_are_sent_once_each(notify_socket: tuple[socket.socket, str]) -> None:
    """report_state() sends STATUS only when the state differs from the last one sent, and
    TokenMetrics hands it every state the refresher publishes."""
    sock, path = notify_socket
    notifier = SystemdNotifier({"NOTIFY_SOCKET": path})
    metrics = token_metrics(MetricsRegistry(), on_state=notifier.report_state)
    for state in ("fresh", "fresh", "refreshing", "fresh", "fresh", "degraded"):
        metrics.set_state(state)
    sock.setblocking(False)
    received = []
    with contextlib.suppress(BlockingIOError):
        while True:
            received.append(sock.recv(4096))
    assert received == [
        b"STATUS=token fresh",
        b"STATUS=token refreshing",
        b"STATUS=token fresh",
        b"STATUS=token degraded",
    ]


def test_state_is_resent_after_a_failed_send(short_tmp: Path) -> None:
    """A STATUS that could not be sent (no socket yet) is sent with the next report."""
    path = str(short_tmp / "late")
    notifier = SystemdNotifier({"NOTIFY_SOCKET": path})
    notifier.report_state("fresh")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(path)
        sock.settimeout(5)
        notifier.report_state("fresh")
        assert sock.recv(4096) == b"STATUS=token fresh"
