"""The bench's per-thread differences (`bench/_stats.since`), on readings of a real process."""

from __future__ import annotations

import os
import threading
import time

import pytest
from bench._stats import since, switches_since, thread_counters

from tests.waiting import wait_until


def test_threads_that_end_or_are_new_never_make_a_difference_negative() -> None:
    """A thread that ended counts nothing; a reused id with lower counts counts from zero."""
    before = {1: ("main", 2.0, 100), 2: ("worker", 1.0, 50), 3: ("worker", 0.5, 40)}
    after = {1: ("main", 2.5, 130), 3: ("worker", 0.1, 5), 4: ("notify", 0.2, 7)}
    assert since(before, after) == {
        1: ("main", 0.5, 30),
        3: ("worker", 0.1, 5),  # id 3 again, a new thread: its counts went down
        4: ("notify", 0.2, 7),
    }


def test_a_thread_that_ends_during_the_window_leaves_the_count_positive() -> None:
    """Read off this process: a thread that wakes often and ends between the two readings
    (as the daemon's idle worker threads do) no longer turns the wake-ups negative."""
    stop = threading.Event()

    def busy() -> None:
        while not stop.is_set():
            time.sleep(0.001)

    worker = threading.Thread(target=busy)
    worker.start()
    time.sleep(0.05)
    before = thread_counters(os.getpid())
    stop.set()
    worker.join()
    assert worker.native_id in before
    assert switches_since(os.getpid(), before) >= 0


def test_a_threads_cpu_time_is_counted_finer_than_a_clock_tick() -> None:
    """A millisecond of work by a thread that then sleeps (as the daemon's do between two
    readings) shows as more than nothing and less than a tick (10 ms): the scheduler's count
    in ns, not the stat file's ticks (0 or 10 ms here)."""
    go, done, stop = threading.Event(), threading.Event(), threading.Event()

    def work() -> None:
        go.wait()
        end = time.perf_counter() + 0.001
        while time.perf_counter() < end:
            pass
        done.set()
        stop.wait()

    worker = threading.Thread(target=work)
    worker.start()
    try:
        while worker.native_id is None:
            time.sleep(0.001)
        tid = worker.native_id
        if not os.path.exists(f"/proc/self/task/{tid}/schedstat"):
            pytest.skip("this kernel keeps no schedstat")
        before = thread_counters(os.getpid())[tid][1]
        go.set()
        assert done.wait(30)
        # The count of a thread is brought up to date when it stops running: read it asleep.
        wait_until(lambda: _state(tid) == "S", deadline=30, what="the worker asleep")
        spent = thread_counters(os.getpid())[tid][1] - before
    finally:
        go.set()
        stop.set()
        worker.join()
    assert 0 < spent < 0.01


def _state(tid: int) -> str:
    with open(f"/proc/self/task/{tid}/stat") as stat:
        return stat.read().rsplit(")", 1)[1].split()[0]
