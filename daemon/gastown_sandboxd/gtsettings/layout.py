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
    if _mode(folder, stat.S_ISDIR) is not True or not _settings_are_plain(folder):
        return None
    return folder


def _settings_are_plain(folder: Path | str) -> bool:
    settings = os.path.join(folder, SETTINGS)
    return not (
        _mode(settings, stat.S_ISLNK) or _mode(os.path.join(settings, CONFIG), stat.S_ISLNK)
    )


def rig_names(town_root: Path) -> list[str]:
    """Every rig of the town, sorted (with or without a settings file); the same verdicts as
    `rig_folder`, for fewer system calls: the folder's own type comes with the listing."""
    try:
        with os.scandir(town_root) as entries:
            folders = [
                entry.name
                for entry in entries
                if rig_name_problem(entry.name) is None and entry.is_dir(follow_symlinks=False)
            ]
    except OSError:
        return []
    root = os.fspath(town_root)
    return sorted(name for name in folders if _settings_are_plain(os.path.join(root, name)))


def _mode(path: Path | str, test: Callable[[int], bool]) -> bool | None:
    # lstat, so that a symlink is seen as one wherever it leads; None when nothing is there.
    try:
        return test(os.lstat(path).st_mode)
    except OSError:
        return None
