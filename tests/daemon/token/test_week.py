"""A simulated week against a scripted cloud, and wall-clock jumps.

The refresher runs unchanged with the real CloudClient over an httpx.MockTransport whose
handler plays the cloud: real 24 h JWTs minted with pyjwt, outages of 1 min, 30 min, 6 h and
11 h, bursts of 5xx, 429/503 with Retry-After, slow answers and garbage 200 bodies. Time is a
SimulatedClock whose sleeps return at once, so the week runs in a fraction of a second.
"""

from __future__ import annotations

import email.utils
import itertools
import json
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio
import httpx
import jwt
import structlog.testing

from gastown_sandboxd.errors import RefreshError
from gastown_sandboxd.events.types import DomainEvent
from gastown_sandboxd.ops.metrics import MetricsRegistry
from gastown_sandboxd.token import envfile
from gastown_sandboxd.token.claims import decode_unverified
from gastown_sandboxd.token.cloud import CloudClient
from gastown_sandboxd.token.refresher import State, TokenRefresher, token_metrics
from tests.daemon.minting import DAY, TOWN, mint
from tests.daemon.simclock import SimulatedClock

START = 1_800_000_000.0
HOUR = 3600.0


@dataclass
class Phase:
    """A misbehaviour that starts at the first call after `after` and lasts a time or a count."""

    after: float
    kind: str
    seconds: float = 0.0
    count: int = 0
    started: float | None = None
    served: int = 0

    def active(self, now: float) -> bool:
        if self.started is None and now >= self.after:
            self.started = now
        if self.started is None:
            return False
        if self.count:
            return self.served < self.count
        return now < self.started + self.seconds


@dataclass
class WeekCloud:
    """The scripted cloud: a MockTransport handler driven by the simulated clock."""

    clock: SimulatedClock
    phases: list[Phase]
    calls: list[tuple[float, str]] = field(default_factory=list)
    minted: list[str] = field(default_factory=list)

    async def handle(self, request: httpx.Request) -> httpx.Response:
        now = self.clock.time()
        phase = next((p for p in self.phases if p.active(now)), None)
        kind = phase.kind if phase else "ok"
        self.calls.append((now, kind))
        if phase is not None:
            phase.served += 1
        answer: Callable[[httpx.Request, int], Awaitable[httpx.Response]]
        answer = getattr(self, f"_{kind}")
        return await answer(request, phase.served if phase else 0)

    async def _ok(self, request: httpx.Request, n: int) -> httpx.Response:
        token = mint(self.clock.time())
        self.minted.append(token)
        # Rotate through the answer forms the contract allows.
        form = len(self.minted) % 3
        if form == 0:
            return httpx.Response(200, text=token)
        if form == 1:
            return httpx.Response(200, json={"token": token, "expiresAt": "…"})
        return httpx.Response(200, json={"result": {"data": {"json": token}}})

    async def _slow(self, request: httpx.Request, n: int) -> httpx.Response:
        await self.clock.sleep(8.0)
        return await self._ok(request, n)

    async def _connect(self, request: httpx.Request, n: int) -> httpx.Response:
        raise httpx.ConnectError("connection refused")

    async def _timeout(self, request: httpx.Request, n: int) -> httpx.Response:
        await self.clock.sleep(10.0)
        raise httpx.ReadTimeout("no answer in 10 s")

    async def _5xx(self, request: httpx.Request, n: int) -> httpx.Response:
        return httpx.Response((500, 502, 503, 504)[n % 4], text="upstream error")

    async def _busy(self, request: httpx.Request, n: int) -> httpx.Response:
        return httpx.Response(429, headers={"retry-after": "120"})

    async def _busy_date(self, request: httpx.Request, n: int) -> httpx.Response:
        date = email.utils.formatdate(self.clock.time() + 90, usegmt=True)
        return httpx.Response(503, headers={"retry-after": date})

    async def _garbage(self, request: httpx.Request, n: int) -> httpx.Response:
        now = self.clock.time()
        bodies: list[tuple[str, bytes]] = [
            ("text/html", b"<html><body><h1>Bad Gateway</h1></body></html>"),
            ("text/plain", b""),
            ("text/plain", b"$(touch pwned)"),
            ("text/plain", mint(now, town_id="town-2").encode()),
            ("text/plain", mint(now - 2 * DAY).encode()),
            ("text/plain", jwt.encode({"town_id": TOWN}, None, algorithm="none").encode()),
            ("application/json", json.dumps({"token": "x" * (1024 * 1024)}).encode()),
            ("application/json", b'{"result": {"data": null}}'),
        ]
        content_type, body = bodies[(n - 1) % len(bodies)]
        return httpx.Response(200, content=body, headers={"content-type": content_type})


class DiskWatch:
    """Samples the env file after every step of simulated time."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.samples = 0
        self.seen: set[str] = set()
        self.violations: list[str] = []
        self._raw = b""
        self._exp: int | None = None

    def __call__(self, before: float, now: float) -> None:
        self.samples += 1
        raw = self.path.read_bytes()
        if raw != self._raw:  # parse only what changed: the week has ~20,000 steps
            self._raw = raw
            token = envfile.EnvFile.from_bytes(raw).get("KILO_JWT")
            self._exp = decode_unverified(token).exp if token else None
            if token:
                self.seen.add(token)
        if self._exp is None or self._exp <= now:
            self.violations.append(f"no unexpired token on disk at {now - START:.0f}s")


def week_phases() -> list[Phase]:
    return [
        Phase(START + 1 * DAY, "connect", seconds=60),
        Phase(START + 2 * DAY, "5xx", seconds=30 * 60),
        Phase(START + 3 * DAY, "timeout", seconds=6 * HOUR),
        Phase(START + 4 * DAY, "connect", seconds=11 * HOUR),
        Phase(START + 5 * DAY, "5xx", count=6),
        Phase(START + 5 * DAY, "busy", count=3),
        Phase(START + 5 * DAY, "busy_date", count=2),
        Phase(START + 5.5 * DAY, "garbage", count=8),
        Phase(START + 6 * DAY, "slow", count=3),
    ]


async def test_simulated_week(tmp_path: Path) -> None:
    """A week of outages and hostile answers never leaves an expired token on disk."""
    clock = SimulatedClock(START, autojump=True)
    env = tmp_path / ".env.gateway"
    first = mint(START - HOUR)
    env.write_text(f"# gateway\nKILO_JWT={first}\n")
    watch = DiskWatch(env)
    clock.observers.append(watch)
    cloud = WeekCloud(clock, week_phases())
    events: list[tuple[str, dict[str, Any]]] = []

    def emit(event: DomainEvent) -> None:
        events.append((event.TYPE, event.fields()))

    client = CloudClient(
        base_url="https://cloud.test",
        internal_key="internal-key-0123456789",
        town_id=TOWN,
        transport=httpx.MockTransport(cloud.handle),
        clock=clock,
    )
    refresher = TokenRefresher(
        town_id=TOWN,
        env_file=env,
        client=client,
        emit=emit,
        clock=clock,
        rng=random.Random(2026),
        metrics=token_metrics(MetricsRegistry(), clock=clock),
    )
    real_start = time.perf_counter()
    with structlog.testing.capture_logs() as logs:
        async with client, anyio.create_task_group() as tg:
            await tg.start(refresher.run)
            await clock.alarm(START + 7 * DAY).wait()
            clock.autojump = False
            status = refresher.status()
            tg.cancel_scope.cancel()
    elapsed = time.perf_counter() - real_start
    print(
        f"\nsimulated week: {elapsed:.2f}s real, {clock.sleeps} sleeps, "
        f"{watch.samples} samples, {len(cloud.calls)} cloud calls, {len(cloud.minted)} tokens"
    )

    assert watch.violations == []
    assert watch.seen <= {first, *cloud.minted}
    assert "# gateway\n" in env.read_text()

    times = [t for t, _ in cloud.calls]
    gaps = [b - a for a, b in itertools.pairwise(times)]
    assert min(gaps) >= 2.0

    for (t, kind), (t_next, _) in zip(cloud.calls, cloud.calls[1:], strict=False):
        if kind == "busy":
            assert t_next - t >= 120
        if kind == "busy_date":
            assert t_next - t >= 89  # an HTTP date has whole seconds

    for phase in week_phases():
        kinds = {k for _, k in cloud.calls}
        assert phase.kind in kinds
    long_outage = [t for t, k in cloud.calls if k == "connect" and t > START + 4 * DAY]
    assert long_outage[-1] - long_outage[0] > 10.5 * HOUR
    assert len(long_outage) < 11 * HOUR / 60  # backed off, not hammering

    assert len(cloud.minted) >= 12
    assert [t for t, _ in events].count("token.refreshed") == len(cloud.minted)
    assert "token.expired" not in [t for t, _ in events]
    failed = [f["reason"] for t, f in events if t == "token.refresh_failed"]
    assert {"connect_error", "timeout", "http_502", "http_429", "unacceptable_token"} <= set(failed)
    assert {"empty_body", "bad_content_type", "body_too_large", "no_token_in_body"} <= set(failed)

    assert status.state is State.FRESH
    assert status.consecutive_failures == 0
    everything = repr(logs) + repr(events)
    assert not any(token in everything for token in [*cloud.minted, first])
    assert "pwned" not in everything


def _quiet_refresher(env: Path, client: Any, clock: SimulatedClock, *, seed: int) -> TokenRefresher:
    """A refresher of the env file `env` on `clock`, whose events go nowhere."""
    return TokenRefresher(
        town_id=TOWN,
        env_file=env,
        client=client,
        emit=lambda event: None,
        clock=clock,
        rng=random.Random(seed),
    )


async def run_with_jump(
    tmp_path: Path, *, jump_at: float, jump: float, until: float
) -> tuple[float, list[float]]:
    """The first planned refresh (wall time) and the cloud call times of a refresher whose
    wall clock steps by `jump` at monotonic `jump_at`."""
    clock = SimulatedClock(START, autojump=True)
    clock.jump_at(jump_at, jump)
    env = tmp_path / ".env.gateway"
    env.write_text(f"KILO_JWT={mint(START)}\n")
    calls: list[float] = []

    class Cloud:
        async def refresh(self, current_token: str | None) -> str:
            calls.append(clock.time())
            return mint(clock.time())

    refresher = _quiet_refresher(env, Cloud(), clock, seed=1)
    async with anyio.create_task_group() as tg:
        await tg.start(refresher.run)
        planned = refresher.status().next_refresh_at
        await clock.alarm(until).wait()
        clock.autojump = False
        tg.cancel_scope.cancel()
    assert planned is not None
    return planned, calls


async def test_wall_clock_jump_forward_refreshes_within_30_s(tmp_path: Path) -> None:
    """A 23 h forward jump (resume, NTP step) is noticed and refreshed within 30 s."""
    planned, calls = await run_with_jump(
        tmp_path, jump_at=100.0, jump=23 * HOUR, until=START + 25 * HOUR
    )
    jumped_at = START + 100.0 + 23 * HOUR
    assert START + 100.0 < planned < jumped_at
    assert calls, "no refresh after the jump"
    assert jumped_at <= calls[0] <= jumped_at + 30


async def test_wall_clock_jump_backward_waits_for_the_refresh_point(tmp_path: Path) -> None:
    """A 6 h backward jump only delays the refresh to the token's refresh point."""
    planned, calls = await run_with_jump(
        tmp_path, jump_at=100.0, jump=-6 * HOUR, until=START + 13 * HOUR
    )
    # The token was minted at start: its point is the desync draw, at most half-life.
    assert START + 100.0 < planned <= START + 0.5 * DAY
    assert calls
    assert planned <= calls[0] <= planned + 30


async def test_wall_clock_jump_backward_during_an_outage_keeps_the_backoff(
    tmp_path: Path,
) -> None:
    """A 1 h backward step during an outage moves the retry back with it: the gaps between
    calls stay within the 300 s backoff in real (monotonic) time, instead of 1 h more."""
    clock = SimulatedClock(START, autojump=True)
    clock.jump_at(1000.0, -HOUR)
    env = tmp_path / ".env.gateway"
    env.write_text(f"KILO_JWT={mint(START - 20 * HOUR)}\n")  # past its point: 4 h left
    calls: list[float] = []

    class Cloud:
        async def refresh(self, current_token: str | None) -> str:
            calls.append(clock.monotonic)
            raise RefreshError("outage", "connect_error")

    refresher = _quiet_refresher(env, Cloud(), clock, seed=7)
    with structlog.testing.capture_logs() as logs:
        async with anyio.create_task_group() as tg:
            await tg.start(refresher.run)
            await clock.alarm(START + 2 * HOUR).wait()  # wall time: 3 h in real time
            clock.autojump = False
            tg.cancel_scope.cancel()
    assert clock.monotonic >= 3 * HOUR
    assert len(calls) > 20
    gaps = [b - a for a, b in itertools.pairwise(calls)]
    # The backoff's 300 s, and at most one 30 s sleep before the step is seen.
    assert max(gaps) <= 300 + 30, max(gaps)
    # Seen as the fall from the loop's last look at the clock, at most one sleep before.
    [step] = [e["seconds"] for e in logs if e["event"] == "wall_clock_stepped_back"]
    assert HOUR - 30 <= step <= HOUR
