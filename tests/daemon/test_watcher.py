"""The settings watcher against real files edited by other processes."""

from __future__ import annotations

import contextlib
import ctypes
import errno
import operator
import os
import shutil
import subprocess
import sys
from collections.abc import AsyncIterator, Callable, Iterable, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import anyio
import pytest
from structlog.testing import capture_logs
from watchfiles import awatch as real_awatch
from watchfiles._rust_notify import RustNotify

from gastown_sandboxd import watcher as watcher_module
from gastown_sandboxd.atomic import write_atomic
from gastown_sandboxd.gtsettings.journal import JOURNAL, ROLLBACK
from gastown_sandboxd.own_writes import OwnWrites
from gastown_sandboxd.watcher import SettingsWatcher, is_temporary
from gastown_sandboxd.watcher import _libc as real_libc
from tests.waiting import eventually

ATOMIC_WRITE = """
import os, sys
path, data = sys.argv[1:3]
tmp = os.path.join(os.path.dirname(path), "." + os.path.basename(path) + ".x1y2.tmp")
with open(tmp, "w") as f:
    f.write(data)
    f.flush()
    os.fsync(f.fileno())
os.replace(tmp, path)
"""

IN_PLACE_WRITE = """
import sys
with open(sys.argv[1], "w") as f:
    f.write(sys.argv[2])
"""


def store_folders(town: Path) -> Iterator[Path]:
    """What the settings store hands the watcher: town settings, each rig and its settings."""
    yield town / "settings"
    for entry in sorted(town.iterdir()):
        if entry.is_dir() and entry.name not in {"settings", "mayor"} and entry.name[0] != ".":
            yield entry
            yield entry / "settings"


@dataclass
class Calls:
    settings: list[set[Path]] = field(default_factory=list)
    env: int = 0

    @property
    def settings_paths(self) -> set[Path]:
        return set().union(*self.settings)

    async def on_settings_change(self, paths: set[Path]) -> None:
        self.settings.append(paths)

    async def on_env_change(self) -> None:
        self.env += 1


@dataclass
class Town:
    root: Path
    env_file: Path
    calls: Calls
    watcher: SettingsWatcher

    def rig_file(self, rig: str) -> Path:
        return self.root / rig / "settings" / "config.json"

    async def fence(self) -> None:
        """Edit the env file and wait for its callback: every earlier edit is routed by then."""
        before = self.calls.env
        write_atomic(self.env_file, f"KILO_JWT=fence{before}\n".encode())
        await eventually(lambda: self.calls.env > before)

    def watches(self, folder: Path) -> bool:
        return str(folder) in self.watcher.status()["folders"]


def run_writer(script: str, path: Path, data: str) -> None:
    subprocess.run([sys.executable, "-c", script, str(path), data], check=True, timeout=30)


@dataclass
class Mode:
    doorbell: bool = True


MODE = Mode()


@pytest.fixture(autouse=True, params=["doorbell", "polled"])
def watch_mode(request: pytest.FixtureRequest) -> Iterator[str]:
    """Every test runs with the inotify doorbell and with the polled fallback."""
    MODE.doorbell = request.param == "doorbell"
    yield request.param
    MODE.doorbell = True


@pytest.fixture
def town_tree(tmp_path: Path) -> tuple[Path, Path]:
    root = tmp_path / "gt"
    (root / "settings").mkdir(parents=True)
    (root / "settings" / "config.json").write_text("{}")
    (root / "alpha" / "settings").mkdir(parents=True)
    (root / "alpha" / "settings" / "config.json").write_text("{}")
    home = tmp_path / "home"
    home.mkdir()
    env_file = home / ".env.gateway"
    env_file.write_text("KILO_JWT=a\n")
    return root, env_file


@asynccontextmanager
async def watching(
    town_tree: tuple[Path, Path],
    folders: Callable[[], Iterator[Path]] | None = None,
    calls: Calls | None = None,
    **kwargs: object,
) -> AsyncIterator[Town]:
    root, env_file = town_tree
    calls = calls or Calls()
    kwargs = {"doorbell": MODE.doorbell, "poll_step_ms": 10, **kwargs}
    watcher = SettingsWatcher(
        town_root=root,
        env_file=env_file,
        folders=folders or (lambda: store_folders(root)),
        on_settings_change=calls.on_settings_change,
        on_env_change=calls.on_env_change,
        **kwargs,  # type: ignore[arg-type]
    )
    assert watcher.status()["mode"] == ("doorbell" if MODE.doorbell else "polled")
    async with anyio.create_task_group() as tg:
        await tg.start(watcher.run)
        yield Town(root, env_file, calls, watcher)
        tg.cancel_scope.cancel()
    assert watcher.status()["running"] is False


def test_is_temporary() -> None:
    """Temporary files of atomic writes are recognised by their dot and .tmp suffix."""
    assert is_temporary("/gt/settings/.config.json.k2j4.tmp")
    assert not is_temporary("/gt/settings/config.json")
    assert not is_temporary("/home/u/.env.gateway")
    assert not is_temporary("/gt/settings/config.tmp")


async def test_atomic_rename_by_another_process_is_seen_once(town_tree: tuple[Path, Path]) -> None:
    """A rig file replaced by rename from another process gives one callback with its path."""
    async with watching(town_tree) as town:
        rig_file = town.rig_file("alpha")
        run_writer(ATOMIC_WRITE, rig_file, '{"agent": "codex"}')
        await eventually(lambda: town.calls.settings == [{rig_file}])
        await town.fence()
        assert town.calls.settings == [{rig_file}]


async def test_in_place_write_by_another_process_is_seen_once(town_tree: tuple[Path, Path]) -> None:
    """A rig file rewritten in place gives one callback with its path."""
    async with watching(town_tree) as town:
        town_file = town.root / "settings" / "config.json"
        run_writer(IN_PLACE_WRITE, town_file, '{"default_agent": "x"}')
        await eventually(lambda: town.calls.settings == [{town_file}])
        await town.fence()
        assert town.calls.settings == [{town_file}]


async def test_env_file_edits_call_on_env_change(town_tree: tuple[Path, Path]) -> None:
    """Atomic and in-place edits of the env file each reach on_env_change."""
    async with watching(town_tree) as town:
        run_writer(ATOMIC_WRITE, town.env_file, "KILO_JWT=b\n")
        await eventually(lambda: town.calls.env == 1)
        run_writer(IN_PLACE_WRITE, town.env_file, "KILO_JWT=c\n")
        await eventually(lambda: town.calls.env == 2)
        assert town.calls.settings == []
        assert town.watcher.status()["env_changes"] == 2


async def test_deleting_a_settings_file_is_reported(town_tree: tuple[Path, Path]) -> None:
    """A removed settings file is a change too; the store decides what it means."""
    async with watching(town_tree) as town:
        rig_file = town.rig_file("alpha")
        rig_file.unlink()
        await eventually(lambda: town.calls.settings == [{rig_file}])


async def test_rig_created_after_start_is_watched(town_tree: tuple[Path, Path]) -> None:
    """A rig folder, then its settings folder, then its file: the later edit is seen."""
    async with watching(town_tree) as town:
        rig = town.root / "beta"
        rig.mkdir()
        await eventually(lambda: town.watches(rig))
        (rig / "settings").mkdir()
        await eventually(lambda: town.watches(rig / "settings"))
        rig_file = town.rig_file("beta")
        run_writer(ATOMIC_WRITE, rig_file, "{}")
        await eventually(lambda: town.calls.settings == [{rig_file}])
        run_writer(IN_PLACE_WRITE, rig_file, '{"agent": "codex"}')
        await eventually(lambda: town.calls.settings == [{rig_file}, {rig_file}])
        assert town.watcher.status()["restarts"] == 2


async def test_rig_arriving_with_its_settings_is_reported(
    town_tree: tuple[Path, Path], tmp_path: Path
) -> None:
    """A rig moved in whole, settings file included, is reported as a settings change."""
    staged = tmp_path / "staging" / "gamma"
    (staged / "settings").mkdir(parents=True)
    (staged / "settings" / "config.json").write_text('{"type": "rig-settings"}')
    async with watching(town_tree) as town:
        staged.rename(town.root / "gamma")
        await eventually(lambda: town.rig_file("gamma") in town.calls.settings_paths)
        run_writer(IN_PLACE_WRITE, town.rig_file("gamma"), "{}")
        await eventually(lambda: len(town.calls.settings) == 2)


@pytest.mark.parametrize("swapped", ["rig", "settings"])
async def test_a_folder_swapped_in_by_rename_has_its_settings_reported(
    town_tree: tuple[Path, Path], swapped: str
) -> None:
    """`mv alpha alpha.old && mv alpha.new alpha` (or the same of alpha/settings): the set of
    folders keeps its names, but the file under them is another: reported as a settings
    change (before, the watch restarted and nothing was reported)."""
    async with watching(town_tree) as town:
        rig_file = town.rig_file("alpha")
        folder = town.root / "alpha" if swapped == "rig" else rig_file.parent
        copy = folder.with_name(folder.name + ".new")
        shutil.copytree(folder, copy)
        new_file = copy / rig_file.relative_to(folder)
        new_file.write_text('{"agent": "codex-swapped"}')
        before = len(town.calls.settings)
        folder.rename(folder.with_name(folder.name + ".old"))
        copy.rename(folder)
        await eventually(lambda: rig_file in set().union(*town.calls.settings[before:]))
        assert rig_file.read_text() == '{"agent": "codex-swapped"}'


async def test_a_town_root_removed_and_made_again_is_watched_again(
    town_tree: tuple[Path, Path],
) -> None:
    """The town root removed and made again in its place (a reinstall, a restore): while it
    is gone its parent is watched for its name; once it is back, its settings are watched
    again and an edit by another process is seen."""
    async with watching(town_tree) as town:
        town_file = town.root / "settings" / "config.json"
        shutil.rmtree(town.root)
        await eventually(lambda: town.watches(town.root.parent))
        before = len(town.calls.settings)
        (town.root / "settings").mkdir(parents=True)
        await eventually(lambda: town.watches(town_file.parent))
        assert not town.watches(town.root.parent)
        run_writer(IN_PLACE_WRITE, town_file, '{"back": true}')
        await eventually(lambda: town_file in set().union(*town.calls.settings[before:]))


async def test_a_settings_folder_made_again_in_its_place_is_watched_again(
    town_tree: tuple[Path, Path],
) -> None:
    """A rig's settings folder removed and made again at once, before the watcher lists its
    folders again: the folders to watch are the same, but the new folder is not the watched
    one. Watching starts again, and the next edit there is seen (before, never)."""
    async with watching(town_tree) as town:
        settings = town.rig_file("alpha").parent
        shutil.rmtree(settings)
        settings.mkdir()
        await eventually(lambda: town.watcher.status()["restarts"] >= 1)
        run_writer(IN_PLACE_WRITE, town.rig_file("alpha"), '{"back": true}')
        await eventually(lambda: town.rig_file("alpha") in town.calls.settings_paths)


@pytest.mark.parametrize("going", ["removed", "renamed away"])
async def test_the_env_files_folder_gone_and_made_again_is_watched_again(
    town_tree: tuple[Path, Path], tmp_path: Path, going: str
) -> None:
    """The env file's folder removed or renamed away, then made again with an env file (a
    home folder restored, provisioning run again): while it is gone its parent is watched for
    its name; once it is back with the env file in it, the change is reported, and so is the
    next edit of the file."""
    async with watching(town_tree) as town:
        home = town.env_file.parent
        if going == "removed":
            shutil.rmtree(home)
        else:
            home.rename(tmp_path / "home.old")
        await eventually(lambda: town.watches(home.parent) and not town.watches(home))
        before = town.calls.env
        home.mkdir()
        write_atomic(town.env_file, b"KILO_JWT=back\n")
        await eventually(lambda: town.calls.env > before and town.watches(home))
        assert not town.watches(home.parent)
        await town.fence()


async def test_an_env_files_folder_made_after_the_start_is_watched(tmp_path: Path) -> None:
    """Started before the env file's folder exists (the daemon before provisioning): the
    folder and the env file made later are seen."""
    root = tmp_path / "gt"
    (root / "settings").mkdir(parents=True)
    env_file = tmp_path / "home" / ".env.gateway"
    async with watching((root, env_file)) as town:
        assert town.watches(tmp_path)
        env_file.parent.mkdir()
        write_atomic(env_file, b"KILO_JWT=first\n")
        await eventually(lambda: town.calls.env >= 1 and town.watches(env_file.parent))
        await town.fence()


async def test_rig_made_in_one_go_is_not_missed(town_tree: tuple[Path, Path]) -> None:
    """Folder, settings folder and file created back to back still reach the callback."""
    async with watching(town_tree) as town:
        rig_file = town.rig_file("delta")
        rig_file.parent.mkdir(parents=True)
        rig_file.write_text("{}")
        await eventually(lambda: rig_file in town.calls.settings_paths)


async def test_temporary_and_foreign_files_are_ignored(town_tree: tuple[Path, Path]) -> None:
    """Temp files of atomic writes and config.json outside a settings folder call nothing."""
    async with watching(town_tree) as town:
        settings = town.root / "alpha" / "settings"
        (settings / ".config.json.abcd.tmp").write_text("{}")
        (settings / "notes.txt").write_text("x")
        (town.root / "alpha" / "config.json").write_text("{}")
        (town.env_file.parent / ".env.gateway.q1w2.tmp").write_text("KILO_JWT=x\n")
        await town.fence()
        assert town.calls.settings == []
        assert town.calls.env == 1
        # notes.txt is filtered before it can wake the loop; config.json and the fence are seen.
        assert town.watcher.status()["changes_seen"] == 2


async def test_removed_rig_is_dropped_from_the_watch(town_tree: tuple[Path, Path]) -> None:
    """Deleting a rig shrinks the watched set and the watcher goes on."""
    async with watching(town_tree) as town:
        assert town.watches(town.root / "alpha" / "settings")
        shutil.rmtree(town.root / "alpha")
        await eventually(lambda: not town.watches(town.root / "alpha"))
        await town.fence()
        status = town.watcher.status()
        assert status["running"] is True
        assert status["errors"] == 0


async def test_status_lists_the_watched_folders(town_tree: tuple[Path, Path]) -> None:
    """status() shows the town root, the env folder and the store's existing folders."""
    root, env_file = town_tree
    async with watching(town_tree) as town:
        status = town.watcher.status()
    assert status["folders"] == sorted(
        str(p)
        for p in (
            root,
            root / "settings",
            root / "alpha",
            root / "alpha" / "settings",
            env_file.parent,
        )
    )
    assert status["restarts"] == 0


async def test_failing_callback_is_logged_and_watching_goes_on(
    town_tree: tuple[Path, Path],
) -> None:
    """A callback that raises does not stop the watcher."""

    class Flaky(Calls):
        async def on_settings_change(self, paths: set[Path]) -> None:
            await super().on_settings_change(paths)
            if len(self.settings) == 1:
                raise RuntimeError("store hiccup")

    with capture_logs() as logs:
        async with watching(town_tree, calls=Flaky()) as town:
            rig_file = town.rig_file("alpha")
            run_writer(IN_PLACE_WRITE, rig_file, '{"a": 1}')
            await eventually(lambda: len(town.calls.settings) == 1)
            run_writer(IN_PLACE_WRITE, rig_file, '{"a": 2}')
            await eventually(lambda: len(town.calls.settings) == 2)
    failures = [log for log in logs if log["event"] == "watcher_callback_failed"]
    assert [log["callback"] for log in failures] == ["on_settings_change"]


async def test_failing_folder_listing_keeps_the_current_watch(
    town_tree: tuple[Path, Path],
) -> None:
    """When the store cannot list its folders, the watcher keeps what it watches."""
    root, _ = town_tree
    broken = False

    def folders() -> Iterator[Path]:
        if broken:
            raise OSError("listing failed")
        return store_folders(root)

    with capture_logs() as logs:
        async with watching(town_tree, folders=folders) as town:
            broken = True
            # A new folder in the town root makes the watcher list its folders again.
            (root / "beta").mkdir()
            await eventually(lambda: any(log["event"] == "watcher_folders_failed" for log in logs))
            rig_file = town.rig_file("alpha")
            run_writer(IN_PLACE_WRITE, rig_file, "{}")
            await eventually(lambda: town.calls.settings == [{rig_file}])
            assert town.watches(root / "alpha" / "settings")
    assert any(log["event"] == "watcher_folders_failed" for log in logs)


async def test_watch_set_up_failure_is_retried(
    town_tree: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch, watch_mode: str
) -> None:
    """A failure to set up the watch (a folder gone meanwhile) is logged, counted and retried."""
    attempts = 0

    def flaky_awatch(*paths: Path, **kwargs: object) -> object:
        nonlocal attempts
        attempts += 1
        if attempts == 1:
            return real_awatch(paths[0] / "vanished", **kwargs)  # type: ignore[arg-type]
        return real_awatch(*paths, **kwargs)  # type: ignore[arg-type]

    real_open = watcher_module._Doorbell.open

    def flaky_doorbell(folders: Iterable[Path], **kwargs: Any) -> object:
        nonlocal attempts
        attempts += 1
        if attempts == 1:
            folders = [*folders, next(iter(folders)) / "vanished"]
        return real_open(folders, **kwargs)

    if watch_mode == "polled":
        monkeypatch.setattr("gastown_sandboxd.watcher.awatch", flaky_awatch)
    else:
        monkeypatch.setattr(watcher_module._Doorbell, "open", flaky_doorbell)
    with capture_logs() as logs:
        async with watching(town_tree, retry_delay=0.01) as town:
            await eventually(lambda: attempts >= 2)
            rig_file = town.rig_file("alpha")
            await eventually(lambda: town.watches(rig_file.parent))
            run_writer(IN_PLACE_WRITE, rig_file, "{}")
            await eventually(lambda: town.calls.settings == [{rig_file}])
            status = town.watcher.status()
    assert status["errors"] == 1
    assert "FileNotFoundError" in str(status["last_error"])
    assert any(log["event"] == "watcher_failed" for log in logs)


class InotifyUsedUp:
    """libc's inotify as the watcher calls it, with no instance to spare while `used_up`
    (EMFILE: the user's 128 instances, shared by every program of the sandbox)."""

    def __init__(self) -> None:
        self.used_up = True
        self.refused = 0
        self._libc = real_libc()

    def inotify_init1(self, flags: int) -> int:
        if self.used_up:
            self.refused += 1
            ctypes.set_errno(errno.EMFILE)
            return -1
        fd: int = self._libc.inotify_init1(flags)
        return fd

    def __getattr__(self, name: str) -> object:
        return getattr(self._libc, name)


class ReadingCalls(Calls):
    """The callbacks, reading each settings file named as the store does (a file read once
    more while the way of watching changes is then told from an edit by its bytes)."""

    def __init__(self) -> None:
        super().__init__()
        self.read: list[str] = []

    async def on_settings_change(self, paths: set[Path]) -> None:
        await super().on_settings_change(paths)
        self.read += [path.read_text() for path in sorted(paths)]


async def test_with_inotify_used_up_the_watcher_polls_by_stat_until_it_is_back(
    town_tree: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch, watch_mode: str
) -> None:
    """No inotify instance to spare: logged once (not at each time inotify is asked again),
    `/status` says stat, and edits are seen, two in the same second included. Once inotify
    is back, the watcher returns to it. A watcher already watching asks for nothing more."""
    libc = InotifyUsedUp()
    monkeypatch.setattr(watcher_module, "_libc", lambda: libc)
    calls = ReadingCalls()
    with capture_logs() as logs:
        async with watching(town_tree, calls=calls, inotify_retry_s=0.2) as town:
            rig_file = town.rig_file("alpha")
            if watch_mode == "doorbell":
                await eventually(lambda: town.watcher.status()["mode"] == "stat")
            for edit in ('{"a": 1}', '{"a": 2}'):  # well within one second
                run_writer(IN_PLACE_WRITE, rig_file, edit)
                await eventually(partial(operator.contains, calls.read, edit))
            if watch_mode == "doorbell":
                refused = libc.refused
                await eventually(lambda: libc.refused >= refused + 2)  # asked, still used up
            libc.used_up = False
            await eventually(lambda: town.watcher.status()["mode"] == watch_mode)
            run_writer(IN_PLACE_WRITE, rig_file, '{"a": 3}')
            await eventually(lambda: '{"a": 3}' in calls.read)
    assert town.calls.settings_paths <= {rig_file, town.root / "settings" / "config.json"}
    told = [log["event"] for log in logs if log["event"].startswith("watcher_inotify")]
    if watch_mode == "doorbell":
        assert told == ["watcher_inotify_used_up", "watcher_inotify_back"]
        assert "watcher_failed" not in [log["event"] for log in logs]
    else:
        assert (libc.refused, told) == (0, [])


async def test_the_daemons_own_write_is_dropped_and_others_still_seen(
    town_tree: tuple[Path, Path],
) -> None:
    """A write whose bytes were noted calls nothing; the next edit by another process does."""
    own = OwnWrites()
    async with watching(town_tree, own_writes=own) as town:
        rig_file = town.rig_file("alpha")
        own.note(rig_file, b'{"agent": "mine"}')
        write_atomic(rig_file, b'{"agent": "mine"}')
        await eventually(lambda: town.watcher.status()["own_writes"] == 1)
        run_writer(ATOMIC_WRITE, rig_file, '{"agent": "theirs"}')
        await eventually(lambda: town.calls.settings == [{rig_file}])
        assert len(own) == 0


async def test_the_daemons_own_write_of_the_env_file_is_not_an_edit(
    town_tree: tuple[Path, Path],
) -> None:
    """The refresher's write of a token (its bytes noted) calls nothing and counts as the
    daemon's own; an edit by another process still reaches on_env_change."""
    own = OwnWrites()
    async with watching(town_tree, own_writes=own) as town:
        own.note(town.env_file, b"KILO_JWT=mine\n")
        write_atomic(town.env_file, b"KILO_JWT=mine\n")
        await eventually(lambda: town.watcher.status()["own_writes"] == 1)
        assert (town.calls.env, town.watcher.status()["env_changes"]) == (0, 0)
        run_writer(ATOMIC_WRITE, town.env_file, "KILO_JWT=theirs\n")
        await eventually(lambda: town.calls.env == 1)
        assert town.watcher.status()["env_changes"] == 1


class RecordingNotify:
    """`RustNotify` as the watcher uses it, keeping every batch of changes it hands over."""

    def __init__(self, *args: object) -> None:
        self._notify = RustNotify(*args)  # type: ignore[arg-type]
        self.batches: list[set[tuple[int, str]]] = []

    def __enter__(self) -> RecordingNotify:
        self._notify.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self._notify.__exit__(*exc)

    def watch(self, *args: object) -> object:
        found = self._notify.watch(*args)  # type: ignore[arg-type]
        if isinstance(found, set):
            self.batches.append(found)
        return found


def _notify_threads() -> list[str]:
    # watchfiles' watch runs a thread of its own, named by notify ("notify-rs inotify loop").
    names = []
    for tid in os.listdir("/proc/self/task"):
        with contextlib.suppress(OSError), open(f"/proc/self/task/{tid}/comm") as comm:
            names.append(comm.read().strip())
    return [name for name in names if name.startswith("notify")]


async def test_own_writes_set_up_no_watchfiles_watch(
    town_tree: tuple[Path, Path], watch_mode: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """watchfiles watches only to collect what rang, an edit by someone else: neither the start
    nor 60 own writes before it set up a watch, and between collects no watchfiles thread
    runs. The edit's collect hands over the edit alone."""
    if watch_mode != "doorbell":
        pytest.skip("the polled fallback collects every write")
    notifies: list[RecordingNotify] = []

    def recording(*args: object) -> RecordingNotify:
        notifies.append(RecordingNotify(*args))
        return notifies[-1]

    monkeypatch.setattr(watcher_module, "RustNotify", recording)
    own = OwnWrites()
    async with watching(town_tree, own_writes=own) as town:
        town_file = town.root / "settings" / "config.json"
        await town.fence()
        written: list[bytes] = []
        for n in range(60):
            written.append(f'{{"mine": {n}}}'.encode())
            own.note(town_file, written[-1])
            write_atomic(town_file, written[-1])
            await eventually(lambda: town.watcher.own_writes == len(written))
        assert notifies == []
        await eventually(lambda: not _notify_threads())  # another test's may still be ending
        run_writer(ATOMIC_WRITE, town_file, '{"theirs": 1}')
        await eventually(lambda: town.calls.settings == [{town_file}])
        assert len(notifies) == 1
        await eventually(lambda: not _notify_threads())
    handed = [path for batch in notifies[0].batches for _change, path in batch]
    # The other process's write: its temporary file and the rename, perhaps the last own one.
    assert len(handed) <= 6, handed


async def test_a_settings_folder_gone_before_the_collect_restarts_the_watch(
    town_tree: tuple[Path, Path], watch_mode: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A ring whose collect cannot set up watchfiles' watch (a settings folder went just
    then) is still a batch of its paths, and watching goes on: a later edit is seen."""
    if watch_mode != "doorbell":
        pytest.skip("the polled fallback sets up no watchfiles watch")
    made = 0

    def gone_once(*args: object) -> RecordingNotify:
        nonlocal made
        made += 1
        if made == 1:  # the first collect
            raise FileNotFoundError(errno.ENOENT, "No such file or directory (os error 2)")
        return RecordingNotify(*args)

    monkeypatch.setattr(watcher_module, "RustNotify", gone_once)
    async with watching(town_tree) as town:
        rig_file = town.rig_file("alpha")
        town_file = town.root / "settings" / "config.json"
        await town.fence()
        run_writer(ATOMIC_WRITE, rig_file, '{"agent": "theirs"}')
        await eventually(lambda: town.calls.settings == [{rig_file}])
        run_writer(ATOMIC_WRITE, town_file, '{"theirs": 2}')
        await eventually(lambda: town.calls.settings == [{rig_file}, {town_file}])
    assert made >= 2


async def test_a_note_is_used_up_by_the_first_change_seen(town_tree: tuple[Path, Path]) -> None:
    """Another process writing other bytes uses the note up, so its later write of the noted
    bytes is an edit too."""
    own = OwnWrites()
    async with watching(town_tree, own_writes=own) as town:
        rig_file = town.rig_file("alpha")
        own.note(rig_file, b'{"agent": "mine"}')
        run_writer(ATOMIC_WRITE, rig_file, '{"agent": "theirs"}')
        await eventually(lambda: town.calls.settings == [{rig_file}])
        run_writer(ATOMIC_WRITE, rig_file, '{"agent": "mine"}')
        await eventually(lambda: town.calls.settings == [{rig_file}, {rig_file}])
        assert town.watcher.status()["own_writes"] == 0


def test_own_writes_match_bytes_and_path_once() -> None:
    """take() is true only for the noted bytes at the noted path, and only once."""
    own = OwnWrites()
    own.note("/gt/settings/config.json", b"a")
    assert not own.take("/gt/alpha/settings/config.json", b"a")
    assert own.take("/gt/settings/../settings/config.json", b"a")
    assert not own.take("/gt/settings/config.json", b"a")
    own.note("/gt/settings/config.json", b"a")
    assert not own.take("/gt/settings/config.json", None)
    assert len(own) == 0


async def test_the_stores_journal_in_the_town_root_wakes_nothing(
    town_tree: tuple[Path, Path],
) -> None:
    """The intent journal a multi-file change makes and drops is neither a rig nor a change:
    no callback, no new listing of the folders, no restart."""
    async with watching(town_tree) as town:
        for name in (JOURNAL, ROLLBACK):
            write_atomic(town.root / name, b"{}")
            (town.root / name).unlink()
        await town.fence()
        status = town.watcher.status()
        assert town.calls.settings == []
        assert (status["restarts"], status["changes_seen"]) == (0, 1)


async def test_changes_during_the_stores_write_are_read_once_it_is_done(
    town_tree: tuple[Path, Path],
) -> None:
    """While the store writes (`begin` … `end`) the doorbell does not listen; then it reads
    what queued: the store's own write is recognised, another edit made meanwhile reported."""
    own = OwnWrites()
    async with watching(town_tree, own_writes=own) as town:
        await town.fence()
        await anyio.sleep(0.1)
        own.begin()
        mine, other = town.root / "settings" / "config.json", town.rig_file("alpha")
        own.note(mine, b'{"mine": 1}')
        write_atomic(mine, b'{"mine": 1}')
        write_atomic(other, b'{"theirs": 1}')
        await anyio.sleep(0.2)
        if MODE.doorbell:
            assert town.calls.settings == []  # nothing read while the write is in flight
        own.end()
        await eventually(lambda: other in town.calls.settings_paths)
        await town.fence()
        # Recognised by its bytes as the ring was read (watchfiles may still hand the path
        # over beside the other edit: the store reads it again and finds it unchanged).
        assert town.watcher.status()["own_writes"] == 1


def _open_doorbell(root: Path, env_file: Path) -> watcher_module._Doorbell:
    # The doorbell on the town's folders in `town_tree` and the env file, as `_watch_rung`
    # opens it.
    settings = frozenset({root / "settings", root / "alpha" / "settings"})
    doorbell = watcher_module._Doorbell.open(
        settings | {root, root / "alpha"}, content=settings, file=env_file
    )
    assert doorbell is not None
    return doorbell


def test_writes_to_other_files_of_the_watched_folders_ring_nothing(
    town_tree: tuple[Path, Path],
) -> None:
    """Busy folders: writes to files that are not the watcher's queue nothing on the
    doorbell, so they never wake the loop. gt appends every event of the town to its log in
    the town root; a shell keeps its history beside the env file, in the home folder, where
    Claude Code also replaces `.claude.json` (lock file, temporary file, rename) as it runs;
    there are notes in a rig folder. Entries coming and going in the town root do ring. Read
    straight from the kernel's queue: the events of a write are queued when it returns."""
    root, env_file = town_tree
    home = env_file.parent
    others = [root / ".events.jsonl", home / ".bash_history", root / "alpha" / "notes"]
    for other in others:
        other.write_text("")
    heard: list[Path] = []

    def hear(path: Path) -> bool:
        heard.append(path)
        return True

    doorbell = _open_doorbell(root, env_file)
    try:
        for other in others:
            with other.open("a") as handle:
                handle.write("{}\n")
        others[1].chmod(0o600)
        (home / ".claude.json.lock").write_text("")
        (home / ".claude.json.tmp.1").write_text("{}")
        (home / ".claude.json.tmp.1").rename(home / ".claude.json")
        (home / ".claude.json.lock").unlink()
        ring = doorbell.drain(hear)
        assert (heard, ring.paths, ring.collect, ring.lost) == ([], set(), False, False)
        (root / "new-rig").mkdir()
        assert doorbell.drain(hear).paths == {root / "new-rig"}
    finally:
        doorbell.close()


def test_the_env_file_is_heard_however_it_changes(town_tree: tuple[Path, Path]) -> None:
    """The env file's own inode is watched, not its folder: an edit in place rings, and so
    does a replacement by rename, after which the new file is the one watched and the one
    moved away is not. Deleted, the file's folder is watched until it is back, then no
    longer. A settings file written in place rings, and makes watchfiles collect."""
    root, env_file = town_tree
    home = env_file.parent
    doorbell = _open_doorbell(root, env_file)
    try:
        run_writer(IN_PLACE_WRITE, env_file, "KILO_JWT=b\n")
        assert doorbell.drain(lambda path: True).paths == {env_file}
        run_writer(ATOMIC_WRITE, env_file, "KILO_JWT=c\n")  # renamed over it
        assert doorbell.drain(lambda path: True).paths == {env_file}
        run_writer(IN_PLACE_WRITE, env_file, "KILO_JWT=d\n")
        assert doorbell.drain(lambda path: True).paths == {env_file}
        moved = home / "old.env"
        env_file.rename(moved)
        assert doorbell.drain(lambda path: True).paths == {env_file}
        run_writer(IN_PLACE_WRITE, moved, "KILO_JWT=old\n")
        (home / "notes").write_text("")  # the folder is watched now: an entry rings
        assert doorbell.drain(lambda path: True).paths == {home / "notes"}
        run_writer(ATOMIC_WRITE, env_file, "KILO_JWT=e\n")
        assert doorbell.drain(lambda path: True).paths == {env_file}
        (home / "more-notes").write_text("")  # back, and the folder unwatched again
        run_writer(IN_PLACE_WRITE, moved, "KILO_JWT=old\n")
        assert doorbell.drain(lambda path: True).paths == set()
        env_file.unlink()
        assert doorbell.drain(lambda path: True).paths == {env_file}
        run_writer(IN_PLACE_WRITE, env_file, "KILO_JWT=f\n")
        assert doorbell.drain(lambda path: True).paths == {env_file}
        run_writer(IN_PLACE_WRITE, env_file, "KILO_JWT=g\n")
        assert doorbell.drain(lambda path: True).paths == {env_file}
        run_writer(IN_PLACE_WRITE, root / "settings" / "config.json", "{}")
        ring = doorbell.drain(lambda path: True)
        assert (ring.collect, ring.paths) == (True, {root / "settings" / "config.json"})
    finally:
        doorbell.close()


def test_a_symlinked_env_file_is_heard_when_its_link_is_pointed_elsewhere(
    town_tree: tuple[Path, Path], tmp_path: Path
) -> None:
    """An env file that is a symlink (a secrets mount, say): its target's edits ring, and so
    does the link pointed at another file, which changes no inode the watch follows; its
    folder is watched for that, and the new target is the one watched."""
    root, env_file = town_tree
    secrets = tmp_path / "secrets"
    secrets.mkdir()
    first, second = secrets / "first", secrets / "second"
    first.write_text("KILO_JWT=one\n")
    second.write_text("KILO_JWT=two\n")
    env_file.unlink()
    env_file.symlink_to(first)
    doorbell = _open_doorbell(root, env_file)
    try:
        run_writer(IN_PLACE_WRITE, first, "KILO_JWT=one-b\n")
        assert doorbell.drain(lambda path: True).paths == {env_file}
        relink = env_file.parent / ".env.gateway.link"
        relink.symlink_to(second)
        relink.replace(env_file)  # as `ln -sfn` does it atomically
        assert env_file in doorbell.drain(lambda path: True).paths
        run_writer(IN_PLACE_WRITE, first, "KILO_JWT=one-c\n")  # no longer the env file
        run_writer(IN_PLACE_WRITE, second, "KILO_JWT=two-b\n")
        assert doorbell.drain(lambda path: True).paths == {env_file}
    finally:
        doorbell.close()
