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

from gastown_sandboxd.gtsettings.schema import rig_name_problem

SETTINGS = "settings"
CONFIG = "config.json"


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
    if _mode(folder, stat.S_ISDIR) is not True:
        return None
    if os.path.realpath(folder) != os.path.join(os.path.realpath(town_root), name):
        return None
    settings = folder / SETTINGS
    if _mode(settings, stat.S_ISLNK) or _mode(settings / CONFIG, stat.S_ISLNK):
        return None
    return folder


def rig_names(town_root: Path) -> list[str]:
    """Every rig of the town, sorted (with or without a settings file)."""
    try:
        with os.scandir(town_root) as entries:
            names = [entry.name for entry in entries]
    except OSError:
        return []
    return sorted(name for name in names if rig_folder(town_root, name) is not None)


def _mode(path: Path, test: Callable[[int], bool]) -> bool | None:
    # lstat, so that a symlink is seen as one wherever it leads; None when nothing is there.
    try:
        return test(os.lstat(path).st_mode)
    except OSError:
        return None
