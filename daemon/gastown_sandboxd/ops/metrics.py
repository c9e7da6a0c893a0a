"""Prometheus metrics: the daemon counts in plain numbers, and prometheus_client renders them at
the first scrape.

Importing prometheus_client (and `http.server`, which only it needs) is 0.9 MiB of RSS and 7 ms
of CPU at every start (median of 16 interleaved imports of the daemon's modules, 2 cores), so
the daemon does not import it to count: each group here keeps its values in ints and floats,
and describes them as metric families only when `GET /metrics` (or a test) reads a
`MetricsRegistry`. Counting takes no lock: every count is made on the event loop. A daemon that
is never scraped never loads the library; one that is pays the same memory as before, and its
first scrape the import, on the loop, once. The families are the library's own
(`prometheus_client.core`), so the text format, the names and the samples are what its Counter,
Gauge, Histogram and Enum gave (without their `_created` samples).
"""

from __future__ import annotations

import bisect
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

from gastown_sandboxd._types import Clock, SystemClock

if TYPE_CHECKING:
    from prometheus_client import CollectorRegistry
    from prometheus_client.core import Metric

    from gastown_sandboxd.events.bus import EventBus
    from gastown_sandboxd.events.notify import Notifier
    from gastown_sandboxd.watcher import SettingsWatcher

PREFIX = "gastown_sandboxd_"


class Source(Protocol):
    """A group of metrics: its families, built from its values at the moment of the call."""

    def collect(self) -> Iterable[Metric]: ...


class MetricsRegistry:
    """The daemon's metric groups; a prometheus_client registry is made at the first read.

    One per daemon (never the library's global registry). Groups register as they are built;
    `prometheus()` imports the library, makes the registry once and registers every group in
    it, and a group registered later goes straight in.
    """

    def __init__(self) -> None:
        self._sources: list[Source] = []
        self._prometheus: CollectorRegistry | None = None

    @property
    def loaded(self) -> bool:
        """True once prometheus_client has been imported for this registry."""
        return self._prometheus is not None

    def register(self, source: Source) -> None:
        self._sources.append(source)
        if self._prometheus is not None:
            self._prometheus.register(source)

    def prometheus(self) -> CollectorRegistry:
        if self._prometheus is None:
            from prometheus_client import CollectorRegistry

            registry = CollectorRegistry(auto_describe=True)
            for source in self._sources:
                registry.register(source)
            self._prometheus = registry
        return self._prometheus

    def exposition(self) -> tuple[bytes, str]:
        """The text format of every group's current values, and its content type."""
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        return generate_latest(self.prometheus()), CONTENT_TYPE_LATEST

    def get_sample_value(self, name: str, labels: dict[str, str] | None = None) -> float | None:
        """The value of one sample as a scrape would show it (None when there is none)."""
        value = self.prometheus().get_sample_value(name, labels)
        return None if value is None else float(value)

    def collect(self) -> Iterable[Metric]:
        """Every family, as a scrape would render it."""
        return self.prometheus().collect()


class LatencyHistogram:
    """Observations counted into fixed buckets (upper bounds, in seconds) and summed."""

    def __init__(self, bounds: Sequence[float]) -> None:
        self.bounds = tuple(sorted(bounds))
        self.counts = [0] * (len(self.bounds) + 1)  # the last is +Inf
        self.sum = 0.0

    def observe(self, seconds: float) -> None:
        self.counts[bisect.bisect_left(self.bounds, seconds)] += 1
        self.sum += seconds

    def family(self, name: str, documentation: str) -> Metric:
        from prometheus_client.core import HistogramMetricFamily
        from prometheus_client.utils import floatToGoString

        cumulative, buckets = 0, []
        for bound, count in zip((*self.bounds, float("inf")), self.counts, strict=True):
            cumulative += count
            buckets.append((floatToGoString(bound), float(cumulative)))  # type: ignore[no-untyped-call]
        return HistogramMetricFamily(name, documentation, buckets=buckets, sum_value=self.sum)


def _by_label(name: str, documentation: str, label: str, counts: dict[str, int]) -> Metric:
    """A counter family with one sample per value of `label`, from `counts`."""
    from prometheus_client.core import CounterMetricFamily

    family = CounterMetricFamily(name, documentation, labels=[label])
    for value, count in counts.items():
        family.add_metric([value], count)
    return family


class TokenMetrics:
    """The token's expiry, the refresh attempts and their latency, the refresher's state."""

    LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)

    def __init__(
        self,
        registry: MetricsRegistry,
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
        self._states = tuple(states)
        self.state = self._states[0]
        self.attempts = dict.fromkeys(results, 0)
        self.latency = LatencyHistogram(self.LATENCY_BUCKETS)
        registry.register(self)

    def set_token(self, exp: int | None) -> None:
        """Record the expiry of the held token (None when none is held)."""
        self._exp = exp

    def record_attempt(self, result: str, seconds: float) -> None:
        """Count one refresh attempt with its result and how long the cloud call took."""
        self.attempts[result] = self.attempts.get(result, 0) + 1
        self.latency.observe(max(0.0, seconds))

    def set_state(self, state: str) -> None:
        if state not in self._states:
            raise ValueError(f"unknown state {state!r}; one of {', '.join(self._states)}")
        self.state = state
        if self._on_state is not None:
            self._on_state(state)

    def collect(self) -> Iterable[Metric]:
        from prometheus_client.core import (
            GaugeMetricFamily,
            StateSetMetricFamily,
        )

        name = PREFIX + "token_"
        yield GaugeMetricFamily(
            name + "expiry_timestamp_seconds",
            "Unix time at which the held token expires (0 when there is none).",
            value=self._exp or 0,
        )
        left = 0.0 if self._exp is None else max(0.0, self._exp - self._clock.time())
        yield GaugeMetricFamily(
            name + "seconds_to_expiry",
            "Seconds until the held token expires, at scrape time (0 when none or expired).",
            value=left,
        )
        yield _by_label(
            name + "refresh_attempts", "Refresh attempts by result.", "result", self.attempts
        )
        yield self.latency.family(
            name + "refresh_duration_seconds", "Time a refresh call to the cloud took."
        )
        yield StateSetMetricFamily(
            name + "state",
            "The refresher's state.",
            value={state: state == self.state for state in self._states},
        )


@dataclass
class SseClients:
    """How many SSE streams are open, across both listeners."""

    count: int = 0


class DaemonMetrics:
    """Events, subscribers, hooks, signals, the watcher and config PATCHes.

    Most values are read from the components at scrape time, so nothing on a hot path pays
    for them; PATCH results are counted by the API as they happen (`count_patch`).
    """

    def __init__(
        self,
        registry: MetricsRegistry,
        *,
        bus: EventBus,
        notifier: Notifier,
        watcher: SettingsWatcher,
        sse_clients: SseClients | None = None,
    ) -> None:
        self._bus = bus
        self._notifier = notifier
        self._watcher = watcher
        self.sse_clients = sse_clients if sse_clients is not None else SseClients()
        self.config_patches: dict[str, int] = {}
        registry.register(self)

    def count_patch(self, status: int) -> None:
        """Count one answered PATCH /config by its HTTP status."""
        key = str(status)
        self.config_patches[key] = self.config_patches.get(key, 0) + 1

    def collect(self) -> Iterable[Metric]:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        yield _by_label(
            PREFIX + "config_patches",
            "PATCH /config requests by HTTP status.",
            "status",
            self.config_patches,
        )
        yield GaugeMetricFamily(
            PREFIX + "event_subscribers",
            "Open event subscriptions (SSE, hooks).",
            value=self._bus.subscriber_count,
        )
        yield GaugeMetricFamily(
            PREFIX + "sse_clients",
            "Open GET /events streams (the /status subscribers).",
            value=self.sse_clients.count,
        )
        yield CounterMetricFamily(
            PREFIX + "events", "Events emitted since start.", value=self._bus.published
        )
        yield CounterMetricFamily(
            PREFIX + "event_subscribers_dropped",
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
            yield CounterMetricFamily(PREFIX + name, text, value=value)
        watcher = self._watcher.status()
        yield GaugeMetricFamily(
            PREFIX + "watcher_running",
            "1 while the settings watcher runs.",
            value=1 if watcher.get("running") else 0,
        )
        yield GaugeMetricFamily(
            PREFIX + "watcher_folders",
            "Folders the watcher watches.",
            value=len(watcher.get("folders", ())),
        )
        yield CounterMetricFamily(
            PREFIX + "watcher_restarts",
            "Watcher restarts (folder set changes, errors).",
            value=watcher.get("restarts", 0),
        )
