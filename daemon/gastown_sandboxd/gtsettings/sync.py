"""The desired-state sync: converge the town's settings on the cloud's desired configuration.

Like a kubelet on its pod spec: at start, every `interval` (jittered ±10 %), when `wake()`
is called (the token refresher's first successful cloud call after an outage) and on
`sync_now()` (POST /config/sync), the component reads the desired configuration, applies
it by the three-way merge (`apply.py`, through `SettingsStore.apply_desired`) and reports
`{"observedGeneration", "revision", "error"}` to the cloud. Applying is decided by content,
not by generation: a newer generation and files that drifted from it both give a non-empty
merge; an empty one writes nothing and emits nothing, and is reported only when the cloud
does not show that generation applied yet. A desired configuration the PATCH checks refuse
writes nothing and is reported as failed with the details; the next sync tries again. After
a failed read the next try comes sooner (5 s doubling up to `interval`). Syncs never overlap:
calls that come before a sync reads the cloud share its result; later ones get the next sync.
"""

from __future__ import annotations

import enum
import random
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import anyio
import anyio.abc
import anyio.to_thread
import structlog

from gastown_sandboxd._types import Clock, SystemClock
from gastown_sandboxd.errors import ConfigError, DesiredConfigUnavailable, PatchInvalid, Problem
from gastown_sandboxd.gtsettings.desired import DesiredConfig, error_report
from gastown_sandboxd.gtsettings.store import PatchResult, SettingsStore

log = structlog.get_logger(__name__)

DEFAULT_INTERVAL = 300.0
JITTER = 0.1
FIRST_RETRY = 5.0


class SyncState(enum.StrEnum):
    PENDING = "pending"  # no sync has finished since start
    APPLIED = "applied"
    FAILED = "failed"  # the desired configuration could not be applied (details reported)
    UNREACHABLE = "unreachable"  # the desired configuration could not be read


class DesiredSource(Protocol):
    """Where the desired configuration comes from: `DesiredConfigClient` or a test double."""

    async def fetch(self, bearer: str | None) -> DesiredConfig: ...

    async def report(
        self,
        bearer: str | None,
        *,
        observed_generation: int,
        revision: str,
        error: dict[str, Any] | None,
    ) -> None: ...


@dataclass(frozen=True, slots=True)
class SyncResult:
    """What one sync did; `as_json` is the answer of POST /config/sync."""

    state: SyncState
    generation: int
    changed: bool
    revision: str
    files: list[str]
    error: dict[str, Any] | None
    reported: bool

    def as_json(self) -> dict[str, Any]:
        return {
            "state": self.state.value,
            "generation": self.generation,
            "changed": self.changed,
            "revision": self.revision,
            "files": list(self.files),
            "error": self.error,
            "reported": self.reported,
        }


class _Flight:
    """One sync that overlapping callers share, until it starts reading the cloud."""

    def __init__(self) -> None:
        self.reading = False
        self.done = anyio.Event()
        self.result: SyncResult | None = None
        self.error: Exception | None = None


class ConfigSync:
    """The sync component; see the module docstring."""

    def __init__(
        self,
        *,
        store: SettingsStore,
        source: DesiredSource,
        bearer: Callable[[], str | None],
        clock: Clock | None = None,
        interval: float = DEFAULT_INTERVAL,
        rng: random.Random | None = None,
    ) -> None:
        """`bearer` gives the current token (blocking: it runs in a worker thread)."""
        self._store = store
        self._source = source
        self._bearer = bearer
        self._clock: Clock = clock or SystemClock()
        self._interval = interval
        # Jitter spreads a fleet's syncs; it is not a secret.
        self._rng = rng or random.Random()  # noqa: S311
        self._lock = anyio.Lock()
        self._state = SyncState.PENDING
        self._last_sync_at: float | None = None
        self._failures = 0
        self._woken = False
        self._replan = False
        self._nap: anyio.CancelScope | None = None
        self._flight: _Flight | None = None

    def status(self) -> dict[str, Any]:
        """`{"generation", "state", "last_sync_at"}` (time in Unix seconds) for /status."""
        return {
            "generation": self._store.last_applied.applied.generation,
            "state": self._state.value,
            "last_sync_at": self._last_sync_at,
        }

    @property
    def interval(self) -> float:
        """Seconds between regular syncs (before jitter)."""
        return self._interval

    def set_interval(self, seconds: float) -> None:
        """Use `seconds` from now on (SIGHUP): a nap in progress ends and the next sync is
        planned from now with the new interval, so a shorter one need not wait out the old."""
        if seconds == self._interval:
            return
        self._interval = seconds
        self._replan = True
        if self._nap is not None:
            self._nap.cancel()

    def wake(self) -> None:
        """Sync soon (the cloud answered again after an outage); safe to call any time."""
        self._woken = True
        if self._nap is not None:
            self._nap.cancel()

    async def run(
        self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED
    ) -> None:
        """Report started, then sync at once and on schedule until cancelled."""
        task_status.started()
        while True:
            self._woken = False
            try:
                await self.sync_now()
            except DesiredConfigUnavailable:
                pass  # logged by sync_now; retried sooner
            except Exception:
                log.exception("config_sync_crashed")
            if self._woken:
                continue
            await self._sleep(self.next_delay())

    def next_delay(self) -> float:
        """Seconds to the next regular sync: the interval, or a retry delay after a failure."""
        base = self._interval
        if self._failures:
            # The exponent held: past 1,024 failures (~85 h of a cloud that cannot be read)
            # 2.0 ** n overflows, and the interval is reached long before 64.
            base = min(self._interval, FIRST_RETRY * 2.0 ** min(self._failures - 1, 64))
        return base * self._rng.uniform(1 - JITTER, 1 + JITTER)

    async def sync_now(self) -> SyncResult:
        """Read the desired configuration, converge on it, report; raises
        `DesiredConfigUnavailable` when it cannot be read (nothing is written then).

        Calls that overlap share one sync as long as it has not read the cloud yet; a call
        that comes once it has waits for it and takes the next, so an answer always reflects
        the desired configuration as it stood when the call came (a dashboard change made just
        before is in it). When the sync it waited for could not read the cloud, it gets that
        error at once: an unreachable cloud is reported within one timeout.
        """
        while (flight := self._flight) is not None and flight.reading:
            await flight.done.wait()
            if flight.error is not None:
                # The cloud failed while this call waited: that is its answer, in one timeout.
                raise flight.error
        if flight is None:
            flight = self._flight = _Flight()
            try:
                flight.result = await self._sync_once(flight)
            except Exception as exc:
                flight.error = exc
            finally:
                if flight.result is None and flight.error is None:
                    flight.error = DesiredConfigUnavailable(503, "cancelled", "the sync stopped")
                self._flight = None
                flight.done.set()
        await flight.done.wait()
        if flight.error is not None:
            raise flight.error
        assert flight.result is not None
        return flight.result

    async def _sync_once(self, flight: _Flight) -> SyncResult:
        async with self._lock:
            flight.reading = True
            bearer = await anyio.to_thread.run_sync(self._read_bearer)
            pushes = self._store.pushes  # a push after this is newer than the read
            try:
                desired = await self._source.fetch(bearer)
            except DesiredConfigUnavailable as exc:
                self._failures += 1
                self._state = SyncState.UNREACHABLE
                log.warning(
                    "config_sync_unreachable",
                    reason=exc.reason,
                    status=exc.status,
                    consecutive_failures=self._failures,
                )
                raise
            self._failures = 0
            result = await self._apply(desired, pushes)
            if self._needs_report(desired, result):
                result = await self._report(bearer, result)
            self._state = result.state
            self._last_sync_at = self._clock.time()
            return result

    async def _apply(self, desired: DesiredConfig, pushes: int) -> SyncResult:
        try:
            applied: PatchResult = await self._store.apply_desired(
                desired.desired, desired.generation, pushes_seen=pushes
            )
        except RecursionError:
            # Deeper than the merge can walk (the cloud's own API refuses past 64 levels):
            # a failure to report, as a refused PATCH is, not a crash of every sync.
            exc = PatchInvalid(
                "the desired configuration is nested too deeply to merge",
                [Problem("", "nested too deeply")],
            )
            return self._failed(desired, exc)
        except ConfigError as exc:
            return self._failed(desired, exc)
        if applied.changed:
            log.info("config_sync_applied", generation=desired.generation, files=applied.files)
        newest = self._store.last_applied.applied.generation
        if newest is not None and newest > desired.generation:
            # A push overtook this read: the newer generation stands, nothing to report.
            return SyncResult(
                SyncState.APPLIED,
                newest,
                changed=False,
                revision=applied.revision,
                files=[],
                error=None,
                reported=False,
            )
        return SyncResult(
            SyncState.APPLIED,
            desired.generation,
            changed=applied.changed,
            revision=applied.revision,
            files=applied.files,
            error=None,
            reported=False,
        )

    def _failed(self, desired: DesiredConfig, exc: ConfigError) -> SyncResult:
        details = [problem.as_json() for problem in exc.details]
        log.warning(
            "config_sync_failed",
            generation=desired.generation,
            error=exc.code,
            message=exc.message,
            details=details,
        )
        return SyncResult(
            SyncState.FAILED,
            desired.generation,
            changed=False,
            revision=self._store.revision,
            files=[],
            error=error_report(exc.message, details),
            reported=False,
        )

    def _needs_report(self, desired: DesiredConfig, result: SyncResult) -> bool:
        # Nothing to tell a cloud that already shows this generation applied.
        if result.generation != desired.generation:
            return False  # a push overtook the read; the cloud recorded it
        return (
            result.error is not None
            or result.changed
            or desired.observed_generation != desired.generation
            or desired.state != SyncState.APPLIED.value
        )

    async def _report(self, bearer: str | None, result: SyncResult) -> SyncResult:
        try:
            await self._source.report(
                bearer,
                observed_generation=result.generation,
                revision=result.revision,
                error=result.error,
            )
        except DesiredConfigUnavailable as exc:
            log.warning("config_sync_report_failed", reason=exc.reason, status=exc.status)
            return result
        return SyncResult(
            result.state,
            result.generation,
            result.changed,
            result.revision,
            result.files,
            result.error,
            reported=True,
        )

    def _read_bearer(self) -> str | None:
        try:
            return self._bearer()
        except OSError as exc:
            log.warning("config_sync_token_unreadable", error=exc.strerror)
            return None

    async def _sleep(self, seconds: float) -> None:
        # `wake()` cancels this nap so that the sync runs at once; `set_interval()` so that
        # the rest of it is planned again with the new interval.
        while True:
            self._replan = False
            with anyio.CancelScope() as scope:
                self._nap = scope
                try:
                    if not self._woken:
                        await self._clock.sleep(seconds)
                finally:
                    self._nap = None
            if not self._replan or self._woken:
                return
            seconds = self.next_delay()
