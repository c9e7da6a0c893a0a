"""Prometheus metrics, each group registered on a registry it is given (never the global one)."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Enum, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from gastown_sandboxd._types import Clock, SystemClock

if TYPE_CHECKING:
    from gastown_sandboxd.events.bus import EventBus
    from gastown_sandboxd.events.notify import Notifier
    from gastown_sandboxd.watcher import SettingsWatcher


class TokenMetrics:
    """The token's expiry, the refresh attempts and their latency, the refresher's state."""

    def __init__(
        self,
        registry: CollectorRegistry,
        *,
        states: Sequence[str],
        results: Sequence[str],
        clock: Clock | None = None,
        on_state: Callable[[str], object] | None = None,
    ) -> None:
        """`states` (the first is the state before any report) and `results` are the label
        values, owned by the token room's enums; `on_state` hears every state the refresher
        publishes (systemd's STATUS line)."""
        self._clock = clock or SystemClock()
        self._on_state = on_state
        self._exp: int | None = None
        self.expiry = Gauge(
            "gastown_sandboxd_token_expiry_timestamp_seconds",
            "Unix time at which the held token expires (0 when there is none).",
            registry=registry,
        )
        self.seconds_to_expiry = Gauge(
            "gastown_sandboxd_token_seconds_to_expiry",
            "Seconds until the held token expires, at scrape time (0 when none or expired).",
            registry=registry,
        )
        self.seconds_to_expiry.set_function(self._seconds_left)
        self.attempts = Counter(
            "gastown_sandboxd_token_refresh_attempts",
            "Refresh attempts by result.",
            ["result"],
            registry=registry,
        )
        for result in results:
            self.attempts.labels(result=result)
        self.latency = Histogram(
            "gastown_sandboxd_token_refresh_duration_seconds",
            "Time a refresh call to the cloud took.",
            buckets=(0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0),
            registry=registry,
        )
        self.state = Enum(
            "gastown_sandboxd_token_state",
            "The refresher's state.",
            states=list(states),
            registry=registry,
        )
        self.state.state(states[0])

    def set_token(self, exp: int | None) -> None:
        """Record the expiry of the held token (None when none is held)."""
        self._exp = exp
        self.expiry.set(exp or 0)

    def record_attempt(self, result: str, seconds: float) -> None:
        """Count one refresh attempt with its result and how long the cloud call took."""
        self.attempts.labels(result=result).inc()
        self.latency.observe(max(0.0, seconds))

    def set_state(self, state: str) -> None:
        self.state.state(state)
        if self._on_state is not None:
            self._on_state(state)

    def _seconds_left(self) -> float:
        if self._exp is None:
            return 0.0
        return max(0.0, self._exp - self._clock.time())


@dataclass
class SseClients:
    """How many SSE streams are open, across both listeners."""

    count: int = 0


class DaemonMetrics:
    """Events, subscribers, hooks, signals, the watcher and config PATCHes.

    Most values are read from the components at scrape time, so nothing on a hot path pays
    for them; PATCH results are counted by the API as they happen.
    """

    def __init__(
        self,
        registry: CollectorRegistry,
        *,
        bus: EventBus,
        notifier: Notifier,
        watcher: SettingsWatcher,
        sse_clients: SseClients | None = None,
    ) -> None:
        self.config_patches = Counter(
            "gastown_sandboxd_config_patches",
            "PATCH /config requests by HTTP status.",
            ["status"],
            registry=registry,
        )
        self.sse_clients = sse_clients if sse_clients is not None else SseClients()
        registry.register(_ComponentCollector(bus, notifier, watcher, self.sse_clients))


class _ComponentCollector(Collector):
    def __init__(
        self, bus: EventBus, notifier: Notifier, watcher: SettingsWatcher, sse: SseClients
    ) -> None:
        self._bus = bus
        self._notifier = notifier
        self._watcher = watcher
        self._sse = sse

    def collect(self) -> Iterable[Metric]:
        prefix = "gastown_sandboxd_"
        yield GaugeMetricFamily(
            prefix + "event_subscribers",
            "Open event subscriptions (SSE, hooks).",
            value=self._bus.subscriber_count,
        )
        yield GaugeMetricFamily(
            prefix + "sse_clients",
            "Open GET /events streams (the /status subscribers).",
            value=self._sse.count,
        )
        yield CounterMetricFamily(
            prefix + "events", "Events emitted since start.", value=self._bus.last_id
        )
        yield CounterMetricFamily(
            prefix + "event_subscribers_dropped",
            "Subscribers dropped for falling behind.",
            value=self._bus.dropped_subscribers,
        )
        stats = self._notifier.stats
        for name, text, value in (
            ("hook_runs", "Hook runs started.", stats.hook_runs),
            ("hook_failures", "Hook runs that failed or timed out.", stats.hook_failures),
            ("hook_timeouts", "Hook runs killed at their timeout.", stats.hook_timeouts),
            ("signals_sent", "Signals delivered through pid files.", stats.signals_sent),
            ("signal_failures", "Signals that could not be sent.", stats.signal_failures),
        ):
            yield CounterMetricFamily(prefix + name, text, value=value)
        watcher = self._watcher.status()
        yield GaugeMetricFamily(
            prefix + "watcher_running",
            "1 while the settings watcher runs.",
            value=1 if watcher.get("running") else 0,
        )
        yield GaugeMetricFamily(
            prefix + "watcher_folders",
            "Folders the watcher watches.",
            value=len(watcher.get("folders", ())),
        )
        yield CounterMetricFamily(
            prefix + "watcher_restarts",
            "Watcher restarts (folder set changes, errors).",
            value=watcher.get("restarts", 0),
        )
