"""The one writer of files: readers always see the old or the new version, never a mix.

Steps: a temporary file in the same folder, write, fsync, chmod, rename over the target,
fsync the folder. `write_atomic_at` does the same inside a folder given by an open
descriptor, so a folder swapped for a symlink after it was checked cannot redirect it.
A target that is a bind-mounted file cannot be renamed over (EBUSY, EXDEV);
then the file is rewritten in place, which is logged because it is not atomic.

`durable=False` leaves out both fsyncs: the file is still whole before it is renamed in, so
readers and a restart after any SIGKILL see the old or the new version, but it reaches the
disk when the kernel writes it back, or at `make_durable`: for state that its owner makes
durable a moment later, once per burst of writes (`LastApplied`).
"""

from __future__ import annotations

import contextlib
import errno
import glob
import os
import secrets
import stat
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import structlog

from gastown_sandboxd.errors import AtomicWriteError

if TYPE_CHECKING:
    from _typeshed import StrPath

log = structlog.get_logger(__name__)

_IN_PLACE_ERRNOS = frozenset({errno.EBUSY, errno.EXDEV})


def write_atomic(
    path: StrPath, data: bytes, *, mode: int | None = None, durable: bool = True
) -> bool:
    """Replace `path` with `data` atomically; return True when the in-place fallback was used.

    `mode` None keeps the mode of an existing file (0644 for a new one). `durable` False: no
    fsync (see the module docstring). Raises `AtomicWriteError` (an OSError with the
    original errno) with the old file intact.
    """
    path = Path(path)
    return _write(_Place(path.parent, None), path.name, data, mode, durable)


def make_durable(path: StrPath) -> None:
    """fsync `path` and its folder: what `write_atomic(durable=False)` left out.

    Raises `AtomicWriteError` when the file cannot be opened or fsynced.
    """
    path = Path(path)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError as exc:
        raise AtomicWriteError(exc.errno, f"cannot fsync {path}: {exc.strerror}") from exc
    _fsync_folder(_Place(path.parent, None))


def write_atomic_at(
    dir_fd: int, name: str, data: bytes, *, mode: int | None = None, folder: Path | None = None
) -> bool:
    """`write_atomic` of the entry `name` of the open folder `dir_fd`, following no symlink.

    The folder is the one the descriptor was opened on, whatever its path leads to now; a
    symlink at `name` is replaced, never written through. `folder` names it in messages.
    """
    return _write(_Place(folder or Path(f"<fd {dir_fd}>"), dir_fd), name, data, mode, True)


@dataclass(frozen=True, slots=True)
class _Place:
    """A folder given by path (`dir_fd` None) or by an open descriptor."""

    folder: Path
    dir_fd: int | None

    def name(self, entry: str) -> str:
        return entry if self.dir_fd is not None else str(self.folder / entry)

    def at(self) -> dict[str, int]:
        return {} if self.dir_fd is None else {"dir_fd": self.dir_fd}

    def rename_at(self) -> dict[str, int]:
        return {} if self.dir_fd is None else {"src_dir_fd": self.dir_fd, "dst_dir_fd": self.dir_fd}


def _write(place: _Place, name: str, data: bytes, mode: int | None, durable: bool) -> bool:
    target = place.folder / name
    final_mode = _target_mode(place, name, mode)
    try:
        fd, tmp_name = _create_temporary(place, name)
    except OSError as exc:
        raise AtomicWriteError(
            exc.errno, f"cannot create a file in {place.folder}: {exc.strerror}"
        ) from exc
    try:
        try:
            try:
                _write_fully(fd, data)
                if durable:
                    os.fsync(fd)
                os.fchmod(fd, final_mode)
            finally:
                os.close(fd)
            os.replace(place.name(tmp_name), place.name(name), **place.rename_at())
            tmp_name = ""
        except OSError as exc:
            if exc.errno in _IN_PLACE_ERRNOS:
                log.warning(
                    "atomic_rename_refused_writing_in_place",
                    path=str(target),
                    errno=errno.errorcode.get(exc.errno or 0, "?"),
                )
                _write_in_place(place, name, data, final_mode, durable)
                return True
            raise AtomicWriteError(exc.errno, f"cannot write {target}: {exc.strerror}") from exc
    finally:
        if tmp_name:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(place.name(tmp_name), **place.at())
    if durable:
        _fsync_folder(place)
    return False


def _create_temporary(place: _Place, name: str) -> tuple[int, str]:
    # O_EXCL | O_NOFOLLOW: never opens what another process put at the name.
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    while True:
        tmp_name = f".{name}.{secrets.token_hex(4)}.tmp"
        try:
            return os.open(place.name(tmp_name), flags, 0o600, **place.at()), tmp_name
        except FileExistsError:
            continue


def _target_mode(place: _Place, name: str, mode: int | None) -> int:
    if mode is not None:
        return mode
    try:
        info = os.stat(place.name(name), follow_symlinks=False, **place.at())
    except OSError:
        return 0o644
    return stat.S_IMODE(info.st_mode) if stat.S_ISREG(info.st_mode) else 0o644


def _write_in_place(place: _Place, name: str, data: bytes, mode: int, durable: bool) -> None:
    target = place.folder / name
    try:
        flags = os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC
        fd = os.open(place.name(name), flags, mode, **place.at())
        try:
            os.ftruncate(fd, 0)
            _write_fully(fd, data)
            if durable:
                os.fsync(fd)
            os.fchmod(fd, mode)
        finally:
            os.close(fd)
    except OSError as exc:
        raise AtomicWriteError(
            exc.errno, f"cannot write {target} in place: {exc.strerror}"
        ) from exc


def _write_fully(fd: int, data: bytes) -> None:
    # Straight to the descriptor: a file object around it would add an fstat, an ioctl and
    # an lseek to every write, and a buffer the bytes are copied through.
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def _fsync_folder(place: _Place) -> None:
    # The rename is durable only once the folder's entry is on disk.
    if place.dir_fd is not None:
        fsync_folder_fd(place.dir_fd)
        return
    try:
        fd = os.open(place.folder, os.O_RDONLY | os.O_DIRECTORY)
    except OSError:
        return
    try:
        fsync_folder_fd(fd)
    finally:
        os.close(fd)


def fsync_folder_fd(fd: int) -> None:
    """fsync an open folder; some file systems refuse it, which is not an error here."""
    with contextlib.suppress(OSError):
        os.fsync(fd)


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
