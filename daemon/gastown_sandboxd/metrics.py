"""Prometheus metrics, each group registered on a registry it is given (never the global one)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Enum, Gauge, Histogram

from ._types import Clock, SystemClock

TOKEN_STATES = ("fresh", "refreshing", "degraded", "expired", "missing", "town_inactive")
REFRESH_RESULTS = ("ok", "outage", "busy", "broken", "unauthorized", "inactive", "write_failed")


class TokenMetrics:
    """The token's expiry, the refresh attempts and their latency, the refresher's state."""

    def __init__(self, registry: CollectorRegistry, *, clock: Clock | None = None) -> None:
        self._clock = clock or SystemClock()
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
        for result in REFRESH_RESULTS:
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
            states=list(TOKEN_STATES),
            registry=registry,
        )
        self.state.state("missing")

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

    def _seconds_left(self) -> float:
        if self._exp is None:
            return 0.0
        return max(0.0, self._exp - self._clock.time())
