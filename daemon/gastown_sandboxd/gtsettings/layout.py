"""Which folders of the town root are rigs, confined to the town root.

A rig is a plain folder (not a symlink, wherever it leads) directly under the town root
whose name passes `rig_name_problem`; its `settings` folder and `settings/config.json` must
not be symlinks either, so nothing the daemon reads or writes for a rig leads elsewhere.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Callable
from pathlib import Path

from gastown_sandboxd.gtsettings.schema import CONFIG, SETTINGS, rig_name_problem


def town_settings_file(town_root: Path) -> Path:
    """`<town>/settings/config.json`."""
    return town_root / SETTINGS / CONFIG


def rig_settings_file(town_root: Path, rig: str) -> Path:
    """`<town>/<rig>/settings/config.json` (only meaningful once `rig_folder` accepted it)."""
    return town_root / rig / SETTINGS / CONFIG


def rig_folder(town_root: Path, name: str) -> Path | None:
    """The folder of rig `name`, or None when `name` is not a rig of this town."""
    if rig_name_problem(name) is not None:
        return None
    folder = town_root / name
    # lstat: a symlink is never a rig; a plain folder directly under the root (a name of one
    # component, as rig_name_problem ensures) cannot lead out of it.
    if _mode(folder, stat.S_ISDIR) is not True:
        return None
    if plain_lstat(os.path.join(folder, SETTINGS)) is None:
        return None
    return folder


def rig_names(town_root: Path | str) -> list[str]:
    """Every rig of the town, sorted (with or without a settings file); the same verdicts as
    `rig_folder`, for fewer system calls: the folder's own type comes with the listing."""
    return [name for name, _ in rig_files(town_root)]


# What lstat said of a settings file: its stat, or the error (absent: FileNotFoundError or
# NotADirectoryError).
Lstat = os.stat_result | OSError


def rig_files(town_root: Path | str) -> list[tuple[str, Lstat]]:
    """`rig_names`, each with what lstat said of its `settings/config.json` (`plain_lstat`):
    what a reader of every rig's file would otherwise stat once more."""
    try:
        with os.scandir(town_root) as entries:
            folders = [
                entry.name
                for entry in entries
                if rig_name_problem(entry.name) is None and entry.is_dir(follow_symlinks=False)
            ]
    except OSError:
        return []
    # A rig's name is one plain component (`rig_name_problem`): paths by concatenation.
    base = os.path.join(os.fspath(town_root), "")
    found: list[tuple[str, Lstat]] = []
    for name in sorted(folders):
        info = plain_lstat(f"{base}{name}/{SETTINGS}")
        if info is not None:
            found.append((name, info))
    return found


def plain_lstat(settings: str) -> Lstat | None:
    """What lstat says of `settings`/config.json, or None when the folder `settings` or the
    file is a symlink. Two system calls; where neither is a symlink, the lstat of the file is
    its stat, which a reader needs anyway."""
    if _mode(settings, stat.S_ISLNK):
        return None
    try:
        info = os.lstat(f"{settings}/{CONFIG}")
    except OSError as exc:
        return exc
    return None if stat.S_ISLNK(info.st_mode) else info


def _mode(path: Path | str, test: Callable[[int], bool]) -> bool | None:
    # lstat, so that a symlink is seen as one wherever it leads; None when nothing is there.
    try:
        return test(os.lstat(path).st_mode)
    except OSError:
        return None
