"""Component metrics are read from the components at scrape time."""

from __future__ import annotations

from pathlib import Path

from prometheus_client import CollectorRegistry

from gastown_sandboxd.events.bus import EventBus
from gastown_sandboxd.events.notify import Notifier
from gastown_sandboxd.ops.metrics import DaemonMetrics, SseClients
from gastown_sandboxd.watcher import SettingsWatcher


async def _nothing(*args: object) -> None:
    return None


def components(tmp_path: Path) -> tuple[EventBus, Notifier, SettingsWatcher]:
    """The components DaemonMetrics reads, idle (nothing runs), over `tmp_path`."""
    bus = EventBus()
    notifier = Notifier(bus=bus, hooks=(), signals=())
    watcher = SettingsWatcher(
        town_root=tmp_path,
        env_file=tmp_path / ".env.gateway",
        folders=list,
        on_settings_change=_nothing,
        on_env_change=_nothing,
    )
    return bus, notifier, watcher


def test_scrape_reads_events_subscribers_hooks_and_the_watcher(tmp_path: Path) -> None:
    """Each value is the component's own count at the moment of the scrape."""
    registry = CollectorRegistry()
    bus, notifier, watcher = components(tmp_path)
    sse = SseClients()
    metrics = DaemonMetrics(registry, bus=bus, notifier=notifier, watcher=watcher, sse_clients=sse)
    assert metrics.sse_clients is sse

    def value(name: str, **labels: str) -> float | None:
        return registry.get_sample_value(name, labels or None)

    assert value("gastown_sandboxd_events_total") == 0
    assert value("gastown_sandboxd_sse_clients") == 0
    bus.emit("token.expired", {"exp": 2, "iat": 1})
    bus.emit("config.changed", {"keys": []})
    sse.count = 3
    notifier.stats.hook_runs = 5
    notifier.stats.hook_failures = 2
    metrics.config_patches.labels(status="422").inc()
    assert value("gastown_sandboxd_events_total") == 2
    assert value("gastown_sandboxd_sse_clients") == 3
    assert value("gastown_sandboxd_hook_runs_total") == 5
    assert value("gastown_sandboxd_hook_failures_total") == 2
    assert value("gastown_sandboxd_config_patches_total", status="422") == 1
    assert value("gastown_sandboxd_watcher_running") == 0
    assert value("gastown_sandboxd_watcher_folders") == 0
