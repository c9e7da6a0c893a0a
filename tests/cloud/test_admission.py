"""Admission control of the refresh routes: the bucket alone, the routes in-process with a
simulated clock, and one real server that the daemon's own refresh client reads."""

from __future__ import annotations

import math
import random
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import httpx
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gastown_cloud.admission import RefreshAdmission
from gastown_cloud.app import create_app
from gastown_cloud.settings import CloudSettings
from gastown_cloud.store import Store
from gastown_sandboxd.errors import RefreshError
from gastown_sandboxd.token.cloud import CloudClient
from tests.fixtures.cloud import CloudServer

SECRET = "a" * 40
KEY = "admission-key-0123456789"
PLAIN = "/api/gastown/refresh-token"
TRPC = "/api/trpc/gastown.refreshToken"


def most_in_one_second(times: list[float]) -> int:
    """The most admissions in any window [t, t + 1)."""
    ordered, start, most = sorted(times), 0, 0
    for end, at in enumerate(ordered):
        while ordered[start] <= at - 1.0:
            start += 1
        most = max(most, end - start + 1)
    return most


# --- the bucket ------------------------------------------------------------------------------


@settings(max_examples=200, deadline=None)
@given(
    rate=st.integers(1, 20),
    gaps=st.lists(st.floats(0.0, 0.5, allow_nan=False), min_size=1, max_size=300),
    callers=st.integers(1, 40),
)
def test_never_more_than_rate_in_any_second(rate: int, gaps: list[float], callers: int) -> None:
    """Whatever the arrivals, no one-second window holds more than `rate` admissions, and every
    refusal says to wait at least 1 s."""
    bucket = RefreshAdmission(rate)
    now, admitted = 0.0, []
    for number, gap in enumerate(gaps):
        now += gap
        wait = bucket.admit(f"town-{number % callers}", now)
        if wait is None:
            admitted.append(now)
        else:
            assert wait >= 1
    assert most_in_one_second(admitted) <= rate
    assert bucket.admitted_total == len(admitted)
    assert bucket.refused_total == len(gaps) - len(admitted)


def test_a_burst_up_to_rate_passes_at_once() -> None:
    """`rate` callers in the same instant are all admitted; the next one is refused."""
    bucket = RefreshAdmission(5)
    assert [bucket.admit(f"t{n}", 10.0) for n in range(5)] == [None] * 5
    assert bucket.admit("t5", 10.0) == 1


def test_refusals_are_spread_over_the_time_the_backlog_needs() -> None:
    """1,000 callers at once against 10 per second: 10 admitted, the other 990 told waits that
    grow with their place (slots 1/rate apart), so at most `rate` are sent to each second."""
    bucket = RefreshAdmission(10)
    waits = [bucket.admit(f"town-{n}", 0.0) for n in range(1000)]
    refused = [wait for wait in waits if wait is not None]
    assert len(refused) == 990
    assert refused == sorted(refused)
    per_second = Counter(refused)
    assert max(per_second.values()) <= 10
    assert min(refused) == 1
    assert max(refused) == 100  # 990 slots from t = 1.0, 0.1 s apart: the last at 99.9 s
    assert bucket.waiting == 990


def test_a_caller_back_early_keeps_its_place() -> None:
    """A refused caller asking again before its slot, with no token free, is told the rest of
    its wait; its slot is not moved to the back."""
    bucket = RefreshAdmission(1)
    assert bucket.admit("first", 0.0) is None
    waits = {f"t{n}": bucket.admit(f"t{n}", 0.0) for n in range(5)}
    assert waits == {"t0": 1, "t1": 2, "t2": 3, "t3": 4, "t4": 5}
    assert bucket.admit("first", 0.5) == 6  # a newcomer again: its slot at 6 s, after t4's
    assert bucket.admit("t3", 0.5) == 4  # t3's slot stays at 4 s
    assert bucket.admit("first", 0.6) == 6  # ... and "first" keeps the slot it was given


def test_any_caller_takes_a_free_token() -> None:
    """A token is never left unused: a caller whose slot has not come is admitted when one is
    free (no one waits while the cloud is idle), and its slot is released."""
    bucket = RefreshAdmission(1)
    assert bucket.admit("a", 0.0) is None
    assert bucket.admit("b", 0.2) == 1
    assert bucket.admit("c", 0.3) == 2
    assert bucket.admit("c", 1.5) is None
    assert bucket.waiting == 1


def test_unclaimed_slots_are_dropped_after_hold() -> None:
    """Slots whose callers never came back are forgotten `hold` seconds after they fell due."""
    bucket = RefreshAdmission(1, hold=60.0)
    bucket.admit("a", 0.0)
    for n in range(10):
        bucket.admit(f"gone-{n}", 0.0)
    assert bucket.waiting == 10
    assert bucket.admit("late", 75.0) is None
    assert bucket.waiting == 0


def test_a_clock_that_steps_back_does_not_stall_the_bucket() -> None:
    """After the clock steps back an hour, admissions resume one second after the last one."""
    bucket = RefreshAdmission(1)
    assert bucket.admit("a", 5000.0) is None
    assert bucket.admit("b", 1400.0) == 1
    assert bucket.admit("b", 1401.0) is not None  # the clock has not passed 5000 yet
    assert bucket.admit("b", 5001.0) is None


def test_rate_below_one_is_refused() -> None:
    """A rate under one refresh per second is a programming error."""
    with pytest.raises(ValueError, match="at least 1"):
        RefreshAdmission(0)


# --- the routes, in-process, with a simulated clock ----------------------------------------


class Clock:
    def __init__(self) -> None:
        self.now = 1_800_000_000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
async def limited(tmp_path: Path, clock: Clock) -> AsyncIterator[httpx.AsyncClient]:
    """The app with `--refresh-rate 2`, its store on disk, and a simulated clock."""
    settings = CloudSettings(
        nextauth_secret=SECRET, internal_api_key=KEY, db=tmp_path / "c.db", refresh_rate=2
    )
    async with Store(settings.db) as store:
        app = create_app(settings, store, clock=clock, monotonic=clock)
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(
            transport=transport, base_url="http://cloud", headers={"x-internal-api-key": KEY}
        ) as client:
            yield client


async def _town(client: httpx.AsyncClient) -> tuple[str, dict[str, str]]:
    created = (await client.post("/api/gastown/towns", json={"userId": "u", "name": "t"})).json()
    return created["town"]["id"], {"authorization": f"Bearer {created['token']}"}


async def test_routes_answer_503_with_retry_after_past_the_rate(
    limited: httpx.AsyncClient, clock: Clock
) -> None:
    """Both refresh routes share the bucket: past 2 in a second they answer 503 `busy` with an
    integer Retry-After; a second later refreshes pass again."""
    towns = [await _town(limited) for _ in range(4)]
    answers = [
        await limited.post(route, json={"townId": town_id}, headers=bearer)
        for route, (town_id, bearer) in zip([PLAIN, TRPC, PLAIN, TRPC], towns, strict=True)
    ]
    assert [a.status_code for a in answers] == [200, 200, 503, 503]
    for busy in answers[2:]:
        assert busy.json()["error"] == "busy"
        assert "2 refreshes per second" in busy.json()["message"]
        assert busy.headers["retry-after"] in {"1", "2"}
    assert [a.headers["retry-after"] for a in answers[2:]] == ["1", "2"]
    clock.now += 1.0
    town_id, bearer = towns[2]
    assert (await limited.post(PLAIN, json={"townId": town_id}, headers=bearer)).status_code == 200


async def test_a_wall_clock_stepped_back_does_not_stop_admission(tmp_path: Path) -> None:
    """Admission counts on a clock that never steps back: with the wall clock an hour behind
    (an NTP correction), refreshes go on passing at the rate. On the wall clock, the window
    stood still and every refresh after the first two was refused for the hour."""
    wall, monotonic = Clock(), Clock()
    settings = CloudSettings(
        nextauth_secret=SECRET, internal_api_key=KEY, db=tmp_path / "c.db", refresh_rate=2
    )
    async with Store(settings.db) as store:
        app = create_app(settings, store, clock=wall, monotonic=monotonic)
        async with httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app),
            base_url="http://cloud",
            headers={"x-internal-api-key": KEY},
        ) as client:
            towns = [await _town(client) for _ in range(2)]
            statuses = []
            for _ in range(10):
                for town_id, bearer in towns:
                    answer = await client.post(PLAIN, json={"townId": town_id}, headers=bearer)
                    statuses.append(answer.status_code)
                wall.now -= 600.0  # the wall clock goes back; a second passes
                monotonic.now += 1.0
    assert statuses == [200] * 20


async def test_refused_requests_take_no_token(limited: httpx.AsyncClient, clock: Clock) -> None:
    """Requests refused before admission (no key, bad body) do not use up the rate."""
    town_id, bearer = await _town(limited)
    for _ in range(5):
        no_key = await limited.post(
            PLAIN, json={"townId": town_id}, headers={"x-internal-api-key": "wrong-key-0123456"}
        )
        assert no_key.status_code == 401
        assert (await limited.post(PLAIN, content=b"{bad")).status_code == 400
    for _ in range(2):
        answer = await limited.post(PLAIN, json={"townId": town_id}, headers=bearer)
        assert answer.status_code == 200


async def test_requests_that_can_refresh_no_town_take_no_token(
    limited: httpx.AsyncClient, clock: Clock
) -> None:
    """Refreshes with a made-up town id, a junk Bearer, or a real Bearer of another town are
    refused (403) before admission: at `--refresh-rate 2`, a flood of them leaves both
    slots of the second to the two real towns. Before, each took a slot and booked the
    others' waits further out (a reviewer: `Retry-After: 281` for real towns after a 5 s
    flood)."""
    (town_id, bearer), (other_id, other_bearer) = [await _town(limited) for _ in range(2)]
    junk = {"authorization": "Bearer junk.junk.junk"}
    for n in range(10):
        for body, headers in (
            ({"townId": f"made-up-{n}"}, junk),
            ({"townId": f"made-up-{n}"}, bearer),
            ({"townId": other_id}, bearer),
        ):
            refused = await limited.post(PLAIN, json=body, headers=headers)
            assert refused.status_code == 403, refused.text
    for town, headers in ((town_id, bearer), (other_id, other_bearer)):
        answer = await limited.post(PLAIN, json={"townId": town}, headers=headers)
        assert answer.status_code == 200, answer.text


async def test_no_rate_admits_every_refresh(tmp_path: Path, clock: Clock) -> None:
    """Without --refresh-rate (the default) 50 refreshes in the same instant all pass."""
    settings = CloudSettings(nextauth_secret=SECRET, internal_api_key=KEY, db=tmp_path / "c.db")
    assert settings.refresh_rate is None
    async with Store(settings.db) as store:
        app = create_app(settings, store, clock=clock, monotonic=clock)
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(
            transport=transport, base_url="http://cloud", headers={"x-internal-api-key": KEY}
        ) as client:
            town_id, bearer = await _town(client)
            for _ in range(50):
                answer = await client.post(PLAIN, json={"townId": town_id}, headers=bearer)
                assert answer.status_code == 200


# --- one real server, read by the daemon's own refresh client ------------------------------


async def test_real_server_refusal_is_read_as_busy_by_the_daemon(
    cloud_factory: Callable[..., CloudServer],
) -> None:
    """`serve --refresh-rate 1`: 12 towns refreshing one after the other; no more pass than one
    per second elapsed, the daemon's refresh client reads each refusal as `busy` with the
    Retry-After, and the waits grow with the queue rather than all being 1 s."""
    cloud = cloud_factory(flags=["--refresh-rate", "1"])
    towns = [cloud.create_town(user_id=f"u{n}") for n in range(12)]
    random.shuffle(towns)
    outcomes: list[float | None] = []
    refusals: list[tuple[str, int | None]] = []
    began = time.monotonic()
    for town, token in towns:
        async with CloudClient(
            base_url=cloud.url, internal_key=cloud.internal_key, town_id=town["id"]
        ) as client:
            try:
                await client.refresh(token)
                outcomes.append(None)
            except RefreshError as error:
                refusals.append((error.kind, error.status))
                outcomes.append(error.retry_after)
    elapsed = time.monotonic() - began
    waits = [wait for wait in outcomes if wait is not None]
    assert 1 <= outcomes.count(None) <= math.ceil(elapsed) + 1
    assert refusals == [("busy", 503)] * len(waits)
    assert min(waits) >= 1
    # Each refusal is queued behind the earlier ones, so the waits spread out.
    assert max(waits) >= len(waits) - elapsed - 1


def test_bad_refresh_rate_exits_2(cloud_factory: Callable[..., CloudServer]) -> None:
    """`--refresh-rate 0` stops start-up with exit 2 naming the flag."""
    with pytest.raises(RuntimeError, match=r"(?s)exited with 2.*--refresh-rate"):
        cloud_factory(flags=["--refresh-rate", "0"])
