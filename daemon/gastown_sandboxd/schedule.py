"""When to try the next refresh: a pure function of the token, the time and past failures.

Regular refresh at `iat + 0.5·lifetime - u·0.1·lifetime`, where `u` in [0, 1) is drawn once
per token (so a fleet that got its tokens together spreads out, and re-planning is stable).
After failures, full-jitter exponential backoff with a floor, tighter when the token is close
to expiry, never sooner than the cloud's `Retry-After`.
"""

from __future__ import annotations

import email.utils
import enum
import random
from dataclasses import dataclass
from datetime import UTC

from .token import Claims


@dataclass(frozen=True, slots=True)
class SchedulePolicy:
    """Tuning of the schedule, in seconds or fractions of the token lifetime."""

    refresh_fraction: float = 0.5
    jitter_fraction: float = 0.1
    backoff_initial: float = 1.0
    backoff_max: float = 300.0
    urgent_backoff_max: float = 30.0
    max_sleep: float = 30.0
    inactive_probe: float = 3600.0
    retry_after_cap: float = 300.0
    # Full jitter can draw ~0: the floor keeps outages to one call per 2 s at most.
    min_retry_gap: float = 2.0
    urgent_fraction: float = 0.1


class Outcome(enum.StrEnum):
    """How the last refresh attempt ended; failures match `RefreshError.kind`."""

    OK = "ok"
    OUTAGE = "outage"
    BUSY = "busy"
    BROKEN = "broken"
    UNAUTHORIZED = "unauthorized"
    INACTIVE = "inactive"
    # A refresh that succeeded with a token already past its refresh point.
    STALE = "stale"


def draw_jitter(rng: random.Random) -> float:
    """The per-token jitter draw `u` in [0, 1)."""
    return rng.random()


def refresh_point(claims: Claims, jitter: float, policy: SchedulePolicy) -> float:
    """The regular refresh time of a token, earlier by `jitter` of the jitter window."""
    lifetime = claims.exp - claims.iat
    return (
        claims.iat + policy.refresh_fraction * lifetime - jitter * policy.jitter_fraction * lifetime
    )


def is_urgent(claims: Claims | None, now: float, policy: SchedulePolicy) -> bool:
    """No token, or less than `urgent_fraction` of its lifetime left."""
    if claims is None:
        return True
    return claims.exp - now < policy.urgent_fraction * (claims.exp - claims.iat)


def backoff_delay(
    failures: int, *, urgent: bool, rng: random.Random, policy: SchedulePolicy
) -> float:
    """Full jitter `U(0, min(cap, initial·2^(n-1)))`, at least `min_retry_gap`."""
    cap = policy.urgent_backoff_max if urgent else policy.backoff_max
    exponent = min(max(failures, 1) - 1, 64)
    ceiling = min(cap, policy.backoff_initial * 2.0**exponent)
    return max(policy.min_retry_gap, rng.uniform(0.0, ceiling))


def next_attempt_at(
    claims: Claims | None,
    now: float,
    *,
    failures: int,
    outcome: Outcome,
    jitter: float,
    rng: random.Random,
    retry_after: float | None = None,
    policy: SchedulePolicy = SchedulePolicy(),
) -> float:
    """The absolute wall time of the next refresh attempt.

    `claims` is the held token (None when there is none), `failures` counts the consecutive
    failed attempts including the last one, `outcome` is how the last attempt ended (OK at
    start), `retry_after` the seconds the cloud asked to wait.
    """
    if outcome is Outcome.INACTIVE:
        return now + policy.inactive_probe
    urgent = is_urgent(claims, now, policy)
    if outcome is Outcome.STALE:
        # Asking again at once would get the same token: wait as after a refusal.
        return now + (policy.urgent_backoff_max if urgent else policy.backoff_max)
    if failures <= 0 or outcome is Outcome.OK:
        if claims is None:
            return now
        return max(now, refresh_point(claims, jitter, policy))
    if outcome is Outcome.UNAUTHORIZED:
        delay = policy.urgent_backoff_max if urgent else policy.backoff_max
    else:
        delay = backoff_delay(failures, urgent=urgent, rng=rng, policy=policy)
    if retry_after is not None:
        delay = max(delay, min(retry_after, policy.retry_after_cap))
    return now + delay


def sleep_for(wake_at: float, now: float, policy: SchedulePolicy = SchedulePolicy()) -> float:
    """Seconds to sleep before looking at the wall clock again (at most `max_sleep`)."""
    return max(0.0, min(wake_at - now, policy.max_sleep))


def parse_retry_after(value: str, now: float) -> float | None:
    """Seconds to wait from a `Retry-After` header (delay-seconds or HTTP date); None if bad."""
    value = value.strip()
    if value.isascii() and value.isdigit():
        return float(int(value))
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError, OverflowError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return max(0.0, when.timestamp() - now)
