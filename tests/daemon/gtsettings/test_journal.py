"""The intent journal and the descriptor-relative writer: crash recovery, leftovers, swaps."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from gastown_sandboxd.atomic import write_atomic_at
from gastown_sandboxd.errors import SettingsConflict
from gastown_sandboxd.gtsettings import journal
from gastown_sandboxd.gtsettings.batch import FileWrite, Target, write_all, write_target
from gastown_sandboxd.gtsettings.folders import open_town_root
from gastown_sandboxd.gtsettings.journal import JOURNAL, ROLLBACK, JournalEntry
from tests.daemon.gt_samples import RIG_SETTINGS, TOWN_SETTINGS, build_town

TOWN_FILE = "settings/config.json"
NEW_TOWN = b'{\n  "type": "town-settings",\n  "version": 1,\n  "default_agent": "codex"\n}\n'
NEW_RIG = b'{\n  "type": "rig-settings",\n  "version": 1,\n  "agent": "codex"\n}\n'


@pytest.fixture
def root(tmp_path: Path) -> Path:
    return build_town(tmp_path / "town", rigs=("backend", "docs", "frontend"))


def settings_files(root: Path) -> dict[str, bytes]:
    return {
        str(path.relative_to(root)): path.read_bytes()
        for path in sorted(root.glob("**/settings/config.json"))
    }


def leftovers(root: Path) -> list[str]:
    names = [p for p in root.rglob("*") if p.name.endswith(".tmp") or "journal" in p.name]
    return sorted(str(p.relative_to(root)) for p in names)


def journal_of(root: Path, entries: list[JournalEntry]) -> None:
    fd = open_town_root(root)
    try:
        journal.begin(fd, root, entries)
    finally:
        os.close(fd)


def four_files() -> list[JournalEntry]:
    return [
        JournalEntry(None, TOWN_SETTINGS, NEW_TOWN),
        JournalEntry("backend", RIG_SETTINGS, NEW_RIG),
        JournalEntry("docs", RIG_SETTINGS, NEW_RIG),
        JournalEntry("frontend", RIG_SETTINGS, NEW_RIG),
    ]


def test_a_crash_between_the_renames_is_rolled_forward(root: Path) -> None:
    """Journal written, two of four files renamed, then the crash: all four are new after."""
    journal_of(root, four_files())
    (root / TOWN_FILE).write_bytes(NEW_TOWN)
    (root / "backend" / TOWN_FILE).write_bytes(NEW_RIG)
    with capture_logs() as logs:
        recovery = journal.recover(root)
    assert recovery is not None
    assert (recovery.direction, recovery.files, recovery.new_at_start) == ("forward", 4, 2)
    assert recovery.mixed
    assert recovery.rewritten == ["docs/settings/config.json", "frontend/settings/config.json"]
    assert settings_files(root) == {
        TOWN_FILE: NEW_TOWN,
        **{f"{rig}/{TOWN_FILE}": NEW_RIG for rig in ("backend", "docs", "frontend")},
    }
    assert leftovers(root) == []
    assert [log["event"] for log in logs] == ["settings_journal_recovered"]
    assert logs[0]["mixed"] is True


def test_a_crash_before_the_first_rename_still_rolls_forward(root: Path) -> None:
    """The journal was whole: the change was decided, every file becomes new."""
    journal_of(root, four_files())
    recovery = journal.recover(root)
    assert recovery is not None
    assert (recovery.new_at_start, recovery.mixed) == (0, False)
    assert set(settings_files(root).values()) == {NEW_TOWN, NEW_RIG}


def test_a_crash_during_a_rollback_is_rolled_back(root: Path) -> None:
    """A rollback under way at the crash: every file goes back, a made file and folder go."""
    (root / "newrig").mkdir()
    before = settings_files(root)
    entries = [*four_files(), JournalEntry("newrig", None, NEW_RIG, made_folder=True)]
    journal_of(root, entries)
    fd = open_town_root(root)
    journal.turn_back(fd)
    os.close(fd)
    (root / TOWN_FILE).write_bytes(NEW_TOWN)
    (root / "newrig" / "settings").mkdir()
    (root / "newrig" / TOWN_FILE).write_bytes(NEW_RIG)
    recovery = journal.recover(root)
    assert recovery is not None
    assert recovery.direction == "back"
    assert settings_files(root) == before
    assert not (root / "newrig" / "settings").exists()
    assert leftovers(root) == []


def test_a_file_edited_by_someone_else_after_the_crash_is_left_alone(root: Path) -> None:
    """Neither the old nor the new bytes: someone else's edit, kept and named."""
    journal_of(root, four_files())
    (root / "docs" / TOWN_FILE).write_bytes(b'{"type": "rig-settings", "agent": "mine"}')
    recovery = journal.recover(root)
    assert recovery is not None
    assert recovery.left_alone == ["docs/settings/config.json"]
    assert (root / "docs" / TOWN_FILE).read_bytes() == b'{"type": "rig-settings", "agent": "mine"}'
    assert (root / TOWN_FILE).read_bytes() == NEW_TOWN


def test_a_rig_folder_swapped_for_a_symlink_after_the_crash_is_left_alone(
    root: Path, tmp_path: Path
) -> None:
    """Recovery never follows a symlink out of the town: that rig is logged and named, the
    outside file keeps its bytes, and the other files are rolled forward."""
    journal_of(root, four_files())
    outside = tmp_path / "outside"
    (outside / "settings").mkdir(parents=True)
    (outside / TOWN_FILE).write_bytes(RIG_SETTINGS)
    os.rename(root / "docs", tmp_path / "docs-real")
    os.symlink(outside, root / "docs")
    with capture_logs() as logs:
        recovery = journal.recover(root)
    assert recovery is not None
    assert recovery.left_alone == ["docs/settings/config.json"]
    assert (outside / TOWN_FILE).read_bytes() == RIG_SETTINGS
    assert (root / TOWN_FILE).read_bytes() == NEW_TOWN
    assert (root / "frontend" / TOWN_FILE).read_bytes() == NEW_RIG
    events = [log["event"] for log in logs]
    assert events == ["settings_journal_folder_unusable", "settings_journal_recovered"]
    assert leftovers(root) == []


def test_a_new_rig_file_whose_folder_was_never_made_is_made_by_the_roll_forward(
    root: Path,
) -> None:
    """The crash came after the journal and before the new rig's `settings` folder was
    made: rolling forward makes the folder and the file."""
    (root / "newrig").mkdir()
    journal_of(root, [*four_files(), JournalEntry("newrig", None, NEW_RIG, made_folder=True)])
    recovery = journal.recover(root)
    assert recovery is not None
    assert "newrig/settings/config.json" in recovery.rewritten
    assert (root / "newrig" / TOWN_FILE).read_bytes() == NEW_RIG


def test_a_file_the_replay_cannot_write_is_left_alone_and_logged(
    root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A write refused during recovery (the disk full, say) stops only that file: it is
    named, and the daemon starts with the others recovered."""

    def refuse_docs(dir_fd: int, name: str, data: bytes, **kwargs: object) -> object:
        if "docs" in str(kwargs.get("folder")):
            raise OSError(28, "No space left on device")
        return write_atomic_at(dir_fd, name, data, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(journal, "write_atomic_at", refuse_docs)
    journal_of(root, four_files())
    with capture_logs() as logs:
        recovery = journal.recover(root)
    assert recovery is not None
    assert recovery.left_alone == ["docs/settings/config.json"]
    assert (root / "docs" / TOWN_FILE).read_bytes() == RIG_SETTINGS
    assert (root / "backend" / TOWN_FILE).read_bytes() == NEW_RIG
    failed = [log for log in logs if log["event"] == "settings_journal_replay_failed"]
    assert [log["error"] for log in failed] == ["[Errno 28] No space left on device"]


def test_an_unreadable_journal_is_dropped_and_nothing_changes(root: Path) -> None:
    """A journal that is not ours to trust is logged and removed; the files stay."""
    before = settings_files(root)
    (root / JOURNAL).write_text("{not json")
    with capture_logs() as logs:
        assert journal.recover(root) is None
    assert settings_files(root) == before
    assert not (root / JOURNAL).exists()
    assert "settings_journal_unreadable" in [log["event"] for log in logs]


def test_a_journal_naming_a_path_out_of_the_town_is_refused(root: Path, tmp_path: Path) -> None:
    """A rig name with a slash in a journal is not replayed (nothing is written outside)."""
    entry = JournalEntry(None, TOWN_SETTINGS, NEW_TOWN).as_json()
    entry["rig"] = "../outside"
    (root / JOURNAL).write_text(json.dumps({"format": 1, "entries": [entry]}))
    assert journal.recover(root) is None
    assert (root / TOWN_FILE).read_bytes() == TOWN_SETTINGS
    assert not (tmp_path / "outside").exists()


def test_leftover_temporaries_of_killed_writers_are_removed(root: Path) -> None:
    """`.config.json.*.tmp` in settings folders and the journal's temporaries go; others stay."""
    garbage = [
        root / "settings" / ".config.json.ab12cd34.tmp",
        root / "docs" / "settings" / ".config.json.ab12cd34.old.tmp",
        root / f"{JOURNAL}.0011aabb.tmp",
    ]
    kept = [root / "settings" / "notes.tmp", root / "docs" / ".config.json.x.tmp"]
    for path in garbage + kept:
        path.write_text("partial")
    assert journal.recover(root) is None
    assert [p.exists() for p in garbage] == [False, False, False]
    assert [p.exists() for p in kept] == [True, True]


def test_write_all_leaves_no_journal_and_no_temporary(root: Path) -> None:
    """A four-file change writes every file and leaves nothing else behind."""
    writes = [
        FileWrite(None, NEW_TOWN, TOWN_SETTINGS),
        *(FileWrite(rig, NEW_RIG, RIG_SETTINGS) for rig in ("backend", "docs", "frontend")),
    ]
    write_all(root, writes)
    assert set(settings_files(root).values()) == {NEW_TOWN, NEW_RIG}
    assert leftovers(root) == []


def test_the_journal_is_on_disk_while_the_files_are_renamed(root: Path) -> None:
    """Every rename of a multi-file change happens while the journal names the change."""
    seen: list[bool] = []

    def watching(target: Target, data: bytes) -> object:
        seen.append((root / JOURNAL).exists())
        return write_target(target, data)

    writes = [FileWrite(None, NEW_TOWN, TOWN_SETTINGS), FileWrite("docs", NEW_RIG, RIG_SETTINGS)]
    write_all(root, writes, watching)
    assert seen == [True, True]
    assert not (root / JOURNAL).exists()


def test_a_single_file_change_needs_no_journal(root: Path) -> None:
    """One file is one rename: atomic without a journal."""
    seen: list[bool] = []

    def watching(target: Target, data: bytes) -> object:
        seen.append((root / JOURNAL).exists())
        return write_target(target, data)

    write_all(root, [FileWrite(None, NEW_TOWN, TOWN_SETTINGS)], watching)
    assert seen == [False]


def test_a_file_changed_since_it_was_read_stops_the_change(root: Path) -> None:
    """The bytes under the descriptor are not those planned on: 409, nothing written."""
    (root / "docs" / TOWN_FILE).write_bytes(b'{"type": "rig-settings"}')
    before = settings_files(root)
    writes = [FileWrite(None, NEW_TOWN, TOWN_SETTINGS), FileWrite("docs", NEW_RIG, RIG_SETTINGS)]
    with pytest.raises(SettingsConflict) as caught:
        write_all(root, writes)
    assert caught.value.status == 409
    assert "docs/settings/config.json changed" in caught.value.message
    assert settings_files(root) == before
    assert leftovers(root) == []


def test_a_rig_folder_that_is_a_symlink_at_write_time_is_refused(
    root: Path, tmp_path: Path
) -> None:
    """A rig swapped for a symlink out of the town before the write: 409, outside untouched."""
    outside = tmp_path / "outside"
    (outside / "settings").mkdir(parents=True)
    (outside / "settings" / "config.json").write_bytes(RIG_SETTINGS)
    os.rename(root / "docs", tmp_path / "docs-real")
    os.symlink(outside, root / "docs")
    writes = [FileWrite(None, NEW_TOWN, TOWN_SETTINGS), FileWrite("docs", NEW_RIG, RIG_SETTINGS)]
    with pytest.raises(SettingsConflict, match="no longer a real folder"):
        write_all(root, writes)
    assert (outside / "settings" / "config.json").read_bytes() == RIG_SETTINGS
    assert (root / TOWN_FILE).read_bytes() == TOWN_SETTINGS


@pytest.mark.parametrize("kind", ["symlink", "fifo"])
def test_a_settings_file_that_is_no_regular_file_at_write_time_is_refused(
    root: Path, tmp_path: Path, kind: str
) -> None:
    """config.json swapped for a symlink (to a file outside the town) or a FIFO after the
    change was planned: 409 naming the file, nothing written, the outside file untouched."""
    outside = tmp_path / "outside.json"
    outside.write_bytes(RIG_SETTINGS)
    target = root / "docs" / TOWN_FILE
    target.unlink()
    if kind == "symlink":
        target.symlink_to(outside)
    else:
        os.mkfifo(target)
    writes = [FileWrite(None, NEW_TOWN, TOWN_SETTINGS), FileWrite("docs", NEW_RIG, RIG_SETTINGS)]
    with pytest.raises(SettingsConflict) as caught:
        write_all(root, writes)
    assert caught.value.status == 409
    assert caught.value.message == (
        "docs/settings/config.json is not a regular file any more; nothing was written"
    )
    assert outside.read_bytes() == RIG_SETTINGS
    assert (root / TOWN_FILE).read_bytes() == TOWN_SETTINGS
    assert leftovers(root) == []


def test_a_swap_after_the_folder_was_opened_cannot_redirect_the_write(
    root: Path, tmp_path: Path
) -> None:
    """The swap lands between the check and the rename: the write goes to the folder that
    was checked (now moved aside), never through the symlink."""
    outside = tmp_path / "outside"
    (outside / "settings").mkdir(parents=True)
    (outside / "settings" / "config.json").write_bytes(RIG_SETTINGS)

    def swap_then_write(target: Target, data: bytes) -> object:
        if target.path.parts[-3] == "docs":
            os.rename(root / "docs", tmp_path / "docs-real")
            os.symlink(outside, root / "docs")
        return write_target(target, data)

    writes = [FileWrite(None, NEW_TOWN, TOWN_SETTINGS), FileWrite("docs", NEW_RIG, RIG_SETTINGS)]
    write_all(root, writes, swap_then_write)
    assert (outside / "settings" / "config.json").read_bytes() == RIG_SETTINGS
    assert sorted(p.name for p in (outside / "settings").iterdir()) == ["config.json"]
    assert (tmp_path / "docs-real" / TOWN_FILE).read_bytes() == NEW_RIG


def test_a_settings_folder_that_is_a_symlink_is_refused(root: Path, tmp_path: Path) -> None:
    """`<rig>/settings` leading elsewhere is no folder of the town: 409, nothing written."""
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    (outside / "config.json").write_bytes(RIG_SETTINGS)
    os.rename(root / "docs" / "settings", tmp_path / "moved")
    os.symlink(outside, root / "docs" / "settings")
    with pytest.raises(SettingsConflict):
        write_all(root, [FileWrite("docs", NEW_RIG, RIG_SETTINGS)])
    assert (outside / "config.json").read_bytes() == RIG_SETTINGS


def test_the_rollback_marker_survives_a_failure_to_put_files_back(root: Path) -> None:
    """`turn_back` renames the journal, so a crash during a rollback rolls back."""
    journal_of(root, four_files())
    fd = open_town_root(root)
    try:
        journal.turn_back(fd)
        assert (root / ROLLBACK).exists()
        assert not (root / JOURNAL).exists()
        journal.finish(fd)
    finally:
        os.close(fd)
    assert leftovers(root) == []
