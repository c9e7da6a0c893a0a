"""`Notifier.reconfigure` (SIGHUP): new hooks and signals from the next event on, kept hooks
keep their runner, removed ones finish their run and end."""

from __future__ import annotations

import signal
import subprocess
import sys
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path

import anyio

from gastown_sandboxd.events.bus import EventBus
from gastown_sandboxd.events.notify import Notifier
from gastown_sandboxd.events.specs import HookSpec, SignalSpec

EVENTS = frozenset({"config.changed"})
APPEND = (
    "import os, sys; "
    "open(sys.argv[1], 'a').write(sys.argv[2] + ' ' + os.environ['GASTOWN_EVENT_ID'] + '\\n')"
)


def hook(path: Path, label: str) -> HookSpec:
    return HookSpec(events=EVENTS, command=(sys.executable, "-c", APPEND, str(path), label))


def lines(path: Path) -> list[str]:
    return path.read_text().splitlines() if path.exists() else []


async def eventually(predicate: Callable[[], bool], timeout: float = 10.0) -> None:
    with anyio.fail_after(timeout):
        while not predicate():
            await anyio.sleep(0.005)


@asynccontextmanager
async def running(notifier: Notifier) -> AsyncIterator[Notifier]:
    async with anyio.create_task_group() as tg:
        await tg.start(notifier.run)
        yield notifier
        tg.cancel_scope.cancel()


async def test_reconfigure_swaps_hooks_between_two_events(tmp_path: Path) -> None:
    """Hook `old` runs for event 1; after reconfigure only `kept` and `new` run for event 2."""
    runs = tmp_path / "runs"
    bus = EventBus()
    kept = hook(runs, "kept")
    notifier = Notifier(bus=bus, hooks=[hook(runs, "old"), kept], signals=[])
    async with running(notifier):
        first = bus.emit("config.changed", {}).id
        await eventually(lambda: {f"old {first}", f"kept {first}"} <= set(lines(runs)))
        await eventually(lambda: notifier.status()["busy_hooks"] == 0)
        notifier.reconfigure([kept, hook(runs, "new")], [])
        assert notifier.status()["hooks"] == 2
        second = bus.emit("config.changed", {}).id
        await eventually(lambda: {f"new {second}", f"kept {second}"} <= set(lines(runs)))
    assert f"old {second}" not in lines(runs)  # retired before the event was emitted
    assert notifier.stats.hook_runs == 4


async def test_reconfigure_sends_the_new_signals(tmp_path: Path) -> None:
    """A [[signals]] entry added by a reload is used for the next event, not before: with
    neither hooks nor signals the notifier holds no subscription, and the reload's makes
    it see the events after the newest one."""
    bus = EventBus()
    notifier = Notifier(bus=bus, hooks=[], signals=[])
    # SIGUSR2's default action ends `sleep`: its exit status tells that the signal came.
    with subprocess.Popen(["sleep", "60"], restore_signals=True) as target:
        pid_file = tmp_path / "pid"
        pid_file.write_text(f"{target.pid}\n")
        try:
            async with running(notifier):
                assert bus.subscriber_count == 0
                bus.emit("config.changed", {})
                spec = SignalSpec(pid_file=pid_file, signal=signal.SIGUSR2, events=EVENTS)
                notifier.reconfigure([], [spec])
                second = bus.emit("config.changed", {}).id
                await eventually(lambda: notifier.stats.last_event_id == second)
            assert target.wait(10) == -signal.SIGUSR2
        finally:
            target.kill()
    assert (notifier.stats.events_dispatched, notifier.stats.signals_sent) == (1, 1)


async def test_a_reload_that_leaves_nothing_to_tell_ends_the_subscription(tmp_path: Path) -> None:
    """Hooks removed by a reload: the next event is the last the notifier sees, and a later
    reload with a hook brings the subscription back, from the event after the newest."""
    runs = tmp_path / "runs"
    bus = EventBus()
    notifier = Notifier(bus=bus, hooks=[hook(runs, "first")], signals=[])
    async with running(notifier):
        assert bus.subscriber_count == 1
        notifier.reconfigure([], [])
        last_seen = bus.emit("config.changed", {}).id
        await eventually(lambda: bus.subscriber_count == 0)
        unseen = bus.emit("config.changed", {}).id
        notifier.reconfigure([hook(runs, "again")], [])
        seen = bus.emit("config.changed", {}).id
        await eventually(lambda: f"again {seen}" in lines(runs))
        assert bus.subscriber_count == 1
    assert notifier.stats.last_event_id == seen
    assert notifier.stats.events_dispatched == 2  # `last_seen` and `seen`, never `unseen`
    assert (last_seen, unseen, seen) == (1, 2, 3)
    assert lines(runs) == [f"again {seen}"]
