"""When to try the next refresh: a pure function of the token, the time and past failures.

Each held token has one regular refresh time, drawn once (so re-planning is stable):
- a token the daemon got from its own refresh call: `refresh_point`, the contract's
  `iat + 0.5·lifetime - u·0.1·lifetime` with `u` in [0, 1) drawn per token;
- a token it adopted (found in the env file at start-up or after an outside edit, or pushed):
  `desync_point`, which spreads a fleet that got its tokens together at once instead of over
  the weeks the jitter alone takes (see its docstring).
After failures, full-jitter exponential backoff with a floor, tighter when the token is close
to expiry, never sooner than the cloud's `Retry-After`; with a `Retry-After` the backoff
itself is held to `busy_backoff_max` (60 s), so the cloud's plan, not the daemon's 300 s
ceiling, decides when a refused sandbox comes back.

Short tokens (CONTRACT §3): below a lifetime of `SHORT_LIFETIME` (1 h) every waiting time
shrinks with the lifetime, so a 30 s demo token fares as a 24 h one does: `backoff_max`,
`urgent_backoff_max`, `max_sleep` and `min_retry_gap` are each multiplied by
lifetime ÷ 1 h, never below `SCALED_FLOOR` (100 ms); see `scaled_policy`. So is
`retry_after_cap`, which the contract's list does not name: a 30 s token held to the 24 h
token's 300 s cap waited out a `Retry-After: 120` with nothing to send for the last 90 s of
it, where the scaled cap (2.5 s) keeps the wait the same share of its life.
"""

from __future__ import annotations

import enum
import math
import random
from dataclasses import dataclass, replace
from datetime import UTC

from gastown_sandboxd.token.claims import Claims


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
    # A 429/503 with Retry-After comes from something alive that plans the return (the cloud's
    # admission control spreads the fleet over its backlog): the daemon's own backoff on top
    # of it is held to this, so a sandbox refused late is not sent 300 s past its slot.
    busy_backoff_max: float = 30.0
    # Full jitter can draw ~0: the floor keeps outages to one call per 2 s at most.
    min_retry_gap: float = 2.0
    urgent_fraction: float = 0.1
    # An adopted token younger than this gets the desync draw; an older one the contract's.
    desync_age_fraction: float = 0.01


SHORT_LIFETIME = 3600.0
SCALED_FLOOR = 0.1


def scaled_policy(policy: SchedulePolicy, lifetime: float | None) -> SchedulePolicy:
    """`policy` with its waiting times shrunk for a token of `lifetime` seconds (None: none
    held, or from 1 h up: unchanged). Each of the contract's four, and the cap on
    `Retry-After`, shrinks by lifetime ÷ 1 h, floor 100 ms (a setting already below the floor
    stays as set)."""
    if lifetime is None or lifetime >= SHORT_LIFETIME:
        return policy
    factor = max(lifetime, 0.0) / SHORT_LIFETIME

    def shrink(seconds: float) -> float:
        return min(seconds, max(SCALED_FLOOR, seconds * factor))

    return replace(
        policy,
        backoff_max=shrink(policy.backoff_max),
        urgent_backoff_max=shrink(policy.urgent_backoff_max),
        max_sleep=shrink(policy.max_sleep),
        min_retry_gap=shrink(policy.min_retry_gap),
        retry_after_cap=shrink(policy.retry_after_cap),
    )


def lifetime_of(claims: Claims | None) -> float | None:
    """`exp - iat` of the held token, None without one."""
    return None if claims is None else float(claims.exp - claims.iat)


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


def desync_point(
    claims: Claims, now: float, rng: random.Random, policy: SchedulePolicy = SchedulePolicy()
) -> float:
    """The regular refresh time of a token the daemon adopted rather than got from the cloud.

    Never before `now`, never after `iat + refresh_fraction·lifetime` (the latest
    `refresh_point`, so expiry is no closer than with the contract's formula), and `now` once
    that has passed (less than half the lifetime left: refresh at once).

    Why: regular refreshes of one sandbox come every X ~ U(a, b) after the token's iat, with
    a = (refresh_fraction - jitter_fraction)·lifetime and b = refresh_fraction·lifetime. A
    fleet whose tokens share an iat (a boot storm: every town's token minted as it boots)
    refreshes in waves that the jitter only damps slowly: by the renewal equation for these X,
    the busiest minute stays above 1.25 times the mean until day 13.
    A fleet is even from the start when each sandbox's first refresh follows the stationary
    law of the time to the next refresh seen from a random instant, density P(X > r)/E[X].
    That law is the law of V·T, with V ~ U(0, 1) and T length-biased on [a, b] (a random
    instant falls in an interval with probability proportional to its length), density
    t/(E[X]·(b - a)), distribution (t² - a²)/(b² - a²), so T = sqrt(a² + W·(b² - a²)) with
    W ~ U(0, 1). Such a fleet is a stationary renewal process: n/E[X] refreshes per unit of
    time from its first minute. Later refreshes follow `refresh_point`.

    A young token (issued less than `desync_age_fraction` of its lifetime ago: minted for a
    boot, pushed, just written by someone else) gets iat + V·T; a draw already past is drawn
    again, uniformly in [now, iat + T]. An older token (what a restarted daemon finds on disk
    in a fleet that is already even) gets the contract's point conditioned on falling after
    now, uniform in [max(iat + a, now), iat + b]: the exact law of the time to the next
    refresh given the token's age, so a fleet-wide restart keeps an even fleet even (the
    draw above would re-bunch it, and the plain formula would refresh at once the ~4 % whose
    point has passed).
    """
    lifetime = claims.exp - claims.iat
    # A jitter wider than the refresh fraction (settings allow it) would make `low` negative.
    low = max(0.0, policy.refresh_fraction - policy.jitter_fraction) * lifetime
    high = policy.refresh_fraction * lifetime
    latest = claims.iat + high
    if now >= latest:
        return now
    if now - claims.iat < policy.desync_age_fraction * lifetime:
        span = math.sqrt(low * low + rng.random() * (high * high - low * low))
        point = claims.iat + rng.random() * span
        if point > now:
            return point
        if claims.iat + span > now:  # always, unless desync_age_fraction reaches past `low`
            return now + rng.random() * (claims.iat + span - now)
    start = max(claims.iat + low, now)
    return start + rng.random() * (latest - start)


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


def counts_from_now(*, failures: int, outcome: Outcome) -> bool:
    """Whether `next_attempt_at` answers with a wait counted from `now` (a backoff, the stale
    wait, the inactive probe) rather than the token's own refresh point."""
    if outcome in (Outcome.INACTIVE, Outcome.STALE):
        return True
    return failures > 0 and outcome is not Outcome.OK


def next_attempt_at(
    claims: Claims | None,
    now: float,
    *,
    failures: int,
    outcome: Outcome,
    refresh_at: float,
    rng: random.Random,
    retry_after: float | None = None,
    policy: SchedulePolicy = SchedulePolicy(),
) -> float:
    """The absolute wall time of the next refresh attempt.

    `claims` is the held token (None when there is none), `refresh_at` its regular refresh
    time (`refresh_point` or `desync_point`, drawn once per token; ignored without a token),
    `failures` counts the consecutive failed attempts including the last one, `outcome` is how
    the last attempt ended (OK at start), `retry_after` the seconds the cloud asked to wait.
    The policy's waiting times are scaled to the held token's lifetime (`scaled_policy`).
    """
    policy = scaled_policy(policy, lifetime_of(claims))
    if outcome is Outcome.INACTIVE:
        return now + policy.inactive_probe
    urgent = is_urgent(claims, now, policy)
    if outcome is Outcome.STALE:
        # Asking again at once would get the same token: wait as after a refusal.
        return now + (policy.urgent_backoff_max if urgent else policy.backoff_max)
    if not counts_from_now(failures=failures, outcome=outcome):
        if claims is None:
            return now
        return max(now, refresh_at)
    if outcome is Outcome.UNAUTHORIZED:
        delay = policy.urgent_backoff_max if urgent else policy.backoff_max
    elif retry_after is not None:
        busy = replace(
            policy,
            backoff_max=min(policy.backoff_max, policy.busy_backoff_max),
            urgent_backoff_max=min(policy.urgent_backoff_max, policy.busy_backoff_max),
        )
        delay = backoff_delay(failures, urgent=urgent, rng=rng, policy=busy)
    else:
        delay = backoff_delay(failures, urgent=urgent, rng=rng, policy=policy)
    if retry_after is not None:
        delay = max(delay, min(retry_after, policy.retry_after_cap))
    return now + delay


def sleep_for(wake_at: float, now: float, policy: SchedulePolicy = SchedulePolicy()) -> float:
    """Seconds to sleep before looking at the wall clock again (at most `max_sleep`)."""
    return max(0.0, min(wake_at - now, policy.max_sleep))


def parse_retry_after(value: str, now: float) -> float | None:
    """Seconds to wait from a `Retry-After` header (delay-seconds or HTTP date); None if bad.

    Any number of digits is read: past a float's range it is infinite, which the cap of
    `next_attempt_at` brings back to 300 s (`int()` first would raise past 4,300 digits, and
    its float past ~308).
    """
    value = value.strip()
    if value.isascii() and value.isdigit():
        return float(value)
    import email.utils  # only for a date: ~4 ms of each command otherwise

    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError, OverflowError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return max(0.0, when.timestamp() - now)
