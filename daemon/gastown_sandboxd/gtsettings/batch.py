"""Write several files as one change: when one write fails, those already written go back.

Before a file is replaced its old version is kept by a hard link in the same folder, so
putting it back is a rename that needs no free space (the usual failure is ENOSPC); where
links are not possible the old bytes are written again. A settings folder made for a new
file is removed again with it. The failure is raised as `StorageUnavailable`, naming the
cause (ENOSPC, EROFS, EACCES, ...) and any file that could not be put back.
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

from gastown_sandboxd.errors import StorageUnavailable

log = structlog.get_logger(__name__)

Write = Callable[[Path, bytes], object]

_CAUSES = {
    errno.ENOSPC: "no space left on the device (ENOSPC)",
    errno.EROFS: "the file system is read-only (EROFS)",
    errno.EACCES: "permission denied (EACCES)",
    errno.EPERM: "operation not permitted (EPERM)",
    errno.EDQUOT: "the disk quota is exceeded (EDQUOT)",
}


@dataclass(frozen=True, slots=True)
class FileWrite:
    """One file of the batch; `old` is None when the file does not exist yet."""

    path: Path
    name: str
    data: bytes
    old: bytes | None


@dataclass(slots=True)
class _Started:
    item: FileWrite
    made_folder: bool = False
    backup: Path | None = None


def write_all(writes: Sequence[FileWrite], write: Write) -> None:
    """Write every file with `write`, or leave every file as it was and raise."""
    started: list[_Started] = []
    for item in writes:
        step = _Started(item)
        started.append(step)
        try:
            step.made_folder = _make_folder(item.path.parent)
            step.backup = _link_backup(item)
            write(item.path, item.data)
        except Exception as exc:
            unrestored = [s.item.name for s in reversed(started) if not _restore(s, write)]
            if not isinstance(exc, OSError):
                raise
            raise StorageUnavailable(describe_failure(exc, item.name, unrestored)) from exc
    for step in started:
        _drop_backup(step)


def describe_failure(exc: OSError, name: str, unrestored: Sequence[str] = ()) -> str:
    """A sentence for the operator: which file, why, and what was left behind."""
    code = exc.errno or 0
    cause = _CAUSES.get(code) or f"{exc.strerror or exc} ({errno.errorcode.get(code, '?')})"
    if unrestored:
        return f"cannot write {name}: {cause}; could not restore {', '.join(unrestored)}"
    return f"cannot write {name}: {cause}; every settings file was left as it was"


def _make_folder(folder: Path) -> bool:
    if folder.is_dir():
        return False
    os.mkdir(folder, 0o755)
    return True


def _link_backup(item: FileWrite) -> Path | None:
    # Ends in .tmp, like the atomic writer's temporary files, so watchers pass it by.
    if item.old is None:
        return None
    backup = item.path.with_name(f".{item.path.name}.{secrets.token_hex(4)}.old.tmp")
    try:
        os.link(item.path, backup)
    except OSError:
        return None
    return backup


def _restore(step: _Started, write: Write) -> bool:
    item = step.item
    try:
        if item.old is None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(item.path)
            if step.made_folder:
                with contextlib.suppress(OSError):
                    os.rmdir(item.path.parent)
        elif _read(item.path) != item.old:
            _put_back(step, item.old, write)
    except Exception as exc:
        log.error("settings_restore_failed", file=item.name, error=str(exc))
        return False
    finally:
        _drop_backup(step)
    return True


def _put_back(step: _Started, old: bytes, write: Write) -> None:
    # The link holds the old inode only if the write replaced the file rather than
    # rewriting it in place (a bind-mounted file), so check before renaming it back.
    if step.backup is not None and _read(step.backup) == old:
        try:
            os.replace(step.backup, step.item.path)
        except OSError:
            pass
        else:
            step.backup = None
            return
    write(step.item.path, old)


def _drop_backup(step: _Started) -> None:
    if step.backup is not None:
        with contextlib.suppress(OSError):
            os.unlink(step.backup)
        step.backup = None


def _read(path: Path) -> bytes | None:
    try:
        return path.read_bytes()
    except OSError:
        return None
