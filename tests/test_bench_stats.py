"""The bench's per-thread differences (`bench/_stats.since`), on readings of a real process."""

from __future__ import annotations

import os
import threading
import time

from bench._stats import since, switches_since, thread_counters


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
