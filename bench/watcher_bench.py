"""The watcher's trade: idle wake-ups per second against edit → callback latency, per step.

Each configuration runs `SettingsWatcher` alone in a child process on a small town (town
settings folder, one rig); this process reads the child's per-thread context switches over an
idle window (10 s, 5 s with `--quick`) and over half as long while this process writes, 20
times a second each, three files that are not the watcher's: gt's event log in the town root
(`.events.jsonl`, where gt appends every event of the town), and in the home folder (the env
file's, by default) a shell's history and Claude Code's state file (`.claude.json`, replaced
by rename as the real CLI does). Then the child renames a new rig settings file into place
(temporary file, fsync, rename, as gt and editors do) and times each until its callback.
Configurations: the inotify doorbell (the default on Linux) at steps 10 and 50 ms, and the
polled fallback (watchfiles' own loop) at steps 10, 50, 100 and 250 ms. Baseline of each row:
the polled loop at the old default step of 10 ms, measured in the same run; of the rows with
writes, the writes per second.

`python -m bench.watcher_bench [--quick]`; `run(quick)` gives the rows to `python -m bench`.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import TextIO

import anyio

from ._stats import percentile, switches_since, thread_counters
from ._table import Row, main_of

CONFIGS: tuple[tuple[str, int], ...] = (
    ("polled", 10),
    ("polled", 50),
    ("polled", 100),
    ("polled", 250),
    ("doorbell", 10),
    ("doorbell", 50),
)


async def _child(root: Path, mode: str, step: int, edits: int) -> None:
    """Watch `root`, say "ready", wait for a line on stdin, then time `edits` renames."""
    from gastown_sandboxd.watcher import SettingsWatcher

    seen = anyio.Event()
    box = {"seen": seen}

    async def on_settings(paths: set[Path]) -> None:
        box["seen"].set()

    async def on_env() -> None:
        return None

    rig_file = root / "town" / "alpha" / "settings" / "config.json"
    watcher = SettingsWatcher(
        town_root=root / "town",
        env_file=root / "home" / ".env.gateway",
        folders=lambda: [root / "town" / "settings", rig_file.parent.parent, rig_file.parent],
        on_settings_change=on_settings,
        on_env_change=on_env,
        step_ms=step,
        poll_step_ms=step,
        doorbell=mode == "doorbell",
    )
    latencies = []
    async with anyio.create_task_group() as tg:
        await tg.start(watcher.run)
        print("ready", flush=True)
        await anyio.to_thread.run_sync(sys.stdin.readline)
        for n in range(edits):
            box["seen"] = anyio.Event()
            temporary = rig_file.parent / f".config.json.b{n}.tmp"
            temporary.write_text(json.dumps({"n": n}))
            with temporary.open("rb") as handle:
                os.fsync(handle.fileno())
            started = time.perf_counter()
            os.replace(temporary, rig_file)
            with anyio.fail_after(10):
                await box["seen"].wait()
            latencies.append((time.perf_counter() - started) * 1000)
            await anyio.sleep(0.05)
        tg.cancel_scope.cancel()
    print("result " + json.dumps(latencies), flush=True)


def _town(root: Path) -> None:
    (root / "town" / "settings").mkdir(parents=True)
    (root / "town" / "alpha" / "settings").mkdir(parents=True)
    (root / "town" / "alpha" / "settings" / "config.json").write_text("{}")
    (root / "home").mkdir()
    (root / "home" / ".env.gateway").write_text("KILO_JWT=x\n")


WRITES_PER_S = 20


def _wakeups(pid: int, window: float, home: Path | None = None, town: Path | None = None) -> float:
    """The child's wake-ups per second over `window`; with `home` and `town`, this process
    meanwhile writes `WRITES_PER_S` times a second each of three files that are not the
    watcher's (`_busy`)."""
    before, started = thread_counters(pid), time.perf_counter()
    if home is not None and town is not None:
        with (
            (town / ".events.jsonl").open("a") as log,
            (home / ".bash_history").open("a") as history,
        ):
            for n in range(int(window * WRITES_PER_S)):
                time.sleep(max(0.0, started + n / WRITES_PER_S - time.perf_counter()))
                _busy(n, log, history, home)
    time.sleep(max(0.0, started + window - time.perf_counter()))
    return switches_since(pid, before) / (time.perf_counter() - started)


def _busy(n: int, log: TextIO, history: TextIO, home: Path) -> None:
    # gt appends an event to its log in the town root; a shell its history in the home
    # folder, where Claude Code replaces its state file as it does (seen with inotify
    # beside the real CLI): a lock file, a temporary file renamed over it, the lock removed.
    for handle in (log, history):
        handle.write("{}\n")
        handle.flush()
    lock, temporary = home / ".claude.json.lock", home / f".claude.json.tmp.{n}"
    lock.write_text("")
    temporary.write_text("{}")
    temporary.replace(home / ".claude.json")
    lock.unlink()


def measure(mode: str, step: int, window: float, edits: int) -> tuple[float, float, list[float]]:
    """(idle wake-ups per second of the child, its wake-ups per second while other files are
    written (`_busy`), rename → callback latencies in ms)."""
    with tempfile.TemporaryDirectory(prefix="watcher-bench-") as tmp:
        root = Path(tmp)
        _town(root)
        argv = [sys.executable, "-m", "bench.watcher_bench", "--child", tmp, mode, str(step)]
        argv.append(str(edits))
        with subprocess.Popen(
            argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
        ) as child:
            assert child.stdin is not None
            assert child.stdout is not None
            line = child.stdout.readline()
            while line and line.strip() != "ready":
                line = child.stdout.readline()
            if not line:
                raise RuntimeError("the watcher child did not start")
            time.sleep(0.5)  # past start-up
            idle = _wakeups(child.pid, window)
            busy = _wakeups(child.pid, window / 2, root / "home", root / "town")
            child.stdin.write("go\n")
            child.stdin.flush()
            line = child.stdout.readline()
            while line and not line.startswith("result "):  # the watcher's log lines
                line = child.stdout.readline()
            latencies = json.loads(line.removeprefix("result "))
    return idle, busy, latencies


def run(quick: bool) -> list[Row]:
    """Every configuration, one after another; the baseline is the first (polled, 10 ms)."""
    window, edits = (5.0, 20) if quick else (10.0, 40)
    results = {config: measure(*config, window, edits) for config in CONFIGS}
    base_wakeups, _, base_latencies = results[CONFIGS[0]]
    base_p50 = percentile(base_latencies, 50)
    rows = []
    for (mode, step), (wakeups, busy, latencies) in results.items():
        note = (
            f"{window:.0f} s idle; baseline: polled, step 10 ms"
            if (mode, step) == CONFIGS[0]
            else ""
        )
        rows += [
            Row(f"{mode}, step {step} ms: idle wake-ups", wakeups, "/s", base_wakeups, note),
            Row(f"{mode}, step {step} ms: wake-ups while gt's event log, a shell's history and "
                f"Claude Code's state file are written, {WRITES_PER_S} times a second each",
                busy, "/s", 3 * WRITES_PER_S,
                "baseline: the writes" if (mode, step) == CONFIGS[0] else ""),
            Row(f"{mode}, step {step} ms: rename → callback p50", percentile(latencies, 50), "ms",
                base_p50, f"{edits} renames" if (mode, step) == CONFIGS[0] else ""),
            Row(f"{mode}, step {step} ms: rename → callback p99", percentile(latencies, 99), "ms"),
        ]  # fmt: skip
    return rows


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        folder, child_mode, child_step, child_edits = sys.argv[2:6]
        anyio.run(_child, Path(folder), child_mode, int(child_step), int(child_edits))
        raise SystemExit(0)
    quick = "5 s idle windows, 20 renames per configuration"
    raise SystemExit(main_of(run, name="watcher_bench", doc=__doc__, quick=quick, title="watcher"))
