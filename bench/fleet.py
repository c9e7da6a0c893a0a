"""Fleet-scale simulation: N sandboxes booted in the same second, refreshing on the real schedule.

Every sandbox boots within the first second holding a 24 h token minted at t = 0. Each call
to the cloud is planned by the daemon's own `gastown_sandboxd.token.schedule`: the boot token, which
the daemon adopts from its env file, at `desync_point` (`first_refresh="daemon"`, what
`TokenRefresher` does) or, as the baseline, at the contract's formula (`"contract"`); every
token from a refresh call at `refresh_point` with a jitter drawn by `draw_jitter`; the next
call by `next_attempt_at`. The cloud answers with a new token whose `iat` is the whole second
of the call, or, during an outage, with a connection error (`Outcome.OUTAGE`). The daemon's
30 s wake-ups never move a call (it happens once its planned time is reached, and the wall
clock does not jump here), so calls are simulated at their planned times with one heap of
(time, sandbox). `restart_at` restarts every daemon in the same second: each adopts the token
on its disk again.

`expected_load` solves the renewal equation for the contract's schedule: the noise-free
refreshes per minute of an infinite fleet, to see how many days a boot storm takes to even out.

`simulate_recovery` puts sandboxes whose refresh falls due during an outage through the
cloud's real admission control (`gastown_cloud.admission.RefreshAdmission`) once it is back,
each refusal answered with 503 and a Retry-After that the real `next_attempt_at` honours.

`python -m bench.fleet` prints every scenario; `simulate()` runs one (tests run small ones);
`run()` gives the headline figures to `python -m bench`.
"""

from __future__ import annotations

import argparse
import bisect
import heapq
import math
import random
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

from gastown_cloud.admission import RefreshAdmission
from gastown_sandboxd.token.claims import Claims
from gastown_sandboxd.token.schedule import (
    Outcome,
    SchedulePolicy,
    desync_point,
    draw_jitter,
    next_attempt_at,
    refresh_point,
)

from ._table import Row, bar, table

HOUR = 3600.0
DAY = 86400
# How a sandbox plans a token it did not get itself: the daemon's rule, the contract's, or
# the desync draw for tokens of every age as first proposed (for comparison).
FirstRefresh = Literal["daemon", "contract", "proposal"]


@dataclass(frozen=True, slots=True)
class Outage:
    """The cloud refuses every connection from `start` for `duration` seconds after boot."""

    start: float
    duration: float

    @property
    def end(self) -> float:
        return self.start + self.duration


@dataclass(frozen=True, slots=True)
class Load:
    """Calls per minute over a window: the mean, the peak and trough of `bucket`-minute averages."""

    mean: float
    peak: float
    bucket: int
    trough: float = 0.0

    @property
    def ratio(self) -> float:
        return self.peak / self.mean if self.mean else math.inf

    @property
    def low_ratio(self) -> float:
        return self.trough / self.mean if self.mean else 0.0


@dataclass
class FleetResult:
    """What the cloud saw, minute by minute, and what the sandboxes went through."""

    n: int
    seconds: float
    outage: Outage | None
    first_refresh: FirstRefresh
    policy: SchedulePolicy
    lifetime: int
    calls: list[int]  # calls to the cloud per minute, failed or not
    refreshes: list[int]  # successful calls per minute
    failing: list[int]  # the most sandboxes in backoff at once during each minute
    restart_at: float | None = None
    min_call_gap: float = math.inf  # shortest time between two calls of one sandbox
    min_left_at_refresh: float = math.inf  # least token life left at a successful call
    expired: int = 0  # tokens that expired before their sandbox replaced them
    outage_calls: int = 0
    outage_calls_expected: float = 0.0  # calls expected from the mean backoffs, summed
    most_calls_one_sandbox: int = 0  # during the outage
    failing_at_recovery: int = 0
    recovery_time: float | None = None  # from the outage's end to the last sandbox refreshed
    first_call: float = math.inf
    first_failures: list[float] = field(default_factory=list, repr=False)  # sorted

    def load(self, start: float, end: float, *, bucket: int = 1, series: str = "calls") -> Load:
        """The load over [start, end) seconds after boot, in whole `bucket`-minute buckets."""
        counts = self.calls if series == "calls" else self.refreshes
        first, last = int(start // 60), min(int(end // 60), len(counts))
        last -= (last - first) % bucket
        window = counts[first:last]
        if not window:
            return Load(0.0, 0.0, bucket)
        sums = [sum(window[k : k + bucket]) for k in range(0, len(window), bucket)]
        return Load(sum(window) / len(window), max(sums) / bucket, bucket, min(sums) / bucket)

    def expected_retry_calls(self, start: float, end: float) -> float:
        """The calls in [start, end) that the backoff's mean delays predict for the outage.

        Counts, for every sandbox that failed, the offsets of `expected_retry_offsets` from its
        first failure that fall in the window and in the outage (sandboxes far from expiry).
        """
        if self.outage is None:
            return 0.0
        offsets = expected_retry_offsets(self.outage.duration, self.policy)
        low, high = max(start, self.outage.start), min(end, self.outage.end)
        if low >= high:
            return 0.0
        total = 0
        for first in self.first_failures:
            if first >= high:
                break
            total += bisect.bisect_left(offsets, high - first)
            total -= bisect.bisect_left(offsets, low - first)
        return float(total)


def simulate(
    n: int = 100_000,
    days: float = 3.0,
    *,
    outage: Outage | None = None,
    seed: int = 1,
    policy: SchedulePolicy | None = None,
    lifetime: int = DAY,
    first_refresh: FirstRefresh = "daemon",
    restart_at: float | None = None,
    restart_refresh: FirstRefresh | None = None,
) -> FleetResult:
    """Run `n` sandboxes for `days`, every daemon restarted in the second after `restart_at`.

    `first_refresh` plans the tokens the daemons adopt from their env files at boot: "daemon"
    as `TokenRefresher` does, "contract" by the contract's formula; `restart_refresh` (by
    default the same) plans the tokens they adopt again at the restart.
    """
    if outage is not None and restart_at is not None:
        raise ValueError("simulate an outage or a restart, not both")
    policy = policy or SchedulePolicy()
    rng = random.Random(seed)
    end = days * DAY
    minutes = math.ceil(end / 60)
    result = FleetResult(
        n=n,
        seconds=end,
        outage=outage,
        first_refresh=first_refresh,
        policy=policy,
        lifetime=lifetime,
        calls=[0] * minutes,
        refreshes=[0] * minutes,
        failing=[0] * minutes,
        restart_at=restart_at,
    )

    def plan(token: Claims, now: float, *, adopted: FirstRefresh | None) -> tuple[float, float]:
        """The token's regular refresh time and the next call, as the daemon plans them."""
        if adopted == "daemon":
            due = desync_point(token, now, rng, policy)
        elif adopted == "proposal":
            due = proposal_point(token, now, rng, policy)
        else:
            due = refresh_point(token, draw_jitter(rng), policy)
        wake = next_attempt_at(
            token, now, failures=0, outcome=Outcome.OK, refresh_at=due, rng=rng, policy=policy
        )
        return due, wake

    boot_token = _claims(0, lifetime)
    held = [boot_token] * n
    due = [0.0] * n
    failures = [0] * n
    last_call = [-math.inf] * n
    heap: list[tuple[float, int]] = []
    for i in range(n):
        booted = rng.random()  # all within the same second
        due[i], at = plan(boot_token, booted, adopted=first_refresh)
        heap.append((at, i))
    heapq.heapify(heap)
    down_from, down_until = (outage.start, outage.end) if outage else (math.inf, math.inf)
    restart = math.inf if restart_at is None else restart_at
    again = restart_refresh or first_refresh
    outage_calls_of: dict[int, int] = {}
    first_fail: dict[int, float] = {}
    failing = 0
    recovered_at: float | None = None
    calls, refreshes, failing_peak = result.calls, result.refreshes, result.failing
    while heap and heap[0][0] < end:
        if heap[0][0] >= restart:
            heap = []
            for i in range(n):
                due[i], at = plan(held[i], restart + rng.random(), adopted=again)
                heap.append((at, i))
            heapq.heapify(heap)
            restart = math.inf
            continue
        now, i = heap[0]
        minute = int(now // 60)
        calls[minute] += 1
        result.first_call = min(result.first_call, now)
        result.min_call_gap = min(result.min_call_gap, now - last_call[i])
        last_call[i] = now
        token = held[i]
        if now >= down_until and recovered_at is None:
            recovered_at = now
            result.failing_at_recovery = failing
        if down_from <= now < down_until:
            failures[i] += 1
            if failures[i] == 1:
                failing += 1
                first_fail[i] = now
            outage_calls_of[i] = outage_calls_of.get(i, 0) + 1
            wake = next_attempt_at(
                token,
                now,
                failures=failures[i],
                outcome=Outcome.OUTAGE,
                refresh_at=due[i],
                rng=rng,
                policy=policy,
            )
        else:
            left = token.exp - now
            result.min_left_at_refresh = min(result.min_left_at_refresh, left)
            if left <= 0:
                result.expired += 1
            if failures[i]:
                failing -= 1
                failures[i] = 0
                result.recovery_time = max(result.recovery_time or 0.0, now - down_until)
            refreshes[minute] += 1
            iat = int(now)  # the cloud mints in whole seconds
            token = held[i] = _claims(iat, lifetime)
            due[i], wake = plan(token, now, adopted=None)
        failing_peak[minute] = max(failing_peak[minute], failing)
        heapq.heapreplace(heap, (wake, i))
    result.expired += sum(1 for token in held if token.exp <= end)
    if outage is not None:
        result.outage_calls = sum(outage_calls_of.values())
        result.most_calls_one_sandbox = max(outage_calls_of.values(), default=0)
        result.first_failures = sorted(first_fail.values())
        result.outage_calls_expected = result.expected_retry_calls(outage.start, outage.end)
    return result


def proposal_point(token: Claims, now: float, rng: random.Random, policy: SchedulePolicy) -> float:
    """The desync draw as first proposed, for tokens of every age: iat + V·T, and when that has
    passed, uniformly in [now, iat + T] (in [now, iat + b] when iat + T has passed too)."""
    lifetime = token.lifetime
    low = (policy.refresh_fraction - policy.jitter_fraction) * lifetime
    high = policy.refresh_fraction * lifetime
    if now >= token.iat + high:
        return now
    span = math.sqrt(low * low + rng.random() * (high * high - low * low))
    point = token.iat + rng.random() * span
    if point > now:
        return point
    top = token.iat + span if token.iat + span > now else token.iat + high
    return now + rng.random() * (top - now)


def expected_backoff(failures: int, policy: SchedulePolicy, *, urgent: bool = False) -> float:
    """The mean of `backoff_delay`: E[max(gap, U(0, ceiling))] = (ceiling² + gap²) / 2·ceiling."""
    cap = policy.urgent_backoff_max if urgent else policy.backoff_max
    ceiling = min(cap, policy.backoff_initial * 2.0 ** min(max(failures, 1) - 1, 64))
    gap = policy.min_retry_gap
    if ceiling <= gap:
        return gap
    return (ceiling * ceiling + gap * gap) / (2 * ceiling)


def expected_retry_offsets(horizon: float, policy: SchedulePolicy) -> list[float]:
    """When a failing sandbox calls, counted from its first failure, if every backoff is its mean.

    The count of offsets below W is the backoff's bound on one sandbox's calls in W seconds.
    """
    offsets = [0.0]
    failures = 1
    while offsets[-1] <= horizon:
        offsets.append(offsets[-1] + expected_backoff(failures, policy))
        failures += 1
    return offsets


def expected_load(
    days: float, *, policy: SchedulePolicy | None = None, lifetime: int = DAY, step: int = 60
) -> list[float]:
    """Expected refreshes per `step` seconds per sandbox, for a fleet whose tokens share iat 0
    and are planned by the contract's formula (`first_refresh="contract"`).

    Solves the renewal equation h = f + (h convolved with f), where f is the law of the refresh
    interval, read off the real `refresh_point` over a fine grid of jitter draws (the first
    refresh, from iat 0, has the same law). Under the daemon's `desync_point` the first refresh
    has the stationary law instead, and h is flat from the start.
    """
    policy = policy or SchedulePolicy()
    token = _claims(0, lifetime)
    grid = 20_000
    interval: dict[int, float] = {}
    for k in range(grid):
        at = refresh_point(token, (k + 0.5) / grid, policy)
        slot = round(at / step)
        interval[slot] = interval.get(slot, 0.0) + 1.0 / grid
    steps = math.ceil(days * DAY / step)
    density = [0.0] * steps
    terms = sorted(interval.items())
    for t in range(steps):
        value = interval.get(t, 0.0)
        for lag, p in terms:
            if lag > t:
                break
            value += density[t - lag] * p
        density[t] = value
    return density


def _claims(iat: int, lifetime: int) -> Claims:
    return Claims("user", "gastown_sandbox", "town", None, iat, iat + lifetime)


# --- the report -----------------------------------------------------------------------------


def _hours(seconds: float) -> str:
    whole = int(seconds // 60)
    return f"{whole // 60}h{whole % 60:02d}"


def overview(result: FleetResult, *, hours: range | None = None, width: int = 50) -> str:
    """Calls per minute, hour by hour: the hour's mean and its busiest minute."""
    rows = []
    for hour in hours or range(math.ceil(result.seconds / HOUR)):
        load = result.load(hour * HOUR, (hour + 1) * HOUR)
        rows.append((hour, load.mean, load.peak))
    top = max((peak for _, _, peak in rows), default=0.0)
    lines = ["hour   mean/min   peak/min"]
    for hour, mean, peak in rows:
        lines.append(f"{hour:4d}  {mean:9.1f}  {peak:9.0f}  |{bar(mean, top, width)}")
    return "\n".join(lines)


def outage_histogram(result: FleetResult, *, bucket: int = 5, width: int = 50) -> str:
    """Calls per minute in `bucket`-minute steps from 30 min before the outage to 60 min after."""
    assert result.outage is not None
    start = result.outage.start - 30 * 60
    stop = result.outage.end + 60 * 60
    rows = []
    for minute in range(int(start // 60), int(stop // 60), bucket):
        at = minute * 60.0
        counts = result.calls[minute : minute + bucket]
        failing = max(result.failing[minute : minute + bucket], default=0)
        expected = result.expected_retry_calls(at, at + bucket * 60) / bucket
        rows.append((at, sum(counts) / bucket, max(counts, default=0), expected, failing))
    top = max((row[2] for row in rows), default=0)
    lines = [
        f"({bucket}-minute buckets; * = cloud down; backoff = retries the mean backoff predicts)",
        "  time  mean/min  peak/min   backoff   failing",
    ]
    for at, mean, peak, expected, most in rows:
        down = "*" if result.outage.start <= at < result.outage.end else " "
        lines.append(
            f"{_hours(at):>6}{down} {mean:8.0f}  {peak:8d}  {expected:8.0f}  {most:8d}"
            f"  |{bar(peak, top, width)}"
        )
    return "\n".join(lines)


def load_table(results: Sequence[tuple[str, FleetResult]]) -> str:
    """Peak over mean calls per minute after the first hour and day by day, per bucket size."""
    rows = []
    for name, result in results:
        days = math.ceil(result.seconds / DAY)
        windows = [("after 1st hour", HOUR, result.seconds)]
        windows += [(f"day {d + 1}", max(d * DAY, HOUR), (d + 1) * DAY) for d in range(days)]
        for label, start, end in windows:
            by = [result.load(start, end, bucket=b) for b in (1, 10, 60)]
            rows.append(
                (name, label, by[0].mean, by[0].peak, by[0].ratio, by[1].ratio, by[2].ratio)
            )
    headers = ("scenario", "window", "mean/min", "peak/min", "1-min", "10-min", "60-min")
    return table(headers, rows)


def expected_load_table(density: Sequence[float], n: int, *, step: int = 60) -> str:
    """Day by day, the noise-free peak and mean refreshes per minute of an n-sandbox fleet."""
    per_day = DAY // step
    rows = []
    for day in range(len(density) // per_day):
        values = density[day * per_day : (day + 1) * per_day]
        mean = sum(values) / len(values) * n * 60 / step
        peak = max(values) * n * 60 / step
        rows.append((day + 1, mean, peak, peak / mean if mean else math.inf))
    return table(("day", "mean/min", "peak/min", "peak/mean"), rows)


def noise_peak(mean: float, buckets: int) -> float:
    """The likely largest of `buckets` Poisson counts of this mean (an even fleet's noise)."""
    return mean + math.sqrt(2 * math.log(max(buckets, 2)) * mean)


def first_day_within(density: Sequence[float], ratio: float, *, step: int = 60) -> int | None:
    """The first day from which every day's noise-free peak/mean stays at or under `ratio`."""
    per_day = DAY // step
    days = len(density) // per_day
    ratios = []
    for day in range(days):
        values = density[day * per_day : (day + 1) * per_day]
        mean = sum(values) / len(values)
        ratios.append(max(values) / mean if mean else math.inf)
    for day in range(days):
        if all(r <= ratio for r in ratios[day:]):
            return day + 1
    return None


def outage_table(result: FleetResult) -> str:
    """The outage in numbers: who failed, how often they called, how fast they recovered."""
    assert result.outage is not None
    outage = result.outage
    before = result.load(outage.start - HOUR, outage.start)
    during = result.load(outage.start, outage.end)
    tail = result.load(outage.end - 10 * 60, outage.end)
    after = result.load(outage.end, outage.end + 10 * 60)
    steady = 60.0 / expected_backoff(64, result.policy)
    rows = [
        ("calls/min in the hour before (mean / peak)", f"{before.mean:.0f} / {before.peak:.0f}"),
        ("calls/min during the outage (mean / peak)", f"{during.mean:.0f} / {during.peak:.0f}"),
        ("calls/min, its last 10 minutes (peak)", f"{tail.peak:.0f}"),
        ("calls/min, 10 minutes after recovery (peak)", f"{after.peak:.0f}"),
        ("sandboxes failing when the cloud came back", f"{result.failing_at_recovery:,}"),
        ("calls per failing sandbox at the 300 s cap", f"{steady:.2f}/min"),
        ("calls during the outage", f"{result.outage_calls:,}"),
        ("  expected from the mean backoff", f"{result.outage_calls_expected:,.0f}"),
        ("most calls by one sandbox", f"{result.most_calls_one_sandbox}"),
        ("shortest gap between two calls of one sandbox", f"{result.min_call_gap:.2f} s"),
        ("every failing sandbox refreshed within", f"{result.recovery_time or 0:.0f} s"),
        ("least token life left at a refresh", f"{result.min_left_at_refresh / HOUR:.2f} h"),
        ("tokens that expired", f"{result.expired}"),
    ]
    return table(("outage of " + _hours(outage.duration) + " at " + _hours(outage.start), ""), rows)


def restart_table(results: Sequence[tuple[str, FleetResult]]) -> str:
    """A fleet-wide restart: the calls of its first minute, then 10-minute peaks and troughs."""
    rows = []
    for name, result in results:
        assert result.restart_at is not None
        at = result.restart_at
        steady = result.load(at - 6 * HOUR, at)
        first = result.load(at, at + 60)
        day = result.load(at, at + DAY, bucket=10)
        later = result.load(at + HOUR, result.seconds, bucket=10)
        rows.append(
            (
                name,
                steady.mean,
                first.mean,
                day.ratio,
                day.low_ratio,
                later.ratio,
                later.low_ratio,
            )
        )
    headers = (
        "adopted tokens",
        "calls/min before",
        "1st minute",
        "peak 1st day",
        "trough 1st day",
        "peak after 1 h",
        "trough after 1 h",
    )
    return table(headers, rows)


def long_outage_table(result: FleetResult, fleet: int) -> str:
    """An outage longer than a token's life above 10 %: calls per sandbox, and for `fleet`."""
    assert result.outage is not None
    outage = result.outage
    last_hour = result.load(outage.end - HOUR, outage.end, bucket=10)
    per_sandbox = last_hour.peak / result.n
    urgent = 60.0 / expected_backoff(64, result.policy, urgent=True)
    relaxed = 60.0 / expected_backoff(64, result.policy)
    rows = [
        ("sandboxes simulated", f"{result.n:,}"),
        ("failing when the cloud came back", f"{result.failing_at_recovery:,}"),
        ("tokens that expired", f"{result.expired:,}"),
        ("calls/min per sandbox, last hour (10-min peak)", f"{per_sandbox:.2f}"),
        ("  backoff's mean at the 30 s cap (under 10 % left)", f"{urgent:.2f}"),
        ("  backoff's mean at the 300 s cap", f"{relaxed:.2f}"),
        (f"calls/min for {fleet:,} sandboxes, last hour", f"{per_sandbox * fleet:,.0f}"),
        (f"calls/min for {fleet:,} sandboxes at the 30 s cap", f"{urgent * fleet:,.0f}"),
    ]
    title = f"outage of {_hours(outage.duration)} at {_hours(outage.start)}"
    return table((title, ""), rows)


def run(*, quick: bool = False, sandboxes: int | None = None) -> list[Row]:
    """Headline figures for `python -m bench`: a boot storm, a fleet restart, a long outage."""
    n = sandboxes or (20_000 if quick else 100_000)
    days = 3.0
    storm = simulate(n, days)
    baseline = simulate(n, days, first_refresh="contract")
    after = (HOUR, storm.seconds)
    mean = storm.load(*after).mean
    buckets = int((storm.seconds - HOUR) // 60)
    rows = [
        Row(
            f"boot storm of {n:,}: refreshes/min, 10-min peak over mean after 1 h",
            storm.load(*after, bucket=10).ratio,
            "x",
            baseline.load(*after, bucket=10).ratio,
            "baseline: the contract's formula for the boot token",
        ),
        Row(
            "boot storm: 1-min peak over mean after 1 h",
            storm.load(*after).ratio,
            "x",
            baseline.load(*after).ratio,
            f"Poisson noise of an even fleet: {noise_peak(mean, buckets) / mean:.2f}",
        ),
    ]
    restart = 30 * HOUR
    restarted = simulate(n, days, restart_at=restart)
    contract = simulate(n, days, restart_at=restart, restart_refresh="contract")
    rows += [
        Row(
            "fleet-wide restart: calls in its first minute over the mean",
            restarted.load(restart, restart + 60).mean / restarted.load(0, restart).mean,
            "x",
            contract.load(restart, restart + 60).mean / contract.load(0, restart).mean,
            "baseline: the contract's formula for the tokens on disk",
        ),
        Row(
            "fleet-wide restart: 10-min peak over mean, its first day",
            restarted.load(restart, restart + DAY, bucket=10).ratio,
            "x",
            contract.load(restart, restart + DAY, bucket=10).ratio,
        ),
    ]
    small = max(50, n // 100)
    outage = Outage(30 * HOUR, 24 * HOUR)
    long = simulate(small, (outage.end + HOUR) / DAY, outage=outage)
    per_sandbox = long.load(outage.end - HOUR, outage.end).mean / small
    rows.append(
        Row(
            "24 h outage: calls/min per sandbox in its last hour",
            per_sandbox,
            "calls/min",
            note=f"x {n:,} sandboxes = {per_sandbox * n:,.0f}/min (30 s cap under 10 % left)",
        )
    )
    rate = max(1, n // 1_000)
    spread = simulate_recovery(n, rate)
    told_one = simulate_recovery(n, rate, retry_after="one")
    unlimited = simulate_recovery(n, None)
    rows += [
        Row(
            f"recovery of {n:,} after a 2 h outage, --refresh-rate {rate}: most admitted in 1 s",
            spread.most_in_one_second(),
            "refreshes",
            unlimited.most_in_one_second(),
            "baseline: no admission control",
        ),
        Row(
            "recovery: every sandbox fresh after the outage's end",
            spread.recovery,
            "s",
            told_one.recovery,
            f"baseline: everyone told 1 s; n/rate + 60 = {spread.bound:.0f} s",
        ),
        Row(
            "recovery: 503 answers sent",
            spread.refusals,
            "calls",
            told_one.refusals,
            "baseline: everyone told 1 s",
        ),
    ]
    return rows


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.fleet", description=__doc__)
    parser.add_argument("--sandboxes", type=int, default=100_000)
    parser.add_argument("--days", type=float, default=3.0)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--outage-at", type=float, default=54.0, help="hours after boot")
    parser.add_argument("--outage-hours", type=float, default=2.0)
    parser.add_argument("--restart-at", type=float, default=30.0, help="hours after boot")
    parser.add_argument("--long-outage-hours", type=float, default=24.0)
    parser.add_argument(
        "--long-outage-sandboxes", type=int, default=1_000, help="simulated; scaled to the fleet"
    )
    parser.add_argument("--horizon-days", type=int, default=30, help="for the expected load")
    parser.add_argument(
        "--recovery-rate", type=int, default=100, help="--refresh-rate of the recovery runs"
    )
    args = parser.parse_args(argv)
    n = args.sandboxes
    began = time.perf_counter()

    storm = simulate(n, args.days, seed=args.seed)
    print(f"== {n:,} sandboxes booted in the same second, 24 h tokens minted at t=0 ==")
    print("(the daemon's schedule: boot tokens adopted from the env file at desync_point)")
    print(f"first call to the cloud at {_hours(storm.first_call)} after boot\n")
    print(overview(storm))

    baseline = simulate(n, args.days, seed=args.seed, first_refresh="contract")
    print("\n== baseline: the same boot storm with the contract's formula for the boot token ==")
    print(f"first call to the cloud at {_hours(baseline.first_call)} after boot\n")
    print(overview(baseline))

    print("\n== calls per minute: peak over mean, by bucket size ==")
    print(load_table([("daemon", storm), ("contract", baseline)]))
    mean = storm.load(HOUR, storm.seconds).mean
    minutes = int((storm.seconds - HOUR) // 60)
    print(
        "\npeak/mean = the busiest bucket's calls per minute over the mean calls per minute of"
        " the same window.\nAn even fleet still shows Poisson noise: at"
        f" {mean:.0f} calls/min its likely peak/mean is {noise_peak(mean, minutes) / mean:.2f}"
        f" in 1-minute buckets, {noise_peak(10 * mean, minutes // 10) / (10 * mean):.2f} in"
        " 10-minute buckets."
    )

    density = expected_load(args.horizon_days)
    print(f"\n== contract baseline, expected (noise-free) refreshes per minute, {n:,} sandboxes ==")
    print(expected_load_table(density, n))
    for ratio in (1.25, 1.1):
        day = first_day_within(density, ratio)
        since = f"day {day}" if day else f"no day up to {args.horizon_days}"
        print(f"noise-free peak/mean stays <= {ratio} from {since}")

    restart = args.restart_at * HOUR
    print(f"\n== every daemon restarted in the same second at {_hours(restart)} ==")
    print("(each adopts the token on its disk again; 10-minute buckets, over the mean)")
    restarts = [
        ("daemon", simulate(n, args.days, seed=args.seed, restart_at=restart)),
        (
            "contract",
            simulate(n, args.days, seed=args.seed, restart_at=restart, restart_refresh="contract"),
        ),
        (
            "desync at any age",
            simulate(n, args.days, seed=args.seed, restart_at=restart, restart_refresh="proposal"),
        ),
    ]
    print(restart_table(restarts))

    outage = Outage(args.outage_at * HOUR, args.outage_hours * HOUR)
    hit = simulate(n, args.days, outage=outage, seed=args.seed)
    print(f"\n== a {args.outage_hours:g} h outage at {args.outage_at:g} h: every call fails ==")
    print(outage_histogram(hit))
    print()
    print(outage_table(hit))
    last = math.ceil(hit.seconds / HOUR)
    print("\nthe fleet after the outage: the recovered sandboxes' next wave is jittered as usual")
    print(overview(hit, hours=range(int(outage.start // HOUR) - 2, last)))

    long = Outage(restart, args.long_outage_hours * HOUR)
    small = args.long_outage_sandboxes
    print(
        f"\n== a {args.long_outage_hours:g} h outage: past ~10 h of failures a token has under"
        " 10 % of its life left and retries at most 30 s apart (contract) =="
    )
    long_hit = simulate(small, (long.end + 6 * HOUR) / DAY, outage=long, seed=args.seed)
    print(overview(long_hit, hours=range(int(long.start // HOUR), math.ceil(long.end / HOUR) + 1)))
    print()
    print(long_outage_table(long_hit, n))

    rate = args.recovery_rate
    print(
        f"\n== {n:,} sandboxes due during a {args.outage_hours:g} h outage, then the cloud"
        f" admits {rate} refreshes per second =="
    )
    print("(the daemon's schedule and the cloud's RefreshAdmission, both the real code)")
    spread = simulate_recovery(n, rate, outage_hours=args.outage_hours, seed=args.seed)
    print(recovery_histogram(spread))
    print()
    print(retry_after_histogram(spread))
    told_one = simulate_recovery(
        n, rate, outage_hours=args.outage_hours, seed=args.seed, retry_after="one"
    )
    unlimited = simulate_recovery(n, None, outage_hours=args.outage_hours, seed=args.seed)
    print("\nbaseline: no admission control")
    print(recovery_histogram(unlimited))
    print()
    print(
        recovery_table(
            [
                ("Retry-After spread", spread),
                ("everyone told 1 s", told_one),
                ("no admission control", unlimited),
            ]
        )
    )
    print(
        "\nA refused daemon waits the longer of Retry-After (capped at 300 s) and its own"
        " backoff,\nwhich a Retry-After holds to 30 s (`busy_backoff_max`): the cloud's slot"
        " decides the return."
    )
    print(f"\nran in {time.perf_counter() - began:.1f} s")
    return 0


# --- recovery from an outage under admission control ----------------------------------------

RetryAfterMode = Literal["spread", "one"]


@dataclass
class RecoveryResult:
    """What `n` sandboxes due during an outage went through once the cloud came back.

    Times are seconds after the outage's end. `rate` is the cloud's `--refresh-rate` (None:
    every call admitted); `retry_after` is how refusals were answered: "spread" as
    `RefreshAdmission` does, or "one" (everyone told 1 s, the baseline).
    """

    n: int
    rate: int | None
    retry_after: RetryAfterMode
    outage: Outage
    fresh_at: list[float]  # when each sandbox got its fresh token
    admitted: list[float]  # when each admission happened
    calls_per_second: list[int]  # every call after the end, admitted or refused
    outage_calls: int = 0
    refusals: int = 0
    waits: Counter[int] = field(default_factory=Counter)  # Retry-After values sent

    @property
    def recovery(self) -> float:
        """From the outage's end until the last sandbox holds a fresh token."""
        return max(self.fresh_at, default=0.0)

    @property
    def bound(self) -> float:
        """The issue's bound: n / rate + 60 s."""
        return math.inf if self.rate is None else self.n / self.rate + 60.0

    def most_in_one_second(self) -> int:
        """The most admissions in any window [t, t + 1) after the end."""
        ordered, start, most = sorted(self.admitted), 0, 0
        for end, at in enumerate(ordered):
            while ordered[start] <= at - 1.0:
                start += 1
            most = max(most, end - start + 1)
        return most

    def admitted_per_second(self) -> list[int]:
        counts = [0] * (math.ceil(self.recovery) + 1)
        for at in self.admitted:
            counts[int(at)] += 1
        return counts


def simulate_recovery(
    n: int = 100_000,
    rate: int | None = 100,
    *,
    outage_hours: float = 2.0,
    retry_after: RetryAfterMode = "spread",
    seed: int = 1,
    lifetime: int = DAY,
    policy: SchedulePolicy | None = None,
) -> RecoveryResult:
    """`n` sandboxes whose regular refresh falls due during an outage of `outage_hours`.

    Each holds a `lifetime` token whose `refresh_point` (the real one, with a real jitter
    draw) lies uniformly in the outage; every call planned by `next_attempt_at` fails with
    a connection error until the end; after it each call goes through the real
    `RefreshAdmission` of the cloud at `rate`: admitted (a fresh token, done) or refused with
    503 and a Retry-After (`Outcome.BUSY`, which `next_attempt_at` honours as the daemon does).
    """
    policy = policy or SchedulePolicy()
    rng = random.Random(seed)
    outage = Outage(0.0, outage_hours * HOUR)
    bucket = None if rate is None else RefreshAdmission(rate)
    lifetime_fraction = policy.refresh_fraction
    held: list[Claims] = []
    due: list[float] = []
    heap: list[tuple[float, int]] = []
    for i in range(n):
        target = rng.random() * outage.duration
        jitter = draw_jitter(rng)
        offset = (lifetime_fraction - jitter * policy.jitter_fraction) * lifetime
        iat = round(target - offset)
        token = _claims(iat, lifetime)
        held.append(token)
        due.append(refresh_point(token, jitter, policy))
        at = next_attempt_at(
            token, 0.0, failures=0, outcome=Outcome.OK, refresh_at=due[i], rng=rng, policy=policy
        )
        heap.append((at, i))
    heapq.heapify(heap)
    failures = [0] * n
    result = RecoveryResult(n, rate, retry_after, outage, [], [], [])
    while heap:
        now, i = heapq.heappop(heap)
        wait: int | None = None
        if now < outage.end:
            result.outage_calls += 1
            outcome = Outcome.OUTAGE
        else:
            since = now - outage.end
            second = int(since)
            if second >= len(result.calls_per_second):
                result.calls_per_second.extend([0] * (second + 1 - len(result.calls_per_second)))
            result.calls_per_second[second] += 1
            wait = None if bucket is None else bucket.admit(f"town-{i}", now)
            if wait is None:
                result.admitted.append(since)
                result.fresh_at.append(since)
                continue
            if retry_after == "one":
                wait = 1
            result.refusals += 1
            result.waits[wait] += 1
            outcome = Outcome.BUSY
        failures[i] += 1
        at = next_attempt_at(
            held[i],
            now,
            failures=failures[i],
            outcome=outcome,
            refresh_at=due[i],
            rng=rng,
            retry_after=None if wait is None else float(wait),
            policy=policy,
        )
        heapq.heappush(heap, (at, i))
    return result


def recovery_histogram(result: RecoveryResult, *, bucket: int = 30, width: int = 40) -> str:
    """Per `bucket` seconds after the end: calls and admissions per second, sandboxes made
    fresh, and those still waiting."""
    admitted = result.admitted_per_second()
    fresh = sorted(result.fresh_at)
    span = max(len(result.calls_per_second), len(admitted))
    rows, waiting, index = [], result.n, 0
    for start in range(0, span, bucket):
        calls = result.calls_per_second[start : start + bucket]
        done = admitted[start : start + bucket]
        got = 0
        while index < len(fresh) and fresh[index] < start + bucket:
            got, index = got + 1, index + 1
        waiting -= got
        rows.append((start, sum(calls) / bucket, max(calls, default=0), max(done, default=0), got,
                     waiting))  # fmt: skip
    top = max((row[2] for row in rows), default=0)
    lines = [
        f"({bucket}-second buckets from the outage's end; admitted/s is the busiest second)",
        "  from   calls/s  peak calls/s  admitted/s   fresh   waiting",
    ]
    for start, mean, peak, most, got, left in rows:
        lines.append(
            f"{start:5d}s {mean:9.1f} {peak:13d} {most:11d} {got:7d} {left:9d}  |"
            f"{bar(peak, top, width)}"
        )
    return "\n".join(lines)


def retry_after_histogram(result: RecoveryResult, *, buckets: int = 10, width: int = 40) -> str:
    """The Retry-After values the cloud sent, in `buckets` ranges."""
    if not result.waits:
        return "(no refusals)"
    top = max(result.waits)
    step = max(1, math.ceil(top / buckets))
    merged: Counter[int] = Counter()
    for wait, count in result.waits.items():
        merged[(wait - 1) // step] += count
    most = max(merged.values())
    lines = ["Retry-After (s)      refusals"]
    for slot in range(math.ceil(top / step)):
        low, high = slot * step + 1, (slot + 1) * step
        count = merged.get(slot, 0)
        lines.append(f"{low:6d} - {high:6d} {count:10,d}  |{bar(count, most, width)}")
    return "\n".join(lines)


def recovery_table(results: Sequence[tuple[str, RecoveryResult]]) -> str:
    """Each run's admissions, calls and recovery time, beside the issue's bound."""
    rows = []
    for name, result in results:
        rows.append(
            (
                name,
                "-" if result.rate is None else f"{result.rate}/s",
                result.most_in_one_second(),
                max(result.calls_per_second, default=0),
                result.refusals,
                result.recovery,
                result.bound,
            )
        )
    headers = ("cloud", "rate", "most admitted in 1 s", "peak calls/s", "503s",
               "all fresh after (s)", "n/rate + 60 (s)")  # fmt: skip
    return table(headers, rows)


if __name__ == "__main__":
    raise SystemExit(main())
