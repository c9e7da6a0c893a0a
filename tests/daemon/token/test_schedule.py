"""The refresh schedule: every branch of next_attempt_at, sleep_for and parse_retry_after."""

from __future__ import annotations

import email.utils
import math
import random
from dataclasses import replace

import pytest
from bench.short_token_bench import simulate

from gastown_sandboxd.token.claims import Claims
from gastown_sandboxd.token.schedule import (
    Outcome,
    SchedulePolicy,
    backoff_delay,
    desync_point,
    draw_jitter,
    is_urgent,
    next_attempt_at,
    parse_retry_after,
    refresh_point,
    scaled_policy,
    sleep_for,
)

T0 = 1_800_000_000
DAY = 86400
POLICY = SchedulePolicy()


def claims(iat: int = T0, lifetime: int = DAY) -> Claims:
    return Claims("user-1", "gastown_sandbox", "town-1", None, iat, iat + lifetime)


def plan(
    held: Claims | None,
    now: float,
    *,
    failures: int = 0,
    outcome: Outcome = Outcome.OK,
    jitter: float = 0.0,
    retry_after: float | None = None,
    seed: int = 1,
) -> float:
    return next_attempt_at(
        held,
        now,
        failures=failures,
        outcome=outcome,
        refresh_at=refresh_point(held, jitter, POLICY) if held else now,
        rng=random.Random(seed),
        retry_after=retry_after,
        policy=POLICY,
    )


def test_defaults_match_the_contract() -> None:
    """The default policy is the contract's: 0.5, 0.1, 1 s to 300 s, 30 s urgent and sleep."""
    assert POLICY.refresh_fraction == 0.5
    assert POLICY.jitter_fraction == 0.1
    assert (POLICY.backoff_initial, POLICY.backoff_max) == (1.0, 300.0)
    assert (POLICY.urgent_backoff_max, POLICY.max_sleep) == (30.0, 30.0)
    assert (POLICY.inactive_probe, POLICY.retry_after_cap) == (3600.0, 300.0)


def test_refresh_at_half_lifetime_without_jitter() -> None:
    """With jitter 0 the refresh is at iat + lifetime/2."""
    assert plan(claims(), T0 + 60) == T0 + DAY / 2


def test_jitter_moves_the_refresh_earlier_by_up_to_a_tenth() -> None:
    """Jitter u moves the point u·10 % of the lifetime earlier, never later."""
    assert plan(claims(), T0, jitter=0.5) == T0 + DAY / 2 - 0.05 * DAY
    assert plan(claims(), T0, jitter=0.999) > T0 + 0.4 * DAY


def test_refresh_point_is_stable_for_one_draw() -> None:
    """Planning again with the same per-token draw gives the same time."""
    u = draw_jitter(random.Random(7))
    assert 0.0 <= u < 1.0
    assert refresh_point(claims(), u, POLICY) == refresh_point(claims(), u, POLICY)
    assert plan(claims(), T0 + 100, jitter=u) == plan(claims(), T0 + 5000, jitter=u)


def test_no_token_means_now() -> None:
    """Without a token (missing, unacceptable, another town) refresh at once."""
    assert plan(None, T0) == T0


def test_past_half_lifetime_means_now() -> None:
    """A token with less than half its lifetime left is refreshed at once."""
    assert plan(claims(), T0 + DAY / 2 + 1) == T0 + DAY / 2 + 1


def test_expired_token_means_now() -> None:
    """An expired token is refreshed at once."""
    assert plan(claims(), T0 + 2 * DAY) == T0 + 2 * DAY


@pytest.mark.parametrize("failures", [1, 2, 3, 5, 9, 20, 1000])
def test_backoff_is_full_jitter_within_the_doubling_ceiling(failures: int) -> None:
    """After n failures the delay is within [2 s floor, min(300, 2^(n-1))]."""
    now = T0 + DAY / 2
    ceiling = min(300.0, 2.0 ** (failures - 1))
    delays = [
        plan(claims(), now, failures=failures, outcome=Outcome.OUTAGE, seed=s) - now
        for s in range(200)
    ]
    assert all(2.0 <= d <= max(2.0, ceiling) for d in delays)
    if ceiling > 10:
        assert max(delays) > ceiling * 0.8  # the jitter uses the whole range


def test_backoff_floor_keeps_calls_two_seconds_apart() -> None:
    """Even a draw of 0 waits at least min_retry_gap."""

    class Zero(random.Random):
        def uniform(self, a: float, b: float) -> float:
            return 0.0

    assert backoff_delay(3, urgent=False, rng=Zero(), policy=POLICY) == 2.0


def test_backoff_is_capped_at_30_s_under_a_tenth_of_lifetime() -> None:
    """With less than 10 % of the lifetime left the delay is at most 30 s."""
    now = T0 + 0.91 * DAY
    assert is_urgent(claims(), now, POLICY)
    delays = [
        plan(claims(), now, failures=30, outcome=Outcome.OUTAGE, seed=s) - now for s in range(200)
    ]
    assert max(delays) <= 30.0
    assert max(delays) > 20.0


def test_backoff_is_capped_at_30_s_without_a_token() -> None:
    """With no token at all, retries come at most 30 s apart."""
    assert is_urgent(None, T0, POLICY)
    delays = [plan(None, T0, failures=30, outcome=Outcome.BROKEN, seed=s) - T0 for s in range(50)]
    assert max(delays) <= 30.0


def test_not_urgent_with_more_than_a_tenth_left() -> None:
    """At 89 % of the lifetime the token is not urgent yet."""
    assert not is_urgent(claims(), T0 + 0.89 * DAY, POLICY)


def test_unauthorized_backs_off_at_the_maximum() -> None:
    """401/403 waits the maximum backoff at once, even after one failure."""
    now = T0 + DAY / 2
    assert plan(claims(), now, failures=1, outcome=Outcome.UNAUTHORIZED) == now + 300.0


def test_unauthorized_close_to_expiry_waits_30_s() -> None:
    """401/403 with under 10 % of the lifetime left waits the urgent maximum."""
    now = T0 + 0.95 * DAY
    assert plan(claims(), now, failures=1, outcome=Outcome.UNAUTHORIZED) == now + 30.0


def test_retry_after_is_honoured_over_a_shorter_backoff() -> None:
    """The delay is at least Retry-After."""
    now = T0 + DAY / 2
    assert plan(claims(), now, failures=1, outcome=Outcome.BUSY, retry_after=120) == now + 120


def test_retry_after_is_honoured_even_when_urgent() -> None:
    """Retry-After beats the 30 s urgent cap (the cloud asked)."""
    now = T0 + 0.95 * DAY
    assert plan(claims(), now, failures=1, outcome=Outcome.BUSY, retry_after=100) == now + 100


def test_retry_after_is_capped_at_300_s() -> None:
    """A Retry-After of an hour is read as 300 s."""
    now = T0 + DAY / 2
    assert plan(claims(), now, failures=1, outcome=Outcome.BUSY, retry_after=3600) == now + 300


def test_short_retry_after_keeps_a_held_backoff() -> None:
    """A Retry-After shorter than the backoff does not shorten it below the draw of the
    backoff held to `busy_backoff_max` (nor below the 2 s floor)."""
    now = T0 + DAY / 2
    got = plan(claims(), now, failures=9, outcome=Outcome.BUSY, retry_after=0.5, seed=3)
    held = replace(POLICY, backoff_max=POLICY.busy_backoff_max)
    assert got == now + backoff_delay(9, urgent=False, rng=random.Random(3), policy=held)
    assert now + 2.0 <= got <= now + 30.0


def test_retry_after_holds_the_own_backoff_to_30_s() -> None:
    """After many failures the own backoff reaches 300 s; under a Retry-After it is held to
    `busy_backoff_max`, so the cloud's slot decides when a refused sandbox comes back."""
    now = T0 + DAY / 2
    assert POLICY.busy_backoff_max == 30.0
    busy = [
        plan(claims(), now, failures=20, outcome=Outcome.BUSY, retry_after=5, seed=seed) - now
        for seed in range(300)
    ]
    assert min(busy) >= 5
    assert max(busy) <= 30
    # Not a constant: the draw still spreads sandboxes refused together.
    assert len({round(wait, 3) for wait in busy}) > 200
    outage = [
        plan(claims(), now, failures=20, outcome=Outcome.OUTAGE, seed=seed) - now
        for seed in range(300)
    ]
    assert max(outage) > 100  # without a Retry-After the 300 s ceiling stays


def test_busy_without_retry_after_backs_off_in_full() -> None:
    """A 429 without Retry-After (`retry_after` None) keeps the whole 300 s ceiling."""
    now = T0 + DAY / 2
    waits = [
        plan(claims(), now, failures=20, outcome=Outcome.BUSY, seed=seed) - now
        for seed in range(300)
    ]
    assert max(waits) > 100


def test_inactive_town_is_probed_hourly() -> None:
    """A town_inactive town is probed again after an hour, whatever the token."""
    assert plan(claims(), T0, failures=4, outcome=Outcome.INACTIVE) == T0 + 3600
    assert plan(None, T0, failures=1, outcome=Outcome.INACTIVE) == T0 + 3600


def test_stale_token_from_the_cloud_waits_the_maximum() -> None:
    """A new token already past its refresh point is not refreshed again at once."""
    now = T0 + 0.6 * DAY
    assert plan(claims(), now, outcome=Outcome.STALE) == now + 300.0
    assert plan(claims(), T0 + 0.95 * DAY, outcome=Outcome.STALE) == T0 + 0.95 * DAY + 30.0


def test_short_demo_tokens_scale() -> None:
    """A 20 s token is refreshed between 8 s and 10 s after iat."""
    assert plan(claims(lifetime=20), T0, jitter=0.0) == T0 + 10
    assert plan(claims(lifetime=20), T0, jitter=0.99) == pytest.approx(T0 + 8.02)


def test_sleep_for_is_capped_at_max_sleep() -> None:
    """The loop looks at the wall clock again at least every 30 s."""
    assert sleep_for(T0 + 3600, T0) == 30.0
    assert sleep_for(T0 + 5, T0) == 5.0
    assert sleep_for(T0 - 5, T0) == 0.0
    assert sleep_for(T0 + 100, T0, SchedulePolicy(max_sleep=7)) == 7.0


# --- desync_point ---------------------------------------------------------------------------

LOW, HIGH = 0.4 * DAY, 0.5 * DAY  # the contract's refresh interval X ~ U(LOW, HIGH)
MEAN = (LOW + HIGH) / 2


def equilibrium_cdf(r: float) -> float:
    """P(R <= r) for the stationary time to the next refresh: the integral of P(X > s)/E[X]."""
    if r <= LOW:
        return r / MEAN
    r = min(r, HIGH)
    return (r - (r - LOW) ** 2 / (2 * (HIGH - LOW))) / MEAN


def draws(now: float, count: int = 20_000, *, iat: int = T0, seed: int = 11) -> list[float]:
    rng = random.Random(seed)
    return [desync_point(claims(iat), now, rng, POLICY) for _ in range(count)]


@pytest.mark.parametrize(
    "age", [-300, 0, 1, 600, 863, 865, 3600, 0.39 * DAY, 0.41 * DAY, 0.45 * DAY, 0.4999 * DAY]
)
def test_desync_point_is_never_before_now_nor_after_half_life(age: float) -> None:
    """Whatever the token's age (even an iat ahead of the clock), now <= point <= iat + L/2."""
    now = T0 + age
    points = draws(now, 2_000)
    assert all(now <= p <= T0 + HIGH for p in points)
    assert len(set(points)) == len(points)  # drawn, not a fixed point


@pytest.mark.parametrize("age", [0, 0.2 * DAY, 0.39 * DAY, 0.45 * DAY, 0.4999 * DAY])
@pytest.mark.parametrize(
    "policy",
    [SchedulePolicy(desync_age_fraction=1.0), SchedulePolicy(jitter_fraction=0.7)],
    ids=["desync-at-any-age", "jitter-wider-than-refresh"],
)
def test_desync_point_stays_in_bounds_under_any_policy(age: float, policy: SchedulePolicy) -> None:
    """Odd policies (every age desynced, a jitter past iat) never plan before now or past half."""
    rng = random.Random(3)
    now = T0 + age
    points = [desync_point(claims(), now, rng, policy) for _ in range(2_000)]
    assert all(now <= p <= T0 + HIGH for p in points)


@pytest.mark.parametrize("age", [0.5 * DAY, 0.5 * DAY + 1, 2 * DAY])
def test_desync_point_is_now_past_half_life(age: float) -> None:
    """With half the lifetime or less left the token is refreshed at once, as §3 says."""
    assert draws(T0 + age, 10) == [T0 + age] * 10


def test_desync_draw_of_a_fresh_token_has_the_stationary_law() -> None:
    """Over many draws the first refresh of a just-minted token follows P(X > r)/E[X]."""
    offsets = sorted(p - T0 for p in draws(T0))
    n = len(offsets)
    # Kolmogorov-Smirnov distance to the stationary law (5 % critical value: 1.36/sqrt(n)).
    distance = max(
        max(abs((k + 1) / n - equilibrium_cdf(r)), abs(k / n - equilibrium_cdf(r)))
        for k, r in enumerate(offsets)
    )
    assert distance < 1.36 / math.sqrt(n)
    # Mean E[X²]/(2·E[X]) and second moment E[X³]/(3·E[X]) of the stationary law.
    mean = (LOW**2 + LOW * HIGH + HIGH**2) / (6 * MEAN)
    second = (HIGH**4 - LOW**4) / (4 * (HIGH - LOW)) / (3 * MEAN)
    spread = math.sqrt(second - mean**2)
    assert sum(offsets) / n == pytest.approx(mean, rel=0.01)
    got_spread = math.sqrt(sum((r - mean) ** 2 for r in offsets) / n)
    assert got_spread == pytest.approx(spread, rel=0.02)
    # Flat over [0, LOW]: a fleet booted together calls at its mean rate from the first minute.
    early = [r for r in offsets if r < LOW]
    assert len(early) / n == pytest.approx(LOW / MEAN, abs=0.01)


def test_desync_draw_past_now_is_drawn_again_after_now() -> None:
    """A young token whose draw fell before now is drawn again between now and iat + T."""
    now = T0 + 800  # under 1 % of the lifetime: still young
    points = draws(now)
    assert min(points) >= now
    # About 800 s / E[X] of the draws passed and were spread over [now, iat + T], so the share
    # in the next 1,000 s is the stationary law's alone, not a pile at now.
    share = sum(1 for p in points if p < T0 + 1800) / len(points)
    assert share == pytest.approx(1000 / MEAN, abs=0.005)


@pytest.mark.parametrize("age", [865, 3600, 0.3 * DAY])
def test_older_token_gets_the_contract_point(age: float) -> None:
    """A token older than 1 % of its lifetime is refreshed at iat + U(0.4, 0.5)·L, as in §3."""
    points = draws(T0 + age)
    assert min(p - T0 for p in points) >= LOW
    assert max(p - T0 for p in points) <= HIGH
    assert sum(points) / len(points) - T0 == pytest.approx(MEAN, rel=0.002)


def test_older_token_inside_its_window_is_drawn_after_now() -> None:
    """In its jitter window an older token is refreshed uniformly between now and half-life."""
    now = T0 + 0.45 * DAY
    points = draws(now)
    assert min(points) >= now
    assert sum(points) / len(points) == pytest.approx((now + T0 + HIGH) / 2, abs=60)
    below = sum(1 for p in points if p < now + 0.025 * DAY) / len(points)
    assert below == pytest.approx(0.5, abs=0.02)


def test_desync_age_limit_is_a_fraction_of_the_lifetime() -> None:
    """A 60 s demo token is young for its first 0.6 s: the limit scales with the lifetime."""
    short = claims(lifetime=60)
    rng = random.Random(5)
    young = [desync_point(short, T0 + 0.5, rng, POLICY) - T0 for _ in range(2_000)]
    old = [desync_point(short, T0 + 0.7, rng, POLICY) - T0 for _ in range(2_000)]
    assert min(young) < 24
    assert min(old) >= 24
    assert max(young + old) <= 30


@pytest.mark.parametrize(("value", "seconds"), [("120", 120.0), (" 0 ", 0.0), ("7", 7.0)])
def test_retry_after_seconds(value: str, seconds: float) -> None:
    """Retry-After as delay-seconds."""
    assert parse_retry_after(value, T0) == seconds


def test_retry_after_http_date() -> None:
    """Retry-After as an HTTP date is the time from now to it."""
    assert parse_retry_after(email.utils.formatdate(T0 + 90, usegmt=True), T0) == 90.0


def test_retry_after_date_in_the_past_is_zero() -> None:
    """An HTTP date in the past means no wait."""
    assert parse_retry_after(email.utils.formatdate(T0 - 90, usegmt=True), T0) == 0.0


def test_retry_after_date_without_zone_is_utc() -> None:
    """An HTTP date with -0000 (unknown zone) is read as UTC."""
    value = email.utils.formatdate(T0 + 30).replace("+0000", "-0000")
    assert parse_retry_after(value, T0) == 30.0


@pytest.mark.parametrize("digits", [400, 5000])
def test_a_retry_after_of_any_length_waits_the_cap(digits: int) -> None:
    """A delay too large for a float (or for `int()`, past 4,300 digits) is no error: it is
    infinite, and the next attempt comes at the cap."""
    seconds = parse_retry_after("1" + "0" * digits, T0)
    assert seconds == math.inf
    at = next_attempt_at(
        claims(T0 - DAY // 2), T0, failures=1, outcome=Outcome.BUSY,
        refresh_at=T0, rng=random.Random(1), retry_after=seconds,
    )  # fmt: skip
    assert at == T0 + POLICY.retry_after_cap


@pytest.mark.parametrize("value", ["", "soon", "-5", "1.5", "١٢", "Mon, 99 Foo 2026"])
def test_bad_retry_after_is_none(value: str) -> None:
    """A Retry-After that is neither form is ignored."""
    assert parse_retry_after(value, T0) is None


def test_short_tokens_shrink_every_wait_with_the_lifetime() -> None:
    """Below 1 h the four waits are multiplied by lifetime ÷ 1 h, floor 100 ms (CONTRACT §3)."""
    half_hour = scaled_policy(POLICY, 1800)
    assert (half_hour.backoff_max, half_hour.urgent_backoff_max) == (150.0, 15.0)
    assert (half_hour.max_sleep, half_hour.min_retry_gap) == (15.0, 1.0)
    demo = scaled_policy(POLICY, 30)
    assert demo.backoff_max == pytest.approx(2.5)
    assert demo.urgent_backoff_max == pytest.approx(0.25)
    assert demo.max_sleep == pytest.approx(0.25)
    assert demo.min_retry_gap == 0.1  # 2 s × 30/3600 = 17 ms, under the floor
    assert demo.retry_after_cap == pytest.approx(2.5)  # not in the contract's list: as the 300 s
    # What is not a wait: the first delay, the inactive town's probe.
    assert (demo.backoff_initial, demo.inactive_probe) == (1.0, 3600.0)


def test_a_short_tokens_retry_after_is_capped_to_its_scale() -> None:
    """A 30 s token told `Retry-After: 120` near the start of its life comes back within the
    scaled cap (2.5 s), still unexpired, not after the 24 h token's 300 s cap."""
    held = claims(lifetime=30)
    at = next_attempt_at(
        held, T0 + 12, failures=1, outcome=Outcome.BUSY,
        refresh_at=T0 + 12, rng=random.Random(1), retry_after=120.0,
    )  # fmt: skip
    assert at == pytest.approx(T0 + 12 + 2.5)
    assert at < held.exp


@pytest.mark.parametrize("lifetime", [3600, DAY, 7 * DAY, None])
def test_tokens_of_an_hour_and_more_keep_the_waits(lifetime: int | None) -> None:
    """From 1 h up (and with no token held) the policy stands as it is."""
    assert scaled_policy(POLICY, lifetime) is POLICY


def test_the_floor_never_raises_a_setting_below_it() -> None:
    """A wait configured under 100 ms is not raised to the floor by the scaling."""
    tight = SchedulePolicy(min_retry_gap=0.05)
    assert scaled_policy(tight, 30).min_retry_gap == 0.05


def test_retries_of_a_short_token_follow_the_scaled_caps() -> None:
    """A 30 s token's retries after an outage come within its scaled caps and gaps."""
    held = claims(lifetime=30)
    for failures in range(1, 12):
        for seed in range(20):
            delay = plan(held, T0 + 12, failures=failures, outcome=Outcome.OUTAGE, seed=seed) - (
                T0 + 12
            )
            assert 0.1 - 1e-6 <= delay <= 2.5 + 1e-6  # wall times near 1.8e9 s: float ulps
        urgent = plan(held, T0 + 28, failures=failures, outcome=Outcome.OUTAGE) - (T0 + 28)
        assert 0.1 - 1e-6 <= urgent <= 0.25 + 1e-6
    assert sleep_for(T0 + 100, T0, scaled_policy(POLICY, 30)) == pytest.approx(0.25)


@pytest.mark.parametrize("seed", range(10))
async def test_a_30_s_token_survives_the_outages_with_no_second_unusable(seed: int) -> None:
    """The real refresher on the simulated clock, 30 s tokens, cloud down at 11-27 s and
    50-58 s over 75 s: there is always an unexpired token in the env file."""
    gaps = await simulate(seed=seed)
    assert gaps.unexpired == 0.0
    # The run did go through both outages and out again.
    assert gaps.calls >= 6


async def test_without_the_scaling_the_same_run_loses_the_token() -> None:
    """The unscaled schedule (waits of a 24 h token) leaves seeds with an expired token: the
    simulation can tell the two apart."""
    lost = [(await simulate(seed=seed, scaled=False)).unexpired for seed in range(30)]
    assert max(lost) > 1.0
