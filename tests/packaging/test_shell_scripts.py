"""The shell scripts of packaging/: executable, valid bash, and shellcheck-clean."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

SCRIPTS = sorted((Path(__file__).resolve().parents[2] / "packaging").glob("*.sh"))


def test_there_are_scripts() -> None:
    """The glob finds the scripts, so the checks below are not vacuous."""
    assert {p.name for p in SCRIPTS} >= {"refresh-token.sh", "container-entry.sh"}


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_executable_bash(script: Path) -> None:
    """Each script is executable, starts with `#!/usr/bin/env bash` and parses (bash -n)."""
    assert os.access(script, os.X_OK)
    assert script.read_text().startswith("#!/usr/bin/env bash\n")
    subprocess.run(["bash", "-n", str(script)], check=True)


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_shellcheck(script: Path) -> None:
    """shellcheck finds nothing, with every optional check on but brace style."""
    tool = shutil.which("shellcheck")
    if tool is None:
        pytest.skip("shellcheck is not installed (apt-get install shellcheck)")
    result = subprocess.run(
        [tool, "--enable=all", "--exclude=SC2250", str(script)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stdout
