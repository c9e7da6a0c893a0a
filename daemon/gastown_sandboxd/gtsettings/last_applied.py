"""The last-applied copy: what the cloud wanted when the daemon last applied it, and its generation.

Kept in the state folder as `<state>/desired-config.json` (0600, written atomically), so a
restart knows which keys the cloud set (the three-way merge removes only those). Before the
files of a change the cloud sent are written, the copy is saved holding the keys of both
(`hold`), so that a kill in the write, which the next start rolls forward, never leaves files
with keys the copy does not count as the cloud's. A file of another town, or one that cannot
be read, counts as none (logged): the next sync then sets what the cloud wants and removes
nothing. Without a state folder the copy lives in memory.

A sync's save is fsynced at once. A push's (`record_push`: the dashboard's changes, which can
come several a second) is written whole and renamed in at once, so after any SIGKILL a
restart reads the copy saved last; the two fsyncs that make it survive a power cut come
later, from `make_durable`, which the store calls a second after a push, once for every push
meanwhile (`SettingsStore.run`), and when the daemon stops. Until then a power cut, though
not a crash, can take the copy back to an older one; the next sync merges against it, which
at worst leaves in place a key that a lost push set and that the cloud removed while the
sandbox was away. A PATCH the cloud pushes thus makes two fsyncs, not four. Eight
alternating rounds of 150 pushed PATCHes one every 50 ms, before and after (a plain PATCH:
2.57 ms both): daemon CPU per PATCH 2.87 -> 2.77 ms, p50 5.27 -> 5.09 ms. On a disk whose
fsync takes milliseconds, not this one's ~45 µs, the answer gains two of them. What a push
still adds is mostly the rename over the old copy: ~0.1 ms on this ext4 whether the new file
was fsynced or not (in-process, 300 renames each way: 90-95 against 108 µs).
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import structlog

from gastown_sandboxd.atomic import make_durable, write_atomic
from gastown_sandboxd.gtsettings.apply import keys_of_both, without_nulls
from gastown_sandboxd.gtsettings.merge_patch import merge_patch
from gastown_sandboxd.gtsettings.schema import Doc

log = structlog.get_logger(__name__)

FILE_NAME = "desired-config.json"
FORMAT = 1


@dataclass(frozen=True, slots=True)
class Applied:
    """The desired configuration last applied (None generation: never)."""

    generation: int | None = None
    desired: Doc = field(default_factory=dict)


class LastApplied:
    """The last-applied copy of one town, in `state_dir` (None: in memory only)."""

    def __init__(self, *, state_dir: Path | None, town_id: str) -> None:
        self._path = None if state_dir is None else Path(state_dir) / FILE_NAME
        self._town_id = town_id
        self._applied = Applied()
        self._durable = True
        self._saved = True  # the copy in memory is the one on disk (False: a save failed)

    @property
    def durable(self) -> bool:
        """False from a save until `make_durable` takes it: set True before its fsyncs, so
        that a save made while they run stays False and gets fsynced at the next call."""
        return self._durable

    @property
    def applied(self) -> Applied:
        return self._applied

    @property
    def path(self) -> Path | None:
        return self._path

    def load(self) -> Applied:
        """Read the copy kept by an earlier run (blocking: call it from a worker thread)."""
        if self._path is None:
            return self._applied
        try:
            raw = self._path.read_bytes()
        except FileNotFoundError:
            return self._applied
        except OSError as exc:
            log.warning("last_applied_unreadable", path=str(self._path), error=exc.strerror)
            return self._applied
        try:
            document = json.loads(raw)
            if document.get("town_id") != self._town_id:
                log.warning("last_applied_of_another_town", path=str(self._path))
                return self._applied
            generation = document["generation"]
            desired = document["desired"]
            if not isinstance(generation, int) or not isinstance(desired, dict):
                raise ValueError("generation or desired of the wrong type")
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            log.warning("last_applied_unreadable", path=str(self._path), error=str(exc))
            return self._applied
        self._applied = Applied(generation, desired)
        return self._applied

    def record(self, generation: int, desired: Mapping[str, Any], *, durable: bool = True) -> bool:
        """Keep `desired` as applied at `generation`; True when the copy changed (blocking).

        `durable` False: saved whole but not fsynced, until `make_durable`."""
        applied = Applied(generation, without_nulls(desired))
        changed = applied != self._applied
        if not changed and self._saved:
            return False
        self._applied = applied
        try:
            self._save(applied, durable)
        except OSError as exc:
            # The files are written already; this run keeps the copy in memory and saves it
            # again at the next record, even of the same copy: a restart on the older one on
            # disk would take keys the cloud has dropped since for its own, and remove them.
            self._saved = False
            log.warning(
                "last_applied_not_saved", path=str(self._path), error=exc.strerror or str(exc)
            )
        else:
            self._saved = True
        return changed

    def hold(self, generation: int, desired: Mapping[str, Any], *, durable: bool = True) -> None:
        """Before the files are written with `desired` (blocking): keep as applied the keys of
        both the copy and `desired` (`keys_of_both`), at the newer generation.

        Written before the files, the copy cannot fall behind them: a SIGKILL after the
        files' journal, which the next start rolls forward, left a copy without the keys
        they got, and a sync never removed those keys once the cloud dropped them (seen with
        40 rigs, killed as the journal appeared). With both, the next sync removes whatever
        the cloud no longer wants of either; `record` after the write keeps `desired`
        alone. The price, until then: a key the write deletes is still counted as the
        cloud's, so one added again by hand in that time would go at the next sync."""
        held = keys_of_both(self._applied.desired, without_nulls(desired))
        newest = max(generation, self._applied.generation or 0)
        if Applied(newest, held) != self._applied:
            self.record(newest, held, durable=durable)

    def record_push(self, body: Mapping[str, Any], generation: int) -> bool:
        """A PATCH the cloud pushed with `X-Gastown-Generation`: merge it into the copy, saved
        whole but not fsynced, until `make_durable`."""
        merged = without_nulls(merge_patch(self._applied.desired, dict(body)))
        newest = max(generation, self._applied.generation or 0)
        return self.record(newest, merged, durable=False)

    def hold_pushes(self, pushes: Sequence[tuple[Mapping[str, Any], int]]) -> None:
        """`hold` for PATCHes the cloud pushed, (body, generation) in order, before their
        write: saved whole but not fsynced, as `record_push` saves."""
        desired, newest = self._applied.desired, self._applied.generation or 0
        for body, generation in pushes:
            desired = without_nulls(merge_patch(desired, dict(body)))
            newest = max(newest, generation)
        self.hold(newest, desired, durable=False)

    def make_durable(self) -> None:
        """fsync the copy saved last, and its folder (blocking); logged when it cannot be."""
        if self._durable or self._path is None:
            return
        self._durable = True
        try:
            make_durable(self._path)
        except OSError as exc:
            log.warning(
                "last_applied_not_fsynced", path=str(self._path), error=exc.strerror or str(exc)
            )

    def folder_problem(self) -> str | None:
        """Why the copy could not be kept on disk, in words for `check`; None when it can be
        (the folder is writable, or the nearest folder above it that exists is, for makedirs).
        """
        if self._path is None:
            return None
        folder = self._path.parent
        probe = folder
        while not probe.exists():
            if probe.parent == probe:
                break
            probe = probe.parent
        if not probe.is_dir():
            return f"{probe} is not a folder"
        if not os.access(probe, os.W_OK | os.X_OK):
            action = "written" if probe == folder else f"created (in {probe})"
            return f"{folder} cannot be {action}"
        return None

    def _save(self, applied: Applied, durable: bool) -> None:
        if self._path is None:
            return
        os.makedirs(self._path.parent, mode=0o700, exist_ok=True)
        document = {
            "format": FORMAT,
            "town_id": self._town_id,
            "generation": applied.generation,
            "desired": applied.desired,
        }
        data = (json.dumps(document, indent=2, ensure_ascii=False) + "\n").encode()
        write_atomic(self._path, data, mode=0o600, durable=durable)
        self._durable = durable
