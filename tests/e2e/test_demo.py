"""`make demo` runs to the end by itself and leaves nothing running or behind."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest


@pytest.mark.slow
def test_demo_runs_to_the_end_and_cleans_up(request: pytest.FixtureRequest) -> None:
    """The demo exits 0 after showing every step, removes its folder and kills its children."""
    # A short TMPDIR: the demo's socket lives there, and a Unix socket path has 107 bytes.
    short = Path(tempfile.mkdtemp(prefix="demo-", dir="/tmp"))
    request.addfinalizer(lambda: shutil.rmtree(short, ignore_errors=True))
    tmp_path = short
    env = dict(os.environ, TMPDIR=str(tmp_path))
    done = subprocess.run(
        [sys.executable, "-m", "gastown_cloud.demo"],
        env=env,
        capture_output=True,
        text=True,
        timeout=150,
        check=False,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    out = done.stdout
    for step in (
        "createTown minted the initial token",
        "next refresh",
        "refresh 1:",
        "refresh 2:",
        "the cloud forwarded it to the sandbox: HTTP 200",
        # The settings view shows the agent the PATCH just wrote, with its wrapper.
        '"kilo-sonnet": {\n                  "provider": "claude"',
        "subscriber got its event #3, config.changed",
        "the agent's answer",
        '"userId": "user-ada"',
        "done: nothing left running",
    ):
        assert step in out
    # The demo never prints a token: only claims and fingerprints.
    assert "eyJ" not in out
    assert list(tmp_path.iterdir()) == []
    assert tempfile.gettempdir()  # the demo's own folder lived under TMPDIR, now empty
    leftovers = subprocess.run(
        ["pgrep", "-f", str(tmp_path)], capture_output=True, text=True, check=False
    )
    assert leftovers.stdout.strip() == ""
