"""Figures shared by the benches: percentiles of samples, a process's CPU time and memory."""

from __future__ import annotations

import os
import statistics
from collections.abc import Sequence


def percentile(samples: Sequence[float], percent: int) -> float:
    """The `percent`-th percentile (inclusive method); the one sample, or 0, below two."""
    if len(samples) < 2:
        return samples[0] if samples else 0.0
    return statistics.quantiles(samples, n=100, method="inclusive")[percent - 1]


def cpu_seconds(pid: int) -> float:
    """utime + stime of process `pid`, from /proc/PID/stat."""
    with open(f"/proc/{pid}/stat") as stat:
        # Fields after the command name (which may hold spaces): utime and stime are 14 and 15.
        fields = stat.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def rss_kib(pid: int) -> int:
    """VmRSS of process `pid` in KiB, from /proc/PID/status."""
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for pid {pid}")


Counters = dict[int, tuple[str, float, int]]


def since(before: Counters, after: Counters) -> Counters:
    """Per thread alive at `after`: (name, CPU seconds, context switches) spent since `before`
    (two `thread_counters` readings of one process).

    Per thread, never one sum: a thread that ends between the readings (an idle worker
    thread leaves after 10 s) takes its counts with it, and a difference of sums went
    negative (-795 wake-ups per rewrite in one full run). A thread that ended counts nothing;
    one whose counts went down is a new thread under a reused id and counts from zero.
    """
    spent: Counters = {}
    for tid, (name, seconds, switches) in after.items():
        _, seconds_before, switches_before = before.get(tid, (name, 0.0, 0))
        if seconds < seconds_before or switches < switches_before:
            seconds_before, switches_before = 0.0, 0
        spent[tid] = (name, seconds - seconds_before, switches - switches_before)
    return spent


def switches_since(pid: int, before: Counters) -> int:
    """Context switches of `pid`'s threads since `before` (`since`): its wake-ups."""
    return sum(switches for _, _, switches in since(before, thread_counters(pid)).values())


def thread_counters(pid: int) -> Counters:
    """Per thread of `pid`: (name, CPU seconds, context switches voluntary + involuntary).

    A context switch is a wake-up's trace: a sleeping thread that wakes and sleeps again
    counts one voluntary switch. Threads that end between the two reads are skipped.

    The CPU seconds are the scheduler's own count, in ns (`/proc/PID/task/TID/schedstat`).
    The stat file gives them in clock ticks (10 ms), so a thread's share of 200 paced
    PATCHes came in steps of 0.05 ms per PATCH (watchfiles' thread: 0.07, 0.13 or 0.20 over
    150). Where the kernel keeps no schedstat, the ticks.
    """
    ticks = os.sysconf("SC_CLK_TCK")
    counters = {}
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return {}
    for tid in tids:
        try:
            with open(f"/proc/{pid}/task/{tid}/stat") as stat:
                head, tail = stat.read().rsplit(")", 1)
            switches = 0
            with open(f"/proc/{pid}/task/{tid}/status") as status:
                for line in status:
                    if "ctxt_switches:" in line:
                        switches += int(line.split()[1])
            seconds = _scheduled_seconds(pid, tid)
        except OSError:
            continue
        fields = tail.split()
        name = head.split("(", 1)[1]
        if seconds is None:
            seconds = (int(fields[11]) + int(fields[12])) / ticks
        counters[int(tid)] = (name, seconds, switches)
    return counters


def _scheduled_seconds(pid: int, tid: str) -> float | None:
    # The first field of schedstat: time on a CPU, in ns. None where there is no such file:
    # a kernel without schedstat, or a thread that ended since its stat was read (its
    # ticks from that read stand).
    try:
        with open(f"/proc/{pid}/task/{tid}/schedstat") as schedstat:
            return int(schedstat.read().split()[0]) / 1e9
    except FileNotFoundError:
        return None
