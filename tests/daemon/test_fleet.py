"""The fleet simulation (bench.fleet) at 10,000 sandboxes: what the real schedule does at scale.

Every run is seeded, so each property is checked on one reproducible draw; the bounds come from
the schedule's parameters (jitter window, backoff law), not from the draw.
"""

from __future__ import annotations

import math
import random

import pytest
from bench.fleet import (
    DAY,
    HOUR,
    FleetResult,
    Outage,
    expected_backoff,
    expected_load,
    first_day_within,
    main,
    simulate,
)

from gastown_sandboxd.schedule import SchedulePolicy, backoff_delay

N = 10_000
POLICY = SchedulePolicy()
OUTAGE = Outage(54 * HOUR, 2 * HOUR)
# Regular refreshes come every U(0.4, 0.5) lifetimes: 0.45 on average.
MEAN_INTERVAL = (POLICY.refresh_fraction - POLICY.jitter_fraction / 2) * DAY


@pytest.fixture(scope="module")
def storm() -> FleetResult:
    """Ten thousand sandboxes booted in the same second, for three days, the cloud always up."""
    return simulate(N, 3)


@pytest.fixture(scope="module")
def outage() -> FleetResult:
    """The same fleet with the cloud refusing every connection for 2 h on day 3's busiest hours."""
    return simulate(N, 3, outage=OUTAGE)


def test_first_wave_waits_for_the_jittered_refresh_point(storm: FleetResult) -> None:
    """No sandbox calls before 40 % of the lifetime, and each calls exactly once by 50 %."""
    early = (POLICY.refresh_fraction - POLICY.jitter_fraction) * DAY
    assert storm.first_call >= early
    assert sum(storm.calls[: int(early // 60)]) == 0
    wave = storm.calls[int(early // 60) : int(POLICY.refresh_fraction * DAY // 60) + 1]
    assert sum(wave) == N


def test_peak_is_bounded_by_the_jitter_window(storm: FleetResult) -> None:
    """The busiest minute stays near N spread over the 2.4 h jitter window (Poisson noise aside)."""
    design = N / (POLICY.jitter_fraction * DAY / 60)
    assert max(storm.calls) <= design + 5 * math.sqrt(design)
    assert storm.load(0, storm.seconds, bucket=60).peak <= 1.1 * design


def test_every_sandbox_refreshes_in_time_when_the_cloud_is_up(storm: FleetResult) -> None:
    """With the cloud up every call succeeds with at least half the token's life left."""
    assert storm.expired == 0
    assert storm.calls == storm.refreshes
    assert storm.min_left_at_refresh >= POLICY.refresh_fraction * DAY
    assert storm.min_call_gap >= (POLICY.refresh_fraction - POLICY.jitter_fraction) * DAY - 1


def test_boot_storm_waves_flatten_too_slowly_for_three_days(storm: FleetResult) -> None:
    """Hourly peak/mean falls day by day, as the renewal equation predicts, yet stays above 1.25."""
    density = expected_load(3)
    ratios = []
    for day in range(3):
        measured = storm.load(max(day * DAY, HOUR), (day + 1) * DAY, bucket=60).ratio
        values = density[day * 1440 : (day + 1) * 1440]
        predicted = max(values) / (sum(values) / len(values))
        assert measured == pytest.approx(predicted, rel=0.1)
        ratios.append(measured)
    assert ratios[0] > ratios[1] > ratios[2] > 1.25


def test_expected_load_evens_out_only_after_a_week() -> None:
    """The noise-free load needs more than a week to stay within 1.25 of its mean, and converges."""
    density = expected_load(30)
    day = first_day_within(density, 1.25)
    assert day is not None
    assert day > 7
    last = density[-1440:]
    assert max(last) / (sum(last) / len(last)) <= 1.05
    # One refresh per sandbox per mean interval, per minute.
    assert sum(last) / len(last) == pytest.approx(60 / MEAN_INTERVAL, rel=0.02)


def test_stationary_first_refresh_keeps_the_load_even_from_boot() -> None:
    """The proposed start rule gives an even hourly load from the first hour, at the same mean."""
    even = simulate(N, 3, first_refresh="stationary")
    load = even.load(0, even.seconds, bucket=60)
    assert load.ratio <= 1.15
    assert load.mean == pytest.approx(N * 60 / MEAN_INTERVAL, rel=0.03)
    assert even.expired == 0


def test_outage_retries_follow_the_backoff(outage: FleetResult) -> None:
    """In the outage a sandbox calls at most once per 2 s, and the fleet as the backoff predicts."""
    assert OUTAGE.start <= outage.first_failures[0] < outage.first_failures[-1] < OUTAGE.end
    assert outage.min_call_gap >= POLICY.min_retry_gap - 1e-6
    assert outage.most_calls_one_sandbox <= OUTAGE.duration / POLICY.min_retry_gap + 1
    assert outage.outage_calls == pytest.approx(outage.outage_calls_expected, rel=0.05)
    tail = outage.load(OUTAGE.end - 600, OUTAGE.end)
    assert tail.mean * 10 == pytest.approx(
        outage.expected_retry_calls(OUTAGE.end - 600, OUTAGE.end), rel=0.05
    )
    # At the 300 s cap a sandbox calls 0.4 times a minute: the load tracks the failing count.
    per_sandbox = tail.mean / outage.failing_at_recovery
    assert (
        60 / expected_backoff(64, POLICY) <= per_sandbox <= 1.5 * 60 / expected_backoff(64, POLICY)
    )


def test_recovery_is_no_thundering_herd(outage: FleetResult) -> None:
    """Back up, the cloud refreshes every failed sandbox within 300 s, under the outage's load."""
    assert outage.failing_at_recovery > 0
    assert outage.recovery_time is not None
    assert outage.recovery_time <= POLICY.backoff_max
    end = int(OUTAGE.end // 60)
    assert max(outage.calls[end : end + 10]) <= max(outage.calls[end - 10 : end])
    assert sum(outage.refreshes[end : end + 6]) >= outage.failing_at_recovery
    assert max(outage.failing[end + 6 : end + 60]) == 0


def test_no_token_expires_in_a_two_hour_outage(outage: FleetResult) -> None:
    """Tokens refreshed at half-life survive a 2 h outage with hours to spare."""
    assert outage.expired == 0
    floor = POLICY.refresh_fraction * DAY - OUTAGE.duration - POLICY.backoff_max
    assert outage.min_left_at_refresh >= floor


def test_outage_past_expiry_retries_at_the_urgent_cap() -> None:
    """Sandboxes whose tokens run out back off at most 30 s: about 4 calls a minute each."""
    hit = simulate(300, 0.2, outage=Outage(1500, 2 * HOUR), lifetime=3600)
    assert hit.expired == 300
    assert hit.failing_at_recovery == 300
    assert hit.recovery_time is not None
    assert hit.recovery_time <= POLICY.urgent_backoff_max
    assert hit.min_call_gap >= POLICY.min_retry_gap - 1e-6
    end = 1500 + 2 * HOUR
    tail = hit.load(end - 600, end)
    urgent_rate = 60 / expected_backoff(64, POLICY, urgent=True)
    assert tail.mean / 300 == pytest.approx(urgent_rate, rel=0.1)


@pytest.mark.parametrize("urgent", [False, True])
def test_expected_backoff_is_the_mean_of_backoff_delay(urgent: bool) -> None:
    """The bound's derivation matches the daemon's own backoff_delay draws."""
    rng = random.Random(7)
    for failures in (1, 2, 3, 5, 9, 12):
        draws = [
            backoff_delay(failures, urgent=urgent, rng=rng, policy=POLICY) for _ in range(20_000)
        ]
        mean = sum(draws) / len(draws)
        assert mean == pytest.approx(expected_backoff(failures, POLICY, urgent=urgent), rel=0.02)


def test_load_buckets_average_whole_buckets_only() -> None:
    """`load` averages per minute, peaks per bucket, and drops a partial last bucket."""
    calls = [0, 6, 0, 0, 3, 0, 9]
    result = FleetResult(
        n=1,
        seconds=len(calls) * 60,
        outage=None,
        first_refresh="schedule",
        policy=POLICY,
        lifetime=DAY,
        calls=calls,
        refreshes=calls,
        failing=[0] * len(calls),
    )
    load = result.load(0, 7 * 60, bucket=3)
    assert (load.mean, load.peak) == (9 / 6, 2.0)
    assert result.load(60, 2 * 60).ratio == 1.0
    assert result.load(120, 180).ratio == math.inf


def test_main_prints_every_scenario(capsys: pytest.CaptureFixture[str]) -> None:
    """`python -m bench.fleet` prints the storm, the expected load, the outage and the proposal."""
    assert main(["--sandboxes", "500", "--horizon-days", "14"]) == 0
    out = capsys.readouterr().out
    for heading in ("booted in the same second", "noise-free", "outage", "proposal", "peak over"):
        assert heading in out
