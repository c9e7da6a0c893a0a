"""The daemon's own writes of settings files, so that the watcher does not echo them.

A writer calls `note_own_write(path, data)` before each write; the watcher, when that file's
change comes in, reads the file and asks `OWN_WRITES.take(path, data)`. Only stdlib here: any
floor of the package may import it.

The settings store also brackets each group it writes with `begin()` and `end()` on the event
loop's thread. The watcher's doorbell stops listening at `begin()` (`on_begin`) and reads
what the kernel queued once no write is in flight (`when_settled`). One write of a settings
file is five inotify events (the temporary file made, written, chmodded and renamed away;
config.json renamed in): read as they came, they woke the event loop in the middle of the
write, which then also waited for the GIL; read after the write, they cost no wake-up of
their own and the file is read once.
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Callable
from pathlib import Path


class OwnWrites:
    """The bytes the daemon last wrote to each file, until the watcher sees that file change.

    Thread-safe: writers note from worker threads, the watcher takes on the event loop.
    """

    def __init__(self) -> None:
        # The bytes themselves, not a digest: the same object the read cache keeps as the
        # file's content (no copy), told apart from what the watcher reads by one compare
        # rather than two SHA-256 (~40,000 instructions each for a town file here).
        self._written: dict[str, bytes] = {}
        self._lock = threading.Lock()
        self._writing = 0
        self._settled: list[Callable[[], object]] = []
        self._on_begin: list[Callable[[], object]] = []

    def begin(self) -> None:
        """A write is about to start; call `end` after it. On the event loop's thread."""
        self._writing += 1
        waiting, self._on_begin = self._on_begin, []
        for callback in waiting:
            callback()

    def on_begin(self, callback: Callable[[], object]) -> Callable[[], None]:
        """Have `callback` called once, at the next `begin`; returns what withdraws it."""
        self._on_begin.append(callback)

        def withdraw() -> None:
            with contextlib.suppress(ValueError):
                self._on_begin.remove(callback)

        return withdraw

    @property
    def in_flight(self) -> bool:
        """Whether a write begun with `begin` has not ended yet."""
        return self._writing > 0

    def end(self) -> None:
        """The write begun last is done: call back whoever waits, once none is in flight."""
        self._writing -= 1
        if self._writing == 0:
            waiting, self._settled = self._settled, []
            for callback in waiting:
                callback()

    def when_settled(self, callback: Callable[[], object]) -> bool:
        """Have `callback` called (on the loop) once no write is in flight; False, and no
        call, when none is in flight now."""
        if self._writing == 0:
            return False
        self._settled.append(callback)
        return True

    def note(self, path: Path | str, data: bytes) -> None:
        """Record that the daemon is writing `data` to `path` (call before the write lands)."""
        with self._lock:
            self._written[os.path.abspath(path)] = data

    def take(self, path: Path | str, data: bytes | None) -> bool:
        """True when `data` is what was last noted for `path`; the note is used up either way."""
        with self._lock:
            written = self._written.pop(os.path.abspath(path), None)
        return written is not None and data is not None and data == written

    def __len__(self) -> int:
        with self._lock:
            return len(self._written)


OWN_WRITES = OwnWrites()


def note_own_write(path: Path | str, data: bytes) -> None:
    """What a writer of settings files or of the env file calls before each write, so the
    change is not echoed."""
    OWN_WRITES.note(path, data)
