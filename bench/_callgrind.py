"""Instructions counted by valgrind's callgrind: a CPU figure that the host's load does not move.

CPU time per PATCH moves by a sixth between turns here, with nothing changed but the host, so
two versions of the daemon a few percent apart cannot be told apart by it. Callgrind counts
the instructions each thread runs instead: the same code, given the same requests, counts
nearly the same whatever else the machine does. A server is started under `PREFIX` with
counting off (so its start costs nothing measured and goes at valgrind's full speed);
`count_instructions` turns counting on for what `run` sends it, off again, and reads each
thread's total from the dump. valgrind runs the threads one at a time, so this counts work,
not its timing: kernel time (fsync, the socket's copies) is not in it, and neither is waiting.
"""

from __future__ import annotations

import shutil
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

# callgrind_control waits until the counted process takes the command. A process blocked in a
# system call (an idle server) takes it through vgdb's ptrace; where ptrace is not allowed (a
# container without it) the command waits for the next wake-up, which may never come.
CONTROL_TIMEOUT = 30.0


class NotCounted(Exception):
    """callgrind could not count: the reason, for the row that would have held the count."""


def available() -> bool:
    """Whether valgrind and callgrind_control are installed (Debian's valgrind)."""
    return shutil.which("valgrind") is not None and shutil.which("callgrind_control") is not None


def prefix(out_dir: Path) -> list[str]:
    """What goes before a server's argv: callgrind, counting off, one dump file per thread."""
    return [
        "valgrind",
        "--tool=callgrind",
        "--instr-atstart=no",
        "--separate-threads=yes",
        f"--callgrind-out-file={out_dir}/callgrind.%p",
    ]


def count_instructions(pid: int, out_dir: Path, run: Callable[[], object]) -> list[int]:
    """Instructions each thread of `pid` (started under `prefix(out_dir)`) ran while `run`
    ran, by callgrind's thread number: the main thread first, the others in the order they
    started. May be called again for the same process: each call reads its own dump. Raises
    `NotCounted` when callgrind does not answer or writes no dump."""
    earlier = set(out_dir.glob(f"callgrind.{pid}.*"))
    _control(pid, "--instr=on")
    run()
    _control(pid, "--instr=off")
    _control(pid, "--dump")
    # callgrind_control returns once the process has answered the dump (through vgdb);
    # until each thread's file is whole, and none is added, wait anyway.
    deadline = time.monotonic() + CONTROL_TIMEOUT
    seen: list[Path] = []
    while True:
        dumps = sorted(set(out_dir.glob(f"callgrind.{pid}.*")) - earlier)
        texts = [path.read_text() for path in dumps]
        if dumps == seen and texts and all(_complete(text) for text in texts):
            break
        seen = dumps
        if time.monotonic() > deadline:
            raise NotCounted(f"callgrind wrote no complete dump in {CONTROL_TIMEOUT:.0f} s")
        time.sleep(0.05)
    # Every dump is complete here, so has its totals; one without a thread is the only one.
    counts = {_thread(text) or 1: _totals(text) or 0 for text in texts}
    return [counts[thread] for thread in sorted(counts)]


def _control(pid: int, *args: str) -> None:
    command = ["callgrind_control", *args, str(pid)]
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=CONTROL_TIMEOUT)
    except subprocess.TimeoutExpired:
        raise NotCounted(
            f"callgrind_control {' '.join(args)} got no answer in {CONTROL_TIMEOUT:.0f} s "
            "(is ptrace allowed here?)"
        ) from None
    # It exits 0 when it finds no callgrind run of that pid, saying so on stdout.
    said = (done.stdout + done.stderr).strip()
    if done.returncode != 0 or said.startswith("Error"):
        raise NotCounted(f"callgrind_control {' '.join(args)}: {said.splitlines()[0][:200]}")


def _complete(text: str) -> bool:
    # `totals:` is the last line callgrind writes to a dump; a file read mid-write may end
    # inside it.
    return text.endswith("\n") and _totals(text) is not None


def _thread(text: str) -> int | None:
    return _field(text, "thread:")


def _totals(text: str) -> int | None:
    """The number on the `totals:` line of a callgrind dump, else None."""
    return _field(text, "totals:")


def _field(text: str, name: str) -> int | None:
    for line in text.splitlines():
        if line.startswith(name):
            return int(line[len(name) :].split()[0])
    return None
