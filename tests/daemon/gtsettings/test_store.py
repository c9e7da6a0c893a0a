"""The settings store on real files: views, PATCH transactions, confinement and external edits."""

from __future__ import annotations

import dataclasses
import errno
import functools
import json
import os
import shutil
import stat
import threading
from pathlib import Path
from typing import Any

import anyio
import pytest
from structlog.testing import capture_logs

from gastown_sandboxd.atomic import write_atomic
from gastown_sandboxd.errors import (
    PatchInvalid,
    PreconditionFailed,
    SettingsFileUnreadable,
    StorageUnavailable,
)
from gastown_sandboxd.events.types import DomainEvent
from gastown_sandboxd.gtsettings import snapshot as snapshot_module
from gastown_sandboxd.gtsettings.batch import Target, write_target
from gastown_sandboxd.gtsettings.folders import read_settings_file
from gastown_sandboxd.gtsettings.last_applied import Applied, LastApplied
from gastown_sandboxd.gtsettings.patch import managed_view
from gastown_sandboxd.gtsettings.schema import pointer
from gastown_sandboxd.gtsettings.store import SettingsStore
from gastown_sandboxd.own_writes import OWN_WRITES
from tests.daemon.gt_samples import (
    RIG_SETTINGS,
    RIGS,
    TOWN_SETTINGS,
    build_town,
    members,
    rig_doc,
    town_doc,
)

TOWN_FILE = Path("settings/config.json")


class Events:
    """An `emit` that records what it is given."""

    def __init__(self) -> None:
        self.seen: list[tuple[str, dict[str, Any]]] = []

    def __call__(self, event: DomainEvent, /) -> None:
        self.seen.append((event.TYPE, event.fields()))

    @property
    def fields(self) -> list[dict[str, Any]]:
        return [fields for _, fields in self.seen]


class FailingWrite:
    """The atomic writer, except that writing `fail_on` raises `error`."""

    def __init__(self, fail_on: Path, error: BaseException) -> None:
        self.fail_on = fail_on
        self.error = error
        self.calls: list[Path] = []

    def __call__(self, target: Target, data: bytes) -> object:
        self.calls.append(target.path)
        if target.path == self.fail_on:
            raise self.error
        return write_target(target, data)


@pytest.fixture
def root(tmp_path: Path) -> Path:
    return build_town(tmp_path / "town")


@pytest.fixture
def events() -> Events:
    return Events()


@pytest.fixture
async def store(root: Path, events: Events) -> SettingsStore:
    settings_store = SettingsStore(town_root=root, emit=events)
    await settings_store.load()
    return settings_store


def _tree(base: Path) -> dict[str, bytes | str]:
    # Every entry under `base`: file bytes, "dir" or the target of a symlink.
    found: dict[str, bytes | str] = {}
    for folder, dirs, files in os.walk(base):
        for name in dirs + files:
            path = Path(folder) / name
            key = str(path.relative_to(base))
            if path.is_symlink():
                found[key] = "-> " + os.readlink(path)
            elif path.is_dir():
                found[key] = "dir"
            else:
                found[key] = path.read_bytes()
    return found


# --- views --------------------------------------------------------------------------------


async def test_view_lists_the_town_and_every_rig_with_a_settings_file(
    root: Path, store: SettingsStore, tmp_path: Path
) -> None:
    """Rigs with settings are listed; folders without, the town's own and escapes are not."""
    (root / "empty").mkdir()
    (root / "mayor" / "settings").mkdir()
    (root / "mayor" / "settings" / "config.json").write_bytes(RIG_SETTINGS)
    (root / "my-rig" / "settings").mkdir(parents=True)
    (root / "my-rig" / "settings" / "config.json").write_bytes(RIG_SETTINGS)
    outside = tmp_path / "outside"
    (outside / "settings").mkdir(parents=True)
    (outside / "settings" / "config.json").write_bytes(RIG_SETTINGS)
    (root / "escape").symlink_to(outside)
    view = await store.view()
    assert view.town == managed_view(town_doc(), "town")
    assert list(view.rigs) == sorted(RIGS)
    assert view.rigs["frontend"] == {"agent": "claude", "role_agents": {"polecat": "codex"}}
    assert view.revision == store.revision
    assert view.as_json() == {"town": view.town, "rigs": view.rigs, "revision": view.revision}
    assert json.loads(json.dumps(view.as_json())) == view.as_json()


async def test_view_of_an_empty_or_missing_town(tmp_path: Path, events: Events) -> None:
    """A town root without settings, or not there at all, has an empty view."""
    for root in (tmp_path, tmp_path / "missing"):
        store = SettingsStore(town_root=root, emit=events)
        await store.load()
        view = await store.view()
        assert (view.town, view.rigs) == ({}, {})
        assert view.revision == store.revision


async def test_view_refuses_unreadable_files_naming_each(root: Path, store: SettingsStore) -> None:
    """GET /config cannot describe a file it cannot read: one detail per such file."""
    (root / "docs" / "settings" / "config.json").write_bytes(b"{oops")
    (root / "frontend" / "settings" / "config.json").write_bytes(b'{"version": 9}')
    with pytest.raises(SettingsFileUnreadable) as caught:
        await store.view()
    assert [d.path for d in caught.value.details] == ["/rigs/docs", "/rigs/frontend"]
    assert "docs/settings/config.json is not valid JSON" in caught.value.message


async def test_rig_names_and_watched_folders(root: Path, store: SettingsStore) -> None:
    """The watcher gets every rig and the settings folders that exist, never the town's own."""
    (root / "newrig").mkdir()
    (root / "notes.txt").write_text("x")
    assert store.rig_names() == ["backend", "docs", "frontend", "newrig"]
    expected = [root / "settings"]
    for rig in RIGS:
        expected += [root / rig, root / rig / "settings"]
    expected.append(root / "newrig")
    assert store.watched_folders() == expected


# --- PATCH: round trips and results -------------------------------------------------------


async def test_patch_round_trip_keeps_every_other_key_byte_exact(
    root: Path, store: SettingsStore, events: Events
) -> None:
    """Managed keys change; every other key keeps its value, its place and its exact text."""
    body = {
        "town": {
            "agents": {
                "kilo-sonnet": {
                    "provider": "claude",
                    "command": "claude",
                    "args": ["--model", "anthropic/claude-sonnet-4.5"],
                    "env": {"ANTHROPIC_BASE_URL": "https://api.kilo.ai/api/gateway"},
                }
            },
            "role_agents": {"mayor": "kilo-sonnet", "polecat": None},
            "role_effort": {"mayor": "max"},
        },
        "rigs": {"frontend": {"role_agents": {"polecat": "kilo-sonnet"}, "agent": None}},
    }
    result = await store.patch(body)
    assert result.changed is True
    assert result.files == ["settings/config.json", "frontend/settings/config.json"]
    town_bytes = (root / TOWN_FILE).read_bytes()
    town = json.loads(town_bytes)
    assert list(town) == list(town_doc())
    before, after = members(TOWN_SETTINGS), members(town_bytes)
    assert {k for k in before if before[k] != after[k]} == {"agents", "role_agents", "role_effort"}
    assert "exec_wrapper" not in town["agents"]["kilo-sonnet"]  # the shims wrap agents
    assert town["agents"]["codex-default"]["args"] is None
    assert town["agents"]["opencode-bare"]["args"] == []
    assert town["role_agents"] == {"mayor": "kilo-sonnet", "witness": "claude-haiku"}
    rig_bytes = (root / "frontend" / TOWN_FILE).read_bytes()
    rig = json.loads(rig_bytes)
    assert list(rig) == ["type", "version", "merge_queue", "namepool", "role_agents", "theme"]
    rig_before, rig_after = members(RIG_SETTINGS), members(rig_bytes)
    assert {k for k in rig_after if rig_before.get(k) != rig_after[k]} == {"role_agents"}
    assert (root / "backend" / TOWN_FILE).read_bytes() == RIG_SETTINGS
    assert rig_bytes.endswith(b"}\n")
    assert result.town == managed_view(town, "town")
    assert result.rigs["frontend"] == {"role_agents": {"polecat": "kilo-sonnet"}}
    assert sorted(result.rigs) == sorted(RIGS)
    assert result.revision == store.revision == (await store.view()).revision
    assert result.as_json()["files"] == result.files


async def test_patch_emits_one_event_per_written_file(store: SettingsStore, events: Events) -> None:
    """Each written file gives one config.changed with scope, rig, file, keys and revision."""
    body = {
        "town": {"role_effort": {"crew": "low"}},
        "rigs": {"docs": {"worker_agents": {"denali": "codex"}}, "backend": {"agent": "claude"}},
    }
    result = await store.patch(body)
    assert [t for t, _ in events.seen] == ["config.changed"] * 2
    assert events.fields == [
        {
            "scope": "town",
            "rig": None,
            "file": "settings/config.json",
            "keys": ["role_effort"],
            "revision": result.revision,
            "source": "api",
        },
        {
            "scope": "rig",
            "rig": "docs",
            "file": "docs/settings/config.json",
            "keys": ["worker_agents"],
            "revision": result.revision,
            "source": "api",
        },
    ]


async def test_events_go_out_before_the_write_ends_for_the_watcher(root: Path) -> None:
    """A PATCH's and a desired configuration's events are emitted while their write is still
    in flight (`OWN_WRITES`), so subscribers are woken before the watcher's own-write check;
    an emit that raises still ends the write, and the error reaches the caller."""
    in_flight: list[bool] = []

    def emit(event: DomainEvent, /) -> None:
        in_flight.append(OWN_WRITES.in_flight)

    store = SettingsStore(town_root=root, emit=emit)
    await store.load()
    await store.patch({"town": {"role_effort": {"crew": "low"}}})
    await store.apply_desired({"town": {"role_effort": {"crew": "high"}}}, generation=1)
    assert in_flight == [True, True]
    assert not OWN_WRITES.in_flight

    def failing(event: DomainEvent, /) -> None:
        raise RuntimeError("a subscriber's bug")

    broken = SettingsStore(town_root=root, emit=failing)
    with pytest.raises(RuntimeError, match="a subscriber's bug"):
        await broken.patch({"town": {"role_effort": {"crew": "medium"}}})
    with pytest.raises(RuntimeError, match="a subscriber's bug"):
        await broken.apply_desired({"town": {"role_effort": {"crew": "low"}}}, generation=2)
    assert not OWN_WRITES.in_flight


async def test_a_patch_that_changes_nothing_writes_and_emits_nothing(
    root: Path, store: SettingsStore, events: Events
) -> None:
    """Setting values they already have, deleting absent ones or {}: no write, no event."""
    before = {p: os.stat(root / p) for p in (TOWN_FILE, Path("frontend") / TOWN_FILE)}
    (root / "empty_rig").mkdir()
    revision = store.revision
    bodies: list[dict[str, Any]] = [
        {},
        {"town": {"role_effort": {"mayor": "high"}, "default_agent": "claude"}},
        {"town": {"agents": {"claude-haiku": {"command": "claude"}}}},
        {"rigs": {"frontend": {"agent": "claude", "role_agents": {"polecat": "codex"}}}},
        {"rigs": {"empty_rig": {}}},
        # Deleting what is not there: RFC 7396 alone would leave `"crew_agents": {}` behind.
        {"town": {"crew_agents": {"ghost": None}}},
        {"rigs": {"empty_rig": {"role_agents": {"polecat": None}, "worker_agents": {}}}},
    ]
    for body in bodies:
        result = await store.patch(body)
        assert (result.changed, result.files, result.revision) == (False, [], revision)
    assert events.seen == []
    assert not (root / "empty_rig" / "settings").exists()
    for path, stat_before in before.items():
        after = os.stat(root / path)
        assert (after.st_ino, after.st_mtime_ns) == (stat_before.st_ino, stat_before.st_mtime_ns)


async def test_patch_creates_missing_files_and_folders(tmp_path: Path, events: Events) -> None:
    """A rig without settings, and a town without them, get files with type and version first."""
    root = build_town(tmp_path / "town", with_files=False)
    (root / TOWN_FILE).unlink()
    (root / "settings").rmdir()
    store = SettingsStore(town_root=root, emit=events)
    await store.load()
    body = {
        "town": {"default_agent": "codex"},
        "rigs": {"docs": {"role_agents": {"crew": "codex"}}},
    }
    result = await store.patch(body)
    assert result.files == ["settings/config.json", "docs/settings/config.json"]
    town = (root / TOWN_FILE).read_bytes()
    assert town == b'{\n  "type": "town-settings",\n  "version": 1,\n  "default_agent": "codex"\n}'
    rig = json.loads((root / "docs" / TOWN_FILE).read_bytes())
    assert list(rig) == ["type", "version", "role_agents"]
    assert stat.S_IMODE(os.stat(root / "docs" / TOWN_FILE).st_mode) == 0o644
    assert [e["keys"] for e in events.fields] == [
        ["type", "version", "default_agent"],
        ["type", "version", "role_agents"],
    ]


async def test_patch_keeps_the_mode_of_existing_files(root: Path, store: SettingsStore) -> None:
    """A file an operator made 0600 stays 0600 after a PATCH."""
    os.chmod(root / TOWN_FILE, 0o600)
    await store.patch({"town": {"role_effort": {"dog": "low"}}})
    assert stat.S_IMODE(os.stat(root / TOWN_FILE).st_mode) == 0o600


async def test_extra_presets_of_the_daemon_resolve(root: Path, events: Events) -> None:
    """Agent names from the daemon's extra presets are accepted."""
    store = SettingsStore(town_root=root, emit=events, extra_presets=["kilo-house"])
    await store.load()
    await store.patch({"town": {"role_agents": {"dog": "kilo-house"}}})
    assert json.loads((root / TOWN_FILE).read_bytes())["role_agents"]["dog"] == "kilo-house"


# --- serialisation and If-Match -------------------------------------------------------------


async def test_one_hundred_concurrent_patches_all_land(root: Path, store: SettingsStore) -> None:
    """100 PATCHes of different keys from 10 tasks: every change is there at the end."""
    roles = ["mayor", "deacon", "boot", "dog", "witness", "refinery", "polecat", "crew"]

    async def worker(task: int) -> None:
        for step in range(10):
            n = task * 10 + step
            if n < len(roles):
                body: dict[str, Any] = {"town": {"role_effort": {roles[n]: "max"}}}
            elif n % 2:
                body = {"town": {"crew_agents": {f"w{n}": "codex"}}}
            else:
                body = {"rigs": {RIGS[n % 3]: {"worker_agents": {f"w{n}": "gemini"}}}}
            await store.patch(body)

    async with anyio.create_task_group() as tg:
        for task in range(10):
            tg.start_soon(worker, task)
    town = json.loads((root / TOWN_FILE).read_bytes())
    assert all(town["role_effort"][role] == "max" for role in roles)
    rigs = {rig: json.loads((root / rig / TOWN_FILE).read_bytes()) for rig in RIGS}
    for n in range(len(roles), 100):
        if n % 2:
            assert town["crew_agents"][f"w{n}"] == "codex"
        else:
            assert rigs[RIGS[n % 3]]["worker_agents"][f"w{n}"] == "gemini"
    assert town["scheduler"] == town_doc()["scheduler"]


async def test_if_match_lets_only_the_first_of_two_writers_in(
    root: Path, store: SettingsStore, events: Events
) -> None:
    """Writers that read the same revision race: one wins, the stale one writes nothing."""
    seen = (await store.view()).revision
    first = await store.patch({"town": {"role_effort": {"dog": "low"}}}, if_match=f'"{seen}"')
    after_first = (root / TOWN_FILE).read_bytes()
    with pytest.raises(PreconditionFailed) as caught:
        await store.patch({"town": {"role_effort": {"dog": "high"}}}, if_match=f'"{seen}"')
    assert caught.value.status == 412
    assert (root / TOWN_FILE).read_bytes() == after_first
    assert len(events.seen) == 1
    await store.patch({"town": {"role_effort": {"boot": "low"}}}, if_match=first.revision)
    await store.patch({"town": {"role_effort": {"boot": "high"}}}, if_match="*")
    await store.patch(
        {"town": {"role_effort": {"boot": "max"}}}, if_match=f'"x", "{store.revision}"'
    )
    with pytest.raises(PreconditionFailed):
        await store.patch(
            {"town": {"role_effort": {"boot": "low"}}}, if_match=f'W/"{store.revision}"'
        )


async def test_concurrent_writers_with_if_match_lose_cleanly(
    root: Path, store: SettingsStore
) -> None:
    """Ten writers with one If-Match: exactly one lands, the nine others write nothing."""
    seen = (await store.view()).revision
    outcomes: list[str] = []

    async def writer(n: int) -> None:
        try:
            await store.patch({"town": {"crew_agents": {f"w{n}": "codex"}}}, if_match=seen)
            outcomes.append(f"w{n}")
        except PreconditionFailed:
            outcomes.append("stale")

    async with anyio.create_task_group() as tg:
        for n in range(10):
            tg.start_soon(writer, n)
    winners = [o for o in outcomes if o != "stale"]
    assert len(winners) == 1
    assert json.loads((root / TOWN_FILE).read_bytes())["crew_agents"] == {winners[0]: "codex"}


# --- all or nothing -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("code", "words"),
    [
        (errno.ENOSPC, "no space left on the device (ENOSPC)"),
        (errno.EROFS, "read-only (EROFS)"),
        (errno.EACCES, "permission denied (EACCES)"),
        (errno.EIO, "(EIO)"),
    ],
)
async def test_a_failed_write_restores_every_file(
    root: Path, events: Events, code: int, words: str
) -> None:
    """The town and two rigs written, the third rig fails: all four files are as before."""
    writer = FailingWrite(root / "frontend" / TOWN_FILE, OSError(code, os.strerror(code)))
    store = SettingsStore(town_root=root, emit=events, write=writer)
    await store.load()
    before = _tree(root)
    revision = store.revision
    body = {
        "town": {"role_effort": {"crew": "max"}},
        "rigs": {rig: {"role_agents": {"crew": "codex"}} for rig in RIGS},
    }
    with pytest.raises(StorageUnavailable) as caught:
        await store.patch(body)
    assert caught.value.status == 503
    assert words in caught.value.message
    assert "frontend/settings/config.json" in caught.value.message
    assert "left as it was" in caught.value.message
    assert writer.calls[:4] == [root / TOWN_FILE] + [root / rig / TOWN_FILE for rig in RIGS]
    assert _tree(root) == before
    assert events.seen == []
    assert store.revision == revision
    assert await store.reconcile_external() == []


async def test_a_failed_write_removes_files_and_folders_it_created(
    tmp_path: Path, events: Events
) -> None:
    """New rig files (and their settings folders) written before a failure are removed."""
    root = build_town(tmp_path / "town", with_files=False)
    writer = FailingWrite(root / "frontend" / TOWN_FILE, OSError(errno.ENOSPC, "full"))
    store = SettingsStore(town_root=root, emit=events, write=writer)
    await store.load()
    before = _tree(root)
    body = {"rigs": {rig: {"agent": "codex"} for rig in RIGS}}
    with pytest.raises(StorageUnavailable):
        await store.patch(body)
    assert _tree(root) == before


async def test_restore_writes_old_bytes_when_links_are_refused(
    root: Path, events: Events, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Where hard links are impossible, the old bytes are written back instead."""

    def no_link(src: Any, dst: Any, **kwargs: Any) -> None:
        raise OSError(errno.EPERM, "links not supported")

    monkeypatch.setattr(os, "link", no_link)
    writer = FailingWrite(root / "frontend" / TOWN_FILE, OSError(errno.EROFS, "ro"))
    store = SettingsStore(town_root=root, emit=events, write=writer)
    await store.load()
    before = _tree(root)
    with pytest.raises(StorageUnavailable):
        await store.patch(
            {"town": {"default_agent": "codex"}, "rigs": {"frontend": {"agent": "codex"}}}
        )
    assert _tree(root) == before
    assert writer.calls == [root / TOWN_FILE, root / "frontend" / TOWN_FILE, root / TOWN_FILE]


async def test_restore_after_an_in_place_write_uses_the_old_bytes(
    root: Path, events: Events
) -> None:
    """A bind-mounted file rewritten in place is restored from the old bytes, not the link."""

    def in_place(target: Target, data: bytes) -> object:
        if target.path == root / "docs" / TOWN_FILE:
            raise OSError(errno.ENOSPC, "full")
        with open(target.path, "r+b") as handle:
            handle.truncate(0)
            handle.write(data)
        return True

    store = SettingsStore(town_root=root, emit=events, write=in_place)
    await store.load()
    before = _tree(root)
    with pytest.raises(StorageUnavailable, match="ENOSPC"):
        await store.patch(
            {"town": {"default_agent": "codex"}, "rigs": {"docs": {"agent": "codex"}}}
        )
    assert _tree(root) == before


async def test_a_restore_that_fails_is_named(
    root: Path, events: Events, monkeypatch: pytest.MonkeyPatch
) -> None:
    """When a file cannot be put back either, the error names it."""

    class Broken(FailingWrite):
        def __call__(self, target: Target, data: bytes) -> object:
            if target.path == root / TOWN_FILE and len(self.calls) > 1:
                raise OSError(errno.EIO, "gone")
            return super().__call__(target, data)

    def no_link(src: Any, dst: Any, **kwargs: Any) -> None:
        raise OSError(errno.EPERM, "links not supported")

    monkeypatch.setattr(os, "link", no_link)
    writer = Broken(root / "frontend" / TOWN_FILE, OSError(errno.ENOSPC, "full"))
    store = SettingsStore(town_root=root, emit=events, write=writer)
    await store.load()
    body = {"town": {"default_agent": "codex"}, "rigs": {"frontend": {"agent": "codex"}}}
    with capture_logs() as logs, pytest.raises(StorageUnavailable) as caught:
        await store.patch(body)
    assert "could not restore settings/config.json" in caught.value.message
    assert [log["event"] for log in logs] == ["settings_restore_failed"]
    assert events.seen == []


async def test_an_unexpected_writer_error_still_restores_and_propagates(
    root: Path, events: Events
) -> None:
    """A bug in the writer (not an OSError) is raised as is, after the files are restored."""
    writer = FailingWrite(root / "docs" / TOWN_FILE, RuntimeError("bug"))
    store = SettingsStore(town_root=root, emit=events, write=writer)
    await store.load()
    before = _tree(root)
    with pytest.raises(RuntimeError, match="bug"):
        await store.patch(
            {"town": {"default_agent": "codex"}, "rigs": {"docs": {"agent": "codex"}}}
        )
    assert _tree(root) == before


async def test_a_missing_town_root_is_storage_unavailable(tmp_path: Path, events: Events) -> None:
    """Writing into a town root that does not exist fails with ENOENT, nothing created."""
    store = SettingsStore(town_root=tmp_path / "gone", emit=events)
    with pytest.raises(StorageUnavailable, match="ENOENT"):
        await store.patch({"town": {"default_agent": "codex"}})
    assert not (tmp_path / "gone").exists()


# --- confinement --------------------------------------------------------------------------


ESCAPES = [
    "..",
    "../outside",
    "../../etc",
    "/etc",
    "/tmp",
    "%2e%2e",
    "%2e%2e%2fetc",
    "．．",
    "..／outside",
    "a∕b",
    "front end",
    "front-end",
    "hq",
    ".git",
    ".beads",
    "mayor",
    "settings",
    "",
    "escape",
    "nosuch",
    "afile",
    "settings_link",
    "config_link",
]


@pytest.mark.parametrize("name", ESCAPES)
async def test_traversal_and_escapes_are_refused(tmp_path: Path, events: Events, name: str) -> None:
    """Rig names that leave the town or are no plain rig folder: 422, nothing written anywhere."""
    root = build_town(tmp_path / "town")
    outside = tmp_path / "outside"
    (outside / "settings").mkdir(parents=True)
    (outside / "settings" / "config.json").write_bytes(RIG_SETTINGS)
    (root / "escape").symlink_to(outside)
    (root / "afile").write_text("not a folder")
    (root / "settings_link").mkdir()
    (root / "settings_link" / "settings").symlink_to(outside / "settings")
    (root / "config_link" / "settings").mkdir(parents=True)
    (root / "config_link" / "settings" / "config.json").symlink_to(
        outside / "settings" / "config.json"
    )
    store = SettingsStore(town_root=root, emit=events)
    await store.load()
    before = _tree(tmp_path)
    with pytest.raises(PatchInvalid) as caught:
        await store.patch({"rigs": {name: {"role_agents": {"polecat": "codex"}}}})
    assert [d.path for d in caught.value.details] == [pointer("rigs", name)]
    assert caught.value.status == 422
    assert _tree(tmp_path) == before
    assert events.seen == []


# --- unreadable files ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "content",
    [
        b"{not json",
        b'{"type": "rig-settings", "version": 2, "agent": "claude"}',
        b'{"type": "town-settings", "version": 1}',
        b"[]",
        b"\xff\xfe",
        b'{"type": "rig-settings", "version": 1, "agent": "claude\\ud800"}',
    ],
)
async def test_unreadable_files_are_never_overwritten(
    root: Path, store: SettingsStore, events: Events, content: bytes
) -> None:
    """A rig file that is not gt's JSON, too new or of another type: 409, left untouched."""
    path = root / "frontend" / TOWN_FILE
    path.write_bytes(content)
    before = _tree(root)
    with pytest.raises(SettingsFileUnreadable) as caught:
        await store.patch(
            {"town": {"default_agent": "codex"}, "rigs": {"frontend": {"agent": "codex"}}}
        )
    assert caught.value.status == 409
    assert [d.path for d in caught.value.details] == ["/rigs/frontend"]
    assert "frontend/settings/config.json" in caught.value.message
    assert _tree(root) == before
    assert events.seen == []
    result = await store.patch({"rigs": {"docs": {"agent": "codex"}}})
    assert result.files == ["docs/settings/config.json"]
    assert "frontend" not in result.rigs
    assert path.read_bytes() == content


async def test_a_settings_path_that_cannot_be_read_is_unreadable(
    root: Path, store: SettingsStore
) -> None:
    """A config.json that is a folder cannot be read: 409 for the PATCH and the view."""
    path = root / "docs" / TOWN_FILE
    path.unlink()
    path.mkdir()
    with pytest.raises(SettingsFileUnreadable, match=r"docs/settings/config\.json cannot be read"):
        await store.patch({"rigs": {"docs": {"agent": "codex"}}})
    with pytest.raises(SettingsFileUnreadable):
        await store.view()
    assert path.is_dir()


@pytest.mark.parametrize("kind", ["too large", "fifo"])
async def test_a_settings_file_too_large_or_no_regular_file_is_never_read_whole(
    root: Path, store: SettingsStore, kind: str
) -> None:
    """Past 16 MiB a file is not read into memory (no settings file is that large), and a
    FIFO is not opened for a read that could block: each is unreadable, named with why, and
    left as it is."""
    path = root / "docs" / TOWN_FILE
    path.unlink()
    if kind == "fifo":
        os.mkfifo(path)
        why = "is not a regular file"
    else:
        with path.open("wb") as big:
            big.truncate(16 * 1024 * 1024 + 1)
        why = "is larger than a settings file can be"
    with pytest.raises(SettingsFileUnreadable) as caught:
        await store.patch({"rigs": {"docs": {"agent": "codex"}}})
    assert caught.value.status == 409
    assert why in caught.value.message
    if kind == "fifo":
        assert stat.S_ISFIFO(path.lstat().st_mode)
    else:
        assert path.stat().st_size == 16 * 1024 * 1024 + 1


async def test_a_town_settings_folder_leading_out_of_the_town_is_never_read_or_written(
    root: Path, tmp_path: Path, events: Events
) -> None:
    """`settings` of the town swapped for a symlink to a folder elsewhere: the town file is
    unreadable (it leads out through a symlink), every PATCH that needs it is refused, and
    the file out there keeps its bytes."""
    outside = tmp_path / "outside"
    shutil.move(root / "settings", outside)
    (root / "settings").symlink_to(outside)
    store = SettingsStore(town_root=root, emit=events)
    await store.load()
    with pytest.raises(SettingsFileUnreadable) as caught:
        await store.patch({"town": {"default_agent": "codex"}})
    assert "leads out of the town root through a symlink" in caught.value.message
    assert [d.path for d in caught.value.details] == ["/town"]
    assert (outside / "config.json").read_bytes() == TOWN_SETTINGS
    assert events.seen == []


async def test_an_unreadable_town_file_blocks_every_patch_that_needs_it(
    root: Path, store: SettingsStore
) -> None:
    """Rigs resolve agents through the town file: a rig PATCH needs it readable too."""
    (root / TOWN_FILE).write_bytes(b'{"type": "town-settings", "version": 3}')
    bodies: list[dict[str, Any]] = [{"town": {}}, {"rigs": {"docs": {"agent": "codex"}}}]
    for body in bodies:
        with pytest.raises(SettingsFileUnreadable) as caught:
            await store.patch(body)
        assert [d.path for d in caught.value.details] == ["/town"]
    assert (await store.patch({})).changed is False


async def test_validation_reports_every_problem_and_writes_nothing(
    root: Path, store: SettingsStore
) -> None:
    """A body with several problems is refused whole, with each problem in details."""
    before = _tree(root)
    body = {
        "town": {"role_agents": {"majer": "claude"}, "role_effort": {"mayor": "huge"}},
        "rigs": {"frontend": {"agent": "nobody"}, "..": {}},
        "extra": True,
    }
    with pytest.raises(PatchInvalid) as caught:
        await store.patch(body)
    assert sorted(d.path for d in caught.value.details) == [
        "/extra",
        "/rigs/..",
        "/rigs/frontend/agent",
        "/town/role_agents/majer",
        "/town/role_effort/mayor",
    ]
    assert "5 problems" in caught.value.message
    assert _tree(root) == before


# --- external edits -----------------------------------------------------------------------


async def test_an_edit_by_another_writer_is_one_external_event(
    root: Path, store: SettingsStore, events: Events
) -> None:
    """Someone else changes a rig file: exactly one config.changed with source external."""
    doc = rig_doc()
    doc["role_agents"]["crew"] = "gemini"
    doc["namepool"]["style"] = "minerals"
    write_atomic(root / "frontend" / TOWN_FILE, json.dumps(doc, indent=2).encode())
    fields = await store.reconcile_external([root / "frontend" / TOWN_FILE])
    assert fields == [
        {
            "scope": "rig",
            "rig": "frontend",
            "file": "frontend/settings/config.json",
            "keys": ["namepool", "role_agents"],
            "revision": store.revision,
            "source": "external",
        }
    ]
    assert events.fields == fields
    assert await store.reconcile_external() == []
    assert len(events.seen) == 1


async def test_the_stores_own_writes_never_come_back_as_external(
    root: Path, store: SettingsStore, events: Events
) -> None:
    """After a PATCH, reconciling the written files (or all) reports nothing."""
    result = await store.patch(
        {"town": {"default_agent": "codex"}, "rigs": {"docs": {"agent": "gemini"}}}
    )
    written = [root / name for name in result.files]
    assert await store.reconcile_external(written) == []
    assert await store.reconcile_external() == []
    assert [e["source"] for e in events.fields] == ["api", "api"]


async def test_a_reconcile_racing_a_patch_sees_nothing_external(
    root: Path, store: SettingsStore, events: Events
) -> None:
    """Reconciles running while PATCHes write never report the daemon's own writes."""

    async def patcher() -> None:
        for n in range(20):
            await store.patch({"town": {"crew_agents": {f"w{n}": "codex"}}})

    async def watcher() -> None:
        for _ in range(40):
            await store.reconcile_external([root / TOWN_FILE])
            await anyio.sleep(0)

    async with anyio.create_task_group() as tg:
        tg.start_soon(patcher)
        tg.start_soon(watcher)
    assert {e["source"] for e in events.fields} == {"api"}
    assert len(events.fields) == 20


async def test_an_edit_a_patch_writes_over_is_reported_before_it(
    root: Path, store: SettingsStore, events: Events
) -> None:
    """An external edit not yet reconciled is reported (external) before the PATCH's event."""
    doc = rig_doc()
    doc["namepool"]["style"] = "minerals"
    (root / "frontend" / TOWN_FILE).write_bytes(json.dumps(doc, indent=2).encode())
    before = store.revision
    result = await store.patch({"rigs": {"frontend": {"agent": "codex"}}})
    assert [(e["source"], e["keys"], e["revision"]) for e in events.fields] == [
        ("external", ["namepool"], before),
        ("api", ["agent"], result.revision),
    ]
    assert json.loads((root / "frontend" / TOWN_FILE).read_bytes())["namepool"]["style"] == (
        "minerals"
    )
    assert await store.reconcile_external() == []


async def test_without_load_the_first_read_is_the_baseline(root: Path, events: Events) -> None:
    """A store used before load() treats the files it first reads as known."""
    store = SettingsStore(town_root=root, emit=events)
    await store.patch({"town": {"default_agent": "codex"}})
    assert [e["source"] for e in events.fields] == ["api"]
    other = SettingsStore(town_root=root, emit=events)
    assert await other.reconcile_external() == []


async def test_a_new_rig_with_settings_and_a_deleted_file_are_external(
    root: Path, store: SettingsStore, events: Events
) -> None:
    """A rig that arrives with a settings file, and a file removed, each give one event."""
    (root / "newrig" / "settings").mkdir(parents=True)
    (root / "newrig" / TOWN_FILE).write_bytes(RIG_SETTINGS)
    (root / "docs" / TOWN_FILE).unlink()
    fields = await store.reconcile_external([root / "newrig" / TOWN_FILE, root / "docs"])
    all_keys = list(rig_doc())
    assert [(f["rig"], f["keys"], f["source"]) for f in fields] == [
        ("docs", all_keys, "external"),
        ("newrig", all_keys, "external"),
    ]
    assert sorted((await store.view()).rigs) == ["backend", "frontend", "newrig"]


async def test_unreadable_external_edits_are_logged_and_skipped(
    root: Path, store: SettingsStore
) -> None:
    """A broken file gives a warning and no event until it can be read again."""
    path = root / "frontend" / TOWN_FILE
    path.write_bytes(b'{"agent": ')
    with capture_logs() as logs:
        assert await store.reconcile_external([path]) == []
    assert [log["event"] for log in logs] == ["settings_file_unreadable"]
    assert logs[0]["file"] == "frontend/settings/config.json"
    doc = rig_doc()
    doc["agent"] = "codex"
    path.write_bytes(json.dumps(doc).encode())
    fields = await store.reconcile_external([path])
    assert [f["keys"] for f in fields] == [["agent"]]


async def test_layout_only_changes_and_unrelated_paths_give_no_event(
    root: Path, store: SettingsStore, tmp_path: Path
) -> None:
    """Re-indenting a file changes no value; paths outside the settings files are ignored."""
    (root / TOWN_FILE).write_bytes(json.dumps(town_doc(), indent=4).encode())
    assert await store.reconcile_external([root / TOWN_FILE]) == []
    (root / "frontend" / TOWN_FILE).write_bytes(b'{"agent": "gemini"}')
    unrelated = [
        tmp_path / "elsewhere.json",
        root / ".beads" / "x",
        root / "notes.md",
        root / "mayor",
    ]
    assert await store.reconcile_external(unrelated) == []
    fields = await store.reconcile_external([root])
    assert [f["rig"] for f in fields] == ["frontend"]


async def test_paths_through_a_symlinked_town_root_are_recognised(
    tmp_path: Path, events: Events
) -> None:
    """A town root reached through a symlink accepts both the linked and the real paths."""
    real = build_town(tmp_path / "real")
    link = tmp_path / "gt"
    link.symlink_to(real)
    store = SettingsStore(town_root=link, emit=events)
    await store.load()
    (real / "docs" / TOWN_FILE).write_bytes(b'{"agent": "gemini"}')
    (real / "backend" / TOWN_FILE).write_bytes(b'{"agent": "gemini"}')
    by_real = await store.reconcile_external([real / "docs" / TOWN_FILE])
    by_link = await store.reconcile_external([link / "backend" / TOWN_FILE])
    assert [f["rig"] for f in by_real + by_link] == ["docs", "backend"]


async def test_a_lone_surrogate_escape_in_a_file_is_unreadable_from_the_start(
    root: Path, events: Events
) -> None:
    """A hand edit that leaves `\\ud800` in a file: the store loads (the daemon starts), and
    the view names the file as unreadable; before, the revision's UTF-8 raised."""
    path = root / "frontend" / TOWN_FILE
    path.write_bytes(path.read_bytes().replace(b'"agent": "', b'"agent": "\\ud800', 1))
    store = SettingsStore(town_root=root, emit=events)
    with capture_logs() as logs:
        await store.load()
    assert [(log["event"], log["file"]) for log in logs] == [
        ("settings_file_unreadable", "frontend/settings/config.json")
    ]
    with pytest.raises(SettingsFileUnreadable) as caught:
        await store.view()
    assert "holds a lone surrogate" in caught.value.message


async def test_load_logs_unreadable_files(root: Path, events: Events) -> None:
    """Files unreadable at start are logged, and reported once they can be read."""
    (root / "docs" / TOWN_FILE).write_bytes(b"nope")
    store = SettingsStore(town_root=root, emit=events)
    with capture_logs() as logs:
        await store.load()
    assert [(log["event"], log["file"]) for log in logs] == [
        ("settings_file_unreadable", "docs/settings/config.json")
    ]
    (root / "docs" / TOWN_FILE).write_bytes(RIG_SETTINGS)
    fields = await store.reconcile_external([root / "docs" / TOWN_FILE])
    assert [f["keys"] for f in fields] == [list(rig_doc())]


# --- group commit -------------------------------------------------------------------------


class GatedWrite:
    """The atomic writer, holding its first write until `gate` is set."""

    def __init__(self) -> None:
        self.gate = threading.Event()
        self.entered = threading.Event()
        self.calls: list[Path] = []

    def __call__(self, target: Target, data: bytes) -> object:
        self.calls.append(target.path)
        self.entered.set()
        self.gate.wait(10)
        return write_target(target, data)


class FailSecond(GatedWrite):
    """The gated writer whose second and later writes fail as a full disk does."""

    def __call__(self, target: Target, data: bytes) -> object:
        if self.calls:
            self.calls.append(target.path)
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return super().__call__(target, data)


async def _held(root: Path, events: Events) -> tuple[SettingsStore, GatedWrite]:
    writer = GatedWrite()
    store = SettingsStore(town_root=root, emit=events, write=writer)
    await store.load()
    return store, writer


async def test_patches_that_arrive_during_a_write_go_as_one_group(
    root: Path, events: Events
) -> None:
    """Three PATCHes queued behind a write are written together, each with its own answer,
    revision and event, in the order they came, as if sent one after another."""
    store, writer = await _held(root, events)
    results: dict[str, Any] = {}

    async def send(name: str, body: dict[str, Any]) -> None:
        results[name] = await store.patch(body)

    async with anyio.create_task_group() as tg:
        tg.start_soon(send, "first", {"town": {"crew_agents": {"a": "codex"}}})
        await anyio.to_thread.run_sync(writer.entered.wait, 10)
        for name in ("b", "c", "d"):
            tg.start_soon(send, name, {"town": {"crew_agents": {name: "gemini"}}})
            await anyio.wait_all_tasks_blocked()
        writer.gate.set()
    assert writer.calls == [root / TOWN_FILE] * 2  # the first PATCH, then the group of three
    town = json.loads((root / TOWN_FILE).read_bytes())
    assert town["crew_agents"] == {"a": "codex", "b": "gemini", "c": "gemini", "d": "gemini"}
    revisions = [results[name].revision for name in ("first", "b", "c", "d")]
    assert len(set(revisions)) == 4
    assert [(e["keys"], e["revision"], e["source"]) for e in events.fields] == [
        (["crew_agents"], revision, "api") for revision in revisions
    ]
    assert results["d"].town["crew_agents"] == town["crew_agents"]
    assert results["b"].town["crew_agents"] == {"a": "codex", "b": "gemini"}
    assert store.revision == revisions[-1] == (await store.view()).revision
    assert await store.reconcile_external() == []


async def test_a_refused_patch_in_a_group_does_not_stop_the_others(
    root: Path, events: Events
) -> None:
    """412 and 422 in the middle of a group: those two write nothing, the others land."""
    store, writer = await _held(root, events)
    seen = store.revision
    outcomes: dict[str, Any] = {}

    async def send(name: str, body: dict[str, Any], if_match: str | None = None) -> None:
        try:
            outcomes[name] = (await store.patch(body, if_match=if_match)).revision
        except (PreconditionFailed, PatchInvalid) as exc:
            outcomes[name] = exc.status

    async with anyio.create_task_group() as tg:
        tg.start_soon(send, "first", {"town": {"crew_agents": {"a": "codex"}}})
        await anyio.to_thread.run_sync(writer.entered.wait, 10)
        queued = [
            ("stale", {"town": {"crew_agents": {"s": "codex"}}}, seen),
            ("invalid", {"town": {"crew_agents": {"i": "no-such-agent"}}}, None),
            ("last", {"rigs": {RIGS[0]: {"agent": "codex"}}}, None),
        ]
        for name, body, if_match in queued:
            tg.start_soon(send, name, body, if_match)
            await anyio.wait_all_tasks_blocked()
        writer.gate.set()
    assert (outcomes["stale"], outcomes["invalid"]) == (412, 422)
    assert outcomes["last"] == store.revision
    town = json.loads((root / TOWN_FILE).read_bytes())
    assert town["crew_agents"] == {"a": "codex"}
    assert json.loads((root / RIGS[0] / TOWN_FILE).read_bytes())["agent"] == "codex"
    assert [e["revision"] for e in events.fields] == [outcomes["first"], outcomes["last"]]


async def test_if_match_within_a_group_sees_the_patches_before_it(
    root: Path, events: Events
) -> None:
    """Two queued writers with the same If-Match: the first lands, the second is stale."""
    store, writer = await _held(root, events)
    outcomes: list[str] = []

    async def send(n: int, if_match: str | None) -> None:
        try:
            await store.patch({"town": {"crew_agents": {f"w{n}": "codex"}}}, if_match=if_match)
            outcomes.append(f"w{n}")
        except PreconditionFailed:
            outcomes.append("stale")

    async with anyio.create_task_group() as tg:
        tg.start_soon(send, 0, None)
        await anyio.to_thread.run_sync(writer.entered.wait, 10)
        seen = store.revision  # what a client read before the group
        for n in (1, 2):
            tg.start_soon(send, n, f'"{seen}"')
            await anyio.wait_all_tasks_blocked()
        writer.gate.set()
    # The revision read before the first PATCH landed is stale for both queued writers.
    assert sorted(outcomes) == ["stale", "stale", "w0"]


async def test_a_failed_group_write_fails_every_patch_that_changed_something(
    root: Path, events: Events
) -> None:
    """The group's write fails: each PATCH that changed a file gets the 503, a PATCH that
    changed nothing still gets its answer, and nothing is written or reported."""

    writer = FailSecond()
    store = SettingsStore(town_root=root, emit=events, write=writer)
    await store.load()
    outcomes: dict[str, Any] = {}

    async def send(name: str, body: dict[str, Any]) -> None:
        try:
            outcomes[name] = (await store.patch(body)).changed
        except StorageUnavailable as exc:
            outcomes[name] = exc.status

    async with anyio.create_task_group() as tg:
        tg.start_soon(send, "first", {"town": {"crew_agents": {"a": "codex"}}})
        await anyio.to_thread.run_sync(writer.entered.wait, 10)
        tg.start_soon(send, "town", {"town": {"crew_agents": {"b": "codex"}}})
        await anyio.wait_all_tasks_blocked()
        tg.start_soon(send, "nothing", {"town": {"crew_agents": {"a": "codex"}}})
        await anyio.wait_all_tasks_blocked()
        tg.start_soon(send, "rig", {"rigs": {RIGS[1]: {"agent": "codex"}}})
        await anyio.wait_all_tasks_blocked()
        before = _tree(root)
        writer.gate.set()
    assert outcomes == {"first": True, "town": 503, "nothing": False, "rig": 503}
    # The first PATCH's write landed before the group's failed; nothing of the group did.
    after = _tree(root)
    assert after[str(TOWN_FILE)] != before[str(TOWN_FILE)]
    assert json.loads(after[str(TOWN_FILE)])["crew_agents"] == {"a": "codex"}
    assert after[f"{RIGS[1]}/{TOWN_FILE}"] == before[f"{RIGS[1]}/{TOWN_FILE}"]
    assert len(events.seen) == 1
    assert await store.reconcile_external() == []


async def test_after_a_failed_group_write_each_later_patch_is_answered_as_on_the_disk(
    root: Path, events: Events
) -> None:
    """PATCHes planned on a change that never landed are answered as the disk alone would:
    one that matched only the unwritten change gets the 503 (its own write would fail), an
    If-Match of the revision on disk is no 412, a pushed one that changes nothing on disk
    is answered and kept as applied, and a refusal of its own stays a refusal."""

    first = {"town": {"crew_agents": {"a": "codex"}}}
    # The revision the disk will hold once the first PATCH is written, from a twin town.
    twin = root.parent / "twin"
    shutil.copytree(root, twin, symlinks=True)
    written = (await SettingsStore(town_root=twin, emit=Events()).patch(first)).revision
    writer = FailSecond()
    store = SettingsStore(town_root=root, emit=events, write=writer)
    await store.load()
    outcomes: dict[str, Any] = {}

    async def send(name: str, body: dict[str, Any], **headers: Any) -> None:
        try:
            result = await store.patch(body, **headers)
            outcomes[name] = (result.changed, result.revision)
        except (StorageUnavailable, PreconditionFailed, PatchInvalid) as exc:
            outcomes[name] = exc.status

    async with anyio.create_task_group() as tg:
        tg.start_soon(send, "first", first)
        await anyio.to_thread.run_sync(writer.entered.wait, 10)
        later: list[tuple[str, dict[str, Any], dict[str, Any]]] = [
            ("changes", {"town": {"crew_agents": {"b": "codex"}}}, {}),
            ("same_as_unwritten", {"town": {"crew_agents": {"b": "codex"}}}, {}),
            ("if_match_disk", {"town": {"crew_agents": {"c": "codex"}}}, {"if_match": written}),
            ("pushed_nothing", {"town": {"crew_agents": {"a": "codex"}}}, {"generation": 7}),
            ("invalid", {"town": {"crew_agents": {"d": 5}}}, {}),
        ]
        for name, body, headers in later:
            tg.start_soon(functools.partial(send, name, body, **headers))
            await anyio.wait_all_tasks_blocked()
        writer.gate.set()
    assert outcomes["first"] == (True, written)
    assert outcomes["changes"] == 503
    assert outcomes["same_as_unwritten"] == 503  # was 200, changed: false, on the unwritten
    assert outcomes["if_match_disk"] == 503  # was 412 against the unwritten revision
    assert outcomes["pushed_nothing"] == (False, (await store.view()).revision)
    assert outcomes["invalid"] == 422
    assert store.last_applied.applied.generation == 7
    assert len(events.seen) == 1


async def test_a_patch_cancelled_while_it_waits_is_never_applied(
    root: Path, events: Events
) -> None:
    """Cancelled before its group was taken: nothing of it is written or reported."""
    store, writer = await _held(root, events)
    waiting = anyio.CancelScope()

    async def cancellable() -> None:
        with waiting:
            await store.patch({"town": {"crew_agents": {"never": "codex"}}})

    async with anyio.create_task_group() as tg:
        tg.start_soon(store.patch, {"town": {"crew_agents": {"a": "codex"}}})
        await anyio.to_thread.run_sync(writer.entered.wait, 10)
        tg.start_soon(cancellable)
        await anyio.wait_all_tasks_blocked()
        waiting.cancel()
        await anyio.wait_all_tasks_blocked()
        writer.gate.set()
    town = json.loads((root / TOWN_FILE).read_bytes())
    assert town["crew_agents"] == {"a": "codex"}
    assert len(events.seen) == 1
    assert writer.calls == [root / TOWN_FILE]


async def test_what_a_patch_wrote_is_not_read_again(
    root: Path, store: SettingsStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The next PATCH and GET take the files the last PATCH wrote from the cache, and an edit
    by someone else that the watcher names is read again."""
    reads: list[Path] = []
    real = read_settings_file

    def counting(path: Path, *, rig: bool) -> bytes:
        reads.append(path)
        return real(path, rig=rig)

    monkeypatch.setattr(snapshot_module, "read_settings_file", counting)
    await store.patch({"town": {"crew_agents": {"a": "codex"}}})
    reads.clear()
    await store.patch({"town": {"crew_agents": {"a": "gemini"}}})
    view = await store.view()
    assert root / TOWN_FILE not in reads
    assert view.town["crew_agents"] == {"a": "gemini"}
    path = root / TOWN_FILE
    with path.open("r+b") as handle:  # in place, same size
        handle.write(path.read_bytes().replace(b'"gemini"', b'"kilo-x"'))
    snapshot_module.forget([path])
    assert (await store.view()).town["crew_agents"] == {"a": "kilo-x"}


async def _edited_in_the_same_tick(root: Path, store: SettingsStore) -> Path:
    """The town file, its crew member `a` set by a PATCH and then edited in place by someone
    else to `kilo1` (same size), with the cache entry kept as if the stat had not moved."""
    await store.patch({"town": {"crew_agents": {"a": "codex"}}})
    path = root / TOWN_FILE
    edited = path.read_bytes().replace(b'"a": "codex"', b'"a": "kilo1"')
    with path.open("r+b") as handle:
        handle.write(edited)
    info = path.stat()
    key = os.path.abspath(path)
    stamp = (info.st_ino, info.st_size, info.st_mtime_ns, info.st_ctime_ns)
    _old_stamp, name, scope, stale = snapshot_module._cache[key]
    snapshot_module._cache[key] = (stamp, name, scope, stale)
    return path


async def test_a_cached_file_someone_edited_in_the_same_tick_is_planned_again(
    root: Path, store: SettingsStore, events: Events
) -> None:
    """A cache entry whose stat an in-place edit kept (same tick, same size) plans the PATCH
    on stale bytes: the write sees other bytes under its descriptor (`SettingsChanged`), the
    group is planned again from the disk, the edit is reported, then the PATCH's change."""
    path = await _edited_in_the_same_tick(root, store)
    result = await store.patch({"town": {"crew_agents": {"b": "codex"}}})
    town = json.loads(path.read_bytes())
    assert town["crew_agents"] == {"a": "kilo1", "b": "codex"}
    assert [(e["source"], e["keys"]) for e in events.fields[1:]] == [
        ("external", ["crew_agents"]),
        ("api", ["crew_agents"]),
    ]
    assert result.revision == store.revision == (await store.view()).revision


async def test_a_sync_on_a_cached_file_edited_in_the_same_tick_is_planned_again(
    root: Path, store: SettingsStore, events: Events
) -> None:
    """The same stale cache entry under a desired-configuration sync: it is planned again
    from the disk, as a PATCH is, and applied over the edit; before, the sync failed with
    409 (and was reported failed to the cloud) until the watcher dropped the entry."""
    path = await _edited_in_the_same_tick(root, store)
    result = await store.apply_desired({"town": {"role_effort": {"crew": "high"}}}, generation=1)
    town = json.loads(path.read_bytes())
    assert town["crew_agents"] == {"a": "kilo1"}
    assert town["role_effort"]["crew"] == "high"
    assert result.changed
    assert store.last_applied.applied.generation == 1


# --- the last-applied copy: fsynced once for a burst of saves ------------------------------


@dataclasses.dataclass
class _Copied:
    """A loaded store keeping its last-applied copy in `state`, and the copy's fsyncs."""

    store: SettingsStore
    copy: LastApplied
    state: Path
    fsynced: list[str]  # "copy" (its file, or the temporary file renamed over it), "state"


async def _copied(
    root: Path, events: Events, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, delay: float
) -> _Copied:
    state = tmp_path / "state"
    copy = LastApplied(state_dir=state, town_id="town-1")
    store = SettingsStore(town_root=root, emit=events, last_applied=copy, copy_fsync_delay=delay)
    await store.load()
    fsynced: list[str] = []
    real_fsync = os.fsync

    def fsync(fd: int) -> None:
        path = Path(os.readlink(f"/proc/self/fd/{fd}"))
        if path == state:
            fsynced.append("state")
        elif path.parent == state and "desired-config.json" in path.name:
            fsynced.append("copy")
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    return _Copied(store, copy, state, fsynced)


async def test_a_burst_of_pushes_shares_one_fsync_of_the_copy_at_the_end(
    root: Path, events: Events, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each push saves the copy (what a run after a SIGKILL loads) with no fsync; with an
    hour to wait, the one fsync comes when `run` is cancelled."""
    kept = await _copied(root, events, tmp_path, monkeypatch, delay=3600)
    async with anyio.create_task_group() as tg:
        await tg.start(kept.store.run)
        for n in range(4):
            agent = ("codex", "gemini")[n % 2]
            await kept.store.patch({"town": {"crew_agents": {"a": agent}}}, generation=n + 1)
        loaded = LastApplied(state_dir=kept.state, town_id="town-1").load()
        assert (loaded.generation, loaded.desired) == (
            4,
            {"town": {"crew_agents": {"a": "gemini"}}},
        )
        assert (kept.copy.durable, kept.fsynced) == (False, [])
        tg.cancel_scope.cancel()
    assert (kept.copy.durable, kept.fsynced) == (True, ["copy", "state"])


async def test_a_syncs_save_of_the_copy_is_fsynced_at_once(
    root: Path, events: Events, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Syncs are minutes apart: the copy an apply saves is fsynced before it returns, and
    with it the pushes' before."""
    kept = await _copied(root, events, tmp_path, monkeypatch, delay=3600)
    async with anyio.create_task_group() as tg:
        await tg.start(kept.store.run)
        await kept.store.patch({"town": {"crew_agents": {"a": "codex"}}}, generation=1)
        assert (kept.copy.durable, kept.fsynced) == (False, [])
        await kept.store.apply_desired({"town": {"crew_agents": {"a": "claude"}}}, generation=2)
        assert (kept.copy.durable, kept.fsynced) == (True, ["copy", "state"])
        tg.cancel_scope.cancel()
    assert kept.fsynced == ["copy", "state"]


async def test_a_push_is_fsynced_once_the_delay_has_passed(
    root: Path, events: Events, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """No delay: fsynced right after the push; a PATCH that is not a push saves nothing."""
    kept = await _copied(root, events, tmp_path, monkeypatch, delay=0)
    async with anyio.create_task_group() as tg:
        await tg.start(kept.store.run)
        await kept.store.patch({"town": {"crew_agents": {"a": "codex"}}}, generation=1)
        # Until both fsyncs ran: `make_durable` marks the copy durable before them (in its
        # worker thread), so waiting for the mark alone raced the second fsync.
        with anyio.fail_after(10):
            while len(kept.fsynced) < 2:
                await anyio.sleep(0.005)
        assert kept.fsynced == ["copy", "state"]
        assert kept.copy.durable
        await kept.store.patch({"town": {"crew_agents": {"a": "gemini"}}})
        assert kept.copy.durable
        tg.cancel_scope.cancel()
    assert kept.fsynced == ["copy", "state"]


# --- the last-applied copy across a kill in the middle of a write --------------------------


class _Killed(BaseException):
    """A SIGKILL in the middle of a write: nothing of the daemon's runs after it."""


def _section(path: Path, key: str) -> dict[str, Any]:
    section: dict[str, Any] = json.loads(path.read_bytes()).get(key) or {}
    return section


@pytest.mark.parametrize("way", ["push", "sync"])
async def test_after_a_kill_mid_write_the_next_sync_removes_what_the_cloud_dropped(
    root: Path, events: Events, tmp_path: Path, way: str
) -> None:
    """A change the cloud sent (pushed, or applied by a sync) is killed between its renames,
    the journal in place; the next start rolls the files forward. The cloud then drops what
    that change set: the next sync removes it from every file. The copy used to be saved
    only after the write, so it never held those keys, and the sync kept them for good while
    the cloud showed the generation applied (a reviewer's run: 40 of 40 rigs)."""
    state = tmp_path / "state"
    first = {
        "town": {"crew_agents": {"alice": "codex"}},
        "rigs": {rig: {"worker_agents": {"bob": "gemini"}} for rig in RIGS},
    }
    last_file = root / RIGS[-1] / "settings" / "config.json"
    killed = SettingsStore(
        town_root=root,
        emit=events,
        write=FailingWrite(last_file, _Killed()),
        last_applied=LastApplied(state_dir=state, town_id="town-1"),
    )
    await killed.load()
    send = killed.patch if way == "push" else killed.apply_desired
    with pytest.raises(_Killed):
        await send(first, generation=1)
    assert (root / ".gastown-sandboxd.journal").exists()

    restarted = SettingsStore(
        town_root=root, emit=events, last_applied=LastApplied(state_dir=state, town_id="town-1")
    )
    await restarted.load()  # rolls the journal forward: every file has the first change
    assert _section(root / TOWN_FILE, "crew_agents")["alice"] == "codex"
    assert all(_section(root / r / TOWN_FILE, "worker_agents")["bob"] == "gemini" for r in RIGS)

    dropped = {
        "town": {"crew_agents": {}},
        "rigs": {rig: {"worker_agents": {}} for rig in RIGS},
    }
    await restarted.apply_desired(dropped, generation=2)
    assert "alice" not in _section(root / TOWN_FILE, "crew_agents")
    for rig in RIGS:
        assert "bob" not in _section(root / rig / TOWN_FILE, "worker_agents"), rig
    assert restarted.last_applied.applied == Applied(2, dropped)
