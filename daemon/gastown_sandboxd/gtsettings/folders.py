"""The town's settings folders, opened one component at a time from the town root's descriptor.

Every folder below the town root is opened with `O_NOFOLLOW` relative to the descriptor of
the folder above it, and every file relative to its folder's descriptor: a rig folder swapped
for a symlink after it was checked cannot lead a read or a write out of the town (the open
fails with ELOOP, or the descriptor still names the folder that was checked).
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat
from dataclasses import dataclass
from pathlib import Path

from gastown_sandboxd.gtsettings.schema import CONFIG, SETTINGS, rig_name_problem

FOLDER_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_READ_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK
_MAX_SETTINGS_BYTES = 16 * 1024 * 1024


def open_town_root(town_root: Path) -> int:
    """A descriptor of the town root (the configured path may itself be a symlink)."""
    return os.open(town_root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)


def open_folder(parent_fd: int, name: str) -> int:
    """A descriptor of the real folder `name` of `parent_fd`; ELOOP or ENOTDIR otherwise."""
    if not name or "/" in name or name in (".", ".."):
        raise OSError(errno.EINVAL, f"{name!r} is not one folder name")
    return os.open(name, FOLDER_FLAGS, dir_fd=parent_fd)


@dataclass(slots=True)
class SettingsFolder:
    """The open `settings` folder of the town (rig None) or of a rig, and the rig's folder."""

    rig: str | None
    path: Path
    owner_fd: int  # the town root or the rig folder
    fd: int | None  # None while the settings folder does not exist
    owns_owner: bool

    def close(self) -> None:
        if self.fd is not None:
            with contextlib.suppress(OSError):
                os.close(self.fd)
            self.fd = None
        if self.owns_owner:
            with contextlib.suppress(OSError):
                os.close(self.owner_fd)
            self.owns_owner = False

    def make(self) -> None:
        """Create the settings folder (0755) and open it."""
        os.mkdir(SETTINGS, 0o755, dir_fd=self.owner_fd)
        self.fd = open_folder(self.owner_fd, SETTINGS)
        # The new folder's entry must be on disk before the file in it counts as written.
        with contextlib.suppress(OSError):
            os.fsync(self.owner_fd)

    def remove(self) -> None:
        """Remove the settings folder again (only when empty)."""
        self.close_settings()
        with contextlib.suppress(OSError):
            os.rmdir(SETTINGS, dir_fd=self.owner_fd)

    def close_settings(self) -> None:
        if self.fd is not None:
            with contextlib.suppress(OSError):
                os.close(self.fd)
            self.fd = None

    def read(self, name: str = CONFIG) -> bytes | None:
        """The bytes of `name` in the settings folder; None when it (or the folder) is absent."""
        if self.fd is None:
            return None
        return read_at(self.fd, name)


def open_settings(root_fd: int, town_root: Path, rig: str | None) -> SettingsFolder:
    """The settings folder of the town or of `rig`, walking from `root_fd`.

    Raises OSError when the rig is not a real folder directly under the town root (ELOOP for
    a symlink, ENOENT when missing, ENOTDIR), or when `settings` is a symlink or a file.
    """
    owner_fd = root_fd
    path = town_root / SETTINGS
    if rig is not None:
        if rig_name_problem(rig) is not None:
            raise OSError(errno.EINVAL, f"{rig!r} is not a rig name")
        owner_fd = open_folder(root_fd, rig)
        path = town_root / rig / SETTINGS
    folder = SettingsFolder(rig, path, owner_fd, None, owns_owner=rig is not None)
    try:
        folder.fd = open_folder(owner_fd, SETTINGS)
    except FileNotFoundError:
        pass
    except BaseException:
        folder.close()
        raise
    return folder


def read_at(dir_fd: int, name: str) -> bytes | None:
    """The bytes of the regular file `name` of `dir_fd`, not through a symlink; None if absent."""
    try:
        fd = os.open(name, _READ_FLAGS, dir_fd=dir_fd)
    except FileNotFoundError:
        return None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise OSError(errno.EINVAL, f"{name} is not a regular file")
        chunks = []
        size = 0
        while chunk := os.read(fd, 1 << 16):
            size += len(chunk)
            if size > _MAX_SETTINGS_BYTES:
                raise OSError(errno.EFBIG, f"{name} is larger than a settings file can be")
            chunks.append(chunk)
        return b"".join(chunks)
    finally:
        os.close(fd)


def read_settings_file(path: Path, *, rig: bool) -> bytes:
    """The bytes of `<owner>/settings/config.json` at `path`, read through descriptors.

    The owner folder (a rig, opened with `O_NOFOLLOW`; or the town root, which may itself be
    a symlink), then `settings` and the file are opened without following a symlink, so a
    folder swapped for one between a check and the read cannot lead it out of the town.
    Raises FileNotFoundError when the file (or a folder on the way) is absent, OSError else.
    """
    flags = FOLDER_FLAGS if rig else os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC
    owner_fd = os.open(path.parent.parent, flags)
    try:
        settings_fd = open_folder(owner_fd, path.parent.name)
        try:
            data = read_at(settings_fd, path.name)
        finally:
            os.close(settings_fd)
    finally:
        os.close(owner_fd)
    if data is None:
        raise FileNotFoundError(errno.ENOENT, "no settings file", str(path))
    return data
