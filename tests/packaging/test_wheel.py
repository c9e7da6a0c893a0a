"""The wheel carries what the installed daemon runs beside its Python modules."""

from __future__ import annotations

import zipfile
from pathlib import Path

from hatchling.builders.wheel import WheelBuilder

ROOT = Path(__file__).resolve().parents[2]


def test_the_wheel_carries_the_token_helper(tmp_path: Path) -> None:
    """Claude Code's apiKeyHelper line names `token_helper.sh` in the installed package: the
    wheel built from this tree holds it, beside the module that names it."""
    (wheel,) = WheelBuilder(str(ROOT)).build(directory=str(tmp_path), versions=["standard"])
    names = zipfile.ZipFile(wheel).namelist()
    assert "gastown_sandboxd/agents/token_helper.sh" in names
    assert "gastown_sandboxd/agents/claude.py" in names
