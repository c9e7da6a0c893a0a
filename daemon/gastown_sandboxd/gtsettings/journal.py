"""The intent journal of a multi-file settings change: all files old or all new after a crash.

Before the first file of a change is renamed into place, `<town>/.gastown-sandboxd.journal`
(0600) names every file with its old bytes (None: it did not exist) and its new bytes, and is
fsynced with the town root. The change then counts as made: `recover` at start rolls every
file still old forward to its new bytes. A change that fails part-way while the daemon runs
renames the journal to `.gastown-sandboxd.journal-rollback` (a rename needs no free space)
before it puts the files back, so a crash during that rolls back instead. The journal goes
once every file is in place (or back).

`recover` runs at start before anything reads the files. A file that holds neither the old
nor the new bytes was edited by someone else after the crash and is left as it is (logged).
It also removes what killed writers left: `.config.json.*.tmp` in every settings folder and
the journal's own temporary files.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import structlog

from gastown_sandboxd.atomic import fsync_folder_fd, write_atomic_at
from gastown_sandboxd.gtsettings.folders import open_settings, open_town_root
from gastown_sandboxd.gtsettings.schema import CONFIG, relative_path, rig_name_problem

log = structlog.get_logger(__name__)

JOURNAL = ".gastown-sandboxd.journal"
ROLLBACK = ".gastown-sandboxd.journal-rollback"
FORMAT = 1

Direction = Literal["forward", "back"]


@dataclass(frozen=True, slots=True)
class JournalEntry:
    """One file of the change: the town's (rig None) or a rig's settings file."""

    rig: str | None
    old: bytes | None
    new: bytes
    made_folder: bool = False

    def as_json(self) -> dict[str, Any]:
        return {
            "rig": self.rig,
            "old": None if self.old is None else base64.b64encode(self.old).decode(),
            "new": base64.b64encode(self.new).decode(),
            "made_folder": self.made_folder,
        }

    @classmethod
    def from_json(cls, item: Any) -> JournalEntry:
        rig = item["rig"]
        if rig is not None and (not isinstance(rig, str) or rig_name_problem(rig) is not None):
            raise ValueError(f"bad rig {rig!r} in the journal")
        old = item["old"]
        return cls(
            rig=rig,
            old=None if old is None else base64.b64decode(old, validate=True),
            new=base64.b64decode(item["new"], validate=True),
            made_folder=bool(item.get("made_folder", False)),
        )


@dataclass(slots=True)
class Recovery:
    """What `recover` found and did; `new_at_start` counts files already new at restart."""

    direction: Direction
    files: int
    new_at_start: int = 0
    rewritten: list[str] = field(default_factory=list)
    left_alone: list[str] = field(default_factory=list)

    @property
    def mixed(self) -> bool:
        """Whether the crash fell between the first and the last rename of the change."""
        return 0 < self.new_at_start < self.files


def begin(root_fd: int, town_root: Path, entries: Sequence[JournalEntry]) -> None:
    """Write and fsync the journal (the change is made from here on); raises OSError."""
    with contextlib.suppress(FileNotFoundError):
        os.unlink(ROLLBACK, dir_fd=root_fd)
    document = {"format": FORMAT, "entries": [entry.as_json() for entry in entries]}
    data = json.dumps(document, separators=(",", ":")).encode()
    write_atomic_at(root_fd, JOURNAL, data, mode=0o600, folder=town_root)


def turn_back(root_fd: int) -> None:
    """Mark the change as being undone, so a crash from here on rolls it back."""
    os.replace(JOURNAL, ROLLBACK, src_dir_fd=root_fd, dst_dir_fd=root_fd)
    fsync_folder_fd(root_fd)


def finish(root_fd: int) -> None:
    """The change is whole (or undone): drop the journal.

    Not fsynced: a journal that comes back after a power loss names files that already
    hold its target bytes, and replaying it changes nothing.
    """
    for name in (JOURNAL, ROLLBACK):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(name, dir_fd=root_fd)


def recover(town_root: Path) -> Recovery | None:
    """Roll an interrupted change forward or back and remove leftovers; None when none was.

    Raises OSError only when the town root cannot be opened.
    """
    root_fd = open_town_root(town_root)
    try:
        recovery = _replay(root_fd, town_root)
        removed = _remove_leftovers(root_fd, town_root)
    finally:
        os.close(root_fd)
    if removed:
        log.info("settings_temporaries_removed", count=removed)
    return recovery


def _replay(root_fd: int, town_root: Path) -> Recovery | None:
    for name, direction in ((ROLLBACK, "back"), (JOURNAL, "forward")):
        try:
            fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=root_fd)
        except FileNotFoundError:
            continue
        with os.fdopen(fd, "rb") as handle:
            raw = handle.read()
        try:
            document = json.loads(raw)
            entries = [JournalEntry.from_json(item) for item in document["entries"]]
        except (ValueError, KeyError, TypeError) as exc:
            # Written atomically, so a torn journal is not ours to trust: nothing was renamed
            # on its account only if it never became whole, and then the files are all old.
            log.error("settings_journal_unreadable", file=name, error=str(exc))
            finish(root_fd)
            return None
        recovery = _apply(root_fd, town_root, entries, direction)  # type: ignore[arg-type]
        finish(root_fd)
        log.warning(
            "settings_journal_recovered",
            direction=recovery.direction,
            files=recovery.files,
            new_at_start=recovery.new_at_start,
            mixed=recovery.mixed,
            rewritten=recovery.rewritten,
            left_alone=recovery.left_alone,
        )
        return recovery
    return None


def _apply(
    root_fd: int, town_root: Path, entries: Sequence[JournalEntry], direction: Direction
) -> Recovery:
    recovery = Recovery(direction, len(entries))
    for entry in entries:
        name = relative_path(entry.rig)
        try:
            folder = open_settings(root_fd, town_root, entry.rig)
        except OSError as exc:
            log.error("settings_journal_folder_unusable", file=name, error=str(exc))
            recovery.left_alone.append(name)
            continue
        try:
            current = folder.read()
            if current == entry.new:
                recovery.new_at_start += 1
            target, other = (
                (entry.new, entry.old) if direction == "forward" else (entry.old, entry.new)
            )
            if current == target:
                continue
            if current != other:
                recovery.left_alone.append(name)
                continue
            if target is None:
                assert folder.fd is not None
                os.unlink(CONFIG, dir_fd=folder.fd)
                fsync_folder_fd(folder.fd)
                if entry.made_folder:
                    folder.remove()
            else:
                if folder.fd is None:
                    folder.make()
                assert folder.fd is not None
                write_atomic_at(folder.fd, CONFIG, target, folder=folder.path)
            recovery.rewritten.append(name)
        except OSError as exc:
            log.error("settings_journal_replay_failed", file=name, error=str(exc))
            recovery.left_alone.append(name)
        finally:
            folder.close()
    return recovery


def _remove_leftovers(root_fd: int, town_root: Path) -> int:
    removed = _remove_temporaries(root_fd, f"{JOURNAL}.")
    with os.scandir(root_fd) as entries:
        names = [entry.name for entry in entries]
    for rig in [None, *(name for name in names if rig_name_problem(name) is None)]:
        try:
            folder = open_settings(root_fd, town_root, rig)
        except OSError:
            continue
        try:
            if folder.fd is not None:
                removed += _remove_temporaries(folder.fd, f".{CONFIG}.")
        finally:
            folder.close()
    return removed


def _remove_temporaries(dir_fd: int, prefix: str) -> int:
    # Only one daemon serves a town and this runs before it writes: every match is a leftover.
    removed = 0
    with os.scandir(dir_fd) as entries:
        names = [e.name for e in entries if e.name.startswith(prefix) and e.name.endswith(".tmp")]
    for name in names:
        with contextlib.suppress(OSError):
            os.unlink(name, dir_fd=dir_fd)
            removed += 1
    return removed
