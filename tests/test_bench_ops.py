"""The stop bench's wait (`bench/ops_bench.reaped`), on real child processes."""

from __future__ import annotations

import subprocess
import sys

import pytest
from bench.ops_bench import reaped


def test_a_process_that_ends_is_reaped_with_its_exit_status() -> None:
    with subprocess.Popen([sys.executable, "-c", "raise SystemExit(3)"]) as child:
        assert reaped(child) == 3
        assert child.returncode == 3


def test_a_process_still_running_at_the_deadline_is_left_running() -> None:
    """It reads its stdin until the end, which comes only when the test closes it."""
    code = "import sys; sys.stdin.read()"
    with subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE) as child:
        assert child.stdin is not None
        with pytest.raises(subprocess.TimeoutExpired):
            reaped(child, timeout=0.2)
        assert child.poll() is None
        child.stdin.close()
        assert reaped(child) == 0
