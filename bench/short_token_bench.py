"""Short tokens through cloud outages: time without a usable token, daemon beside the seed's cron.

The real `TokenRefresher` on the simulated clock (`tests/daemon/simclock.py`) against a
simulated cloud that mints 30 s tokens and is down from 11 to 27 s and from 50 to 58 s; the
run lasts 75 s and starts with a token minted at 0 s in the env file, as provisioning leaves
it. Two figures per run, summed over the 75 s:

- without an unexpired token: what an agent calling the gateway meets (it takes any token
  before its `exp`);
- without an acceptable token: the daemon's own stricter rule (CONTRACT §3: `exp` more than
  a tenth of the lifetime ahead, so 3 s for a 30 s token).

Rows: the daemon with the schedule of CONTRACT §3 (waits scaled to the lifetime), averaged
over `seeds` jitter draws; baselines in the same run: the same daemon with the unscaled
schedule (as before short tokens shrank the waits) and the seed's cron (a refresh every half
lifetime, 15 s, no retry; averaged over every phase of its period against the token).
`simulate()` is also the engine of the 0 s test in tests/daemon/token/test_schedule.py.

`python -m bench.short_token_bench [--quick]`; `run(quick)` gives the rows to `python -m bench`.
"""

from __future__ import annotations

import contextlib
import random
import statistics
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from unittest import mock

import anyio
from structlog.testing import capture_logs
from tests.daemon.minting import TOWN, mint
from tests.daemon.simclock import SimulatedClock

from gastown_sandboxd.errors import RefreshError
from gastown_sandboxd.events.types import DomainEvent, TokenRefreshed
from gastown_sandboxd.token import schedule
from gastown_sandboxd.token.refresher import TokenRefresher

from ._table import Row, main_of

START = 1_800_000_000.0
LIFETIME = 30
OUTAGES: tuple[tuple[float, float], ...] = ((11.0, 27.0), (50.0, 58.0))
DURATION = 75.0


@dataclass(frozen=True)
class Gaps:
    """Seconds without a token of each kind over the run, and the calls the cloud got."""

    unexpired: float
    acceptable: float
    calls: int


class SimulatedCloud:
    """Mints a `lifetime` token at the simulated time, except during `outages` (relative)."""

    def __init__(
        self, clock: SimulatedClock, lifetime: int, outages: Sequence[tuple[float, float]]
    ):
        self._clock = clock
        self._lifetime = lifetime
        self._outages = outages
        self.calls = 0

    async def refresh(self, current_token: str | None) -> str:
        self.calls += 1
        at = self._clock.time() - START
        if any(begin <= at < end for begin, end in self._outages):
            raise RefreshError("outage", "connect_error")
        return mint(self._clock.time(), lifetime=self._lifetime)


def gaps(held: Sequence[tuple[float, int, int]], end: float) -> tuple[float, float]:
    """(unexpired, acceptable) seconds without a token between the first holding and `end`,
    from `(since, iat, exp)` in time order (relative seconds)."""
    unexpired = acceptable = 0.0
    for index, (since, iat, exp) in enumerate(held):
        until = held[index + 1][0] if index + 1 < len(held) else end
        margin = min(60.0, (exp - iat) / 10)
        unexpired += max(0.0, until - max(since, exp))
        acceptable += max(0.0, until - max(since, exp - margin))
    return unexpired, acceptable


async def simulate(
    *, seed: int, scaled: bool = True, lifetime: int = LIFETIME,
    outages: Sequence[tuple[float, float]] = OUTAGES, duration: float = DURATION,
) -> Gaps:  # fmt: skip
    """One run of the real refresher; `scaled=False` runs the schedule without §3's scaling."""
    clock = SimulatedClock(START)
    cloud = SimulatedCloud(clock, lifetime, outages)
    held: list[tuple[float, int, int]] = [(0.0, int(START), int(START) + lifetime)]

    def emit(event: DomainEvent) -> None:
        if isinstance(event, TokenRefreshed):
            held.append((clock.time() - START, event.iat, event.exp))

    with (
        tempfile.TemporaryDirectory(prefix="short-token-") as tmp,
        _unscaled(not scaled),
        capture_logs(),  # the refresher's log lines, hundreds per run, are not the figure
    ):
        env_file = Path(tmp) / ".env.gateway"
        env_file.write_text(f"KILO_JWT={mint(START, lifetime=lifetime)}\n")
        refresher = TokenRefresher(
            town_id=TOWN, env_file=env_file, client=cloud, emit=emit, clock=clock,
            rng=random.Random(seed),
        )  # fmt: skip
        async with anyio.create_task_group() as tg:
            await tg.start(refresher.run)
            await clock.alarm(START + duration).wait()
            tg.cancel_scope.cancel()
    relative = [(since, iat - int(START), exp - int(START)) for since, iat, exp in held]
    unexpired, acceptable = gaps(relative, duration)
    return Gaps(unexpired, acceptable, cloud.calls)


@contextlib.contextmanager
def _unscaled(active: bool) -> Iterator[None]:
    # The schedule as it was before §3 scaled the waits: no lifetime counts as short.
    if not active:
        yield
        return
    with mock.patch.object(schedule, "SHORT_LIFETIME", 0.0):
        yield


def cron(
    *, phase: float, lifetime: int = LIFETIME,
    outages: Sequence[tuple[float, float]] = OUTAGES, duration: float = DURATION,
) -> Gaps:  # fmt: skip
    """The seed's cron: a refresh every half lifetime (12 h of 24 h) from `phase` seconds
    after the first token was minted, no retry on failure."""
    held = [(0.0, 0, lifetime)]
    calls = 0
    at = phase
    while at < duration:
        calls += 1
        if not any(begin <= at < end for begin, end in outages):
            held.append((at, int(at), int(at) + lifetime))
        at += lifetime / 2
    unexpired, acceptable = gaps(held, duration)
    return Gaps(unexpired, acceptable, calls)


def run(quick: bool) -> list[Row]:
    """The scaled and unscaled daemon over `seeds` jitter draws each, and the cron."""
    seeds = range(20 if quick else 100)
    scaled = [anyio.run(_simulate, seed, True) for seed in seeds]
    unscaled = [anyio.run(_simulate, seed, False) for seed in seeds]
    # The cron's phase against the token is arbitrary: every phase of the period in 0.1 s steps.
    period = LIFETIME / 2
    crons = [cron(phase=step / 10) for step in range(int(period * 10))]
    seed_cron = Gaps(
        statistics.mean(c.unexpired for c in crons),
        statistics.mean(c.acceptable for c in crons),
        round(statistics.mean(c.calls for c in crons)),
    )
    cron_worst = max(c.unexpired for c in crons)
    note = f"30 s tokens, outages 11-27 s and 50-58 s, 75 s; mean of {len(seeds)} seeds"
    rows = []
    for field, label in (("unexpired", "unexpired"), ("acceptable", "acceptable (§3)")):
        ours = statistics.mean(getattr(g, field) for g in scaled)
        before = statistics.mean(getattr(g, field) for g in unscaled)
        worst = max(getattr(g, field) for g in scaled)
        rows += [
            Row(f"daemon: s without an {label} token", ours, "s", before,
                f"{note}; baseline: unscaled schedule" if field == "unexpired" else
                f"worst seed {worst:.2f} s"),
            Row(f"seed's cron: s without an {label} token", getattr(seed_cron, field), "s",
                note=f"a refresh every 15 s, no retry; mean of every phase, worst "
                f"{cron_worst:.1f} s" if field == "unexpired" else ""),
        ]  # fmt: skip
    rows.append(
        Row("daemon: calls to the cloud", statistics.mean(g.calls for g in scaled), "calls",
            statistics.mean(g.calls for g in unscaled), "baseline: unscaled schedule")
    )  # fmt: skip
    return rows


async def _simulate(seed: int, scaled: bool) -> Gaps:
    return await simulate(seed=seed, scaled=scaled)


if __name__ == "__main__":
    quick = "20 seeds, not 100"
    raise SystemExit(
        main_of(run, name="short_token_bench", doc=__doc__, quick=quick, title="short tokens")
    )
