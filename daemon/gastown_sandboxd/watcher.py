"""The watcher: external edits of the settings files and of the env file.

Folders are watched, never files (atomic writers rename over them), and never recursively
(rigs hold large worktrees): the town root itself (rigs appearing and going; while it is
gone, its parent, for its name to come back), the env file's folder, and the folders
`folders()` names now (town settings folder, each rig folder, each rig's settings folder).
Only existing folders can be watched, so after a batch that may change the set (anything but
a settings file or the env file) the wanted set is computed again; when it differs, watching
restarts with the new set, and a settings folder new to the set, or at or under a watched
folder that itself went, that holds `config.json` is reported as changed: a rig that arrived
with its settings, and a folder swapped in by rename under the same name (the store decides
what is external, and reports only files whose content differs).

Routing of one batch: `<folder named settings>/config.json` → `on_settings_change(paths)`;
the env file → `on_env_change()`. Every change kind counts (an atomic rename into place is
reported by inotify as the final name being added). Temporary files of atomic writes
(`.name.XXXX.tmp`) are ignored. A callback that raises is logged; watching goes on.

The daemon's own writes: the writer calls `own_writes.note(path, data)` before it writes; a
settings file whose bytes, read when its change comes in, are the ones noted is dropped before
any re-read of the town, rig listing or log line (the note is used up either way, so an edit
by someone else that later writes the same bytes is not mistaken for the daemon's). With the
doorbell this happens as the ring is read, so the daemon's own write wakes nothing else: no
watchfiles collect and no watchfiles thread, which watches only for a collect (below).

Sleeping (measured by `bench/watcher_bench.py`; Linux, inotify, 2 shared cores, idle
wake-ups/s and rename → callback p50): watchfiles' thread wakes every `step_ms` while
`RustNotify.watch` runs, whether or not anything happened: step 10 ms 100/s and 20 ms,
50 ms 21/s and 62 ms, 100 ms 11/s and 149 ms, 250 ms about 5/s and 430 ms.
So on Linux the watcher keeps its own inotify descriptor, the doorbell, that the event loop
waits on: no wake-up until the kernel has an event for a relevant name. A ring of a settings
file sets up a watchfiles watch of the settings folders (`RustNotify`, ~0.14 ms with its
thread) and runs `RustNotify.watch`, which hands over what watchfiles collected of the rest of
the burst once a `step_ms` passes with no new change (or `debounce_ms` into a busy burst), or
nothing after two steps; then the watch is given back. Every path of the ring is in the batch
too, so the change that rang (before the watch) and one watchfiles has not read yet (its
thread held up) are neither lost nor reported twice. Kept between collects, watchfiles'
thread woke for every open, write and rename in the settings folders, the daemon's own reads
and writes too (~6 times a PATCH), and its set kept two names of every own write until
someone else edited a settings file (4.5 MiB more RSS after 20,000 writes, measured on
`RustNotify` alone) unless emptied at each. Medians of 8 alternating rounds of 150 PATCHes
one every 30 ms, kept against set up per collect: daemon CPU per PATCH 2.88 -> 2.75 ms
(watchfiles' thread 0.12 ms -> none), context switches 24.7 -> 15.6 a PATCH; threads after
start 4 -> 3. The env file and the entries of the other folders are known from the ring
itself, gathered with the same step and limit (`_Doorbell.settle`). Idle, the watcher costs no
wake-up at all, and with step 10 ms an edit reaches its callback in ~22 ms (two steps). After
a collect, what the doorbell queued meanwhile (the rest of the same write) joins the batch
instead of ringing again. A rewrite of the town's settings file in place by bash
(`bench/events_bench.py`) wakes a daemon process ~13.5 times in all (~27 while watchfiles'
watch was kept between collects); when the rest of a write rang on its own, a second collect
waited up to 1 s for watchfiles (~127).

What wakes it: in the settings folders, any change; in the town root and the rig folders,
only entries coming, going or renamed; and the env file itself, through a watch on its inode,
set again on each file renamed over it: written in place, replaced, or going. Its folder is
watched for names only while the file is missing or a symlink, and otherwise only for the
folder itself going: renamed away, the file's own watch sees nothing. A folder gone (the
town root, the env file's) has its parent watched for its name until it is back; then the
watch starts again, as it does when any watched folder itself goes (one made again in its
place at once is another folder), and after every restart the env file is read once more (a
home folder restored with another token in it: before, the daemon held the old token for
good).
The env file's folder is the home folder by default, where a shell keeps its history and
Claude Code replaces its state file (`.claude.json`) as it runs, and gt appends every event
of the town to its log in the town root (`.events.jsonl`). Measured by
`bench/watcher_bench.py` with those three files written 20 times a second each: 247 wake-ups
a second (the loop, watchfiles' collect and its thread) when every folder was watched for
writes, the env file's folder included, and watchfiles watched them all; 0.8 now.

When inotify is used up (`inotify_init1` or `inotify_add_watch` refused with EMFILE, ENFILE,
ENOSPC or ENOMEM: the user's 128 instances or its watches, shared by every program of the
sandbox, agents' dev servers and editors included), the watch cannot be set up, and retrying
it every second would log a warning every second and see nothing until other programs give
inotify back. So the watcher polls by stat (`/status` mode `stat`, `_watch_by_stat`): every
`poll_step_ms` (250 ms) it compares the whole stat of the env file and of each settings file
with the last (and lists the folders every fourth step), logs once, and asks inotify again
every `inotify_retry_s` (60 s). Measured on a daemon process in that mode, over 20 s idle:
~5 wake-ups a second; 0.25 % of a core with 2 rigs, 0.45 % with 32 (1.25 % when it listed
the folders at every step). watchfiles' own polling cannot stand in: it compares whole
seconds of mtime and misses an edit in the second of the one before. Measured with a real
daemon in a user namespace whose inotify instances are 0: before, 8 `watcher_failed`
warnings in 8 s and an edit never seen; now one `watcher_inotify_used_up` and the edit seen.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import errno
import os
import re
import struct
from collections.abc import Awaitable, Callable, Iterable
from pathlib import Path
from typing import Any

import anyio
import anyio.abc
import anyio.to_thread
import structlog
from watchfiles import Change, awatch
from watchfiles._rust_notify import RustNotify

from gastown_sandboxd.gtsettings.journal import JOURNAL, ROLLBACK
from gastown_sandboxd.gtsettings.schema import CONFIG, SETTINGS
from gastown_sandboxd.gtsettings.snapshot import StatKey, stat_key
from gastown_sandboxd.gtsettings.snapshot import forget as forget_cached
from gastown_sandboxd.own_writes import OWN_WRITES, OwnWrites

log = structlog.get_logger(__name__)

# The step of the polled fallback: ~5 wake-ups/s, an edit seen in under 500 ms.
POLL_STEP_MS = 250
# Without inotify to be had (its instances or watches used up), how long the watcher polls
# by stat before it asks inotify again.
INOTIFY_RETRY_S = 60.0
# Polling by stat looks at the files every step, and lists the folders every this many steps.
STAT_LIST_EVERY = 4
# inotify_init1 / inotify_add_watch failing with these: the user's instances (128 by default)
# or watches used up, or the kernel's memory; other programs may give them back.
_EXHAUSTED = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOSPC, errno.ENOMEM})
# How watchfiles' errors name the system's error: "Too many open files (os error 24)".
_OS_ERROR = re.compile(r"\(os error (\d+)\)")
# What `_inotify_used_up` watches for a moment: the file system's root, always there.
INOTIFY_PROBE = Path("/")


def is_temporary(path: str) -> bool:
    """True for the temporary file of an atomic write (`.config.json.k2j4.tmp`)."""
    name = os.path.basename(path)
    return name.startswith(".") and name.endswith(".tmp")


def _and_parent_while_gone(folder: Path) -> set[Path]:
    """`folder`, and its parent while it is gone (removed to be made again: a reinstall, a
    restore; or not made yet), whose watch sees its name come back."""
    return {folder} if folder.is_dir() else {folder, folder.parent}


def _is_settings_file(path: Path) -> bool:
    return path.name == CONFIG and path.parent.name == SETTINGS


class SettingsWatcher:
    """Calls back on external edits of settings files and the env file; see the module doc."""

    def __init__(
        self,
        *,
        town_root: Path,
        env_file: Path,
        folders: Callable[[], Iterable[Path]],
        on_settings_change: Callable[[set[Path]], Awaitable[object]],
        on_env_change: Callable[[], Awaitable[object]],
        debounce_ms: int = 50,
        step_ms: int = 10,
        poll_step_ms: int = POLL_STEP_MS,
        retry_delay: float = 1.0,
        doorbell: bool = True,
        own_writes: OwnWrites = OWN_WRITES,
        inotify_retry_s: float = INOTIFY_RETRY_S,
    ) -> None:
        """`doorbell=False` forces the polled fallback (`awatch` with `poll_step_ms`)."""
        self._town_root = _absolute(town_root)
        self._env_file = _absolute(env_file)
        self._folders = folders
        self._on_settings_change = on_settings_change
        self._on_env_change = on_env_change
        self._debounce_ms = debounce_ms
        self._step_ms = max(1, step_ms)
        self._poll_step_ms = max(1, poll_step_ms)
        self._retry_delay = retry_delay
        self._doorbell = doorbell and not os.environ.get("WATCHFILES_FORCE_POLLING")
        self._own_writes = own_writes
        self._running = False
        self._watched: frozenset[Path] = frozenset()
        self._went: set[Path] = set()  # watched folders that themselves went, until a restart
        self.mode = "doorbell" if self._doorbell else "polled"
        # Set while inotify is used up: the watch polls by stat (mode "stat") and asks
        # inotify again after INOTIFY_RETRY_S.
        self._without_inotify = False
        self._used_up_told = False  # logged; told again once inotify is back
        self.inotify_retry_s = inotify_retry_s
        self.restarts = 0
        self.changes_seen = 0
        self.settings_changes = 0
        self.own_writes = 0
        self.env_changes = 0
        self.errors = 0
        self._last_error: str | None = None

    def status(self) -> dict[str, Any]:
        """What /status shows under `watcher`."""
        return {
            "running": self._running,
            "mode": self.mode,
            "folders": sorted(str(folder) for folder in self._watched),
            "restarts": self.restarts,
            "changes_seen": self.changes_seen,
            "settings_changes": self.settings_changes,
            "own_writes": self.own_writes,
            "env_changes": self.env_changes,
            "errors": self.errors,
            "last_error": self._last_error,
        }

    def wanted_folders(self) -> frozenset[Path]:
        """The existing folders to watch now: the town's and the env file's."""
        return self._wanted()[0]

    def _wanted(self) -> tuple[frozenset[Path], frozenset[Path]]:
        # `wanted_folders()`, and which of them are the town's (its root, the store's folders).
        town = _and_parent_while_gone(self._town_root)
        try:
            town.update(_absolute(folder) for folder in self._folders())
        except Exception as exc:  # the store's listing failed: keep what we know
            log.warning("watcher_folders_failed", error=str(exc))
            town.update(self._watched)
        env_folders = _and_parent_while_gone(self._env_file.parent)
        folders = frozenset(folder for folder in town | env_folders if folder.is_dir())
        return folders, folders & town

    async def run(
        self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED
    ) -> None:
        """Watch until cancelled; started once the first set of folders is being watched."""
        self._running = True
        first = True
        try:
            while True:
                folders, town = self._wanted()
                async with anyio.create_task_group() as tg:
                    outcome = await tg.start(self._watch, folders, town)
                    previous, self._watched = self._watched, folders
                    if outcome.started and self._used_up_told and not self._without_inotify:
                        self._used_up_told = False
                        log.info("watcher_inotify_back", mode=self.mode)
                        await self._catch_up(folders, town)
                    if first:
                        task_status.started()
                    else:
                        self.restarts += 1
                        # Folders new to the set, and those at or under a watched folder that
                        # itself went: one swapped in by rename (`mv alpha alpha.old && mv
                        # alpha.new alpha`) keeps its name in the set, and its file changed
                        # without an event of its own. The store reports only what differs.
                        went, self._went = self._went, set()
                        swapped = {f for f in folders if f in went or went & set(f.parents)}
                        await self._report_present((folders - previous) | swapped)
                        # The env file may have come back (with its folder) before the new
                        # watch was set: read once more, which changes nothing if it did not.
                        await _call_safely("on_env_change", self._on_env_change)
                    # A folder made while the watch was being set up would go unseen.
                    if self.wanted_folders() != folders:
                        tg.cancel_scope.cancel()
                first = False
                if outcome.failed and not outcome.retry_now:
                    await anyio.sleep(self._retry_delay)
        finally:
            self._running = False

    async def _watch(
        self,
        folders: frozenset[Path],
        town: frozenset[Path],
        *,
        task_status: anyio.abc.TaskStatus[_Outcome],
    ) -> None:
        outcome = _Outcome()
        stop = anyio.Event()
        async with anyio.create_task_group() as tg:
            tg.start_soon(_set_when_cancelled, stop)
            try:
                if self._without_inotify:
                    await self._watch_by_stat(stop, outcome, task_status)
                elif self._doorbell:
                    await self._watch_rung(folders, town, stop, outcome, task_status)
                else:
                    await self._watch_polled(folders, stop, outcome, task_status)
            except (OSError, RuntimeError) as exc:  # a folder vanished, inotify limits, …
                self.errors += 1
                self._last_error = f"{type(exc).__name__}: {exc}"
                if not self._without_inotify and (_exhausted(exc) or _inotify_used_up()):
                    # Not a fault of the watch: retrying it every second would fail and log
                    # the same until other programs give inotify back. Poll by stat now.
                    self._without_inotify = outcome.retry_now = True
                    if not self._used_up_told:  # once, not at every retry of inotify
                        self._used_up_told = True
                        log.warning(
                            "watcher_inotify_used_up",
                            error=self._last_error,
                            effect=f"polling by stat every {self._poll_step_ms} ms; inotify "
                            f"is asked again every {self.inotify_retry_s:.0f} s",
                        )
                else:
                    outcome.failed = True
                    log.warning("watcher_failed", error=self._last_error)
                if not outcome.started:
                    task_status.started(outcome)
            tg.cancel_scope.cancel()

    async def _watch_rung(
        self,
        folders: frozenset[Path],
        town: frozenset[Path],
        stop: anyio.Event,
        outcome: _Outcome,
        task_status: anyio.abc.TaskStatus[_Outcome],
    ) -> None:
        """Sleep on the doorbell; on a ring of a settings file, let watchfiles collect the
        batch; the env file and the folders' names are known from the ring itself."""
        settings = frozenset(folder for folder in folders if folder.name == SETTINGS)
        # The env file's folder (unless it is the town's) is watched for the env file alone,
        # its names only while the file is missing or a symlink (`watch_file`); its parent
        # while it is gone.
        doorbell = _Doorbell.open(
            town | (folders - {self._env_file.parent}), content=settings, file=self._env_file
        )
        if doorbell is None:  # no inotify here after all: poll from now on
            self._doorbell = False
            await self._watch_polled(folders, stop, outcome, task_status)
            return
        with contextlib.closing(doorbell):
            self.mode = "doorbell"
            outcome.started = True
            task_status.started(outcome)

            def rings(path: Path) -> bool:
                return not self._is_own_ring(path) and self._relevant_path(path)

            # Nothing to collect yet: a watchfiles watch set up now would see only what the
            # doorbell sees too (what came while it was being set up is read at the first wait).
            ring = _Ring()
            while True:
                changes: set[tuple[Change, str]] = set()
                if ring.collect:
                    raw = await self._collect(settings, stop)
                    if raw == "stop":
                        return
                    if not isinstance(raw, str):
                        changes.update(
                            (Change(change), path)
                            for change, path in raw
                            if self._relevant(Change(change), path)
                        )
                    # The rest of the burst watchfiles collected (queued on the doorbell
                    # meanwhile) belongs to this batch, not to a ring of its own.
                    if not self._own_writes.in_flight:
                        ring.add(doorbell.drain(rings))
                # A path watchfiles reported is one change, not two.
                reported = {path for _, path in changes}
                changes.update(
                    (Change.modified, path) for path in map(str, ring.paths) if path not in reported
                )
                if ring.lost:  # the folders may have changed too (the drain named the env file)
                    changes.add((Change.modified, str(self._town_root)))
                if changes and not await self._batch(changes, folders):
                    return
                ring = await doorbell.wait(rings, self._own_writes)
                if not ring.collect:  # the rest of the same burst
                    await doorbell.settle(
                        ring, rings, self._own_writes, self._step_ms, self._debounce_ms
                    )

    async def _collect(
        self, settings: frozenset[Path], stop: anyio.Event
    ) -> set[tuple[int, str]] | str:
        """What watchfiles collects of the rest of a burst that rang in a settings folder:
        `RustNotify.watch` of a watch of `settings` set up now and given back after it,
        "timeout" (nothing more within two steps), "stop", or "gone" when a settings folder
        is gone (the ring's batch then makes the watch start again without it).

        Two steps are enough: the ring's own paths are in the batch, so a change watchfiles
        did not see (before its watch) or has not read yet is lost neither way.
        """
        try:
            notify = RustNotify(sorted(map(str, settings)), False, False, 0, False, False)
        except FileNotFoundError:
            return "gone"
        with notify:
            return await anyio.to_thread.run_sync(
                notify.watch, self._debounce_ms, self._step_ms, 2 * self._step_ms, stop
            )

    async def _watch_polled(
        self,
        folders: frozenset[Path],
        stop: anyio.Event,
        outcome: _Outcome,
        task_status: anyio.abc.TaskStatus[_Outcome],
    ) -> None:
        changes_iter = awatch(
            *folders,
            watch_filter=self._relevant,
            debounce=self._debounce_ms,
            step=self._poll_step_ms,
            stop_event=stop,
            recursive=False,
        )
        # awatch registers its watches on the first __anext__, before it first suspends,
        # so the caller resumes from start() only once they are in place.
        self.mode = "polled"
        outcome.started = True
        task_status.started(outcome)
        async with contextlib.aclosing(changes_iter):
            async for changes in changes_iter:
                if not await self._batch(changes, folders):
                    return

    async def _watch_by_stat(
        self,
        stop: anyio.Event,
        outcome: _Outcome,
        task_status: anyio.abc.TaskStatus[_Outcome],
    ) -> None:
        """Without inotify: every `poll_step_ms`, the stat of the env file and of each
        settings file (of the folders wanted now) against the last; what differs is routed.

        watchfiles' own polling cannot stand in: it compares whole seconds of mtime, so an
        edit in the second of the one before is never seen. The stat here is compared whole
        (inode, size, mtime and ctime in ns). After `inotify_retry_s` the watch ends and the
        next one asks inotify again. What may have changed while the way of watching
        changed is read once more at both ends (`_catch_up`).
        """
        self.mode = "stat"
        outcome.started = True
        task_status.started(outcome)
        folders, town = self._wanted()
        paths = self._stamped(town)
        seen = _stamps(paths)
        await self._catch_up(folders, town)
        polls = 0
        with anyio.move_on_after(self.inotify_retry_s):
            while not stop.is_set():
                await anyio.sleep(self._poll_step_ms / 1000)
                await _settled(self._own_writes)
                polls += 1
                if polls % STAT_LIST_EVERY == 0:  # the folders (rigs come and go) less often
                    folders, town = self._wanted()
                    paths, self._watched = self._stamped(town), folders
                now = _stamps(paths)
                changes = {
                    (_kind(seen.get(path), now.get(path)), str(path))
                    for path in seen.keys() | now.keys()
                    if seen.get(path) != now.get(path)
                }
                seen = now
                if changes:
                    await self._route(changes, folders)
        # Time to ask inotify again; if it is still used up, the next watch comes back here.
        self._without_inotify, outcome.retry_now = False, True

    def _stamped(self, town: frozenset[Path]) -> list[Path]:
        """What polling by stat looks at: the env file (through a symlink: its target) and
        the settings file of each settings folder of the town."""
        return [self._env_file, *_config_files(town)]

    async def _catch_up(self, folders: frozenset[Path], town: frozenset[Path]) -> None:
        """Have every settings file and the env file read once more: an edit made between
        two ways of watching is seen by neither. The store and the refresher compare with
        what they hold, so this reports only what really changed, and logs nothing else."""
        await _settled(self._own_writes)
        present = {path for path in _config_files(town) if path.is_file()}
        if present:
            await self._read_again(present)
        await _call_safely("on_env_change", self._on_env_change)

    async def _batch(self, changes: set[tuple[Change, str]], folders: frozenset[Path]) -> bool:
        """Route one batch; False when watching must restart: the folders to watch changed,
        or a watched folder itself went (made again in its place at once, it is another
        folder with the same name, whose watch must be set again)."""
        may_regrow = await self._route(changes, folders)
        went = {Path(raw) for _change, raw in changes if Path(raw) in folders}
        if went:
            self._went |= went
            return False
        return not (may_regrow and self.wanted_folders() != folders)

    def _relevant(self, change: Change, raw: str) -> bool:
        """Only the env file, settings files and folder changes under the town root wake us.

        The env file's folder is often a busy home folder (shell history, logs): without this
        filter every write there would wake the loop, and a log file there would feed itself.
        """
        if is_temporary(raw):
            return False
        return self._relevant_path(Path(raw))

    def _is_own_ring(self, path: Path) -> bool:
        """Whether a change the doorbell saw is the daemon's own write of a settings file,
        known by its bytes before anything else is read or listed: no collect for it."""
        if _is_settings_file(path) and path.parent in self._watched and self._is_own_write(path):
            self.settings_changes += 1
            self.own_writes += 1
            return True
        return path == self._env_file and self._is_own_env_write()

    def _is_own_env_write(self) -> bool:
        # The refresher's own write of the token (`envfile.write_token` notes its bytes): no
        # `env_file_changed` line, count or re-read for it. Each refresh logged one, as if
        # someone had edited the file (with 10 s tokens, as many lines as the refreshes').
        if self._is_own_write(self._env_file):
            self.own_writes += 1
            return True
        return False

    def _relevant_path(self, path: Path) -> bool:
        if is_temporary(path.name):
            return False
        if path.name in (JOURNAL, ROLLBACK) and path.parent == self._town_root:
            return False  # the store's own intent journal, made and dropped by each change
        return (
            path == self._env_file
            or path.name in (CONFIG, SETTINGS)
            or path.parent == self._town_root
            or path == self._town_root  # back in its parent, watched while it was gone
            or path == self._env_file.parent  # the same, or the watched folder itself went
            or path in self._watched  # a watched folder itself went
        )

    async def _route(self, changes: set[tuple[Change, str]], folders: frozenset[Path]) -> bool:
        """Call back for one batch; True when it may change the folders to watch."""
        self.changes_seen += len(changes)
        settings: set[Path] = set()
        env = False
        may_regrow = False
        for _change, raw in changes:
            path = Path(raw)
            if path == self._env_file:
                env = True
            elif _is_settings_file(path):
                if path.parent in folders:
                    settings.add(path)
            else:
                may_regrow = True
        if settings:
            self.settings_changes += 1
            others = {path for path in settings if not self._is_own_write(path)}
            self.own_writes += len(settings) - len(others)
            if others:
                await self._settings_changed(others)
        if env and not self._is_own_env_write():
            self.env_changes += 1
            log.info("env_file_changed", path=str(self._env_file))
            await _call_safely("on_env_change", self._on_env_change)
        return may_regrow

    def _is_own_write(self, path: Path) -> bool:
        # Read on the loop: a settings file is a few KiB, cheaper than a hop to a thread.
        return self._own_writes.take(path, _read_quickly(path))

    async def _settings_changed(self, paths: set[Path]) -> None:
        log.info("settings_files_changed", paths=sorted(str(path) for path in paths))
        await self._read_again(paths)

    async def _read_again(self, paths: set[Path]) -> None:
        # A path the watcher names is always read again (an edit can keep size and stamps).
        forget_cached(paths)
        await _call_safely("on_settings_change", self._on_settings_change, paths)

    async def _report_present(self, added: frozenset[Path]) -> None:
        present = {path for path in _config_files(added) if path.is_file()}
        if present:
            self.settings_changes += 1
            await self._settings_changed(present)


# inotify(7): what makes the doorbell ring. IN_CLOSE_WRITE is left out of the folders' masks
# (watchfiles ignores it); a write shows as IN_MODIFY, a rename as IN_MOVED_FROM/TO.
_IN_MODIFY = 0x2
_IN_ATTRIB = 0x4
_IN_CLOSE_WRITE = 0x8
_IN_MOVED_FROM = 0x40
_IN_MOVED_TO = 0x80
_IN_CREATE = 0x100
_IN_DELETE = 0x200
_IN_DELETE_SELF = 0x400
_IN_MOVE_SELF = 0x800
_IN_Q_OVERFLOW = 0x4000
_IN_IGNORED = 0x8000
_IN_ONLYDIR = 0x01000000
_IN_EXCL_UNLINK = 0x04000000
_IN_NONBLOCK = os.O_NONBLOCK
_IN_CLOEXEC = os.O_CLOEXEC
# Names: the town root and the rig folders, where only entries coming and going matter (gt
# appends every event of the town to a file in the town root); also the env file's folder,
# while the env file is missing or a symlink.
_NAMES_MASK = (
    _IN_MOVED_FROM | _IN_MOVED_TO | _IN_CREATE | _IN_DELETE | _IN_DELETE_SELF | _IN_MOVE_SELF
    | _IN_ONLYDIR | _IN_EXCL_UNLINK
)  # fmt: skip
# The env file's folder while the file is there: the folder itself going, nothing of its files.
_SELF_MASK = _IN_DELETE_SELF | _IN_MOVE_SELF | _IN_ONLYDIR
# Content: the settings folders, whose files may also be written in place.
_CONTENT_MASK = _NAMES_MASK | _IN_MODIFY | _IN_ATTRIB
# The env file itself (its inode, watched again on each file that replaces it): written in
# place, replaced (its link count drops), or going. Not its folder, often a busy home folder.
_FILE_MASK = _IN_MODIFY | _IN_ATTRIB | _IN_CLOSE_WRITE | _IN_DELETE_SELF | _IN_MOVE_SELF
_EVENT = struct.Struct("iIII")  # wd, mask, cookie, len; then len bytes of NUL-padded name


class _Ring:
    """What one ring brought: its paths (settings files, the env file, entries of the town
    root and the rig folders), whether watchfiles must collect (a settings file changed, or
    the queue was lost), and whether the queue was lost (anything may have changed)."""

    __slots__ = ("collect", "lost", "paths")

    def __init__(self, *, collect: bool = False) -> None:
        self.paths: set[Path] = set()
        self.collect = collect
        self.lost = False

    def add(self, other: _Ring) -> None:
        self.paths |= other.paths
        self.collect = self.collect or other.collect
        self.lost = self.lost or other.lost


class _Doorbell:
    """A non-blocking inotify descriptor on the watched folders and the env file, read on
    the event loop."""

    def __init__(self, libc: Any, fd: int, places: dict[int, Path], file: Path) -> None:
        self._libc = libc
        self._fd = fd
        self._places = places  # watch descriptor -> its folder, or the env file
        self._file = file
        self._file_wd: int | None = None
        # The env file's folder, watched for names while the env file is missing or a symlink
        # (unless it is one of the town's folders, watched anyway).
        self._shared = file.parent in places.values()
        self._folder_wd: int | None = None
        self._folder_names = False  # whether its watch is for names, or for itself only

    @classmethod
    def open(
        cls, folders: Iterable[Path], *, content: frozenset[Path], file: Path
    ) -> _Doorbell | None:
        """Watch `folders` (`content` ones for writes too) and the file `file`; None when
        inotify is not there; OSError when a folder is not."""
        libc = _libc()
        if libc is None:
            return None
        fd = libc.inotify_init1(_IN_NONBLOCK | _IN_CLOEXEC)
        if fd < 0:
            code = ctypes.get_errno()
            if code in _EXHAUSTED:  # there is inotify, but none to spare right now
                raise OSError(code, os.strerror(code), "inotify_init1")
            log.warning("watcher_doorbell_unavailable", error=os.strerror(code))
            return None
        places: dict[int, Path] = {}
        try:
            for folder in folders:
                mask = _CONTENT_MASK if folder in content else _NAMES_MASK
                wd = libc.inotify_add_watch(fd, os.fsencode(folder), mask)
                if wd < 0:
                    code = ctypes.get_errno()
                    raise OSError(code, os.strerror(code), str(folder))
                places[wd] = folder
        except BaseException:
            os.close(fd)
            raise
        doorbell = cls(libc, fd, places, file)
        doorbell.watch_file()
        return doorbell

    def watch_file(self) -> bool:
        """Watch the env file's inode as it is now (a file renamed over it is a new inode;
        a symlink's target), and its folder: for the name while there is no file or it is a
        symlink (re-pointing a link changes no inode watched here), else only for the folder
        itself going (removed, renamed away: the file's own watch sees nothing of a rename).
        True when the file is there (it may have come while its folder's watch was being set
        up, unseen)."""
        wd = self._add(self._file, _FILE_MASK)
        linked = self._file.is_symlink()
        if not self._shared:
            self._watch_folder(names=wd is None or linked)
            if wd is None:
                wd = self._add(self._file, _FILE_MASK)  # it may have come meanwhile
        if wd is None:  # not there: an inode moved elsewhere is no longer the env file
            self._drop(self._file_wd)
            self._file_wd = None
            return False
        if wd != self._file_wd:
            self._drop(self._file_wd)  # the replaced inode
            self._file_wd = wd
            self._places[wd] = self._file
        return True

    def _watch_folder(self, *, names: bool) -> None:
        # One watch per inode: adding it again with another mask changes its mask.
        if self._folder_wd is not None and names == self._folder_names:
            return
        folder = self._file.parent
        wd = self._add(folder, _NAMES_MASK if names else _SELF_MASK)
        if wd != self._folder_wd:
            self._drop(self._folder_wd)
            self._folder_wd = wd
        if wd is not None:
            self._places[wd] = folder
            self._folder_names = names

    def _add(self, path: Path, mask: int) -> int | None:
        wd: int = self._libc.inotify_add_watch(self._fd, os.fsencode(path), mask)
        return None if wd < 0 else wd

    def _drop(self, wd: int | None) -> None:
        # Its events still queued, and its IN_IGNORED, are dropped by the drain.
        if wd is not None:
            self._libc.inotify_rm_watch(self._fd, wd)
            self._places.pop(wd, None)

    async def wait(self, relevant: Callable[[Path], bool], own_writes: OwnWrites) -> _Ring:
        """Return once the kernel reports a change of a path `relevant` accepts (asked once
        per path and read; a lost queue always counts), with every such path queued by then.

        Never while the daemon's own write is in flight (`own_writes`): a write that begins
        stops the listening, and what the kernel queued meanwhile is read once it is done,
        in one go, with no wake-up of its own. Temporary files of atomic writes are dropped by
        name before any path is built.

        The queue is read at once (what is queued already; once a write in flight has
        settled), then in plain callbacks of the loop (the descriptor's reader, and the
        callback the write's end schedules), not in steps of the waiting task: the daemon's
        own write is recognised there and listening goes on, and only a ring that names
        something wakes the task. Beginning a write takes the reader off the loop, where
        cancelling the wait took a step of the task too (with anyio's cancel scope formatting
        the cancelling task for its reason), while the write's worker thread waited for the
        GIL. In-process, a store and this watcher, 400 PATCHes 5 ms apart: the loop's time
        per PATCH beyond the store's own went from 400-450 to 170-230 µs (three pairs,
        `Handle._run` timed); a daemon's main thread, 0.05-0.2 ms of CPU per paced PATCH.
        anyio has no reader callback, only `wait_readable` (a task's wait), so this one place
        uses the asyncio loop's own `add_reader`: the daemon runs on asyncio (hypercorn's
        asyncio server), and the callbacks only read, recognise and set the task's future.
        """
        loop = asyncio.get_running_loop()
        woken: asyncio.Future[_Ring] = loop.create_future()
        withdraw: list[Callable[[], None]] = []

        def listen() -> None:
            loop.add_reader(self._fd, ready)
            withdraw.append(own_writes.on_begin(pause))

        def stop_listening() -> None:
            loop.remove_reader(self._fd)
            while withdraw:
                withdraw.pop()()

        def ready() -> None:
            stop_listening()
            read()

        def pause() -> None:  # the write has begun (`on_begin` calls back once)
            stop_listening()
            own_writes.when_settled(read_soon)

        def read_soon() -> None:  # after the write's own task has gone on (its answer)
            loop.call_soon(read)

        def read() -> None:
            if woken.done():  # cancelled meanwhile
                return
            if own_writes.when_settled(read_soon):  # another write began meanwhile
                return
            try:
                ring = self.drain(relevant)
            except BaseException as exc:
                woken.set_exception(exc)
                return
            if ring.collect or ring.paths:
                woken.set_result(ring)
            else:
                listen()

        read()
        try:
            return await woken
        finally:
            stop_listening()

    async def settle(
        self,
        ring: _Ring,
        relevant: Callable[[Path], bool],
        own_writes: OwnWrites,
        step_ms: int,
        limit_ms: int,
    ) -> None:
        """Add to `ring` what rings next, until `step_ms` pass without a ring or `limit_ms`
        since the first: a burst (a file written in place, a rig made) is one batch, as
        watchfiles' step makes it. Ends early once a settings file rings: watchfiles
        collects the rest."""
        deadline = anyio.current_time() + limit_ms / 1000
        while not ring.collect:
            quiet = min(step_ms / 1000, deadline - anyio.current_time())
            if quiet <= 0:
                return
            with anyio.move_on_after(quiet):
                ring.add(await self.wait(relevant, own_writes))
                continue
            return

    def drain(self, relevant: Callable[[Path], bool]) -> _Ring:
        """The ring of the queued events: each path once, temporary files of atomic writes
        left out by name before any path is built."""
        names: dict[tuple[int, bytes], None] = {}
        ring = _Ring()
        while True:
            try:
                buffer = os.read(self._fd, 64 * 1024)
            except BlockingIOError:
                break
            except OSError as exc:
                if exc.errno == errno.EINTR:
                    continue
                raise
            offset = 0
            size = _EVENT.size
            while offset + size <= len(buffer):
                wd, mask, _cookie, length = _EVENT.unpack_from(buffer, offset)
                offset += size
                name = buffer[offset : offset + length].rstrip(b"\0")
                offset += length
                if mask & _IN_Q_OVERFLOW:
                    ring.lost = ring.collect = True
                elif mask & _IN_IGNORED and wd == self._file_wd:
                    self._file_wd = None  # the env file's inode went (reported as it went)
                    del self._places[wd]
                elif wd in self._places:  # not a watch dropped already (a replaced inode)
                    names[wd, name] = None
        file_changed = ring.lost  # a lost queue may have held the env file's events
        for wd, name in names:
            text = os.fsdecode(name)
            if is_temporary(text):
                continue
            place = self._places.get(wd, self._file)
            path = place / text if text else place
            if path == self._file:
                file_changed = True
                continue
            if not relevant(path):
                continue
            ring.paths.add(path)
            ring.collect = ring.collect or _is_settings_file(path)
        # The env file, whatever happened to it (written, replaced, gone, back), is watched as
        # it is now before anyone reads it. One that came back while its folder's watch was
        # being set up is reported too: its own event may have come before that watch.
        if file_changed or self._file_wd is None:
            there = self.watch_file()
            if (file_changed or there) and relevant(self._file):
                ring.paths.add(self._file)
        return ring

    def close(self) -> None:
        os.close(self._fd)


def _read_quickly(path: Path) -> bytes | None:
    """The file's bytes, None when it cannot be read. Plain descriptor reads: `read_bytes`'
    buffered file object adds an ioctl, two lseeks and an fstat to every read, and this one
    runs on the event loop for every change of a settings file."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)
    except OSError:
        return None
    try:
        chunks = []
        while chunk := os.read(fd, 1 << 16):
            chunks.append(chunk)
        return b"".join(chunks)
    except OSError:
        return None
    finally:
        os.close(fd)


async def _settled(own_writes: OwnWrites) -> None:
    # Returns once no write of the daemon's own is in flight (at once when none is).
    done = anyio.Event()
    if own_writes.when_settled(done.set):
        await done.wait()


def _exhausted(exc: BaseException) -> bool:
    """Whether `exc` itself says that inotify's instances or watches are used up: an errno
    of the doorbell's own calls, or watchfiles' message (its OSError carries none).

    Asking the kernel afterwards (`_inotify_used_up`) is not enough: the failed watch has
    given its instance and watches back by then, so one of each is free again when only
    part of inotify is left (a reviewer, with one instance for the user: the doorbell had
    it, watchfiles' collect failed with EMFILE at every edit, and no edit was ever seen)."""
    if isinstance(exc, OSError) and exc.errno in _EXHAUSTED:
        return True
    text = str(exc)
    return "MaxFilesWatch" in text or any(
        int(code) in _EXHAUSTED for code in _OS_ERROR.findall(text)
    )


def _inotify_used_up() -> bool:
    """Whether inotify is there but has no instance or watch to spare now: asked of the
    kernel with one instance and one watch of `INOTIFY_PROBE`, both given back at once.

    The probe is a folder that is always there: the kernel looks the path up before it
    counts the watches, so a watch of a folder that is gone (a town root while it is made
    again) fails with ENOENT and never tells that the watches are used up.
    """
    libc = _libc()
    if libc is None:
        return False
    fd = libc.inotify_init1(_IN_NONBLOCK | _IN_CLOEXEC)
    if fd < 0:
        return ctypes.get_errno() in _EXHAUSTED
    try:
        wd = libc.inotify_add_watch(fd, os.fsencode(INOTIFY_PROBE), _NAMES_MASK)
        return wd < 0 and ctypes.get_errno() in _EXHAUSTED
    finally:
        os.close(fd)


def _libc() -> Any:
    """libc's inotify functions through ctypes, or None where there are none."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        init, add, remove = libc.inotify_init1, libc.inotify_add_watch, libc.inotify_rm_watch
    except (OSError, AttributeError):
        return None
    init.argtypes, init.restype = [ctypes.c_int], ctypes.c_int
    add.argtypes, add.restype = [ctypes.c_int, ctypes.c_char_p, ctypes.c_uint32], ctypes.c_int
    remove.argtypes, remove.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return libc


def _config_files(folders: Iterable[Path]) -> list[Path]:
    """The settings file of each settings folder among `folders` (there or not)."""
    return [folder / CONFIG for folder in folders if folder.name == SETTINGS]


def _stamps(paths: Iterable[Path]) -> dict[Path, StatKey | None]:
    """The whole stat of each path, as the read cache keys it (None: not there)."""
    stamps: dict[Path, StatKey | None] = {}
    for path in paths:
        try:
            stamps[path] = stat_key(os.stat(path))
        except OSError:
            stamps[path] = None
    return stamps


def _kind(before: object, after: object) -> Change:
    """The change between two stamps of a path (None: not there)."""
    if before is None:
        return Change.added
    return Change.deleted if after is None else Change.modified


class _Outcome:
    __slots__ = ("failed", "retry_now", "started")

    def __init__(self) -> None:
        self.failed = False
        self.retry_now = False  # watch again at once (the way to watch changed)
        self.started = False


async def _set_when_cancelled(stop: anyio.Event) -> None:
    # watchfiles' thread ignores cancellation; the stop event ends it within one step.
    try:
        await anyio.sleep_forever()
    finally:
        stop.set()


async def _call_safely(
    name: str, callback: Callable[..., Awaitable[object]], *args: object
) -> None:
    try:
        await callback(*args)
    except Exception as exc:
        log.exception("watcher_callback_failed", callback=name, error=str(exc))


def _absolute(path: Path) -> Path:
    # Not resolved: the paths watchfiles reports start with the folder as it was given.
    return Path(os.path.abspath(path))
