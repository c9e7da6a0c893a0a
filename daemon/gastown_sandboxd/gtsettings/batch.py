"""Write several settings files as one change: all of them or none, even across a SIGKILL.

Every folder is opened from the town root's descriptor one component at a time with
`O_NOFOLLOW` and every file is written relative to its folder's descriptor (`folders.py`),
so a rig folder swapped for a symlink mid-change cannot redirect a write. Each file is first
read again through its descriptor: bytes other than those the change was planned on (someone
edited it, or the folder was swapped) stop the change before anything is written
(`SettingsConflict`, 409).

A change of two files or more writes the intent journal (`journal.py`) before the first
rename. When a write fails while the daemon runs, the files already written go back: the
old version is kept by a hard link until the change is done, so putting it back is a rename
that needs no free space (the usual failure is ENOSPC); where links are not possible the old
bytes are written again. A settings folder made for a new file is removed again. The
failure is raised as `StorageUnavailable`, naming the cause (ENOSPC, EROFS, EACCES, ...) and
any file that could not be put back.
"""

from __future__ import annotations

import contextlib
import errno
import os
import secrets
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import structlog

from gastown_sandboxd.atomic import fsync_folder_fd, write_atomic_at
from gastown_sandboxd.errors import SettingsConflict, StorageUnavailable
from gastown_sandboxd.gtsettings import journal
from gastown_sandboxd.gtsettings.folders import (
    SettingsFolder,
    open_settings,
    open_town_root,
    read_at,
)
from gastown_sandboxd.gtsettings.journal import JournalEntry
from gastown_sandboxd.gtsettings.schema import CONFIG, relative_path

log = structlog.get_logger(__name__)

_CAUSES = {
    errno.ENOSPC: "no space left on the device (ENOSPC)",
    errno.EROFS: "the file system is read-only (EROFS)",
    errno.EACCES: "permission denied (EACCES)",
    errno.EPERM: "operation not permitted (EPERM)",
    errno.EDQUOT: "the disk quota is exceeded (EDQUOT)",
}


@dataclass(frozen=True, slots=True)
class Target:
    """Where one file goes: the entry `name` of the open folder `dir_fd` (at `path`)."""

    path: Path
    dir_fd: int
    name: str = CONFIG


Write = Callable[[Target, bytes], object]


class SettingsChanged(SettingsConflict):
    """A file's bytes are not those the change was planned on (someone edited it since):
    the one conflict that planning again from a fresh read can resolve."""


def write_target(target: Target, data: bytes) -> os.stat_result:
    """The writer of every settings file: atomic, relative to the folder's descriptor.

    Returns the stat of the file it put in place, taken right after, for the read cache
    (`snapshot.remember`); a writer that returns anything else leaves the cache alone.
    """
    write_atomic_at(target.dir_fd, target.name, data, folder=target.path.parent)
    return os.stat(target.name, dir_fd=target.dir_fd, follow_symlinks=False)


@dataclass(frozen=True, slots=True)
class FileWrite:
    """One file of the batch: the town's (rig None) or a rig's; `old` None when absent."""

    rig: str | None
    data: bytes
    old: bytes | None

    @property
    def name(self) -> str:
        return relative_path(self.rig)


@dataclass(slots=True)
class _Step:
    item: FileWrite
    folder: SettingsFolder
    made_folder: bool = False
    backup: str | None = None
    started: bool = False


def write_all(
    town_root: Path, writes: Sequence[FileWrite], write: Write = write_target
) -> dict[str | None, os.stat_result]:
    """Write every file with `write`, or leave every file as it was and raise.

    Returns, by rig, the stat each write returned (`write_target` does). Raises
    `SettingsConflict` when a file or folder is not what the change was planned on,
    `StorageUnavailable` when the disk refuses; the files are as they were then.
    """
    if not writes:
        return {}
    try:
        root_fd = open_town_root(town_root)
    except OSError as exc:
        raise StorageUnavailable(describe_failure(exc, writes[0].name)) from exc
    steps: list[_Step] = []
    try:
        for item in writes:
            steps.append(_Step(item, _open_checked(root_fd, town_root, item)))
        for step in steps:
            step.made_folder = step.folder.fd is None
        journaled = len(steps) > 1
        if journaled:
            entries = [
                JournalEntry(s.item.rig, s.item.old, s.item.data, s.made_folder) for s in steps
            ]
            try:
                journal.begin(root_fd, town_root, entries)
            except OSError as exc:
                raise StorageUnavailable(describe_failure(exc, journal.JOURNAL)) from exc
        written: dict[str | None, os.stat_result] = {}
        for index, step in enumerate(steps):
            try:
                # The last write is atomic on its own: if it fails, its file is as it was.
                done = _write_one(step, town_root, write, backup=index < len(steps) - 1)
                if isinstance(done, os.stat_result):
                    written[step.item.rig] = done
            except Exception as exc:
                unrestored = _undo(root_fd, steps, write, journaled)
                if not isinstance(exc, OSError):
                    raise
                raise StorageUnavailable(describe_failure(exc, step.item.name, unrestored)) from exc
        if journaled:
            journal.finish(root_fd)
        for step in steps:
            _drop_backup(step)
        return written
    finally:
        for step in steps:
            step.folder.close()
        os.close(root_fd)


def describe_failure(exc: OSError, name: str, unrestored: Sequence[str] = ()) -> str:
    """A sentence for the operator: which file, why, and what was left behind."""
    code = exc.errno or 0
    cause = _CAUSES.get(code) or f"{exc.strerror or exc} ({errno.errorcode.get(code, '?')})"
    if unrestored:
        return f"cannot write {name}: {cause}; could not restore {', '.join(unrestored)}"
    return f"cannot write {name}: {cause}; every settings file was left as it was"


def _open_checked(root_fd: int, town_root: Path, item: FileWrite) -> SettingsFolder:
    # The bytes read through the descriptors must be those the change was planned on.
    try:
        folder = open_settings(root_fd, town_root, item.rig)
    except OSError as exc:
        if exc.errno in (errno.ELOOP, errno.ENOTDIR, errno.ENOENT, errno.EINVAL):
            raise SettingsConflict(
                f"{item.name}: its folder is no longer a real folder of the town "
                f"({os.strerror(exc.errno or 0)}); nothing was written"
            ) from exc
        raise StorageUnavailable(describe_failure(exc, item.name)) from exc
    try:
        current = folder.read()
    except OSError as exc:
        folder.close()
        if exc.errno in (errno.ELOOP, errno.EINVAL):
            raise SettingsConflict(
                f"{item.name} is not a regular file any more; nothing was written"
            ) from exc
        raise StorageUnavailable(describe_failure(exc, item.name)) from exc
    if current != item.old:
        folder.close()
        raise SettingsChanged(
            f"{item.name} changed while the change was being prepared; nothing was written, "
            "try again"
        )
    return folder


def _write_one(step: _Step, town_root: Path, write: Write, *, backup: bool) -> object:
    step.started = True
    folder = step.folder
    if folder.fd is None:
        folder.make()
    assert folder.fd is not None
    if backup:
        step.backup = _link_backup(folder.fd, step.item)
    return write(Target(town_root / step.item.name, folder.fd), step.item.data)


def _undo(root_fd: int, steps: list[_Step], write: Write, journaled: bool) -> list[str]:
    if journaled:
        try:
            journal.turn_back(root_fd)
        except OSError as exc:
            log.error("settings_journal_turn_back_failed", error=str(exc))
    unrestored = [s.item.name for s in reversed(steps) if s.started and not _restore(s, write)]
    if journaled and not unrestored:
        with contextlib.suppress(OSError):
            journal.finish(root_fd)
    return unrestored


def _link_backup(dir_fd: int, item: FileWrite) -> str | None:
    # Ends in .tmp, like the atomic writer's temporary files, so watchers pass it by.
    if item.old is None:
        return None
    backup = f".{CONFIG}.{secrets.token_hex(4)}.old.tmp"
    try:
        os.link(CONFIG, backup, src_dir_fd=dir_fd, dst_dir_fd=dir_fd, follow_symlinks=False)
    except OSError:
        return None
    return backup


def _restore(step: _Step, write: Write) -> bool:
    item = step.item
    folder = step.folder
    try:
        if folder.fd is None:
            return True
        if item.old is None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(CONFIG, dir_fd=folder.fd)
            fsync_folder_fd(folder.fd)
            if step.made_folder:
                folder.remove()
        elif folder.read() != item.old:
            _put_back(step, item.old, write)
    except Exception as exc:
        log.error("settings_restore_failed", file=item.name, error=str(exc))
        return False
    finally:
        _drop_backup(step)
    return True


def _put_back(step: _Step, old: bytes, write: Write) -> None:
    # The link holds the old inode only if the write replaced the file rather than
    # rewriting it in place (a bind-mounted file), so check before renaming it back.
    fd = step.folder.fd
    assert fd is not None
    if step.backup is not None and _read_quietly(fd, step.backup) == old:
        try:
            os.replace(step.backup, CONFIG, src_dir_fd=fd, dst_dir_fd=fd)
        except OSError:
            pass
        else:
            step.backup = None
            fsync_folder_fd(fd)
            return
    write(Target(step.folder.path / CONFIG, fd), old)


def _drop_backup(step: _Step) -> None:
    fd = step.folder.fd
    if step.backup is not None and fd is not None:
        with contextlib.suppress(OSError):
            os.unlink(step.backup, dir_fd=fd)
    step.backup = None


def _read_quietly(dir_fd: int, name: str) -> bytes | None:
    try:
        return read_at(dir_fd, name)
    except OSError:
        return None
