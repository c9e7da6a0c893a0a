"""The town's settings files as read at one moment: bytes, documents, or why unreadable.

Reads are cached per path against the file's `(inode, size, mtime_ns, ctime_ns)`: a file that
stat says is unchanged is not read and parsed again. Two guards keep the cache from ever
serving stale content: an entry read from the disk is used only when the file was already a
second old when it was read (an in-place edit in the same timestamp tick, same size, cannot
hide), and `forget` drops the paths the watcher names (every edit by someone else).

What the daemon itself just wrote goes in too (`remember`, after the rename): its bytes and
document, against the stat of the file it renamed into place, unless a `forget` came since
the write began (`epoch`). So the next PATCH or GET reads none of the files the last PATCH
wrote, even within that second; an edit by someone else right after (even within a tick,
keeping the key) is named by the watcher, which drops the entry. The write itself checks
the bytes under its descriptors again (`batch.write_all`), so a stale entry can at worst
cost a 409, never overwrite someone's edit.

Documents are shared, never changed in place (every caller builds new dicts: see
`merge_patch`).
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

from gastown_sandboxd.errors import SettingsFileUnreadable
from gastown_sandboxd.gtsettings.folders import read_settings_file
from gastown_sandboxd.gtsettings.layout import Lstat, plain_lstat, rig_files
from gastown_sandboxd.gtsettings.patch import (
    managed_view,
    member_key,
    parse_document,
    revision_of,
    view_text,
)
from gastown_sandboxd.gtsettings.schema import (
    CONFIG,
    SETTINGS,
    TOWN_FILE,
    Doc,
    Scope,
    TownFiles,
    relative_path,
)

# How the API encodes a JSON answer: Starlette's `JSONResponse.render` exactly, so that an
# answer assembled from texts worked out once (`Snapshot.view_json`) is the same bytes.
ANSWER_JSON = json.JSONEncoder(ensure_ascii=False, allow_nan=False, separators=(",", ":"))


@dataclass(frozen=True, slots=True)
class FileState:
    """A settings file as read: bytes (None when absent), document, or why it is unreadable.

    Never changed once made, and neither is its document: what is derived from them (the
    digest, the file's part of the revision) is worked out once and kept in `memo`.
    """

    raw: bytes | None = None
    doc: Doc | None = None
    error: str | None = None
    memo: dict[str, str | None] = field(default_factory=dict, compare=False, repr=False)

    @property
    def digest(self) -> str | None:
        """SHA-256 of the bytes: how the store tells its own content from others'."""
        if "digest" not in self.memo:
            raw = self.raw
            self.memo["digest"] = None if raw is None else hashlib.sha256(raw).hexdigest()
        return self.memo["digest"]

    def view_text(self, scope: Scope) -> str:
        """This file's part of the revision (`patch.view_text`), worked out once."""
        text = self.memo.get(scope)
        if text is None:
            text = self.memo[scope] = view_text(self.doc, scope)
        return text

    def view_json(self, scope: Scope) -> str:
        """This file's managed view as the API answers it (`ANSWER_JSON`), worked out once."""
        key = "json:" + scope
        text = self.memo.get(key)
        if text is None:
            text = self.memo[key] = ANSWER_JSON.encode(managed_view(self.doc, scope))
        return text


@dataclass(frozen=True, slots=True)
class Snapshot:
    """Every settings file of the town, keyed by rig (None for the town).

    Never changed once made: its revision and its answer's texts are worked out once and kept
    in `memo` (a PATCH asks the snapshot it planned on and the one it left twice each).
    """

    files: dict[str | None, FileState] = field(default_factory=dict)
    memo: dict[str, str] = field(default_factory=dict, compare=False, repr=False)

    def town_files(self) -> TownFiles:
        """The parsed files, unreadable ones by the digest of their bytes."""
        town = self.files[None]
        rigs = {rig: s.doc for rig, s in self.files.items() if rig is not None and not s.error}
        return TownFiles(town=town.doc, rigs=rigs, unreadable=self._unreadable())

    def revision(self) -> str:
        """`patch.revision(self.town_files())`, from each file's kept part; worked out once."""
        known = self.memo.get("revision")
        if known is not None:
            return known
        rigs = {
            rig: s.view_text("rig")
            for rig, s in self.files.items()
            if rig is not None and s.error is None and s.doc is not None
        }
        text = revision_of(self.files[None].view_text("town"), rigs, self._unreadable())
        self.memo["revision"] = text
        return text

    def _unreadable(self) -> dict[str, str]:
        return {
            relative_path(rig): s.digest or ""
            for rig, s in self.files.items()
            if s.error is not None
        }

    def view(self) -> tuple[Doc, dict[str, Doc]]:
        """The managed view of the town and of each rig with a readable file, rigs sorted."""
        rigs = {rig: managed_view(s.doc, "rig") for rig, s in self._viewed_rigs()}
        return managed_view(self.files[None].doc, "town"), rigs

    def view_json(self) -> tuple[str, str]:
        """`view()` as the API answers it (`ANSWER_JSON`): the town's object and the object
        of the rigs, from each file's text (`FileState.view_json`); worked out once.

        A PATCH's answer and GET /config hold every rig. With 100 rigs, encoding their
        views took the event loop ~10,000 instructions a rig on every PATCH (callgrind);
        the store works this out in its worker thread (`SettingsStore._plan_group`)."""
        town, rigs = self.memo.get("json:town"), self.memo.get("json:rigs")
        if town is None or rigs is None:
            members = (f"{member_key(rig)}:{s.view_json('rig')}" for rig, s in self._viewed_rigs())
            town = self.memo["json:town"] = self.files[None].view_json("town")
            rigs = self.memo["json:rigs"] = "{" + ",".join(members) + "}"
        return town, rigs

    def _viewed_rigs(self) -> list[tuple[str, FileState]]:
        return sorted(
            (rig, s) for rig, s in self.files.items() if rig is not None and s.doc is not None
        )


def read_snapshot(town_root: Path) -> Snapshot:
    """Read the town's file and the file of every rig folder (absent ones included).

    A town file whose path leads out of the town root (a symlinked `settings` folder or
    file) is unreadable: nothing is read or written through it.
    """
    snapshot = _snapshot(town_root, _read)
    assert snapshot is not None
    return snapshot


def cached_snapshot(town_root: Path) -> Snapshot | None:
    """`read_snapshot` from the cache and stat alone, or None when some file would have to
    be read (its bytes are not cached against the stat it has now).

    No file is opened: two lstats, the listing of the town root, two lstats per rig (each
    file's lstat is its stat: `layout.plain_lstat`). Cheap enough for the event loop, where
    a hop to a worker thread costs more.
    """
    return _snapshot(town_root, _cached_file)


def _snapshot(
    town_root: Path, read: Callable[[str, Scope, str, Lstat | None], FileState | None]
) -> Snapshot | None:
    # Paths as strings: a Path is built only for a file that is read from the disk. Each file
    # is stat'ed once, by the lstat that also tells it is no symlink (`layout.plain_lstat`);
    # it was lstat'ed, then stat'ed. Every rig costs every PATCH this: one PATCH of the town
    # file at a time from a raw client, p50 (CPU), 5 alternating rounds of 300: 100 rigs
    # 3.53 (3.23) -> 2.89 (2.60) ms, 32 rigs 2.16 (1.93) -> 1.97 (1.77) ms; with 2 rigs,
    # the worker's instructions per PATCH 1,283k -> 1,201k (callgrind).
    root = os.path.abspath(town_root)
    settings = os.path.join(root, SETTINGS)
    town_file = os.path.join(settings, CONFIG)
    town: FileState | None
    info = plain_lstat(settings)
    if info is not None or _inside(root, town_file):
        town = read(town_file, "town", TOWN_FILE, info)
        if town is None:
            return None
    else:
        town = FileState(error=f"{TOWN_FILE} leads out of the town root through a symlink")
    files: dict[str | None, FileState] = {None: town}
    base = os.path.join(root, "")
    for rig, info in rig_files(root):
        state = read(f"{base}{rig}/{SETTINGS}/{CONFIG}", "rig", relative_path(rig), info)
        if state is None:
            return None
        files[rig] = state
    return Snapshot(files)


# An entry is trusted only for a file whose mtime was this far behind the read (timestamps
# move in coarse ticks: a same-size in-place edit within one would keep the key).
QUIET_NS = 1_000_000_000

StatKey = tuple[int, int, int, int]


def stat_key(info: os.stat_result) -> StatKey:
    """What tells a file unchanged without reading it: inode, size, mtime and ctime (ns).
    A cached read is keyed on it, and the watcher polling by stat compares it."""
    return (info.st_ino, info.st_size, info.st_mtime_ns, info.st_ctime_ns)


_cache: dict[str, tuple[StatKey, str, Scope, FileState]] = {}
_cache_lock = threading.Lock()


_epoch = 0  # counts `forget` calls: a write that began before one does not `remember`


def forget(paths: Iterable[Path | str]) -> None:
    """Drop the cached reads of `paths`: the next read of each goes to the disk."""
    global _epoch
    with _cache_lock:
        _epoch += 1
        for path in paths:
            _cache.pop(os.path.abspath(path), None)


def epoch() -> int:
    """Taken by a writer before it writes, and handed to `remember` after."""
    with _cache_lock:
        return _epoch


def remember(
    path: Path, scope: Scope, name: str, state: FileState, info: os.stat_result, since: int
) -> None:
    """Cache `state` as what the file at `path` holds: the daemon has just put it in place,
    and `info` is the stat its writer took right after. Nothing is kept when a `forget`
    came after `since` (an edit by someone else may have landed since the write began) or
    when the size is not the state's."""
    key = os.path.abspath(path)
    with _cache_lock:
        if since == _epoch and state.raw is not None and info.st_size == len(state.raw):
            _cache[key] = (stat_key(info), name, scope, state)
        else:
            _cache.pop(key, None)


def read_file(path: Path | str, scope: Scope, name: str) -> FileState:
    """One file: absent, parsed, or unreadable with the reason (named by `name`)."""
    return _read(os.path.abspath(path), scope, name, None)


def _read(key: str, scope: Scope, name: str, info: Lstat | None) -> FileState:
    # `key`: an absolute, normal path; `info`: its stat or the error, taken by the caller
    # (None: taken here).
    before = _lookup(key, scope, name, info)
    if isinstance(before, FileState):
        return before
    read_at = time.time_ns()
    state = _read_uncached(Path(key), scope, name)
    if state.raw is not None and before.st_size == len(state.raw):
        quiet = read_at - max(before.st_mtime_ns, before.st_ctime_ns) > QUIET_NS
        with _cache_lock:
            if quiet:
                _cache[key] = (stat_key(before), name, scope, state)
            else:
                _cache.pop(key, None)
    return state


def _cached_file(key: str, scope: Scope, name: str, info: Lstat | None) -> FileState | None:
    """`_read` when stat alone tells (absent, unreadable, cached); None when it would read."""
    found = _lookup(key, scope, name, info)
    return found if isinstance(found, FileState) else None


def _lookup(key: str, scope: Scope, name: str, info: Lstat | None) -> FileState | os.stat_result:
    """What stat tells of the file at `key` (`info`, else a stat taken now): absent,
    unreadable or cached as a state, or else its stat, against which to read it."""
    if info is None:
        try:
            info = os.stat(key)
        except OSError as exc:
            info = exc
    if isinstance(info, FileNotFoundError | NotADirectoryError):
        forget([key])
        return FileState()
    if isinstance(info, OSError):
        return FileState(error=f"{name} cannot be read: {info.strerror or info}")
    cached = _cache.get(key)  # one get: atomic, no lock
    if cached is not None and cached[0] == stat_key(info) and cached[1:3] == (name, scope):
        return cached[3]
    return info


def _read_uncached(path: Path, scope: Scope, name: str) -> FileState:
    try:
        raw = read_settings_file(path, rig=scope == "rig")
    except (FileNotFoundError, NotADirectoryError):
        return FileState()
    except OSError as exc:
        return FileState(error=f"{name} cannot be read: {exc.strerror or exc}")
    try:
        return FileState(raw=raw, doc=parse_document(raw, scope, file=name))
    except SettingsFileUnreadable as exc:
        return FileState(raw=raw, error=exc.message)


def _inside(town_root: str, path: str) -> bool:
    # Where a symlink is on the way (`plain_lstat` said so): whether it still leads inside.
    root = os.path.realpath(town_root)
    return os.path.realpath(path).startswith(root + os.sep)
