"""Operating the daemon: `metrics.py` (Prometheus), `systemd.py` (sd_notify and the watchdog),
`logs.py` (structlog, secrets redacted) and `socket_lock.py` (one daemon per socket).

The face loads its modules on first use, so the commands that only read a lock or set up logs
(`check`, `status`) load nothing else. prometheus_client itself is loaded only by a scrape
(`metrics.MetricsRegistry`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from gastown_sandboxd._lazy import lazy_names

if TYPE_CHECKING:
    from gastown_sandboxd.ops.logs import Redactor, configure_logging
    from gastown_sandboxd.ops.metrics import (
        DaemonMetrics,
        MetricsRegistry,
        SseClients,
        TokenMetrics,
    )
    from gastown_sandboxd.ops.socket_lock import SocketLock, check_free, owner_pid
    from gastown_sandboxd.ops.systemd import SystemdNotifier

__all__ = [
    "DaemonMetrics",
    "MetricsRegistry",
    "Redactor",
    "SocketLock",
    "SseClients",
    "SystemdNotifier",
    "TokenMetrics",
    "check_free",
    "configure_logging",
    "owner_pid",
]

_WHERE = {
    "DaemonMetrics": "metrics",
    "MetricsRegistry": "metrics",
    "Redactor": "logs",
    "SocketLock": "socket_lock",
    "SseClients": "metrics",
    "SystemdNotifier": "systemd",
    "TokenMetrics": "metrics",
    "check_free": "socket_lock",
    "configure_logging": "logs",
    "owner_pid": "socket_lock",
}


__getattr__ = lazy_names(__name__, _WHERE)
