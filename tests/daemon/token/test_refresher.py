"""The token component: start-up, scheduled and forced refreshes, pushes, reloads, failures."""

from __future__ import annotations

import itertools
import os
import random
import subprocess
import time
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
import httpx
import jwt
import pytest
import structlog.testing

from gastown_sandboxd.errors import AtomicWriteError, RefreshError, TokenError
from gastown_sandboxd.events.types import DomainEvent
from gastown_sandboxd.ops.metrics import MetricsRegistry
from gastown_sandboxd.token import envfile
from gastown_sandboxd.token.claims import decode_unverified, fingerprint
from gastown_sandboxd.token.cloud import CloudClient
from gastown_sandboxd.token.refresher import State, TokenRefresher, token_metrics
from gastown_sandboxd.token.schedule import SchedulePolicy, desync_point
from tests.daemon.minting import DAY, TOWN, forge, mint
from tests.daemon.simclock import SimulatedClock
from tests.fixtures.cloud import CloudServer
from tests.waiting import eventually

T0 = 1_800_000_000.0
POLICY = SchedulePolicy()
Action = str | Exception | Callable[[], Awaitable[str]] | None


class Fixed(random.Random):
    """A random source whose every draw is `value`, so that planned times can be computed."""

    def __init__(self, value: float) -> None:
        super().__init__(0)
        self.value = value

    def random(self) -> float:
        return self.value


class ScriptedCloud:
    """A token source that plays a script of answers, then mints fresh 24 h tokens."""

    def __init__(self, clock: SimulatedClock, lifetime: int = DAY) -> None:
        self.clock = clock
        self.lifetime = lifetime
        self.script: deque[Action] = deque()
        self.calls: list[tuple[float, str | None]] = []
        self.minted: list[str] = []

    async def refresh(self, current_token: str | None) -> str:
        self.calls.append((self.clock.time(), current_token))
        action = self.script.popleft() if self.script else None
        if isinstance(action, Exception):
            raise action
        if isinstance(action, str):
            return action
        if action is not None:
            return await action()
        token = mint(self.clock.time(), lifetime=self.lifetime)
        self.minted.append(token)
        return token


class Rig:
    """A refresher wired to a simulated clock, a scripted cloud and an event list."""

    def __init__(
        self,
        tmp_path: Path,
        *,
        autojump: bool = False,
        env_text: str | None = None,
        client: Any = None,
        rng: random.Random | None = None,
    ) -> None:
        self.clock = SimulatedClock(T0, autojump=autojump)
        self.cloud = ScriptedCloud(self.clock)
        self.env = tmp_path / ".env.gateway"
        if env_text is not None:
            self.env.write_text(env_text)
        self.events: list[tuple[str, dict[str, Any]]] = []
        self.registry = MetricsRegistry()
        self.refresher = TokenRefresher(
            town_id=TOWN,
            env_file=self.env,
            client=client or self.cloud,
            emit=self.emit,
            clock=self.clock,
            rng=rng or random.Random(4),
            metrics=token_metrics(self.registry, clock=self.clock),
        )

    def emit(self, event: DomainEvent) -> None:
        self.events.append((event.TYPE, event.fields()))

    def types(self) -> list[str]:
        return [t for t, _ in self.events]

    def disk_token(self) -> str | None:
        return envfile.read_token(self.env)

    def metric(self, name: str, **labels: str) -> float | None:
        value = self.registry.get_sample_value(name, labels)
        return None if value is None else float(value)

    @asynccontextmanager
    async def running(self) -> AsyncIterator[TokenRefresher]:
        async with anyio.create_task_group() as tg:
            await tg.start(self.refresher.run)
            yield self.refresher
            tg.cancel_scope.cancel()


def cloud_answer(status: int = 200, **kwargs: Any) -> CloudClient:
    return CloudClient(
        base_url="https://cloud.test",
        internal_key="internal-key-0123456789",
        town_id=TOWN,
        transport=httpx.MockTransport(lambda request: httpx.Response(status, **kwargs)),
    )


# --- start-up ---------------------------------------------------------------------------


async def test_missing_env_file_refreshes_at_once(tmp_path: Path) -> None:
    """With no env file the first thing the loop does is a refresh; the file is 0600."""
    rig = Rig(tmp_path)
    async with rig.running() as refresher:
        await eventually(lambda: refresher.status().state is State.FRESH)
        (token,) = rig.cloud.minted
        assert rig.cloud.calls == [(T0, None)]
        assert rig.env.read_text() == f"KILO_JWT={token}\n"
        assert os.stat(rig.env).st_mode & 0o777 == 0o600
        status = refresher.status()
        assert status.state is State.FRESH
        assert status.token is not None
        assert status.token.fingerprint == fingerprint(token)
        assert status.token_on_disk_ok
        assert status.last_refresh_at == T0
        assert status.next_refresh_at is not None
        assert T0 + 0.4 * DAY <= status.next_refresh_at <= T0 + 0.5 * DAY
        assert rig.events == [
            ("token.refreshed", {"exp": int(T0) + DAY, "iat": int(T0), "source": "cloud"})
        ]


async def test_started_is_reported_before_the_first_refresh(tmp_path: Path) -> None:
    """run() reports started right after reading the file, while the cloud is still busy."""
    rig = Rig(tmp_path)
    gate = anyio.Event()

    async def slow() -> str:
        await gate.wait()
        return mint(rig.clock.time())

    rig.cloud.script.append(slow)
    async with rig.running() as refresher:
        assert refresher.status().state is State.MISSING
        await eventually(lambda: len(rig.cloud.calls) == 1)
        assert not refresher.status().token_on_disk_ok
        gate.set()
        await eventually(lambda: refresher.status().state is State.FRESH)


async def test_fresh_token_on_disk_is_kept_until_its_refresh_point(tmp_path: Path) -> None:
    """A fresh token is not refreshed at start; the refresh comes at its jittered half-life."""
    token = mint(T0 - 3600)
    rig = Rig(tmp_path, env_text=f"A=1\nKILO_JWT={token}\n")
    async with rig.running() as refresher:
        status = refresher.status()
        assert status.state is State.FRESH
        assert status.token_on_disk_ok
        assert status.next_refresh_at is not None
        assert T0 - 3600 + 0.4 * DAY <= status.next_refresh_at <= T0 - 3600 + 0.5 * DAY
        slept = rig.clock.sleeps
        rig.clock.advance(status.next_refresh_at - T0 - 1)
        # It woke, found the refresh point a second away and went back to sleep, calling nobody.
        await eventually(lambda: rig.clock.sleeps > slept)
        assert rig.cloud.calls == []
        rig.clock.advance(1)
        await eventually(lambda: len(rig.cloud.calls) == 1)
        assert rig.cloud.calls[0][1] == token
        await eventually(lambda: rig.disk_token() == rig.cloud.minted[0])
        assert rig.env.read_text().startswith("A=1\n")


async def test_a_fresh_token_on_its_own_line_is_not_written_at_start(tmp_path: Path) -> None:
    """The file as the daemon writes it is left alone: same inode, same bytes."""
    text = f"A=1\r\nKILO_JWT={mint(T0 - 3600)}\n# kept\n"
    rig = Rig(tmp_path, env_text=text)
    inode = rig.env.stat().st_ino
    async with rig.running():
        pass
    assert (rig.env.stat().st_ino, rig.env.read_bytes()) == (inode, text.encode())


@pytest.mark.parametrize(
    "line",
    ["KILO_JWT={t}\r\n", "export KILO_JWT='{t}'\n", "KILO_JWT={t}\nKILO_JWT={t}\n"],
    ids=["crlf", "export_quoted", "twice"],
)
@pytest.mark.parametrize("when", ["start", "edit"])
async def test_a_fresh_token_on_a_line_of_another_shape_is_written_again(
    tmp_path: Path, line: str, when: str
) -> None:
    """A token line saved with CRLF (bash then reads the CR into the token), quoted, exported
    or twice: the daemon holds the token and writes its line as it always does, every other
    line kept, at start or when the edit is seen; nothing is asked of the cloud."""
    token = mint(T0 - 3600)
    text = "A=1\r\n" + line.format(t=token) + "B=2\n"
    rig = Rig(tmp_path, env_text=text if when == "start" else f"KILO_JWT={mint(T0 - 7200)}\n")
    with structlog.testing.capture_logs() as logs:
        async with rig.running() as refresher:
            if when == "edit":
                rig.env.write_text(text)
                assert await refresher.reload_env_file() is True
            assert refresher.status().token_on_disk_ok
    assert rig.env.read_bytes() == f"A=1\r\nKILO_JWT={token}\nB=2\n".encode()
    sourced = subprocess.run(
        ["bash", "-c", f'set -a; . "{rig.env}"; printf %s "$KILO_JWT"'],
        capture_output=True, text=True, check=True, env={},
    )  # fmt: skip
    assert sourced.stdout == token
    assert "env_file_token_line_rewritten" in [e["event"] for e in logs]
    assert rig.cloud.calls == []


async def test_start_up_token_is_desynchronised_and_a_refreshed_one_follows_the_contract(
    tmp_path: Path,
) -> None:
    """A token minted at boot is refreshed first at the desync draw, then by the contract."""
    booted = mint(T0)
    rig = Rig(tmp_path, env_text=f"KILO_JWT={booted}\n", rng=Fixed(0.25))
    async with rig.running() as refresher:
        planned = refresher.status().next_refresh_at
        assert planned is not None
        span = ((0.4 * DAY) ** 2 + 0.25 * ((0.5 * DAY) ** 2 - (0.4 * DAY) ** 2)) ** 0.5
        assert planned == pytest.approx(T0 + 0.25 * span)
        assert planned == desync_point(decode_unverified(booted), T0, Fixed(0.25), POLICY)
        # Earlier than the contract's window: the fleet's first refreshes spread from boot.
        assert planned < T0 + 0.4 * DAY
        slept = rig.clock.sleeps
        rig.clock.advance(planned - T0 - 1)
        await eventually(lambda: rig.clock.sleeps > slept)
        assert rig.cloud.calls == []
        rig.clock.advance(1)
        await eventually(lambda: refresher.status().last_refresh_at is not None)
        ((called_at, bearer),) = rig.cloud.calls
        assert called_at == pytest.approx(planned)
        assert bearer == booted
        iat = decode_unverified(rig.cloud.minted[0]).iat
        assert refresher.status().next_refresh_at == iat + 0.5 * DAY - 0.25 * 0.1 * DAY


async def test_start_up_token_inside_its_jitter_window_is_not_refreshed_at_once(
    tmp_path: Path,
) -> None:
    """An older token found on disk (a daemon restart) gets the contract's point drawn after now."""
    found = mint(T0 - 0.45 * DAY)
    rig = Rig(tmp_path, env_text=f"KILO_JWT={found}\n", rng=Fixed(0.25))
    async with rig.running() as refresher:
        half_life = int(T0 - 0.45 * DAY) + 0.5 * DAY
        assert refresher.status().next_refresh_at == T0 + 0.25 * (half_life - T0)
        # Asleep until then: the start-up decision made no call.
        await eventually(lambda: rig.clock.sleeps > 0)
        assert rig.cloud.calls == []


async def test_token_past_half_life_is_refreshed_at_once_with_bearer(tmp_path: Path) -> None:
    """A token with less than half its lifetime left is refreshed at start, sent as Bearer."""
    token = mint(T0 - 0.6 * DAY)
    rig = Rig(tmp_path, env_text=f"KILO_JWT={token}\n")
    async with rig.running():
        await eventually(lambda: len(rig.cloud.minted) == 1)
        assert rig.cloud.calls == [(T0, token)]


async def test_token_of_another_town_is_replaced_at_once(tmp_path: Path) -> None:
    """Another town's token is neither trusted nor sent; other lines stay."""
    other = mint(T0, town_id="town-2")
    rig = Rig(tmp_path, env_text=f"# mine\nKILO_JWT={other}\nB=2\n")
    async with rig.running() as refresher:
        assert refresher.status().state is State.MISSING
        await eventually(lambda: refresher.status().state is State.FRESH)
        assert rig.cloud.calls == [(T0, None)]
        assert rig.env.read_text() == f"# mine\nKILO_JWT={rig.cloud.minted[0]}\nB=2\n"


async def test_expired_token_is_sent_as_bearer_and_reported(tmp_path: Path) -> None:
    """An expired token still identifies the town to the cloud, and token.expired is emitted."""
    old = mint(T0 - 2 * DAY)
    rig = Rig(tmp_path, env_text=f"KILO_JWT={old}\n")
    rig.cloud.script.append(RefreshError("outage", "http_502", status=502))
    async with rig.running() as refresher:
        await eventually(lambda: len(rig.cloud.calls) == 1)
        assert rig.cloud.calls[0][1] == old
        await eventually(lambda: "token.expired" in rig.types())
        status = refresher.status()
        assert status.state is State.EXPIRED
        assert not status.token_on_disk_ok
        assert rig.types().count("token.expired") == 1


async def test_a_token_issued_ahead_of_a_clock_behind_is_still_the_bearer(tmp_path: Path) -> None:
    """A good token whose iat is 10 min ahead of the sandbox's clock (booted before NTP) is
    not acceptable, so it is never written, and a refresh comes at once; but it is held as
    the Bearer of that refresh, which the cloud's binding takes (without it: 401 for good)."""
    ahead = mint(T0 + 600)
    rig = Rig(tmp_path, env_text=f"KILO_JWT={ahead}\n")
    rig.cloud.script.append(RefreshError("outage", "http_502", status=502))
    async with rig.running() as refresher:
        await eventually(lambda: len(rig.cloud.calls) == 1)
        assert rig.cloud.calls[0] == (T0, ahead)
        assert not refresher.status().token_on_disk_ok
        assert refresher.status().state is State.DEGRADED
    assert rig.env.read_text() == f"KILO_JWT={ahead}\n"


async def test_a_reloaded_refresh_fraction_moves_the_held_tokens_refresh(tmp_path: Path) -> None:
    """SIGHUP with refresh.fraction 0.1 (was 0.5): the held token's refresh comes within the
    new tenth of its life, not at its old point (the reload reached only the next token)."""
    rig = Rig(tmp_path, env_text=f"KILO_JWT={mint(T0 - 3600)}\n")
    async with rig.running() as refresher:
        before = refresher.status().next_refresh_at
        assert before is not None
        assert before > T0 - 3600 + 0.1 * DAY
        refresher.set_policy(SchedulePolicy(refresh_fraction=0.1, jitter_fraction=0.0))
        after = refresher.status().next_refresh_at
        assert after is not None
        assert T0 <= after <= T0 - 3600 + 0.1 * DAY
        refresher.set_policy(SchedulePolicy(refresh_fraction=0.1, jitter_fraction=0.0))
        assert refresher.status().next_refresh_at == after  # the same knobs: no new draw


async def test_a_token_issued_ahead_of_this_clock_is_refreshed_by_the_clouds_clock(
    tmp_path: Path,
) -> None:
    """The cloud's clock is 120 s ahead: its 60 s token (iat 120 s ahead, acceptable) is
    refreshed within 24-30 s of its arrival, as the gateway counts its life, not 120 s
    later at iat + 24-30 s, when the gateway had refused it for a minute."""
    rig = Rig(tmp_path, env_text=f"KILO_JWT={mint(T0)}\n")

    async def ahead() -> str:
        return mint(rig.clock.time() + 120, lifetime=60)

    rig.cloud.script.append(ahead)
    async with rig.running() as refresher:
        await refresher.refresh_now()
        planned = refresher.status().next_refresh_at
        assert planned is not None
        assert T0 + 24 <= planned <= T0 + 30


async def test_unreadable_env_file_counts_as_missing(tmp_path: Path) -> None:
    """An env file that cannot be read is logged and treated as holding no token."""
    rig = Rig(tmp_path)
    rig.env.mkdir()  # reading a folder fails with IsADirectoryError
    with structlog.testing.capture_logs() as logs:
        async with rig.running() as refresher:
            assert refresher.status().state is State.MISSING
    assert "env_file_unreadable" in [e["event"] for e in logs]


# --- forced refresh ---------------------------------------------------------------------


async def test_overlapping_forced_refreshes_share_one_call(tmp_path: Path) -> None:
    """Five refresh_now calls at once make one cloud call and get the same token."""
    rig = Rig(tmp_path, env_text=f"KILO_JWT={mint(T0)}\n")
    gate = anyio.Event()

    async def slow() -> str:
        await gate.wait()
        return mint(rig.clock.time() + 5)

    rig.cloud.script.append(slow)
    views: list[Any] = []

    async def force() -> None:
        views.append(await rig.refresher.refresh_now())

    async with rig.running() as refresher, anyio.create_task_group() as tg:
        for _ in range(5):
            tg.start_soon(force)
        await eventually(lambda: len(rig.cloud.calls) == 1)
        assert refresher.status().state is State.REFRESHING
        gate.set()
    assert len(rig.cloud.calls) == 1
    assert len(views) == 5
    assert len({v.fingerprint for v in views}) == 1
    assert rig.types() == ["token.refreshed"]


async def test_forced_refresh_joins_a_scheduled_one_in_flight(tmp_path: Path) -> None:
    """A forced refresh during the loop's own call shares that call."""
    rig = Rig(tmp_path)
    gate = anyio.Event()

    async def slow() -> str:
        await gate.wait()
        return mint(rig.clock.time())

    rig.cloud.script.append(slow)
    async with rig.running() as refresher:
        await eventually(lambda: len(rig.cloud.calls) == 1)
        async with anyio.create_task_group() as tg:
            tg.start_soon(refresher.refresh_now)
            await anyio.sleep(0.01)
            gate.set()
    assert len(rig.cloud.calls) == 1


async def test_forced_refresh_failure_raises_and_degrades(tmp_path: Path) -> None:
    """A failed forced refresh raises RefreshError; the old token stays, state degraded."""
    token = mint(T0)
    rig = Rig(tmp_path, env_text=f"KILO_JWT={token}\n")
    rig.cloud.script.append(RefreshError("outage", "connect_error"))
    async with rig.running() as refresher:
        with pytest.raises(RefreshError) as caught:
            await refresher.refresh_now()
        assert caught.value.kind == "outage"
        status = refresher.status()
        assert status.state is State.DEGRADED
        assert status.consecutive_failures == 1
        assert status.last_failure == "connect_error"
        assert status.next_refresh_at is not None
        assert T0 + 2 <= status.next_refresh_at <= T0 + 2.5
        assert rig.disk_token() == token
        assert rig.events == [
            (
                "token.refresh_failed",
                {
                    "reason": "connect_error",
                    "consecutive_failures": 1,
                    "exp": int(T0) + DAY,
                    "iat": int(T0),
                },
            )
        ]
        # The retry comes from the loop after the backoff and clears the degradation.
        rig.clock.advance(3)
        await eventually(lambda: refresher.status().state is State.FRESH)
        assert refresher.status().consecutive_failures == 0


async def test_refresh_now_without_run_calls_inline(tmp_path: Path) -> None:
    """Before run() starts, a forced refresh still works (inline)."""
    rig = Rig(tmp_path)
    view = await rig.refresher.refresh_now()
    assert view.fingerprint == fingerprint(rig.cloud.minted[0])
    assert rig.disk_token() == rig.cloud.minted[0]


async def test_same_token_again_is_not_rewritten(tmp_path: Path) -> None:
    """A cloud that answers with the held token causes no write and no event."""
    token = mint(T0)
    rig = Rig(tmp_path, env_text=f"KILO_JWT={token}\n")
    rig.cloud.script.append(token)
    async with rig.running() as refresher:
        before = rig.env.stat().st_mtime_ns
        view = await refresher.refresh_now()
        assert view.fingerprint == fingerprint(token)
        assert rig.env.stat().st_mtime_ns == before
        assert rig.events == []


async def test_stale_token_from_the_cloud_is_not_refreshed_again_at_once(
    tmp_path: Path,
) -> None:
    """A new token already past half-life is used, and the next call waits 300 s."""
    rig = Rig(tmp_path, env_text=f"KILO_JWT={mint(T0)}\n")
    stale = mint(T0 - 0.6 * DAY)
    rig.cloud.script.append(stale)
    async with rig.running() as refresher:
        await refresher.refresh_now()
        assert rig.disk_token() == stale
        assert refresher.status().next_refresh_at == T0 + 300


class _Draws(random.Random):
    """Every draw is the largest jitter: refresh points at 0.4 of the lifetime."""

    def uniform(self, a: float, b: float) -> float:
        return max(a, b)

    def random(self) -> float:
        return 1.0 - 1e-12


@pytest.mark.parametrize("again", ["a new token", "the held token"])
async def test_a_token_already_past_its_drawn_point_waits_300_s_not_0(
    tmp_path: Path, again: str
) -> None:
    """A token 0.45 of its life old on arrival (this clock 11 h ahead of the cloud's), past
    its drawn point (0.4 here) but not half its life, was refreshed again at once, over and
    over (a reviewer: 21 calls in 120 s); so was the held token served again. Both wait the
    300 s of a stale token."""
    held = mint(T0 - 0.45 * DAY)
    rig = Rig(tmp_path, env_text=f"KILO_JWT={mint(T0)}\n", rng=_Draws())
    rig.cloud.script.append(held)
    async with rig.running() as refresher:
        await refresher.refresh_now()
        if again == "the held token":
            rig.clock.advance(2)
            rig.cloud.script.append(held)
            await refresher.refresh_now()
        assert rig.disk_token() == held
        assert refresher.status().next_refresh_at == rig.clock.time() + 300


# --- hostile answers --------------------------------------------------------------------


def json_answer(body: bytes) -> dict[str, Any]:
    """An answer of these exact JSON bytes (httpx's `json=` cannot encode a lone surrogate)."""
    return {"content": body, "headers": {"content-type": "application/json"}}


HOSTILE: list[tuple[str, dict[str, Any], str]] = [
    ("shell", {"text": "$(touch x)"}, "unacceptable_token"),
    ("shell_json", {"json": {"token": "`touch x`;$(touch x)"}}, "unacceptable_token"),
    ("other_town", {"text": mint(T0, town_id="town-2")}, "unacceptable_token"),
    ("expired", {"text": mint(T0 - 2 * DAY)}, "unacceptable_token"),
    ("alg_none", {"text": jwt.encode({"a": 1}, None, algorithm="none")}, "unacceptable_token"),
    (
        "alg_none_signed",
        {
            "text": forge(
                {"alg": "none"},
                {"sub": "u", "type": "gastown_sandbox", "town_id": TOWN, "iat": 1, "exp": 2},
            )
        },
        "unacceptable_token",
    ),
    (
        # Times past a float's range: `exp - now` would raise, not refuse.
        "huge_times",
        {
            "text": forge(
                {"alg": "HS256", "typ": "JWT"},
                {
                    "sub": "u",
                    "type": "gastown_sandbox",
                    "town_id": TOWN,
                    "iat": 10**400,
                    "exp": 10**400 + DAY,
                },
            )
        },
        "unacceptable_token",
    ),
    ("one_mb", {"text": "A" * (1024 * 1024)}, "body_too_large"),
    (
        "html",
        {"text": "<html><h1>502</h1></html>", "headers": {"content-type": "text/html"}},
        "bad_content_type",
    ),
    ("empty", {"text": ""}, "empty_body"),
    ("newline_inside", {"text": mint(T0) + "\nEVIL=$(touch x)"}, "unacceptable_token"),
    # JSON escapes of lone surrogates decode to text UTF-8 cannot hold: refused, not a crash
    # of the refresher (which ended the daemon with UnicodeEncodeError).
    ("lone_surrogate", json_answer(b'{"token": "\\ud800"}'), "unacceptable_token"),
    (
        "lone_low_surrogate",
        json_answer(b'{"result": {"data": "%s\\udc00"}}' % mint(T0).encode()),
        "unacceptable_token",
    ),
]


@pytest.mark.parametrize(("name", "response", "reason"), HOSTILE, ids=[h[0] for h in HOSTILE])
async def test_hostile_answers_never_reach_the_env_file(
    tmp_path: Path, name: str, response: dict[str, Any], reason: str
) -> None:
    """A hostile 200 is a failure with a reason; the old token stays; no log holds a token."""
    token = mint(T0)
    original = f"A=1\nKILO_JWT={token}\n"
    async with cloud_answer(**response) as client:
        rig = Rig(tmp_path, env_text=original, client=client)
        with structlog.testing.capture_logs() as logs:
            async with rig.running() as refresher:
                with pytest.raises(RefreshError) as caught:
                    await refresher.refresh_now()
                status = refresher.status()
    assert (caught.value.kind, caught.value.reason) == ("broken", reason)
    assert rig.env.read_text() == original
    assert status.state is State.DEGRADED
    assert status.consecutive_failures == 1
    assert status.token is not None
    assert status.token.fingerprint == fingerprint(token)
    failed = [e for e in logs if e["event"] == "token_refresh_failed"]
    assert [e["reason"] for e in failed] == [reason]
    everything = repr(logs) + repr(rig.events) + str(caught.value)
    assert token not in everything
    assert "touch" not in everything
    for value in response.values():
        if isinstance(value, str) and value.count(".") >= 2:
            assert value not in everything
    assert rig.types() == ["token.refresh_failed"]
    assert rig.metric("gastown_sandboxd_token_refresh_attempts_total", result="broken") == 1
    # Sourcing the env file runs nothing.
    subprocess.run(["bash", "-c", f'set -a; . "{rig.env}"'], cwd=tmp_path, check=True, env={})
    assert not (tmp_path / "x").exists()


async def test_unacceptable_token_lists_its_problems(tmp_path: Path) -> None:
    """The failure event of an unacceptable token names its problems, not the token."""
    rig = Rig(tmp_path, env_text=f"KILO_JWT={mint(T0)}\n")
    rig.cloud.script.append(mint(T0, town_id="town-2", lifetime=5))
    async with rig.running() as refresher:
        with pytest.raises(RefreshError) as caught:
            await refresher.refresh_now()
    assert isinstance(caught.value.__cause__, TokenError)
    assert caught.value.status == 200
    assert rig.events == [
        (
            "token.refresh_failed",
            {
                "reason": "unacceptable_token",
                "consecutive_failures": 1,
                "status": 200,
                "problems": ["wrong_town", "bad_lifetime"],
                "exp": int(T0) + DAY,
                "iat": int(T0),
            },
        )
    ]


async def test_token_cut_inside_its_signature_is_refused(tmp_path: Path) -> None:
    """A 200 text/plain body that lost the signature's tail is a failure, not a new token."""
    original = f"KILO_JWT={mint(T0)}\n"
    cut = mint(T0 + 5)[:-3]
    async with cloud_answer(text=cut) as client:
        rig = Rig(tmp_path, env_text=original, client=client)
        async with rig.running() as refresher:
            with pytest.raises(RefreshError) as caught:
                await refresher.refresh_now()
    assert (caught.value.reason, caught.value.status) == ("unacceptable_token", 200)
    assert rig.env.read_text() == original
    assert rig.events[0][1]["problems"] == ["bad_signature"]


# --- failure kinds ----------------------------------------------------------------------


async def test_retry_after_is_honoured(tmp_path: Path) -> None:
    """After 429 with Retry-After 120 the next call waits at least 120 s."""
    rig = Rig(tmp_path, autojump=True)
    rig.cloud.script.extend([RefreshError("busy", "http_429", status=429, retry_after=120.0), None])
    async with rig.running():
        await eventually(lambda: len(rig.cloud.calls) == 2)
        rig.clock.autojump = False
    (first, _), (second, _) = rig.cloud.calls
    assert second - first >= 120
    assert rig.events[0] == (
        "token.refresh_failed",
        {"reason": "http_429", "consecutive_failures": 1, "status": 429},
    )


async def test_unauthorized_backs_off_at_the_maximum(tmp_path: Path) -> None:
    """After 401 the next call waits the full 300 s."""
    rig = Rig(tmp_path, autojump=True, env_text=f"KILO_JWT={mint(T0 - 0.5 * DAY)}\n")
    rig.cloud.script.extend([RefreshError("unauthorized", "unauthorized", status=401)] * 3 + [None])
    async with rig.running():
        await eventually(lambda: len(rig.cloud.calls) == 4)
        rig.clock.autojump = False
    times = [t for t, _ in rig.cloud.calls]
    assert [b - a for a, b in itertools.pairwise(times)] == [300.0] * 3
    assert {f["reason"] for t, f in rig.events if t == "token.refresh_failed"} == {"unauthorized"}


async def test_outage_backs_off_and_tightens_near_expiry(tmp_path: Path) -> None:
    """Calls during an outage are at least 2 s apart, and at most 30 s apart near expiry."""
    rig = Rig(tmp_path, autojump=True, env_text=f"KILO_JWT={mint(T0 - 0.5 * DAY)}\n")
    rig.cloud.script.extend([RefreshError("outage", "connect_error")] * 400)
    async with rig.running():
        await eventually(lambda: len(rig.cloud.calls) >= 400)
        rig.clock.autojump = False
    times = [t for t, _ in rig.cloud.calls[:400]]
    pairs = list(itertools.pairwise(times))
    assert min(b - a for a, b in pairs) >= 2.0
    assert max(b - a for a, b in pairs) <= 300.0
    # The token (24 h) was issued 12 h before T0: under 10 % is left from T0 + 9.6 h.
    late = [b - a for a, b in pairs if a > T0 + 0.4 * DAY]
    assert len(late) > 10
    assert max(late) <= 30.0


async def test_write_failure_is_a_failure_and_keeps_the_old_token(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A disk that refuses the write raises AtomicWriteError; the held token is the old one."""
    token = mint(T0)
    rig = Rig(tmp_path, env_text=f"KILO_JWT={token}\n")

    def full(*args: Any, **kwargs: Any) -> bool:
        raise AtomicWriteError(28, "No space left on device")

    monkeypatch.setattr(envfile, "write_atomic", full)
    rig.cloud.script.append(mint(T0 + 5))
    async with rig.running() as refresher:
        with pytest.raises(AtomicWriteError):
            await refresher.refresh_now()
        status = refresher.status()
    assert status.state is State.DEGRADED
    assert status.last_failure == "write_failed"
    assert not status.token_on_disk_ok
    assert status.token is not None
    assert status.token.fingerprint == fingerprint(token)
    assert rig.metric("gastown_sandboxd_token_refresh_attempts_total", result="write_failed") == 1
    assert rig.types() == ["token.refresh_failed"]


@pytest.mark.parametrize("status", [404, 409, 410, 423])
async def test_inactive_town_is_probed_hourly_and_recovers_on_force(
    tmp_path: Path, status: int
) -> None:
    """404/409/410/423: town_inactive, one call an hour at most; a forced refresh recovers."""
    rig = Rig(tmp_path, autojump=True, env_text=f"KILO_JWT={mint(T0 - 0.5 * DAY)}\n")
    rig.cloud.script.extend([RefreshError("inactive", f"http_{status}", status=status)] * 10)
    async with rig.running() as refresher:
        await rig.clock.alarm(T0 + 5 * 3600 + 60).wait()
        rig.clock.autojump = False
        assert refresher.status().state is State.TOWN_INACTIVE
        times = [t for t, _ in rig.cloud.calls]
        assert len(times) == 6
        assert all(b - a >= 3600 for a, b in itertools.pairwise(times))
        assert rig.types() == ["town.inactive"]
        assert rig.events[0][1] == {"status": status, "reason": f"http_{status}"}
        rig.cloud.script.clear()
        await refresher.refresh_now()
        assert refresher.status().state is State.FRESH
        assert rig.types()[-1] == "token.refreshed"


async def test_forced_probe_of_an_inactive_town_that_is_still_inactive(tmp_path: Path) -> None:
    """A forced refresh of an inactive town raises kind inactive and keeps the state."""
    rig = Rig(tmp_path, env_text=f"KILO_JWT={mint(T0)}\n")
    rig.cloud.script.extend([RefreshError("inactive", "http_410", status=410)] * 2)
    async with rig.running() as refresher:
        for _ in range(2):
            with pytest.raises(RefreshError) as caught:
                await refresher.refresh_now()
            assert caught.value.kind == "inactive"
            rig.clock.advance(2)  # the least gap between two calls to the cloud
        assert refresher.status().state is State.TOWN_INACTIVE
        assert refresher.status().next_refresh_at == T0 + 2 + 3600
    assert rig.types() == ["town.inactive"]


async def test_forced_refreshes_keep_the_least_gap_after_any_call(tmp_path: Path) -> None:
    """Calls to the cloud keep 2 s apart (CONTRACT §3), forced ones too: within 2 s of a
    failed call a forced refresh waits out the rest (at most 2 s, after a wall clock stepped
    back too), and the ones forced meanwhile share its call. Within 2 s of a call that
    brought a token, a forced refresh answers that token at once, with no call (20 forced
    refreshes in a row were 20 calls in 0.27 s); after the gap it calls again."""
    rig = Rig(tmp_path, env_text=f"KILO_JWT={mint(T0)}\n")

    async def forced_twice(first_wait: float) -> None:
        async with anyio.create_task_group() as tg:
            for _ in range(2):
                tg.start_soon(refresher.refresh_now)
            calls = len(rig.cloud.calls)
            await anyio.wait_all_tasks_blocked()
            rig.clock.advance(first_wait - 0.1)
            await anyio.wait_all_tasks_blocked()
            assert len(rig.cloud.calls) == calls
            rig.clock.advance(0.1)
        assert len(rig.cloud.calls) == calls + 1

    async def fails() -> None:
        rig.cloud.script.append(RefreshError("outage", "connect_error"))
        with pytest.raises(RefreshError):
            await refresher.refresh_now()

    async with rig.running() as refresher:
        first = await refresher.refresh_now()
        for _ in range(20):
            assert await refresher.refresh_now() == first  # within the gap: no call
        rig.clock.advance(1.9)
        assert await refresher.refresh_now() == first
        assert len(rig.cloud.calls) == 1
        rig.clock.advance(0.1)
        assert await refresher.refresh_now() != first  # the gap is over: a call
        rig.clock.advance(2)
        await fails()
        rig.clock.advance(0.5)
        await forced_twice(1.5)  # after a failure
        rig.clock.advance(2)
        await fails()
        rig.clock.jump(-3600)
        await forced_twice(2.0)
    calls = [t for t, _ in rig.cloud.calls]
    assert [b - a for a, b in itertools.pairwise(calls)] == pytest.approx(
        [2.0, 2.0, 2.0, 2.0, 2.0 - 3600]
    )
    assert len(calls) == 6


def _planned_after(refresher: TokenRefresher, at: float) -> bool:
    planned = refresher.status().next_refresh_at
    return planned is not None and planned > at


async def _refused(refresher: TokenRefresher) -> None:
    with pytest.raises(RefreshError):
        await refresher.refresh_now()


async def test_a_token_due_within_the_gap_after_a_success_is_refreshed_once_after_it(
    tmp_path: Path,
) -> None:
    """A push of a token 13 h into its 24 h, 0.3 s after a refresh, is due at once: the loop
    waits out the rest of the gap and calls once (answered from the held token instead, the
    loop stayed due and spun: 72,316 turns and 1.7 s of CPU in a reviewer's run)."""
    rig = Rig(tmp_path, env_text=f"KILO_JWT={mint(T0)}\n")
    async with rig.running() as refresher:
        await refresher.refresh_now()
        rig.clock.advance(0.3)
        await refresher.accept(mint(T0 - 13 * 3600))
        await anyio.wait_all_tasks_blocked()
        assert len(rig.cloud.calls) == 1
        rig.clock.advance(1.5)
        await anyio.wait_all_tasks_blocked()
        assert len(rig.cloud.calls) == 1
        rig.clock.advance(0.3)  # past the gap's end (T0 + 2, a float's step away at T0)
        # The call is recorded when the cloud answers; the refresher plans after it.
        await eventually(lambda: _planned_after(refresher, rig.clock.time() + 3600))
        assert len(rig.cloud.calls) == 2
        assert rig.cloud.calls[1][0] == pytest.approx(T0 + 2.1)


async def test_after_the_wall_clock_steps_back_a_forced_refresh_reaches_the_cloud(
    tmp_path: Path,
) -> None:
    """A success, then the wall clock one hour back: the least gap is not open for that
    hour (the town stopped meanwhile was first seen an hour later in a reviewer's run); the
    next forced refresh calls the cloud, at most 2 s later."""
    rig = Rig(tmp_path, env_text=f"KILO_JWT={mint(T0)}\n")
    async with rig.running() as refresher:
        await refresher.refresh_now()
        rig.clock.jump(-3600)
        rig.cloud.script.append(RefreshError("inactive", "town_stopped", status=409))
        async with anyio.create_task_group() as tg:
            tg.start_soon(_refused, refresher)
            await anyio.wait_all_tasks_blocked()
            rig.clock.advance(2.1)
        assert len(rig.cloud.calls) == 2
        assert refresher.status().state is State.TOWN_INACTIVE


# --- pushes and reloads -----------------------------------------------------------------


async def test_pushed_token_is_written(tmp_path: Path) -> None:
    """accept() writes an acceptable token, emits source push and reschedules."""
    rig = Rig(tmp_path, env_text=f"KILO_JWT={mint(T0 - 3600)}\n")
    pushed = mint(T0)
    async with rig.running() as refresher:
        view = await refresher.accept(pushed)
        assert view.fingerprint == fingerprint(pushed)
        assert rig.disk_token() == pushed
        assert rig.events[-1] == (
            "token.refreshed",
            {"exp": int(T0) + DAY, "iat": int(T0), "source": "push"},
        )
        status = refresher.status()
        # A pushed token is adopted: the desync draw, before its half-life.
        assert status.next_refresh_at is not None
        assert T0 < status.next_refresh_at <= T0 + 0.5 * DAY
        assert await refresher.accept(pushed) == view
        assert len(rig.events) == 1


async def test_pushed_token_leaves_inactive(tmp_path: Path) -> None:
    """A token pushed by the cloud ends the town_inactive state."""
    rig = Rig(tmp_path, env_text=f"KILO_JWT={mint(T0)}\n")
    rig.cloud.script.append(RefreshError("inactive", "http_409", status=409))
    async with rig.running() as refresher:
        with pytest.raises(RefreshError):
            await refresher.refresh_now()
        await refresher.accept(mint(T0 + 1))
        assert refresher.status().state is State.FRESH


async def test_pushed_bad_token_is_refused_with_every_reason(tmp_path: Path) -> None:
    """accept() of a bad token raises TokenError with all reasons and writes nothing."""
    original = f"KILO_JWT={mint(T0)}\n"
    rig = Rig(tmp_path, env_text=original)
    async with rig.running() as refresher:
        with pytest.raises(TokenError) as caught:
            await refresher.accept(mint(T0, town_id="town-2", lifetime=7))
    assert caught.value.reasons == ("wrong_town", "bad_lifetime")
    assert rig.env.read_text() == original
    assert rig.events == []


async def test_own_writes_are_not_changes(tmp_path: Path) -> None:
    """After the refresher writes, a reload finds nothing new."""
    rig = Rig(tmp_path)
    async with rig.running() as refresher:
        await eventually(lambda: refresher.status().state is State.FRESH)
        assert await refresher.reload_env_file() is False
        assert rig.types() == ["token.refreshed"]


async def test_missing_file_that_stays_missing_is_no_change(tmp_path: Path) -> None:
    """A reload with no token before and after changes nothing."""
    rig = Rig(tmp_path)
    assert await rig.refresher.reload_env_file() is False


async def test_outside_edit_with_a_new_token_is_adopted(tmp_path: Path) -> None:
    """Another acceptable token written by someone else is adopted and rescheduled (desync)."""
    rig = Rig(tmp_path, env_text=f"KILO_JWT={mint(T0 - 3600)}\n", rng=Fixed(0.5))
    newer = mint(T0)
    async with rig.running() as refresher:
        before = refresher.status().next_refresh_at
        rig.env.write_text(f"KILO_JWT={newer}\n")
        assert await refresher.reload_env_file() is True
        status = refresher.status()
        assert status.token is not None
        assert status.token.fingerprint == fingerprint(newer)
        assert status.next_refresh_at != before
        assert status.next_refresh_at == desync_point(
            decode_unverified(newer), T0, Fixed(0.5), POLICY
        )
        assert rig.events == [
            ("token.refreshed", {"exp": int(T0) + DAY, "iat": int(T0), "source": "file"})
        ]
    assert rig.cloud.calls == []


@pytest.mark.parametrize(
    ("edited", "restored"),
    [
        ("OTHER=1\n", "OTHER=1\nKILO_JWT={held}\n"),
        ("KILO_JWT=$(touch x)\nOTHER=1\n", "KILO_JWT={held}\nOTHER=1\n"),
        (f"KILO_JWT={mint(T0, town_id='town-2')}\nOTHER=1\n", "KILO_JWT={held}\nOTHER=1\n"),
    ],
    ids=["no_token", "shell", "other_town"],
)
async def test_outside_edit_that_leaves_no_acceptable_token_puts_the_held_one_back(
    tmp_path: Path, edited: str, restored: str
) -> None:
    """The held token stays (the cloud binds a refresh to it) and goes back into the file,
    every other line of the edit kept; nothing is asked of the cloud."""
    held = mint(T0)
    rig = Rig(tmp_path, env_text=f"KILO_JWT={held}\n")
    async with rig.running() as refresher:
        planned = refresher.status().next_refresh_at
        rig.env.write_text(edited)
        with structlog.testing.capture_logs() as logs:
            assert await refresher.reload_env_file() is False
        status = refresher.status()
        assert rig.env.read_text() == restored.format(held=held)
        assert status.token is not None
        assert status.token.fingerprint == fingerprint(held)
        assert (status.state, status.token_on_disk_ok) == (State.FRESH, True)
        assert status.next_refresh_at == planned
        # The daemon's own write, seen by the watcher, is no change.
        assert await refresher.reload_env_file() is False
    assert rig.cloud.calls == []
    assert [e["event"] for e in logs] == ["env_file_token_lost", "env_file_token_restored"]
    assert held not in repr(logs)
    assert not (tmp_path / "x").exists()


async def test_outside_edit_that_removes_an_expired_token_keeps_it_as_the_bearer(
    tmp_path: Path,
) -> None:
    """An expired held token is not written back, but the refresh that is due still sends
    it as the Bearer (a refresh without one is refused by the cloud's binding)."""
    expired = mint(T0 - 2 * DAY)
    rig = Rig(tmp_path, env_text=f"KILO_JWT={expired}\n")
    rig.cloud.script.append(RefreshError("outage", "connect_error"))
    async with rig.running() as refresher:
        await eventually(lambda: len(rig.cloud.calls) == 1)
        rig.env.write_text("OTHER=1\n")
        assert await refresher.reload_env_file() is False
        assert rig.env.read_text() == "OTHER=1\n"
        assert refresher.status().token_on_disk_ok is False
        rig.clock.advance(2)  # the least gap since the failed call
        await refresher.refresh_now()
        assert rig.env.read_text() == f"OTHER=1\nKILO_JWT={rig.cloud.minted[0]}\n"
    assert [bearer for _, bearer in rig.cloud.calls] == [expired, expired]


async def test_outside_edit_with_no_token_when_none_is_held_refreshes_at_once(
    tmp_path: Path,
) -> None:
    """With nothing held (the file had no acceptable token), an edit is read as at start-up."""
    rig = Rig(tmp_path, env_text="KILO_JWT=$(touch x)\n")
    rig.cloud.script.append(RefreshError("outage", "connect_error"))
    async with rig.running() as refresher:
        await eventually(lambda: len(rig.cloud.calls) == 1)
        rig.env.write_text("KILO_JWT=still-not-a-token\nOTHER=1\n")
        assert await refresher.reload_env_file() is True
        rig.clock.advance(2)  # the least gap since the failed call
        await eventually(lambda: len(rig.cloud.minted) == 1)
        await eventually(lambda: rig.disk_token() == rig.cloud.minted[0])
        assert rig.env.read_text() == f"KILO_JWT={rig.cloud.minted[0]}\nOTHER=1\n"
    assert [bearer for _, bearer in rig.cloud.calls] == [None, None]


# --- metrics ----------------------------------------------------------------------------


async def test_metrics_follow_the_token(tmp_path: Path) -> None:
    """Expiry, seconds to expiry, attempts by result, latency and state are exported."""
    rig = Rig(tmp_path)
    assert rig.metric("gastown_sandboxd_token_state", gastown_sandboxd_token_state="missing") == 1
    assert rig.metric("gastown_sandboxd_token_seconds_to_expiry") == 0
    slow_token = mint(T0)

    async def slow() -> str:
        await rig.clock.sleep(2.0)
        return slow_token

    rig.cloud.script.extend([RefreshError("outage", "http_500", status=500), slow])
    async with rig.running() as refresher:
        await eventually(lambda: len(rig.cloud.calls) == 1)
        rig.clock.advance(3)
        await eventually(lambda: len(rig.cloud.calls) == 2)
        assert refresher.status().state is State.MISSING
        assert refresher.status().consecutive_failures == 1
        rig.clock.advance(2)
        await eventually(lambda: refresher.status().state is State.FRESH)
        attempts = "gastown_sandboxd_token_refresh_attempts_total"
        assert rig.metric(attempts, result="outage") == 1
        assert rig.metric(attempts, result="ok") == 1
        assert rig.metric(attempts, result="busy") == 0
        assert rig.metric("gastown_sandboxd_token_refresh_duration_seconds_count") == 2
        assert rig.metric("gastown_sandboxd_token_refresh_duration_seconds_sum") == 2.0
        assert rig.metric("gastown_sandboxd_token_expiry_timestamp_seconds") == T0 + DAY
        now = rig.clock.time()
        assert rig.metric("gastown_sandboxd_token_seconds_to_expiry") == T0 + DAY - now
        assert rig.metric("gastown_sandboxd_token_state", gastown_sandboxd_token_state="fresh") == 1


async def test_cancelled_run_releases_waiters(tmp_path: Path) -> None:
    """Stopping the component while a forced refresh waits fails that refresh, no hang."""
    rig = Rig(tmp_path, env_text=f"KILO_JWT={mint(T0)}\n")
    never = anyio.Event()

    async def hang() -> str:
        await never.wait()
        return ""

    rig.cloud.script.append(hang)
    errors: list[BaseException] = []

    async def force() -> None:
        try:
            await rig.refresher.refresh_now()
        except RefreshError as exc:
            errors.append(exc)

    async with anyio.create_task_group() as outer:
        async with rig.running():
            outer.start_soon(force)
            await eventually(lambda: len(rig.cloud.calls) == 1)
        await eventually(lambda: len(errors) == 1)
    assert isinstance(errors[0], RefreshError)
    assert errors[0].reason == "cancelled"


# --- end to end -------------------------------------------------------------------------


async def test_against_the_real_cloud(
    tmp_path: Path, cloud_factory: Callable[..., CloudServer]
) -> None:
    """A forced refresh through CloudClient gets a real token; stop, start and destroy map."""
    server = cloud_factory(token_lifetime=60)
    town, _ = server.create_town(user_id="user-7", organization_id="org-7")
    older = server.mint("user-7", town["id"], "org-7", lifetime=60, now=int(time.time()) - 5)
    env = tmp_path / ".env.gateway"
    env.write_text(f"OTHER=1\nKILO_JWT={older}\n")
    events: list[str] = []
    client = CloudClient(base_url=server.url, internal_key=server.internal_key, town_id=town["id"])
    refresher = TokenRefresher(
        town_id=town["id"],
        env_file=env,
        client=client,
        emit=lambda event: events.append(event.TYPE),
        # Forced refreshes one after another, some after a refused one: a gap of 1 ms after
        # a failed call, not the 100 ms a 60 s token's scaled 2 s would be.
        policy=SchedulePolicy(min_retry_gap=0.001),
    )
    async with client, anyio.create_task_group() as tg:
        await tg.start(refresher.run)
        assert refresher.status().state is State.FRESH
        view = await refresher.refresh_now()
        token = envfile.read_token(env)
        assert token is not None
        assert token != older
        assert view.fingerprint == fingerprint(token)
        assert (view.sub, view.organization_id, view.exp - view.iat) == ("user-7", "org-7", 60)
        assert env.read_text() == f"OTHER=1\nKILO_JWT={token}\n"

        server.set_status(town["id"], "stop")
        with pytest.raises(RefreshError) as caught:
            await refresher.refresh_now()
        assert (caught.value.kind, caught.value.status) == ("inactive", 409)
        assert refresher.status().state is State.TOWN_INACTIVE
        assert envfile.read_token(env) == token

        server.set_status(town["id"], "start")
        await refresher.refresh_now()
        assert refresher.status().state is State.FRESH

        server.set_status(town["id"], "destroy")
        with pytest.raises(RefreshError) as caught:
            await refresher.refresh_now()
        assert (caught.value.kind, caught.value.status) == ("inactive", 410)
        tg.cancel_scope.cancel()
    assert events.count("town.inactive") == 2
