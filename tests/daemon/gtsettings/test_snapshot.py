"""Cached reads of settings files: served from memory only while stat says nothing changed."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st
from starlette.responses import JSONResponse

from gastown_sandboxd.gtsettings import snapshot
from gastown_sandboxd.gtsettings.layout import rig_files, rig_folder, rig_names
from gastown_sandboxd.gtsettings.snapshot import (
    FileState,
    Snapshot,
    cached_snapshot,
    forget,
    read_file,
    read_snapshot,
)
from gastown_sandboxd.gtsettings.store import ConfigView, PatchResult

TOWN = b'{"type": "town-settings", "version": 1, "default_agent": "claude"}\n'
OTHER = b'{"type": "town-settings", "version": 1, "default_agent": "codex!"}\n'


def next_tick(folder: Path) -> None:
    """Return once the file system's (coarse) clock has moved past every stamp made so far."""
    probe = folder / ".tick"
    probe.write_bytes(b"")
    first = probe.stat().st_ctime_ns
    deadline = time.monotonic() + 5
    while probe.stat().st_ctime_ns == first and time.monotonic() < deadline:
        probe.write_bytes(b"")
    probe.unlink()


@pytest.fixture
def no_quiet_wait(monkeypatch: pytest.MonkeyPatch) -> None:
    """Trust a file as soon as its stamps are behind the read (not a second behind)."""
    monkeypatch.setattr(snapshot, "QUIET_NS", 0)


@pytest.fixture
def town_file(tmp_path: Path) -> Path:
    path = tmp_path / "settings" / "config.json"
    path.parent.mkdir()
    path.write_bytes(TOWN)
    return path


@pytest.mark.usefixtures("no_quiet_wait")
def test_a_quiet_unchanged_file_is_not_read_again(town_file: Path) -> None:
    """Same stamp, file already quiet when read: the same parsed state comes back."""
    next_tick(town_file.parent)
    first = read_file(town_file, "town", "settings/config.json")
    assert first.doc is not None
    assert first.doc["default_agent"] == "claude"
    assert read_file(town_file, "town", "settings/config.json") is first
    forget([town_file])
    again = read_file(town_file, "town", "settings/config.json")
    assert again is not first
    assert again == first


def test_a_fresh_file_is_always_read(town_file: Path) -> None:
    """A file modified within the last second is read each time (timestamps are coarse)."""
    assert snapshot.QUIET_NS == 1_000_000_000
    first = read_file(town_file, "town", "settings/config.json")
    town_file.write_bytes(OTHER)  # same size, in place, likely the same tick
    second = read_file(town_file, "town", "settings/config.json")
    assert second.doc is not None
    assert second.doc["default_agent"] == "codex!"
    assert first.doc is not None
    assert first.doc["default_agent"] == "claude"


@pytest.mark.usefixtures("no_quiet_wait")
def test_an_in_place_edit_of_a_quiet_file_is_seen(town_file: Path) -> None:
    """Same size, mtime put back: the ctime still moves, so the edit is read."""
    next_tick(town_file.parent)
    first = read_file(town_file, "town", "settings/config.json")
    assert read_file(town_file, "town", "settings/config.json") is first  # cached
    stamp = town_file.stat()
    next_tick(town_file.parent)
    with town_file.open("r+b") as handle:
        handle.write(OTHER)
    os.utime(town_file, ns=(stamp.st_atime_ns, stamp.st_mtime_ns))
    state = read_file(town_file, "town", "settings/config.json")
    assert state.doc is not None
    assert state.doc["default_agent"] == "codex!"


@pytest.mark.usefixtures("no_quiet_wait")
def test_a_replaced_or_removed_file_is_seen(town_file: Path) -> None:
    """An atomic rename (new inode) and a deletion both show on the next read."""
    next_tick(town_file.parent)
    read_file(town_file, "town", "settings/config.json")
    staged = town_file.with_name(".config.json.x.tmp")
    staged.write_bytes(OTHER)
    os.replace(staged, town_file)
    state = read_file(town_file, "town", "settings/config.json")
    assert state.doc is not None
    assert state.doc["default_agent"] == "codex!"
    town_file.unlink()
    assert read_file(town_file, "town", "settings/config.json").raw is None


def test_snapshot_and_rig_listing_agree_with_rig_folder(tmp_path: Path) -> None:
    """The listing's verdicts are rig_folder's: plain folders with plain settings only."""
    root = tmp_path / "gt"
    (root / "settings").mkdir(parents=True)
    for name in ("alpha", "beta", "mayor", ".hidden", "with-dash"):
        (root / name / "settings").mkdir(parents=True)
    (root / "alpha" / "settings" / "config.json").write_text('{"type": "rig-settings"}')
    (root / "linked").symlink_to(root / "alpha")
    outside = tmp_path / "outside"
    outside.mkdir()
    (root / "gamma").mkdir()
    (root / "gamma" / "settings").symlink_to(outside)
    (root / "notes.txt").write_text("x")
    names = sorted(entry.name for entry in root.iterdir())
    assert rig_names(root) == [name for name in names if rig_folder(root, name) is not None]
    assert rig_names(root) == ["alpha", "beta"]
    snapshot = read_snapshot(root)
    assert sorted(rig for rig in snapshot.files if rig is not None) == ["alpha", "beta"]


def test_rig_files_hand_each_rigs_lstat_or_error_to_the_reader(tmp_path: Path) -> None:
    """Each rig with what lstat said of its file: a stat for a file (or anything but a
    symlink), the error where there is none; the snapshot reads each accordingly. The town
    file's symlink inside the root passes the confinement check and fails the read."""
    root = tmp_path / "gt"
    (root / "settings").mkdir(parents=True)
    (root / "settings" / "real.json").write_bytes(TOWN)
    # A town file that is a symlink, even one inside the root, is unreadable (read with
    # O_NOFOLLOW), and named so; nothing is read through it.
    (root / "settings" / "config.json").symlink_to("real.json")
    for name in ("alpha", "beta", "gamma"):
        (root / name).mkdir()
    (root / "alpha" / "settings").mkdir()
    (root / "alpha" / "settings" / "config.json").write_text('{"type": "rig-settings"}')
    (root / "beta" / "settings").mkdir()  # no file
    (root / "gamma" / "settings").write_text("a file where the folder should be")
    (root / "delta" / "settings" / "config.json").mkdir(parents=True)  # a folder, no file
    found = dict(rig_files(root))
    assert list(found) == ["alpha", "beta", "delta", "gamma"]
    alpha = found["alpha"]
    assert isinstance(alpha, os.stat_result)
    assert alpha.st_ino == (root / "alpha" / "settings" / "config.json").stat().st_ino
    assert isinstance(found["beta"], FileNotFoundError)
    assert isinstance(found["gamma"], NotADirectoryError)
    assert isinstance(found["delta"], os.stat_result)
    files = read_snapshot(root).files
    assert files[None].raw is None
    assert "settings/config.json cannot be read" in (files[None].error or "")
    assert files["alpha"].doc == {"type": "rig-settings"}
    assert (files["beta"].raw, files["beta"].error) == (None, None)
    assert (files["gamma"].raw, files["gamma"].error) == (None, None)
    assert "delta/settings/config.json" in (files["delta"].error or "")


def test_a_snapshot_stats_each_file_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Two lstats a file (its folder's and its own, which is also its stat) and no stat."""
    root = tmp_path / "gt"
    (root / "settings").mkdir(parents=True)
    (root / "settings" / "config.json").write_bytes(TOWN)
    for rig in ("one", "two", "three"):
        (root / rig / "settings").mkdir(parents=True)
        (root / rig / "settings" / "config.json").write_text('{"type": "rig-settings"}')
    read_snapshot(root)
    calls: dict[str, int] = {"stat": 0, "lstat": 0}
    real_stat, real_lstat = os.stat, os.lstat

    def counted_stat(*args: object, **kwargs: object) -> os.stat_result:
        calls["stat"] += 1
        return real_stat(*args, **kwargs)  # type: ignore[arg-type]

    def counted_lstat(*args: object, **kwargs: object) -> os.stat_result:
        calls["lstat"] += 1
        return real_lstat(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(os, "stat", counted_stat)
    monkeypatch.setattr(os, "lstat", counted_lstat)
    snapshot_again = read_snapshot(root)
    monkeypatch.undo()
    assert sorted(rig or "" for rig in snapshot_again.files) == ["", "one", "three", "two"]
    assert calls == {"stat": 0, "lstat": 2 * 4}


@pytest.mark.usefixtures("no_quiet_wait")
def test_a_cached_snapshot_is_served_from_stats_or_not_at_all(town_file: Path) -> None:
    """`cached_snapshot` gives what `read_snapshot` would, or None when a file must be read."""
    root = town_file.parent.parent
    next_tick(town_file.parent)
    forget([town_file])
    assert cached_snapshot(root) is None  # never read: only a read can tell
    read = read_snapshot(root)
    served = cached_snapshot(root)
    assert served is not None
    assert served.files[None] is read.files[None]
    assert served.revision() == read.revision()
    next_tick(town_file.parent)
    town_file.write_bytes(OTHER)  # a new stamp: the cached bytes no longer count
    assert cached_snapshot(root) is None
    assert read_snapshot(root).files[None].raw == OTHER


_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=6),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner, max_size=3)
    ),
    max_leaves=8,
)
_town_docs = st.dictionaries(
    st.sampled_from(["type", "default_agent", "agents", "role_agents", "crew_agents", "other"]),
    _values,
    max_size=5,
)
_rig_docs = st.dictionaries(
    st.sampled_from(["type", "agent", "agents", "worker_agents", "role_effort", "x"]),
    _values,
    max_size=4,
)


@given(
    town=st.none() | _town_docs,
    rigs=st.dictionaries(
        st.from_regex(r"[A-Za-z0-9_]{1,8}", fullmatch=True), st.none() | _rig_docs, max_size=4
    ),
    files=st.lists(st.text(max_size=8), max_size=3),
    changed=st.booleans(),
)
def test_answers_from_kept_texts_are_the_bytes_json_response_sends(
    town: dict[str, object] | None,
    rigs: dict[str, dict[str, object] | None],
    files: list[str],
    changed: bool,
) -> None:
    """GET /config and PATCH /config send texts each file's view keeps, assembled: the same
    bytes Starlette's `JSONResponse` makes of `as_json()`, whatever the documents hold
    (non-ASCII, nesting, floats, rigs without a file, a town without one)."""
    states: dict[str | None, FileState] = {None: FileState(doc=town)}
    states.update({rig: FileState(doc=doc) for rig, doc in rigs.items()})
    snap = Snapshot(states)
    view = ConfigView(snapshot=snap, revision=snap.revision())
    assert view.json_bytes() == JSONResponse(view.as_json()).body
    result = PatchResult(changed, snap.revision(), files, snap)
    assert result.json_bytes() == JSONResponse(result.as_json()).body
    again = PatchResult(changed, snap.revision(), files, snap)  # the kept texts, reused
    assert again.json_bytes() == result.json_bytes()
