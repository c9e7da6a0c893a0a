"""The process entry: it hides the packages the daemon never uses, and only in its process."""

from __future__ import annotations

import subprocess
import sys

import pytest

from gastown_sandboxd.__main__ import NEVER_USED

PROBE = """
import importlib.util, sys
from gastown_sandboxd.__main__ import NEVER_USED, hide_never_used
installed = [n for n in NEVER_USED if importlib.util.find_spec(n) is not None]
hide_never_used()
import httpx, structlog, gastown_sandboxd.cli, gastown_sandboxd.daemon
loaded = [n for n in NEVER_USED if sys.modules.get(n) is not None]
print(",".join(installed) + "|" + ",".join(loaded) + "|" + str(callable(httpx.get)))
"""


def test_the_entry_keeps_httpx_and_structlog_from_loading_what_the_daemon_never_uses() -> None:
    """In a fresh interpreter of this venv (where the test tools install rich, click and
    pygments), the daemon's whole import loads none of them, and httpx still works."""
    done = subprocess.run(
        [sys.executable, "-c", PROBE], capture_output=True, text=True, timeout=60, check=True
    )
    installed, loaded, works = done.stdout.strip().split("|")
    if not installed:
        pytest.skip("none of rich, click, pygments is installed: nothing to hide")
    assert loaded == ""
    assert works == "True"


def test_importing_the_package_hides_nothing() -> None:
    """Only the entry's `main` hides: a program importing the package keeps its modules."""
    code = (
        "import sys, gastown_sandboxd.cli, gastown_sandboxd.__main__\n"
        f"print(any(sys.modules.get(n, 0) is None for n in {NEVER_USED!r}))"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True
    )
    assert done.stdout.strip() == "False"


def test_the_command_runs_through_the_entry() -> None:
    """`python -m gastown_sandboxd --help` goes through `main` and prints the usage."""
    done = subprocess.run(
        [sys.executable, "-m", "gastown_sandboxd", "--help"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    assert "usage:" in done.stdout
