"""The daemon's own writes of settings files, so that the watcher does not echo them.

A writer calls `note_own_write(path, data)` before each write; the watcher, when that file's
change comes in, reads the file and asks `OWN_WRITES.take(path, data)`. Only stdlib here: any
floor of the package may import it.
"""

from __future__ import annotations

import hashlib
import os
import threading
from pathlib import Path


class OwnWrites:
    """The bytes the daemon last wrote to each file, until the watcher sees that file change.

    Thread-safe: writers note from worker threads, the watcher takes on the event loop.
    """

    def __init__(self) -> None:
        self._digests: dict[str, bytes] = {}
        self._lock = threading.Lock()

    def note(self, path: Path | str, data: bytes) -> None:
        """Record that the daemon is writing `data` to `path` (call before the write lands)."""
        digest = hashlib.sha256(data).digest()
        with self._lock:
            self._digests[os.path.abspath(path)] = digest

    def take(self, path: Path | str, data: bytes | None) -> bool:
        """True when `data` is what was last noted for `path`; the note is used up either way."""
        with self._lock:
            digest = self._digests.pop(os.path.abspath(path), None)
        return digest is not None and data is not None and hashlib.sha256(data).digest() == digest

    def __len__(self) -> int:
        with self._lock:
            return len(self._digests)


OWN_WRITES = OwnWrites()


def note_own_write(path: Path | str, data: bytes) -> None:
    """What a writer of settings files calls before each write, so the change is not echoed."""
    OWN_WRITES.note(path, data)
