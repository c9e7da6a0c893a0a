"""The bench's instruction counts (`bench/_callgrind.py`), read off real callgrind runs."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from bench import _callgrind

# Sums the numbers up to each N it reads; answers each line, so the test knows it is done.
CHILD = """
import sys
for line in sys.stdin:
    total = sum(range(int(line)))
    print(total, flush=True)
"""

pytestmark = pytest.mark.skipif(
    not _callgrind.available(), reason="valgrind is missing (make tools)"
)


def test_each_count_is_what_ran_while_counting_and_twice_the_work_counts_about_twice(
    tmp_path: Path,
) -> None:
    """Counting is off until asked: what the child did before (its start, a first sum) is not
    counted; two counts of the same process each read their own dump."""
    argv = [*_callgrind.prefix(tmp_path), sys.executable, "-c", CHILD]
    with subprocess.Popen(
        argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True
    ) as child:
        assert child.stdin is not None
        assert child.stdout is not None
        stdin, stdout = child.stdin, child.stdout

        def sum_to(n: int) -> None:
            stdin.write(f"{n}\n")
            stdin.flush()
            assert int(stdout.readline()) == n * (n - 1) // 2

        try:
            sum_to(3_000_000)  # not counted
            once = _callgrind.count_instructions(child.pid, tmp_path, lambda: sum_to(200_000))
            twice = _callgrind.count_instructions(child.pid, tmp_path, lambda: sum_to(400_000))
        finally:
            child.kill()
    assert len(once) == len(twice) >= 1
    # Twice the work counts about twice: with the 3,000,000 summed before counted too, the
    # first count would be the larger; with the first count in the second, 3 times.
    assert 1.6 < twice[0] / once[0] < 2.4


def test_a_process_not_under_callgrind_is_not_counted_and_says_why(tmp_path: Path) -> None:
    """callgrind_control exits 0 when no callgrind run has that pid: the count still fails at
    once, with its words, rather than waiting for a dump that never comes."""
    # It waits for its input, which ends when the block closes its stdin.
    waiting = [sys.executable, "-c", "import sys; sys.stdin.read()"]
    with (
        subprocess.Popen(waiting, stdin=subprocess.PIPE) as plain,
        pytest.raises(_callgrind.NotCounted, match="not detected"),
    ):
        _callgrind.count_instructions(plain.pid, tmp_path, lambda: None)
