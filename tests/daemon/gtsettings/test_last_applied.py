"""The last-applied copy: kept across runs, refused when unreadable, and its folder as
`check` reports it."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from gastown_sandboxd.gtsettings.last_applied import LastApplied
from tests.fixtures.fsyncs import record_fsyncs


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


def test_the_copy_one_run_records_is_the_one_the_next_run_loads(tmp_path: Path) -> None:
    """Written 0600 with its nulls dropped (a null removes a key, it is never a value); an
    unchanged copy is not written again."""
    first = copy_in(tmp_path)
    assert first.record(3, {"town": {"default_agent": "codex", "default_model": None}})
    assert first.path is not None
    assert stat.S_IMODE(first.path.stat().st_mode) == 0o600
    assert not first.record(3, {"town": {"default_agent": "codex"}})
    loaded = copy_in(tmp_path).load()
    assert (loaded.generation, loaded.desired) == (3, {"town": {"default_agent": "codex"}})


def test_a_push_is_there_for_the_next_run_at_once_and_fsynced_when_made_durable(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A sync's save is fsynced at once; a push's is whole on disk before `record_push`
    returns (what a run after a SIGKILL loads) but not fsynced: `make_durable` fsyncs it and
    its folder once, however often it is asked."""
    fsynced = record_fsyncs(monkeypatch)
    copy = copy_in(tmp_path)
    assert copy.record(4, {"town": {"default_agent": "codex"}})
    assert (copy.durable, fsynced) == (True, ["file", "folder"])
    assert copy.record_push({"town": {"role_effort": {"mayor": "high"}}}, 5)
    assert (copy.durable, fsynced) == (False, ["file", "folder"])
    loaded = copy_in(tmp_path).load()
    assert (loaded.generation, loaded.desired) == (
        5,
        {"town": {"default_agent": "codex", "role_effort": {"mayor": "high"}}},
    )
    copy.make_durable()
    copy.make_durable()
    assert (copy.durable, fsynced) == (True, ["file", "folder", "file", "folder"])


def test_a_copy_that_cannot_be_fsynced_is_logged_and_kept(tmp_path: Path) -> None:
    """Its file gone before the fsync (someone cleaned the state folder): one log line, and
    the copy in memory stands."""
    copy = copy_in(tmp_path)
    assert copy.record_push({"town": {"default_agent": "codex"}}, 2)
    assert copy.path is not None
    copy.path.unlink()
    with capture_logs() as logs:
        copy.make_durable()
    assert [(entry["event"], entry["log_level"]) for entry in logs] == [
        ("last_applied_not_fsynced", "warning")
    ]
    assert copy.durable
    assert copy.applied.desired == {"town": {"default_agent": "codex"}}


def test_a_copy_in_memory_only_has_nothing_to_fsync() -> None:
    copy = copy_in(None)
    assert copy.record_push({"town": {"default_agent": "codex"}}, 1)
    assert copy.durable
    copy.make_durable()


@pytest.mark.parametrize(
    "content",
    [
        b"{not json",
        b"[3]",
        b'{"town_id": "town-1", "generation": "3", "desired": {}}',
        b'{"town_id": "town-1", "generation": 3, "desired": []}',
        b'{"town_id": "town-1", "desired": {}}',
    ],
    ids=["not-json", "not-an-object", "generation-text", "desired-list", "no-generation"],
)
def test_a_copy_that_cannot_be_read_counts_as_none_and_is_logged(
    tmp_path: Path, content: bytes
) -> None:
    """The next sync then sets what the cloud wants and removes nothing; the file is left
    for whoever wants to look at it (the next record replaces it)."""
    path = tmp_path / "desired-config.json"
    path.write_bytes(content)
    with capture_logs() as logs:
        loaded = copy_in(tmp_path).load()
    assert (loaded.generation, loaded.desired) == (None, {})
    assert [entry["event"] for entry in logs] == ["last_applied_unreadable"]
    assert path.read_bytes() == content


def test_a_copy_that_is_a_folder_counts_as_none_and_is_logged(tmp_path: Path) -> None:
    (tmp_path / "desired-config.json").mkdir()
    with capture_logs() as logs:
        loaded = copy_in(tmp_path).load()
    assert loaded.generation is None
    assert [(e["event"], e["error"]) for e in logs] == [
        ("last_applied_unreadable", "Is a directory")
    ]


def test_a_copy_of_the_town_is_used_and_one_of_another_town_is_not(tmp_path: Path) -> None:
    path = tmp_path / "desired-config.json"
    document = {"format": 1, "town_id": "town-2", "generation": 5, "desired": {"town": {}}}
    path.write_text(json.dumps(document))
    with capture_logs() as logs:
        assert copy_in(tmp_path).load().generation is None
    assert [entry["event"] for entry in logs] == ["last_applied_of_another_town"]
    assert LastApplied(state_dir=tmp_path, town_id="town-2").load().generation == 5


def test_hold_keeps_the_keys_of_both_until_the_record_after_the_write(tmp_path: Path) -> None:
    """Before a write, `hold` saves the keys of the copy and of the change (a restart after
    a kill in the write reads them all); the `record` after the write keeps the change's
    alone. A hold that adds nothing saves nothing; its generation is the newer one."""
    copy = copy_in(tmp_path)
    copy.record(3, {"town": {"crew_agents": {"a": "codex", "b": "claude"}, "default_agent": "x"}})
    change = {"town": {"crew_agents": {"a": "gemini", "b": None, "c": "codex"}}}
    copy.hold(4, change)
    held = {
        "town": {"crew_agents": {"a": "gemini", "b": "claude", "c": "codex"}, "default_agent": "x"}
    }
    reread = copy_in(tmp_path).load()
    assert (reread.generation, reread.desired) == (4, held)
    saved = (tmp_path / "desired-config.json").stat().st_mtime_ns
    copy.hold(2, {"town": {"crew_agents": {"a": "gemini"}}})
    assert (tmp_path / "desired-config.json").stat().st_mtime_ns == saved
    assert copy.applied.generation == 4
    copy.record(4, change)
    assert copy_in(tmp_path).load().desired == {
        "town": {"crew_agents": {"a": "gemini", "c": "codex"}}
    }
