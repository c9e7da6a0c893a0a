"""gt's settings files: the town's and each rig's `settings/config.json`.

Pure rules first: `schema.py` (the file model, roles, efforts, folder names), `json_text.py`
(byte-exact rendering), `merge_patch.py` (RFC 7396), `validation.py` and
`agent_resolution.py` (every rule of a PATCH), `patch.py` (a PATCH applied to the files, the
managed view, the revision) and `apply.py` (the three-way merge of the cloud's desired
configuration). Then the disk: `layout.py` and `snapshot.py` (which folders are rigs, the files
as read at one moment), `folders.py` (`O_NOFOLLOW` folder descriptors), `journal.py` and
`batch.py` (all files old or all new), `store.py` (the `SettingsStore`),
`last_applied.py`, `desired.py` (the cloud's desired configuration over HTTP) and `sync.py`
(the `ConfigSync` component).
"""

from gastown_sandboxd.gtsettings.desired import DesiredConfigClient
from gastown_sandboxd.gtsettings.last_applied import LastApplied
from gastown_sandboxd.gtsettings.schema import CONFIG, EFFORTS, ROLES, SECRET_ENV_NAMES, SETTINGS
from gastown_sandboxd.gtsettings.store import PatchResult, SettingsStore
from gastown_sandboxd.gtsettings.sync import ConfigSync
from gastown_sandboxd.gtsettings.validation import contains_jwt

__all__ = [
    "CONFIG",
    "EFFORTS",
    "ROLES",
    "SECRET_ENV_NAMES",
    "SETTINGS",
    "ConfigSync",
    "DesiredConfigClient",
    "LastApplied",
    "PatchResult",
    "SettingsStore",
    "contains_jwt",
]
