"""The one writer of files: readers always see the old or the new version, never a mix.

Steps: a temporary file in the same folder, write, fsync, chmod, rename over the target,
fsync the folder. A target that is a bind-mounted file cannot be renamed over (EBUSY,
EXDEV); then the file is rewritten in place, which is logged because it is not atomic.
"""

from __future__ import annotations

import contextlib
import errno
import glob
import os
import stat
import tempfile
import time
from pathlib import Path

import structlog

from gastown_sandboxd.errors import AtomicWriteError

log = structlog.get_logger(__name__)

_IN_PLACE_ERRNOS = frozenset({errno.EBUSY, errno.EXDEV})


def write_atomic(path: Path, data: bytes, *, mode: int | None = None) -> bool:
    """Replace `path` with `data` atomically; return True when the in-place fallback was used.

    `mode` None keeps the mode of an existing file (0644 for a new one). Raises
    `AtomicWriteError` (an OSError with the original errno) with the old file intact.
    """
    path = Path(path)
    folder = path.parent
    final_mode = _target_mode(path, mode)
    try:
        fd, tmp_name = _mkstemp(folder, path.name)
    except OSError as exc:
        raise AtomicWriteError(
            exc.errno, f"cannot create a file in {folder}: {exc.strerror}"
        ) from exc
    tmp = Path(tmp_name)
    try:
        try:
            with os.fdopen(fd, "wb") as handle:
                handle.write(data)
                handle.flush()
                os.fsync(handle.fileno())
                os.fchmod(handle.fileno(), final_mode)
            os.replace(tmp, path)
        except OSError as exc:
            if exc.errno in _IN_PLACE_ERRNOS:
                log.warning(
                    "atomic_rename_refused_writing_in_place",
                    path=str(path),
                    errno=errno.errorcode.get(exc.errno or 0, "?"),
                )
                _write_in_place(path, data, final_mode)
                return True
            raise AtomicWriteError(exc.errno, f"cannot write {path}: {exc.strerror}") from exc
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
    _fsync_folder(folder)
    return False


def _mkstemp(folder: Path, name: str) -> tuple[int, str]:
    return tempfile.mkstemp(prefix=f".{name}.", suffix=".tmp", dir=folder)


def _target_mode(path: Path, mode: int | None) -> int:
    if mode is not None:
        return mode
    try:
        return stat.S_IMODE(path.stat().st_mode)
    except FileNotFoundError:
        return 0o644


def _write_in_place(path: Path, data: bytes, mode: int) -> None:
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT, mode)
        try:
            os.ftruncate(fd, 0)
            view = memoryview(data)
            while view:
                written = os.write(fd, view)
                view = view[written:]
            os.fsync(fd)
            os.fchmod(fd, mode)
        finally:
            os.close(fd)
    except OSError as exc:
        raise AtomicWriteError(exc.errno, f"cannot write {path} in place: {exc.strerror}") from exc


def _fsync_folder(folder: Path) -> None:
    # The rename is durable only once the folder's entry is on disk.
    try:
        fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def remove_stale_temporaries(target: Path, *, older_than: float = 600.0) -> int:
    """Remove `.NAME.*.tmp` files beside `target` that a killed writer left behind.

    Only files older than `older_than` seconds go: a live writer (the cron fallback uses the
    same pattern) finishes in seconds. Returns how many were removed.
    """
    target = Path(target)
    cutoff = time.time() - older_than
    removed = 0
    try:
        candidates = list(target.parent.glob(f".{glob.escape(target.name)}.*.tmp"))
    except OSError:
        return 0
    for path in candidates:
        try:
            info = path.lstat()
            if stat.S_ISREG(info.st_mode) and info.st_mtime < cutoff:
                path.unlink()
                removed += 1
        except OSError:
            continue
    if removed:
        log.info("stale_temporaries_removed", folder=str(target.parent), count=removed)
    return removed
