"""Reading a file that others put in place, and that may be no file at all.

The env file, a signal's pid file and Claude Code's settings are given by the operator or
written by other programs: a FIFO there (some secret injectors make one) held `open` for ever
(an agent's start, the apiKeyHelper, the daemon's event loop and a worker thread it could not
stop), and /dev/zero a read until the memory ran out. So they are opened without blocking,
taken only when they are regular files, and read up to a bound.
"""

from __future__ import annotations

import errno
import os
import stat
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from _typeshed import StrPath


class NotRegularFile(OSError):
    """A folder, a FIFO, a device or a socket where a file is read; `strerror` says which
    ("a FIFO, not a file")."""


def read_regular(path: StrPath, limit: int = -1) -> bytes:
    """At most `limit` bytes (-1: all) of the regular file at `path`, a symlink followed.

    Raises what opening it raises (`FileNotFoundError` when there is none, `PermissionError`
    …) and `NotRegularFile` when it is no regular file.
    """
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    # Looked at before a file object is made of it: `open` refuses a folder's descriptor with
    # its own IsADirectoryError, which would not say it is no file.
    try:
        mode = os.fstat(fd).st_mode
    except BaseException:
        os.close(fd)
        raise
    if not stat.S_ISREG(mode):
        os.close(fd)
        code = errno.EISDIR if stat.S_ISDIR(mode) else errno.EINVAL
        raise NotRegularFile(code, f"{_kind(mode)}, not a file", os.fspath(path))
    with open(fd, "rb") as handle:
        return handle.read(limit)


def _kind(mode: int) -> str:
    if stat.S_ISDIR(mode):
        return "a folder"
    if stat.S_ISFIFO(mode):
        return "a FIFO"
    return "a socket" if stat.S_ISSOCK(mode) else "a device"
