"""Component metrics are read from the components at scrape time."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from gastown_sandboxd.events.bus import EventBus
from gastown_sandboxd.events.notify import Notifier
from gastown_sandboxd.ops.metrics import DaemonMetrics, MetricsRegistry, SseClients, TokenMetrics
from gastown_sandboxd.watcher import SettingsWatcher

ROOT = Path(__file__).resolve().parents[3]


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
    registry = MetricsRegistry()
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
    metrics.count_patch(422)
    assert value("gastown_sandboxd_events_total") == 2
    assert value("gastown_sandboxd_sse_clients") == 3
    assert value("gastown_sandboxd_hook_runs_total") == 5
    assert value("gastown_sandboxd_hook_failures_total") == 2
    assert value("gastown_sandboxd_config_patches_total", status="422") == 1
    assert value("gastown_sandboxd_watcher_running") == 0
    assert value("gastown_sandboxd_watcher_folders") == 0


LAZY_PROBE = """
import sys, tempfile
from pathlib import Path
import gastown_sandboxd.daemon, gastown_sandboxd.cli
from gastown_sandboxd.ops.metrics import DaemonMetrics, MetricsRegistry
from gastown_sandboxd.token.refresher import token_metrics
from tests.daemon.ops.test_metrics import components
registry = MetricsRegistry()
bus, notifier, watcher = components(Path(tempfile.mkdtemp()))
DaemonMetrics(registry, bus=bus, notifier=notifier, watcher=watcher).count_patch(200)
token = token_metrics(registry)
token.record_attempt("ok", 0.2)
token.set_state("fresh")
before = "prometheus_client" in sys.modules or registry.loaded
body, content_type = registry.exposition()
print(before, "prometheus_client" in sys.modules, registry.loaded, content_type.split(";")[0])
print(body.decode())
"""


def test_prometheus_client_is_loaded_by_the_first_scrape_only() -> None:
    """In a fresh interpreter, the daemon's modules and its metric groups, counting, do not
    import prometheus_client; the first exposition does, and shows what was counted."""
    done = subprocess.run(
        [sys.executable, "-c", LAZY_PROBE],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
        cwd=ROOT,
    )
    first, _, body = done.stdout.partition("\n")
    assert first.split() == ["False", "True", "True", "text/plain"]
    assert 'gastown_sandboxd_config_patches_total{status="200"} 1.0' in body
    assert 'gastown_sandboxd_token_refresh_attempts_total{result="ok"} 1.0' in body
    assert 'gastown_sandboxd_token_state{gastown_sandboxd_token_state="fresh"} 1.0' in body


def test_refresh_latency_buckets_hold_values_up_to_their_bound() -> None:
    """A value equal to a bound counts in that bucket, the buckets are cumulative, a value
    past the last bound only in +Inf, and the sum is the values' sum."""
    registry = MetricsRegistry()
    metrics = TokenMetrics(registry, states=["missing", "fresh"], results=["ok"])
    for seconds in (0.05, 0.051, 30.0, 31.0, -1.0):
        metrics.record_attempt("ok", seconds)
    name = "gastown_sandboxd_token_refresh_duration_seconds"
    buckets = {
        le: registry.get_sample_value(name + "_bucket", {"le": le})
        for le in ("0.05", "0.1", "10.0", "30.0", "+Inf")
    }
    assert buckets == {"0.05": 2, "0.1": 3, "10.0": 3, "30.0": 4, "+Inf": 5}
    assert registry.get_sample_value(name + "_count") == 5
    assert registry.get_sample_value(name + "_sum") == 0.05 + 0.051 + 30.0 + 31.0
    assert registry.get_sample_value("gastown_sandboxd_token_refresh_attempts_total") is None
    assert (
        registry.get_sample_value("gastown_sandboxd_token_refresh_attempts_total", {"result": "ok"})
        == 5
    )


def test_an_unknown_state_is_refused_and_the_state_kept() -> None:
    heard: list[str] = []
    registry = MetricsRegistry()
    metrics = TokenMetrics(registry, states=["missing", "fresh"], results=[], on_state=heard.append)
    with pytest.raises(ValueError, match="unknown state 'stale'"):
        metrics.set_state("stale")
    assert heard == []
    labels = {"gastown_sandboxd_token_state": "missing"}
    assert registry.get_sample_value("gastown_sandboxd_token_state", labels) == 1


def test_a_group_registered_after_the_first_scrape_is_scraped() -> None:
    registry = MetricsRegistry()
    assert registry.get_sample_value("gastown_sandboxd_token_expiry_timestamp_seconds") is None
    TokenMetrics(registry, states=["missing"], results=[]).set_token(1_900_000_000)
    value = registry.get_sample_value("gastown_sandboxd_token_expiry_timestamp_seconds")
    assert value == 1_900_000_000
