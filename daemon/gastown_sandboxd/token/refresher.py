"""The token component: keeps an acceptable, unexpired token in the env file.

It reads the env file at start, refreshes from the cloud on the schedule of `schedule.py`,
checks every token before writing it, and reports what it does through `emit`. Forced
refreshes that overlap (and a regular one that is in flight) share one cloud call.
A token from its own refresh call is next refreshed at the contract's jittered half-life
(`refresh_point`); one it adopted (from the env file, or pushed) at `desync_point`, so that a
fleet booted together does not refresh in waves.
"""

from __future__ import annotations

import contextlib
import enum
import errno
import random
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Protocol

import anyio
import anyio.abc
import anyio.to_thread
import structlog

from gastown_sandboxd._types import Clock, Emit, SystemClock
from gastown_sandboxd.errors import AtomicWriteError, RefreshError, TokenError
from gastown_sandboxd.events.types import (
    TokenExpired,
    TokenOrigin,
    TokenRefreshed,
    TokenRefreshFailed,
    TownInactive,
)
from gastown_sandboxd.ops.metrics import MetricsRegistry, TokenMetrics
from gastown_sandboxd.token.claims import (
    Claims,
    TokenView,
    acceptability_reasons,
    decode_unverified,
    fingerprint,
    time_reasons,
)
from gastown_sandboxd.token.envfile import read_token, write_token
from gastown_sandboxd.token.schedule import (
    Outcome,
    SchedulePolicy,
    counts_from_now,
    desync_point,
    draw_jitter,
    lifetime_of,
    next_attempt_at,
    refresh_point,
    scaled_policy,
    sleep_for,
)

log = structlog.get_logger(__name__)


class TokenSource(Protocol):
    """Where new tokens come from: `CloudClient` or a test double."""

    async def refresh(self, current_token: str | None) -> str: ...


class State(enum.StrEnum):
    FRESH = "fresh"
    REFRESHING = "refreshing"
    DEGRADED = "degraded"
    EXPIRED = "expired"
    MISSING = "missing"
    TOWN_INACTIVE = "town_inactive"


# The result label of one refresh attempt: how it ended (a stale success counts as ok), or the
# env file refusing the new token.
REFRESH_RESULTS = (*(o.value for o in Outcome if o is not Outcome.STALE), "write_failed")


def token_metrics(registry: MetricsRegistry, **kwargs: Any) -> TokenMetrics:
    """The refresher's metrics, labelled with its states (missing first) and results."""
    states = [State.MISSING.value, *(s.value for s in State if s is not State.MISSING)]
    return TokenMetrics(registry, states=states, results=REFRESH_RESULTS, **kwargs)


@dataclass(frozen=True, slots=True)
class LastError:
    """Why the last refresh failed: `reason` is the failure kind, `at` Unix seconds."""

    reason: Outcome
    at: float
    detail: str


@dataclass(frozen=True, slots=True)
class RefresherStatus:
    """A snapshot for /status and /readyz; times are Unix seconds."""

    state: State
    token: TokenView | None
    next_refresh_at: float | None
    last_refresh_at: float | None
    consecutive_failures: int
    token_on_disk_ok: bool
    last_failure: str | None = None
    # The last failed attempt since the last success; None once a refresh succeeds.
    last_error: LastError | None = None


@dataclass(frozen=True, slots=True)
class _Held:
    token: str = field(repr=False)
    claims: Claims
    view: TokenView
    # The regular refresh time, drawn once per token.
    refresh_at: float


class _Flight:
    """One cloud call that several waiters share."""

    def __init__(self) -> None:
        self.done = anyio.Event()
        self.view: TokenView | None = None
        self.error: Exception | None = None

    async def result(self) -> TokenView:
        await self.done.wait()
        if self.error is not None:
            raise self.error
        assert self.view is not None
        return self.view


# The reasons that leave a token good as the Bearer of a refresh (CONTRACT §3: "even an
# expired one"), though not for agents or the env file.
BEARER_ONLY = frozenset({"expired", "issued_in_future"})


class TokenRefresher:
    """Keeps the town's token fresh in `env_file`."""

    def __init__(
        self,
        *,
        town_id: str,
        env_file: Path,
        client: TokenSource,
        emit: Emit,
        clock: Clock | None = None,
        rng: random.Random | None = None,
        policy: SchedulePolicy | None = None,
        metrics: TokenMetrics | None = None,
        on_cloud_recovered: Callable[[], object] | None = None,
    ) -> None:
        """`on_cloud_recovered` is called when a refresh succeeds after failed ones."""
        self._town_id = town_id
        self._env_file = Path(env_file)
        self._client = client
        self._emit = emit
        self._clock: Clock = clock or SystemClock()
        # Jitter spreads a fleet's refreshes; it is not a secret.
        self._rng = rng or random.Random()  # noqa: S311
        self._policy = policy or SchedulePolicy()
        self._metrics = metrics
        self._on_cloud_recovered = on_cloud_recovered
        self._held: _Held | None = None
        self._disk_ok = False
        self._failures = 0
        self._outcome = Outcome.OK
        self._retry_after: float | None = None
        self._inactive = False
        self._last_failure: str | None = None
        self._last_error: LastError | None = None
        self._last_refresh_at: float | None = None
        self._last_call_ended: float | None = None  # wall time the last call to the cloud ended
        self._last_call_ok = False  # and whether it brought a token that was kept
        self._next_at: float | None = None
        # Whether `_next_at` is a wait counted from an event (a backoff, a probe), which a
        # wall clock stepped back must not lengthen, rather than the token's refresh point.
        self._next_is_wait = False
        self._seen: float | None = None  # the latest wall time the loop saw
        self._expired_reported = False
        self._flight: _Flight | None = None
        self._tg: anyio.abc.TaskGroup | None = None
        self._nap: anyio.CancelScope | None = None
        self._file_lock = anyio.Lock()

    # --- the component -------------------------------------------------------------------

    async def run(
        self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED
    ) -> None:
        """Read the env file, report started, then refresh on schedule until cancelled."""
        async with anyio.create_task_group() as tg:
            self._tg = tg
            try:
                async with self._file_lock:
                    self._load(await self._read_file_token(), self._clock.time())
                    await self._rewrite_line()
                task_status.started()
                await self._loop()
            finally:
                self._tg = None

    async def refresh_now(self) -> TokenView:
        """Refresh now (also probing an inactive town); raises `RefreshError` on failure.

        A token the cloud sends that is not acceptable is a `RefreshError` of kind "broken"
        whose cause is the `TokenError`; a failed write raises `AtomicWriteError`.
        """
        flight = self._flight
        if flight is None:
            flight = self._flight = _Flight()
            if self._tg is not None:
                self._tg.start_soon(self._fly, flight)
            else:
                await self._fly(flight)
        return await flight.result()

    async def accept(self, token: str) -> TokenView:
        """Adopt a token pushed by the cloud; raises `TokenError` with every reason."""
        now = self._clock.time()
        reasons = acceptability_reasons(token, town_id=self._town_id, now=now)
        if reasons:
            log.warning("pushed_token_refused", reasons=reasons)
            raise TokenError(reasons)
        if self._held is not None and self._held.token == token:
            return self._held.view
        view = await self._store(token, decode_unverified(token), source="push")
        self._succeeded(now, source="push")
        return view

    async def reload_env_file(self) -> bool:
        """Re-read the env file after an outside edit; True when the held token changed.

        The daemon's own writes leave the file's token equal to the held one: no change. An
        acceptable token someone else wrote is adopted; an edit that leaves none puts the held
        token back (`_keep_held`).
        """
        async with self._file_lock:
            token = await self._read_file_token()
            held = self._held
            if held is not None and token == held.token:
                self._disk_ok = True
                return False
            if held is None and token is None:
                return False
            now = self._clock.time()
            reasons = (
                acceptability_reasons(token, town_id=self._town_id, now=now)
                if token is not None
                else ["missing"]
            )
            if token is not None and not reasons:
                self._held = self._hold(token, decode_unverified(token), adopted=True)
                self._disk_ok = True
                log.info("env_file_token_adopted", fingerprint=fingerprint(token))
                await self._rewrite_line()
                self._emit_refreshed(self._held, "file")
                self._succeeded(now, source="file")
                return True
            if held is not None:
                await self._keep_held(held, token, reasons)
                return False
            log.warning("env_file_token_lost", had=False)
            self._load(token, now)
            return True

    async def _rewrite_line(self) -> None:
        """The held token's line as the daemon writes it (CONTRACT §3: `KILO_JWT=<token>`,
        exactly that, once), when the file holds it otherwise: a line saved with CRLF (the
        daemon reads through the CR, bash keeps it in the value, and the gateway refuses
        that), a second `KILO_JWT` line, quotes or `export`."""
        if await self._write_held():
            held = self._held
            assert held is not None
            log.info("env_file_token_line_rewritten", fingerprint=held.view.fingerprint)

    async def _write_held(self) -> bool | None:
        """Set the held token's line in the env file: True when that changed the file, False
        when it held the line already, None when nothing can be written (no token held, or
        one that is no longer acceptable) or the write failed (logged)."""
        held = self._held
        if held is None or time_reasons(held.claims.iat, held.claims.exp, now=self._clock.time()):
            return None
        try:
            return await write_token(self._env_file, held.token)
        except AtomicWriteError as exc:
            log.warning("env_file_token_not_written", errno=exc.errno)
            return None

    async def _keep_held(self, held: _Held, found: str | None, reasons: list[str]) -> None:
        """The env file, edited by someone else, holds no acceptable token: keep the one held
        (the cloud binds a refresh to it, so dropping it would leave only refreshes without a
        Bearer, refused with 401 for good), and put it back where agents read it while it is
        still acceptable (CONTRACT §3: the daemon keeps the line, every other line as it is).
        An expired one stays the Bearer of the refresh the schedule already has due."""
        log.warning(
            "env_file_token_lost",
            had=True,
            found=fingerprint(found) if found is not None else None,
            reasons=reasons,
        )
        self._disk_ok = await self._write_held() is not None
        if self._disk_ok:
            log.info("env_file_token_restored", fingerprint=held.view.fingerprint)

    def status(self) -> RefresherStatus:
        now = self._clock.time()
        held = self._held
        return RefresherStatus(
            state=self._state(now),
            token=held.view if held else None,
            next_refresh_at=self._next_at,
            last_refresh_at=self._last_refresh_at,
            consecutive_failures=self._failures,
            token_on_disk_ok=(
                held is not None
                and self._disk_ok
                and not time_reasons(held.claims.iat, held.claims.exp, now=now)
            ),
            last_failure=self._last_failure,
            last_error=self._last_error,
        )

    def set_policy(self, policy: SchedulePolicy) -> None:
        """Use new schedule knobs (an options reload); the next wake-up is planned again.

        A new `refresh.fraction` or `refresh.jitter` draws the held token's refresh point
        again (as for a token adopted now: not before now, not after the new fraction of its
        lifetime), or the reload would only reach the next token."""
        old, self._policy = self._policy, policy
        held = self._held
        knobs = (policy.refresh_fraction, policy.jitter_fraction)
        if held is not None and knobs != (old.refresh_fraction, old.jitter_fraction):
            self._held = self._hold(held.token, held.claims, adopted=True)
        self._replan(self._clock.time())

    # --- the loop ------------------------------------------------------------------------

    async def _loop(self) -> None:
        while True:
            now = self._clock.time()
            self._follow_wall_clock(now)
            self._note_expiry(now)
            due = self._next_at if self._next_at is not None else now
            if now >= due:
                # A failure is recorded, reported and rescheduled by the attempt itself.
                with contextlib.suppress(RefreshError, AtomicWriteError):
                    await self.refresh_now()
                continue
            wake_at = due
            if self._held is not None and not self._expired_reported:
                wake_at = min(wake_at, self._held.claims.exp)
            # Short tokens shrink the longest sleep with their lifetime (CONTRACT §3).
            await self._sleep(sleep_for(wake_at, now, self._waits_for(self._held)))

    async def _sleep(self, seconds: float) -> None:
        # Replanning cancels this nap so that a new plan takes effect at once.
        with anyio.CancelScope() as scope:
            self._nap = scope
            try:
                await self._clock.sleep(seconds)
            finally:
                self._nap = None

    async def _fly(self, flight: _Flight) -> None:
        try:
            flight.view = await self._attempt()
        except Exception as exc:
            flight.error = exc
        finally:
            if flight.view is None and flight.error is None:
                flight.error = RefreshError("outage", "cancelled")
            self._flight = None
            self._publish()
            flight.done.set()

    async def _attempt(self) -> TokenView:
        self._publish()
        held = self._held
        now = self._clock.time()
        if held is not None and now < held.refresh_at and self._just_called_ok(now):
            # Within the least gap after a call that brought a token, a forced refresh of a
            # token not yet due is answered with what that call brought: 20 forced refreshes
            # in a row were 20 calls in 0.27 s (a reviewer), a storm for the cloud. A due
            # token (the loop's refresh, a push past half its life) waits out the gap and
            # calls: answered from here, the loop stayed due and spun.
            return held.view
        await self._keep_gap()
        held = self._held
        self._last_call_ok = False
        started = self._clock.time()
        try:
            token = await self._client.refresh(held.token if held else None)
        except RefreshError as exc:
            self._last_call_ended = self._clock.time()
            self._failed(exc, self._last_call_ended - started)
            raise
        now = self._last_call_ended = self._clock.time()
        elapsed = now - started
        reasons = acceptability_reasons(token, town_id=self._town_id, now=now)
        if reasons:
            # Only a 200 carries a token (CloudClient raises for every other status).
            error = RefreshError("broken", "unacceptable_token", status=200)
            self._failed(error, elapsed, problems=reasons)
            raise error from TokenError(reasons)
        claims = decode_unverified(token)
        if held is not None and held.token == token:
            # The held token again (minted in the same second, or a cloud that serves an
            # older one): past its refresh point it is stale (`_succeeded`), as a new one is.
            view = held.view
        else:
            try:
                view = await self._store(token, claims, source="cloud")
            except AtomicWriteError as exc:
                self._disk_ok = False
                self._failed(RefreshError("outage", "write_failed"), elapsed, errno=exc.errno)
                raise
        self._record("ok", elapsed)
        recovered = self._failures > 0
        self._succeeded(now, source="cloud")
        self._last_call_ok = True
        if recovered and self._on_cloud_recovered is not None:
            self._on_cloud_recovered()
        return view

    async def _keep_gap(self) -> None:
        """Wait out the rest of the least gap between two calls to the cloud (CONTRACT §3:
        2 s, scaled for short tokens; never longer, whatever the wall clock did since): an
        outage sees one call per gap at most, forced refreshes (`POST /token/refresh`,
        `gastown-sandboxd refresh` in a loop) included, and the ones forced meanwhile share
        the call that follows. After a success, `_attempt` answers a forced refresh of a
        token not yet due with that token instead."""
        wait = self._gap_left(self._clock.time())
        if wait > 0:
            await self._clock.sleep(wait)

    def _just_called_ok(self, now: float) -> bool:
        """Whether the last call brought a token and ended less than the least gap before
        `now`, by a wall clock that has not stepped back since (after a step back the gap
        counted as open for as long as the step: no forced refresh reached the cloud)."""
        ended = self._last_call_ended
        return self._last_call_ok and ended is not None and ended <= now and self._gap_left(now) > 0

    def _gap_left(self, now: float) -> float:
        """Seconds left at `now` of the least gap since the last call ended (at most the gap)."""
        ended = self._last_call_ended
        if ended is None:
            return 0.0
        gap = self._waits_for(self._held).min_retry_gap
        return min(gap, ended + gap - now)

    def _waits_for(self, held: _Held | None) -> SchedulePolicy:
        """The policy with its waits scaled to `held`'s lifetime (CONTRACT §3: shorter for a
        token under 1 h; as set without one)."""
        return scaled_policy(self._policy, lifetime_of(held.claims if held else None))

    # --- bookkeeping ---------------------------------------------------------------------

    async def _read_file_token(self) -> str | None:
        try:
            return await anyio.to_thread.run_sync(read_token, self._env_file)
        except OSError as exc:
            log.warning("env_file_unreadable", path=str(self._env_file), error=exc.strerror)
            return None

    def _load(self, token: str | None, now: float) -> None:
        """Take the file's token as at start-up: held if acceptable or merely expired."""
        self._held = None
        self._disk_ok = False
        self._failures = 0
        self._outcome = Outcome.OK
        self._retry_after = None
        self._expired_reported = False
        if token is not None:
            reasons = acceptability_reasons(token, town_id=self._town_id, now=now)
            if set(reasons) <= BEARER_ONLY:
                # A token refused for its times alone still proves who we are to the cloud
                # (Bearer): an expired one, and one whose iat is ahead of a clock that is
                # behind (a boot before NTP, a restored snapshot), which the cloud's binding
                # takes. Dropped, every refresh went without a Bearer and got 401 for good.
                # It is never written; without an acceptable token, refresh at once (§3).
                held = self._hold(token, decode_unverified(token), adopted=True)
                self._held = replace(held, refresh_at=now) if reasons else held
                self._disk_ok = True
                log.info(
                    "env_file_token_loaded", fingerprint=fingerprint(token), usable=not reasons
                )
            else:
                log.warning(
                    "env_file_token_refused", fingerprint=fingerprint(token), reasons=reasons
                )
        else:
            log.info("env_file_token_missing", path=str(self._env_file))
        self._replan(now)

    def _hold(self, token: str, claims: Claims, *, adopted: bool) -> _Held:
        now = self._clock.time()
        if adopted:
            at = desync_point(claims, now, self._rng, self._policy)
        else:
            at = refresh_point(claims, draw_jitter(self._rng), self._policy)
        # A token issued ahead of this clock (the cloud's runs ahead, or this one behind:
        # §3 lets iat be 300 s ahead) lives by the cloud's clock, as the gateway judges it:
        # its point counts from now, when it was issued, not from iat. With the cloud 120 s
        # ahead, a 60 s token was refreshed ~147 s after it came, and the gateway refused it
        # for the last ~87 s of that (a reviewer's run: 78 of 191 samples).
        if claims.iat > now:
            at = max(now, at - (claims.iat - now))
        return _Held(token, claims, TokenView.of(token, claims), at)

    async def _store(self, token: str, claims: Claims, *, source: str) -> TokenView:
        async with self._file_lock:
            wrote = await write_token(self._env_file, token)
            held = self._held = self._hold(token, claims, adopted=source != "cloud")
            self._disk_ok = True
        log.info(
            "token_refreshed",
            source=source,
            fingerprint=held.view.fingerprint,
            exp=claims.exp,
            written=wrote,
        )
        self._emit_refreshed(held, source)
        return held.view

    def _emit_refreshed(self, held: _Held, source: str) -> None:
        self._expired_reported = False
        self._emit(
            TokenRefreshed(exp=held.claims.exp, iat=held.claims.iat, source=TokenOrigin(source))
        )

    def _succeeded(self, now: float, *, source: str) -> None:
        self._failures = 0
        self._retry_after = None
        self._last_failure = None
        self._last_error = None
        self._last_refresh_at = now
        if source != "file":
            self._inactive = False
        held = self._held
        # A token from the cloud already past its refresh point would be refreshed again at
        # once: back off. Its drawn point, not half its life: a token 0.4-0.5 of its life
        # old on arrival (this clock ahead of the cloud's by 10-12 h of 24) was refreshed
        # again at once, over and over (a reviewer: 21 calls in 120 s, gaps down to 5 ms).
        stale = held is not None and now >= held.refresh_at
        if stale and source == "cloud":
            log.warning("cloud_token_stale", exp=held.claims.exp if held else None)
        self._outcome = Outcome.STALE if stale and source == "cloud" else Outcome.OK
        self._replan(now)

    def _failed(self, error: RefreshError, elapsed: float, **extra: Any) -> None:
        now = self._clock.time()
        self._failures += 1
        self._outcome = Outcome(error.kind)
        self._retry_after = error.retry_after
        self._last_failure = error.reason
        self._last_error = LastError(Outcome(error.kind), now, _detail(error, extra))
        became_inactive = error.kind == "inactive" and not self._inactive
        if error.kind == "inactive":
            self._inactive = True
        self._record("write_failed" if error.reason == "write_failed" else error.kind, elapsed)
        self._replan(now)
        log.warning(
            "token_refresh_failed",
            kind=error.kind,
            reason=error.reason,
            status=error.status,
            consecutive_failures=self._failures,
            retry_in=round((self._next_at or now) - now, 3),
            **extra,
        )
        if became_inactive:
            self._emit(TownInactive(status=error.status, reason=error.reason))
        if error.kind == "inactive":
            return
        held = self._held
        problems = extra.get("problems")
        self._emit(
            TokenRefreshFailed(
                reason=error.reason,
                consecutive_failures=self._failures,
                status=error.status,
                problems=tuple(problems) if problems is not None else None,
                exp=held.claims.exp if held is not None else None,
                iat=held.claims.iat if held is not None else None,
            )
        )

    def _follow_wall_clock(self, now: float) -> None:
        """A wall clock stepped back (an NTP step, a VM's clock set right) moves a wait that
        counts seconds from an event back with it: a backoff of 300 s stays 300 s, not 300 s
        plus the step. The token's refresh point is a time of the token's and stays where
        it is (CONTRACT §3: measured against the wall clock). A step forward needs nothing:
        such a wait ends sooner, as after a suspend, when the seconds did pass.

        The step is seen as the fall from the last wall time the loop saw, so it is short by
        the seconds slept since (at most `max_sleep`, 30 s): such a wait ends at most that
        much late, never early."""
        seen, self._seen = self._seen, now
        if seen is None or now >= seen or not self._next_is_wait or self._next_at is None:
            return
        step = seen - now
        log.warning("wall_clock_stepped_back", seconds=round(step, 3))
        self._next_at -= step
        self._publish()

    def _replan(self, now: float) -> None:
        held = self._held
        outcome = Outcome.INACTIVE if self._inactive else self._outcome
        self._next_is_wait = counts_from_now(failures=self._failures, outcome=outcome)
        self._next_at = next_attempt_at(
            held.claims if held else None,
            now,
            failures=self._failures,
            outcome=outcome,
            refresh_at=held.refresh_at if held else now,
            rng=self._rng,
            retry_after=self._retry_after,
            policy=self._policy,
        )
        self._publish()
        if self._nap is not None:
            self._nap.cancel()

    def _note_expiry(self, now: float) -> None:
        held = self._held
        if held is None or self._expired_reported or now < held.claims.exp:
            return
        self._expired_reported = True
        log.warning("token_expired", fingerprint=held.view.fingerprint, exp=held.claims.exp)
        self._emit(TokenExpired(exp=held.claims.exp, iat=held.claims.iat))
        self._publish()

    def _state(self, now: float) -> State:
        held = self._held
        if self._inactive:
            return State.TOWN_INACTIVE
        if held is None:
            return State.MISSING
        if now >= held.claims.exp:
            return State.EXPIRED
        if self._failures > 0:
            return State.DEGRADED
        if self._flight is not None:
            return State.REFRESHING
        return State.FRESH

    def _publish(self) -> None:
        if self._metrics is None:
            return
        self._metrics.set_token(self._held.claims.exp if self._held else None)
        self._metrics.set_state(self._state(self._clock.time()))

    def _record(self, result: str, elapsed: float) -> None:
        if self._metrics is not None:
            self._metrics.record_attempt(result, elapsed)


def _detail(error: RefreshError, extra: dict[str, Any]) -> str:
    """One line for operators: the short reason code, with the HTTP status or errno."""
    detail = error.reason
    if error.status is not None:
        detail += f" (HTTP {error.status})"
    if extra.get("errno"):
        detail += f" ({errno.errorcode.get(extra['errno'], extra['errno'])})"
    if extra.get("problems"):
        detail += ": " + ", ".join(str(p) for p in extra["problems"])
    return detail
