"""Hooks and signals driven by bus events, with real subprocesses and real signals."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from pathlib import Path

import anyio
import pytest
from structlog.testing import capture_logs

from gastown_sandboxd.events.bus import EventBus
from gastown_sandboxd.events.notify import Notifier, hook_backoff, read_pid, run_hook
from gastown_sandboxd.events.specs import HookSpec, SignalSpec, parse_duration, parse_signal
from tests.waiting import eventually

ALL = frozenset({"token.refreshed", "config.changed"})


class RecordingClock:
    """A clock whose sleeps return at once and are recorded."""

    def __init__(self) -> None:
        self.sleeps: list[float] = []

    def time(self) -> float:
        return 0.0

    async def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        await anyio.sleep(0)


def dispatched(notifier: Notifier, event_id: int) -> Callable[[], bool]:
    return lambda: notifier.stats.last_event_id >= event_id


def failed(notifier: Notifier, failures: int) -> Callable[[], bool]:
    return lambda: notifier.stats.hook_failures >= failures


@asynccontextmanager
async def running(notifier: Notifier) -> AsyncIterator[Notifier]:
    async with anyio.create_task_group() as tg:
        await tg.start(notifier.run)
        yield notifier
        tg.cancel_scope.cancel()


def python_hook(script: str, *args: str | Path, timeout: float = 10.0) -> HookSpec:
    return HookSpec(
        events=ALL, command=(sys.executable, "-c", script, *map(str, args)), timeout=timeout
    )


def lines(path: Path) -> list[str]:
    return path.read_text().splitlines() if path.exists() else []


def gone(pid: int) -> bool:
    """True when `pid` no longer runs (absent, or a zombie waiting for its reaper)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return True
    return stat.rsplit(")", 1)[1].split()[0] == "Z"


# --- parsing and specs -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "seconds"),
    [
        ("30s", 30.0),
        ("500ms", 0.5),
        ("2m", 120.0),
        ("1h", 3600.0),
        ("1.5", 1.5),
        (2, 2.0),
        (0.2, 0.2),
    ],
)
def test_parse_duration(value: str | float, seconds: float) -> None:
    """Durations are read with ms, s, m or h units, or as plain seconds."""
    assert parse_duration(value) == pytest.approx(seconds)


@pytest.mark.parametrize("value", ["", "fast", "-1s", "10 days", "1e3", True, -1, float("inf")])
def test_parse_duration_rejects_garbage(value: str | float) -> None:
    """Anything else is a ValueError the settings loader turns into a startup error."""
    with pytest.raises(ValueError, match="duration"):
        parse_duration(value)


def test_parse_signal() -> None:
    """Signals are named with or without SIG, in any case, or by number."""
    assert parse_signal("SIGHUP") is signal.SIGHUP
    assert parse_signal("usr1") is signal.SIGUSR1
    assert parse_signal(int(signal.SIGTERM)) is signal.SIGTERM
    for bad in ("SIGNOPE", 999, True, 1.0):
        with pytest.raises(ValueError, match="signal"):
            parse_signal(bad)  # type: ignore[arg-type]


def test_specs_validate_themselves() -> None:
    """Unknown event types, empty commands and bad timeouts are refused."""
    with pytest.raises(ValueError, match="unknown event types"):
        HookSpec(events=frozenset({"token.renewed"}), command=("true",))
    with pytest.raises(ValueError, match="at least one"):
        HookSpec(events=frozenset(), command=("true",))
    with pytest.raises(ValueError, match="command"):
        HookSpec(events=ALL, command=())
    with pytest.raises(ValueError, match="timeout"):
        HookSpec(events=ALL, command=("true",), timeout=0)
    with pytest.raises(ValueError, match="unknown event types"):
        SignalSpec(pid_file=Path("x"), signal=signal.SIGHUP, events=frozenset({"nope"}))


def test_hook_backoff_doubles_to_its_cap() -> None:
    """Backoff is 0 before a failure, then base doubling up to the cap."""
    assert [hook_backoff(n, base=1.0, cap=60.0) for n in range(9)] == [
        0.0, 1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 60.0, 60.0,
    ]  # fmt: skip
    assert hook_backoff(10_000, base=1.0, cap=60.0) == 60.0


@pytest.mark.parametrize(
    ("content", "message"),
    [("", "no pid"), ("abc\n", "no pid"), ("0\n", "not a single process"), ("-5", "no pid"),
     ("4194305\n", "beyond any process id"), ("99999999999\n", "beyond any process id"),
     ("9" * 40, "beyond any process id")],
)  # fmt: skip
def test_read_pid_rejects_bad_files(tmp_path: Path, content: str, message: str) -> None:
    """Empty, non-numeric, zero or negative pids are refused (0 would signal our own group),
    and pids past Linux's largest (past pid_t's range, os.kill raised OverflowError)."""
    pid_file = tmp_path / "x.pid"
    pid_file.write_text(content)
    with pytest.raises(ValueError, match=message):
        read_pid(pid_file)


def test_read_pid_reads_the_first_line(tmp_path: Path) -> None:
    """A pid file may carry more lines after the pid."""
    pid_file = tmp_path / "x.pid"
    pid_file.write_text(" 4242 \nextra\n")
    assert read_pid(pid_file) == 4242


# --- hooks ---------------------------------------------------------------------------------

RECORD = """
import json, os, sys
with open(sys.argv[1], "a") as out:
    out.write(json.dumps({"stdin": sys.stdin.read(), "event": os.environ["GASTOWN_EVENT"],
                          "id": os.environ["GASTOWN_EVENT_ID"],
                          "parent": os.environ.get("GT_TEST_PARENT"),
                          "secrets": [name for name in ("INTERNAL_API_KEY", "NEXTAUTH_SECRET")
                                      if name in os.environ]}) + "\\n")
"""


async def test_hook_gets_event_json_on_stdin_and_type_in_env(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The hook reads the event's JSON on stdin and sees GASTOWN_EVENT plus the parent env,
    less the daemon's secrets."""
    monkeypatch.setenv("GT_TEST_PARENT", "inherited")
    monkeypatch.setenv("INTERNAL_API_KEY", "k" * 32)
    monkeypatch.setenv("NEXTAUTH_SECRET", "s" * 32)
    out = tmp_path / "out.jsonl"
    bus = EventBus()
    async with running(Notifier(bus=bus, hooks=[python_hook(RECORD, out)], signals=[])) as n:
        bus.emit("token.expired", {"exp": 1})  # not one of the hook's events
        event = bus.emit("config.changed", {"scope": "town", "keys": ["agents"]})
        await eventually(lambda: len(lines(out)) == 1 and n.stats.hook_runs == 1)
    record = json.loads(lines(out)[0])
    assert json.loads(record["stdin"]) == event.as_json()
    assert record["event"] == "config.changed"
    assert record["id"] == str(event.id)
    assert record["parent"] == "inherited"
    assert record["secrets"] == []
    assert n.stats.hook_failures == 0


HANG_ONCE = """
import os, signal, subprocess, sys
marker, pids, out = sys.argv[1:4]
if not os.path.exists(marker):
    open(marker, "w").close()
    # Both hang until a signal ends them: only the hook's timeout kill can.
    child = subprocess.Popen([sys.executable, "-c", "import signal; signal.pause()"])
    with open(pids, "w") as f:
        f.write(f"{os.getpid()} {child.pid}")
    signal.pause()
with open(out, "a") as f:
    f.write(os.environ["GASTOWN_EVENT_ID"] + "\\n")
"""


async def test_hanging_hook_is_killed_with_its_children_and_runs_again(tmp_path: Path) -> None:
    """A hook past its 0.2 s timeout is killed (its whole group) and the next event runs it."""
    marker, pids, out = tmp_path / "marker", tmp_path / "pids", tmp_path / "out"
    clock = RecordingClock()
    hook = python_hook(HANG_ONCE, marker, pids, out, timeout=0.2)
    bus = EventBus()
    with capture_logs() as logs:
        async with running(Notifier(bus=bus, hooks=[hook], signals=[], clock=clock)) as n:
            bus.emit("token.refreshed", {})
            await eventually(lambda: n.stats.hook_timeouts == 1)
            hook_pid, child_pid = map(int, pids.read_text().split())
            await eventually(lambda: gone(hook_pid) and gone(child_pid))
            second = bus.emit("token.refreshed", {})
            await eventually(lambda: lines(out) == [str(second.id)])
    assert n.stats.hook_runs == 2
    assert n.stats.hook_failures == 1
    assert clock.sleeps == [1.0]
    assert any(log["event"] == "hook_timed_out" and log["timeout"] == 0.2 for log in logs)


COALESCE = """
import os, sys, time
log, release = sys.argv[1:3]
with open(log, "a") as f:
    f.write(os.environ["GASTOWN_EVENT_ID"] + "\\n")
deadline = time.monotonic() + 20
while not os.path.exists(release) and time.monotonic() < deadline:
    time.sleep(0.01)
"""


async def test_events_during_a_run_coalesce_into_one_more_run(tmp_path: Path) -> None:
    """Ten events while the hook runs give exactly one more run, with the newest event."""
    log, release = tmp_path / "log", tmp_path / "release"
    bus = EventBus()
    async with running(
        Notifier(bus=bus, hooks=[python_hook(COALESCE, log, release)], signals=[])
    ) as n:
        bus.emit("token.refreshed", {})
        await eventually(lambda: lines(log) == ["1"])
        for _ in range(10):
            bus.emit("config.changed", {})
        await eventually(lambda: n.stats.events_dispatched == 11)
        release.touch()
        await eventually(lambda: len(lines(log)) == 2)
        assert n.stats.hook_runs == 2
    assert lines(log) == ["1", "11"]
    assert n.stats.hook_events_coalesced == 9


async def test_failing_hook_backs_off_and_never_holds_back_emit() -> None:
    """A hook failing 100 times in a row backs off each time; dispatch keeps pace with emit."""
    clock = RecordingClock()
    false = shutil.which("false")
    assert false is not None
    hook = HookSpec(events=ALL, command=(false,), timeout=5)
    bus = EventBus()
    async with running(Notifier(bus=bus, hooks=[hook], signals=[], clock=clock)) as n:
        for attempt in range(1, 101):
            event = bus.emit("token.refreshed", {})  # plain call: emit has nothing to await
            assert event.id == bus.last_id
            await eventually(dispatched(n, event.id))
            await eventually(failed(n, attempt))
        # A burst far larger than a subscriber buffer: the dispatcher still sees every event.
        for _ in range(900):
            bus.emit("config.changed", {})
        await eventually(lambda: n.stats.last_event_id == 1000)
        await eventually(lambda: n.status()["busy_hooks"] == 0)
        assert n.status()["failing_hooks"] == 1
    assert n.stats.events_dispatched == 1000
    assert n.stats.resubscribes >= 1
    # Every event either started a run or was folded into a later one.
    assert n.stats.hook_runs + n.stats.hook_events_coalesced == 1000
    assert n.stats.hook_runs == n.stats.hook_failures == len(clock.sleeps)
    assert clock.sleeps[:7] == [1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 60.0]
    assert clock.sleeps[6:100] == [60.0] * 94


async def test_backing_off_hook_does_not_run_during_its_backoff() -> None:
    """While a failed hook waits out its backoff, new events only wait, folded into one."""
    false = shutil.which("false")
    assert false is not None
    bus = EventBus()
    hook = HookSpec(events=ALL, command=(false,))
    async with running(Notifier(bus=bus, hooks=[hook], signals=[], backoff_base=30.0)) as n:
        bus.emit("token.refreshed", {})
        await eventually(lambda: n.stats.hook_failures == 1)
        for _ in range(50):
            bus.emit("token.refreshed", {})
        await eventually(lambda: n.stats.last_event_id == 51)
        assert n.stats.hook_runs == 1
        assert n.stats.hook_events_coalesced == 49


async def test_unstartable_and_failing_hooks_are_logged_and_counted(tmp_path: Path) -> None:
    """A missing program, an argument holding a NUL (TOML's "\\u0000"; before, a ValueError
    that ended the notifier and the daemon) and a non-zero exit are failures that leave the
    notifier running."""
    missing = HookSpec(events=ALL, command=(str(tmp_path / "no-such-hook"),))
    nul = HookSpec(events=ALL, command=("/bin/true", "a\0b"))
    exit3 = python_hook("raise SystemExit(3)")
    bus = EventBus()
    with capture_logs() as logs:
        hooks = [missing, nul, exit3]
        notifier = Notifier(bus=bus, hooks=hooks, signals=[], clock=RecordingClock())
        async with running(notifier) as n:
            bus.emit("token.refreshed", {})
            await eventually(lambda: n.stats.hook_failures == 3)
    started = {log["program"]: log for log in logs if log["event"] == "hook_start_failed"}
    assert sorted(started) == sorted([str(tmp_path / "no-such-hook"), "/bin/true"])
    assert "null byte" in started["/bin/true"]["error"]
    assert {log["event"]: log for log in logs}["hook_failed"]["returncode"] == 3


async def test_successful_run_resets_the_failure_count(tmp_path: Path) -> None:
    """After a success the next failure backs off from the start again."""
    toggle = tmp_path / "fail"
    script = "import os, sys; sys.exit(1 if os.path.exists(sys.argv[1]) else 0)"
    clock = RecordingClock()
    bus = EventBus()
    async with running(
        Notifier(bus=bus, hooks=[python_hook(script, toggle)], signals=[], clock=clock)
    ) as n:
        toggle.touch()
        bus.emit("token.refreshed", {})
        await eventually(lambda: n.stats.hook_runs == 1 and len(clock.sleeps) == 1)
        bus.emit("token.refreshed", {})
        await eventually(lambda: len(clock.sleeps) == 2)
        toggle.unlink()
        bus.emit("token.refreshed", {})
        await eventually(lambda: n.stats.hook_runs == 3 and n.status()["failing_hooks"] == 0)
        toggle.touch()
        bus.emit("token.refreshed", {})
        await eventually(lambda: len(clock.sleeps) == 3)
    assert clock.sleeps == [1.0, 2.0, 1.0]


async def test_hook_that_ignores_stdin_is_fine() -> None:
    """A hook that exits without reading its input succeeds."""
    true = shutil.which("true")
    assert true is not None
    bus = EventBus()
    event = bus.emit("config.changed", {"big": "x" * 200_000})
    assert await run_hook(HookSpec(events=ALL, command=(true,)), event) == "ok"


async def test_cancelled_run_kills_the_hook(tmp_path: Path) -> None:
    """Stopping the daemon mid-run kills the hook instead of leaving it behind."""
    pid_file = tmp_path / "pid"
    script = (
        "import os, signal, sys; open(sys.argv[1], 'w').write(str(os.getpid())); signal.pause()"
    )
    bus = EventBus()
    event = bus.emit("config.changed", {})
    async with anyio.create_task_group() as tg:
        tg.start_soon(run_hook, python_hook(script, pid_file), event)
        await eventually(lambda: pid_file.exists() and pid_file.read_text() != "")
        tg.cancel_scope.cancel()
    assert gone(int(pid_file.read_text()))


# --- signals -------------------------------------------------------------------------------

ON_SIGHUP = """
import os, signal, sys, time
out, ready = sys.argv[1:3]
def record(signum, frame):
    with open(out, "a") as f:
        f.write(signal.Signals(signum).name + "\\n")
signal.signal(signal.SIGHUP, record)
open(ready, "w").close()
deadline = time.monotonic() + 30
while time.monotonic() < deadline:
    time.sleep(0.01)
"""


# Children inherit an ignored SIGHUP (`nohup make test`); the signal tests need its default.
# The marker file says the default is back: a SIGHUP sent before would be lost.
DEFAULT_SIGHUP = (
    "import os, signal, sys; signal.signal(signal.SIGHUP, signal.SIG_DFL); "
    "open(sys.argv[1], 'w').close(); os.execvp(sys.argv[2], sys.argv[2:])"
)


@asynccontextmanager
async def child(argv: Sequence[str]) -> AsyncIterator[anyio.abc.Process]:
    """A real child process with SIGHUP at its default (yielded once it is), killed and
    reaped on exit."""
    with tempfile.TemporaryDirectory(prefix="child-") as folder:
        defaulted = Path(folder) / "sighup-default"
        process = await anyio.open_process(
            [sys.executable, "-c", DEFAULT_SIGHUP, str(defaulted), *argv],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        async with process:
            try:
                await eventually(defaulted.exists)
                yield process
            finally:
                if process.returncode is None:
                    process.kill()


async def test_signal_follows_the_pid_file(tmp_path: Path) -> None:
    """The process named in the pid file gets the signal; a rewritten file names the next one."""
    out, ready, pid_file = tmp_path / "out", tmp_path / "ready", tmp_path / "gt.pid"
    spec = SignalSpec(pid_file=pid_file, signal=signal.SIGHUP, events=frozenset({"config.changed"}))
    bus = EventBus()
    async with (
        child([sys.executable, "-c", ON_SIGHUP, str(out), str(ready)]) as first,
        child(["sleep", "30"]) as second,
        running(Notifier(bus=bus, hooks=[], signals=[spec])) as n,
    ):
        await eventually(ready.exists)
        pid_file.write_text(f"{first.pid}\n")
        bus.emit("token.refreshed", {})  # not one of the spec's events
        bus.emit("config.changed", {})
        await eventually(lambda: lines(out) == ["SIGHUP"])
        pid_file.write_text(f"{second.pid}\n")
        bus.emit("config.changed", {})
        with anyio.fail_after(10):
            assert await second.wait() == -signal.SIGHUP
        assert lines(out) == ["SIGHUP"]
        assert n.stats.signals_sent == 2


async def test_signal_problems_are_logged_and_counted(tmp_path: Path) -> None:
    """Missing, garbage, own-pid, own-thread, dead-process and FIFO pid files are logged;
    nothing crashes. A thread's id reaches the whole process on Linux (a SIGTERM to one
    stopped the daemon), and a FIFO with no writer froze the event loop in `open`."""
    pid_file = tmp_path / "gt.pid"
    spec = SignalSpec(pid_file=pid_file, signal=signal.SIGHUP, events=ALL)
    async with child(["true"]) as dead:
        await dead.wait()
    done = threading.Event()
    thread = threading.Thread(target=done.wait)
    thread.start()
    bus = EventBus()
    try:
        with capture_logs() as logs:
            async with running(Notifier(bus=bus, hooks=[], signals=[spec])) as n:
                own_thread = str(thread.native_id)
                for content in (None, "not a pid", str(os.getpid()), own_thread, str(dead.pid)):
                    if content is not None:
                        pid_file.write_text(content)
                    event = bus.emit("config.changed", {})
                    await eventually(dispatched(n, event.id))
                pid_file.unlink()
                os.mkfifo(pid_file)
                event = bus.emit("config.changed", {})
                await eventually(dispatched(n, event.id))
                assert n.stats.signal_failures == 6
    finally:
        done.set()
        thread.join()
    assert [log["event"] for log in logs if log["event"].startswith("signal_")] == [
        "signal_pid_file_missing",
        "signal_pid_file_invalid",
        "signal_refused_own_pid",
        "signal_refused_own_pid",
        "signal_process_gone",
        "signal_pid_file_unreadable",
    ]
    assert n.stats.signals_sent == 0


async def test_unreadable_pid_file_is_logged(tmp_path: Path) -> None:
    """A pid file that cannot be read (here a folder) is logged, not raised."""
    pid_dir = tmp_path / "gt.pid"
    pid_dir.mkdir()
    spec = SignalSpec(pid_file=pid_dir, signal=signal.SIGHUP, events=ALL)
    bus = EventBus()
    with capture_logs() as logs:
        async with running(Notifier(bus=bus, hooks=[], signals=[spec])) as n:
            bus.emit("config.changed", {})
            await eventually(lambda: n.stats.signal_failures == 1)
    assert [log["event"] for log in logs] == ["signal_pid_file_unreadable"]


async def test_notifier_stops_when_the_bus_closes() -> None:
    """Closing the bus at shutdown ends Notifier.run."""
    bus = EventBus()
    notifier = Notifier(bus=bus, hooks=[HookSpec(events=ALL, command=("true",))], signals=[])
    with anyio.fail_after(5):
        async with anyio.create_task_group() as tg:
            await tg.start(notifier.run)
            bus.close()
    assert notifier.status()["hooks"] == 1
