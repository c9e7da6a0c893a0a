"""The last-applied copy's folder, as `check` reports it."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from gastown_sandboxd.gtsettings.last_applied import LastApplied


def copy_in(folder: Path | None) -> LastApplied:
    return LastApplied(state_dir=folder, town_id="town-1")


def test_a_writable_folder_or_one_that_can_be_created_is_no_problem(tmp_path: Path) -> None:
    assert copy_in(tmp_path).folder_problem() is None
    assert copy_in(tmp_path / "a" / "b" / "state").folder_problem() is None
    assert copy_in(None).folder_problem() is None


def test_a_file_where_a_folder_must_be_is_named(tmp_path: Path) -> None:
    (tmp_path / "taken").write_text("")
    problem = copy_in(tmp_path / "taken" / "state").folder_problem()
    assert problem == f"{tmp_path / 'taken'} is not a folder"
    assert copy_in(tmp_path / "taken").folder_problem() == f"{tmp_path / 'taken'} is not a folder"


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into any folder")
def test_a_folder_without_write_permission_is_named(tmp_path: Path) -> None:
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    try:
        assert copy_in(locked).folder_problem() == f"{locked} cannot be written"
        problem = copy_in(locked / "state").folder_problem()
        assert problem == f"{locked / 'state'} cannot be created (in {locked})"
    finally:
        locked.chmod(0o700)
