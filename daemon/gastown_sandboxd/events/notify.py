"""Hooks and signals: tell local programs about events.

`Notifier.run` subscribes to the bus while it has hooks or signals to tell (none are set up
by default, and then an event wakes nothing here), and dispatches each event without ever
waiting on a hook:

- a hook (`[[hooks]] events, command, timeout`) runs in its own task, one run at a time; the
  events that arrive while it runs (or backs off) fold into ONE more run with the newest event.
  The event's JSON goes to stdin; its environment is the daemon's less the daemon's secrets
  (`SECRETS_OF_THE_DAEMON`, as an agent's), with `GASTOWN_EVENT=<type>` and
  `GASTOWN_EVENT_ID=<id>` added, and the shim folder first on `PATH`: a hook that has gt
  restart an agent gives the pane the hook's PATH (tmux takes a new pane's from the client
  that asked), and with the daemon's, which never holds the shims, the restarted kilo ran
  with no token at all (a reviewer, real tmux 3.3a). It starts in a new session, so at its
  timeout its whole process group is killed. A failed, unstartable or killed run is logged
  and counted, and the hook then backs off (1 s doubling to 60 s by default) before its next
  run: a broken hook never storms.
- a signal (`[[signals]] pid_file, signal, events`) is sent at once; the pid file is read
  anew each time. A missing or bad pid file, a gone process or a refusal is logged and counted.

Hook output is not captured: it goes to the daemon's own stdout/stderr (the journal).

Subscribed with nothing to tell, the notifier's task woke for every event and went back to
wait: two steps of a task per PATCH. Instructions of the event loop's thread per PATCH
(callgrind, a daemon without hooks or signals, the tree before against this one): one every
20 ms 2,072k -> 2,013k, 4 clients 1,857k -> 1,813k (`GET /healthz`, no event: 1,117k ->
1,115k). Timed, daemon CPU per paced PATCH: 2.66 -> 2.29 and 2.63 -> 2.60 ms (two sets of 8
and 10 alternating rounds: the host's noise is as large).
"""

from __future__ import annotations

import contextlib
import os
import signal as signals_module
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
import anyio.abc
import structlog

from gastown_sandboxd._files import read_regular
from gastown_sandboxd._types import SECRETS_OF_THE_DAEMON, Clock, SystemClock
from gastown_sandboxd.errors import SubscriberLagged
from gastown_sandboxd.events.bus import Event, EventBus
from gastown_sandboxd.events.specs import HookSpec, SignalSpec

log = structlog.get_logger(__name__)

_PID_FILE_LIMIT = 64


@dataclass
class NotifyStats:
    """Counters for /status and metrics; plain integers, only ever increased."""

    events_dispatched: int = 0
    last_event_id: int = 0
    resubscribes: int = 0
    hook_runs: int = 0
    hook_failures: int = 0
    hook_timeouts: int = 0
    hook_events_coalesced: int = 0
    signals_sent: int = 0
    signal_failures: int = 0


def hook_backoff(failures: int, *, base: float, cap: float) -> float:
    """Seconds to wait after `failures` failed runs in a row: base doubling, capped."""
    if failures <= 0:
        return 0.0
    return min(cap, base * 2.0 ** min(failures - 1, 60))


# Linux's PID_MAX_LIMIT: no pid is larger, whatever kernel.pid_max says.
PID_MAX_LIMIT = 4 * 1024 * 1024


def read_pid(pid_file: Path) -> int:
    """The pid on the first line of `pid_file`; OSError if unreadable or no regular file,
    ValueError if not a pid. Read on the event loop, so without blocking (`read_regular`):
    a FIFO there (no writer) froze the whole daemon in `open` (a reviewer: /healthz
    unanswered)."""
    head = read_regular(pid_file, _PID_FILE_LIMIT)
    text = head.decode("ascii", errors="replace").strip().splitlines()
    if not text or not text[0].strip().isdecimal():
        raise ValueError("no pid on the first line")
    pid = int(text[0].strip())
    # 0 and negative numbers would signal whole process groups, or every process; past
    # Linux's largest pid no process has it (and past pid_t's range os.kill raises
    # OverflowError, which no caller expects).
    if pid <= 0:
        raise ValueError(f"pid {pid} is not a single process")
    if pid > PID_MAX_LIMIT:
        raise ValueError(f"pid {text[0].strip()[:20]} is beyond any process id")
    return pid


def _is_own_thread(pid: int) -> bool:
    """True when `pid` is the id of one of the daemon's threads."""
    return os.path.exists(f"/proc/self/task/{pid}")


def send_signal(spec: SignalSpec) -> bool:
    """Send `spec.signal` to the pid in `spec.pid_file` now; log and return False on any problem."""
    where = {"pid_file": str(spec.pid_file), "signal": spec.signal.name}
    try:
        pid = read_pid(spec.pid_file)
    except FileNotFoundError:
        log.warning("signal_pid_file_missing", **where)
        return False
    except OSError as exc:
        log.warning("signal_pid_file_unreadable", error=exc.strerror, **where)
        return False
    except ValueError as exc:
        log.warning("signal_pid_file_invalid", problem=str(exc), **where)
        return False
    if pid == os.getpid() or _is_own_thread(pid):
        # The default action of most signals would stop the daemon itself; on Linux a
        # thread's id reaches its whole process (a reviewer: SIGTERM to a worker thread's id
        # stopped the daemon with exit 0, which supervisord does not restart).
        log.warning("signal_refused_own_pid", pid=pid, **where)
        return False
    try:
        os.kill(pid, spec.signal)
    except ProcessLookupError:
        log.warning("signal_process_gone", pid=pid, **where)
        return False
    except OSError as exc:
        log.warning("signal_refused", pid=pid, error=exc.strerror, **where)
        return False
    log.info("signal_sent", pid=pid, **where)
    return True


def hook_environment(event: Event, shim_dir: Path | None) -> dict[str, str]:
    """A hook's environment: the daemon's less its secrets, the event named, and `shim_dir`
    (when given) first on PATH, once."""
    env = {name: value for name, value in os.environ.items() if name not in SECRETS_OF_THE_DAEMON}
    env.update(GASTOWN_EVENT=event.type, GASTOWN_EVENT_ID=str(event.id))
    if shim_dir is not None:
        rest = env.get("PATH", os.defpath).split(os.pathsep)
        env["PATH"] = os.pathsep.join([str(shim_dir), *(e for e in rest if e != str(shim_dir))])
    return env


async def run_hook(spec: HookSpec, event: Event, *, shim_dir: Path | None = None) -> str:
    """Run `spec` once for `event`; the outcome is "ok", "failed", "timeout" or "unstartable"."""
    program = spec.command[0]
    env = hook_environment(event, shim_dir)
    try:
        # Shielded: a cancellation while asyncio starts the process would leave it killed but
        # never reaped (asyncio's own wait for it is cancelled too, and its exit can come after
        # the loop is gone: a ResourceWarning seen once in a full run). Starting takes
        # milliseconds; the kill and the reap below cover everything after.
        with anyio.CancelScope(shield=True):
            process = await anyio.open_process(
                spec.command,
                stdin=subprocess.PIPE,
                stdout=None,
                stderr=None,
                env=env,
                start_new_session=True,
            )
    except (OSError, ValueError) as exc:  # ValueError: an argument holding a NUL
        log.warning(
            "hook_start_failed", program=program, error=getattr(exc, "strerror", None) or str(exc)
        )
        return "unstartable"
    async with process:
        try:
            with anyio.move_on_after(spec.timeout) as deadline:
                await _feed(process, (event.data + "\n").encode())
                await process.wait()
        finally:
            if process.returncode is None:
                # Timed out or the daemon is stopping: take the hook's children down too, and
                # reap the hook even when cancelled (SIGKILL makes the wait short), so no
                # zombie and no unreaped process object is left behind.
                _kill_group(process.pid)
                with anyio.CancelScope(shield=True):
                    await process.wait()
    if deadline.cancelled_caught:
        log.warning("hook_timed_out", program=program, timeout=spec.timeout, event_id=event.id)
        return "timeout"
    if process.returncode != 0:
        log.warning("hook_failed", program=program, returncode=process.returncode)
        return "failed"
    log.debug("hook_succeeded", program=program, event_id=event.id)
    return "ok"


async def _feed(process: anyio.abc.Process, data: bytes) -> None:
    stdin = process.stdin
    if stdin is None:
        return
    # A hook may exit without reading its input; that is its business.
    try:
        await stdin.send(data)
        await stdin.aclose()
    except (anyio.BrokenResourceError, OSError):
        pass


def _kill_group(pid: int) -> None:
    # The child is not reaped yet, so its pid (= its group id) cannot have been reused.
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, signals_module.SIGKILL)


class _HookRunner:
    """One hook's task: runs it for the newest pending event, one run at a time."""

    def __init__(self, spec: HookSpec, notifier: Notifier) -> None:
        self.spec = spec
        self._notifier = notifier
        self._pending: Event | None = None
        self._wakeup: anyio.Event | None = None
        self.consecutive_failures = 0
        self.busy = False
        self.retired = False

    def retire(self) -> None:
        """End after the run in progress (which is not killed); pending events are dropped."""
        self.retired = True
        self._pending = None
        if self._wakeup is not None:
            self._wakeup.set()

    def offer(self, event: Event) -> None:
        if self._pending is not None:
            self._notifier.stats.hook_events_coalesced += 1
        self._pending = event
        if self._wakeup is not None:
            self._wakeup.set()

    async def run(self) -> None:
        stats = self._notifier.stats
        while True:
            while self._pending is None:
                self.busy = False
                if self.retired:
                    return
                self._wakeup = anyio.Event()
                await self._wakeup.wait()
            self.busy = True
            event, self._pending = self._pending, None
            stats.hook_runs += 1
            outcome = await run_hook(self.spec, event, shim_dir=self._notifier.shim_dir)
            if outcome == "ok":
                self.consecutive_failures = 0
                continue
            stats.hook_failures += 1
            if outcome == "timeout":
                stats.hook_timeouts += 1
            self.consecutive_failures += 1
            delay = self._notifier.backoff(self.consecutive_failures)
            log.info(
                "hook_backing_off",
                program=self.spec.command[0],
                failures=self.consecutive_failures,
                seconds=delay,
            )
            await self._notifier.clock.sleep(delay)


class Notifier:
    """Dispatches bus events to hooks and signals; see the module docstring."""

    def __init__(
        self,
        *,
        bus: EventBus,
        hooks: Sequence[HookSpec],
        signals: Sequence[SignalSpec],
        clock: Clock | None = None,
        backoff_base: float = 1.0,
        backoff_max: float = 60.0,
        shim_dir: Path | None = None,
    ) -> None:
        self._bus = bus
        self.shim_dir = shim_dir
        self._signals = tuple(signals)
        self.clock: Clock = clock if clock is not None else SystemClock()
        self._backoff_base = backoff_base
        self._backoff_max = backoff_max
        self.stats = NotifyStats()
        self._runners = tuple(_HookRunner(spec, self) for spec in hooks)
        self._tg: anyio.abc.TaskGroup | None = None
        # Set while `run` waits with nothing to tell; `reconfigure` wakes it, and it subscribes
        # after `_resume_after`, the newest event at that moment.
        self._wanted: anyio.Event | None = None
        self._resume_after: int | None = None

    def reconfigure(self, hooks: Sequence[HookSpec], signals: Sequence[SignalSpec]) -> None:
        """Use these hooks and signals from the next event on (a reload of the options).

        A hook whose spec is unchanged keeps its runner, its pending run and its back-off; a
        removed hook finishes the run in progress and ends.
        """
        kept: dict[HookSpec, list[_HookRunner]] = {}
        for runner in self._runners:
            kept.setdefault(runner.spec, []).append(runner)
        runners = []
        for spec in hooks:
            same = kept.get(spec)
            if same:
                runners.append(same.pop(0))
                continue
            runner = _HookRunner(spec, self)
            if self._tg is not None:
                self._tg.start_soon(runner.run)
            runners.append(runner)
        for left in kept.values():
            for runner in left:
                runner.retire()
        self._runners = tuple(runners)
        self._signals = tuple(signals)
        if self._wanted is not None and self._tells_anyone():
            self._resume_after = self._bus.last_id
            self._wanted.set()

    def _tells_anyone(self) -> bool:
        return bool(self._runners or self._signals)

    def backoff(self, failures: int) -> float:
        return hook_backoff(failures, base=self._backoff_base, cap=self._backoff_max)

    def status(self) -> dict[str, Any]:
        return {
            "hooks": len(self._runners),
            "signals": len(self._signals),
            "busy_hooks": sum(1 for r in self._runners if r.busy),
            "failing_hooks": sum(1 for r in self._runners if r.consecutive_failures),
            **vars(self.stats),
        }

    def dispatch(self, event: Event) -> None:
        """Hand `event` to the matching hooks and send the matching signals; never waits."""
        self.stats.events_dispatched += 1
        self.stats.last_event_id = event.id
        for runner in self._runners:
            if event.type in runner.spec.events:
                runner.offer(event)
        for spec in self._signals:
            if event.type in spec.events:
                if send_signal(spec):
                    self.stats.signals_sent += 1
                else:
                    self.stats.signal_failures += 1

    async def run(
        self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED
    ) -> None:
        """Dispatch until cancelled or until the bus closes; started once subscribed, or at
        once with neither hooks nor signals (then subscribed after the `reconfigure` that
        brings some, from the next event on, and no longer after one that leaves none)."""
        async with anyio.create_task_group() as tg:
            self._tg = tg
            for runner in self._runners:
                tg.start_soon(runner.run)
            resume_after: int | None = None
            started = False
            while True:
                if not self._tells_anyone():
                    if not started:
                        task_status.started()
                        started = True
                    self._wanted = anyio.Event()
                    try:
                        await self._wanted.wait()
                    finally:
                        self._wanted = None
                    resume_after = self._resume_after
                try:
                    async with self._bus.subscribe(last_event_id=resume_after) as subscription:
                        if not started:
                            task_status.started()
                            started = True
                        async for event in subscription:
                            self.dispatch(event)
                            if not self._tells_anyone():
                                break
                        else:
                            break  # the bus closed
                except SubscriberLagged as lagged:
                    # The ring still holds what a burst pushed past our buffer.
                    resume_after = lagged.last_event_id
                    self.stats.resubscribes += 1
                    log.info("notifier_resubscribed", after_event_id=resume_after)
            self._tg = None
            tg.cancel_scope.cancel()
