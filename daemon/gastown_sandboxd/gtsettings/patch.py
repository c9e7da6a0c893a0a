"""gt's settings files as the daemon manages them: validate, merge, render, compare. No I/O.

A PATCH /config body is `{"town": {...}, "rigs": {"<rig>": {...}}}`, a JSON Merge Patch on
the managed keys of each file (`MANAGED_KEYS`); every other key stays as it was, in value
and in order. An agent gets an `exec_wrapper` only when the body sets one: the agent shims
already run every agent CLI through `gastown-sandboxd exec` (a default wrapper would start
Python twice); an `exec_wrapper` already in a file stays unless the body sets it.
"""

from __future__ import annotations

import functools
import hashlib
import json
import threading
from collections.abc import Mapping
from typing import Any

from gastown_sandboxd.gtsettings.json_text import parse_document, render, same
from gastown_sandboxd.gtsettings.merge_patch import merge_patch
from gastown_sandboxd.gtsettings.schema import (
    AGENT_FIELDS,
    EFFORTS,
    FILE_TYPES,
    MANAGED_KEYS,
    PRESETS,
    RIG_KEYS,
    ROLES,
    SCHEMA_VERSION,
    SECRET_ENV_NAMES,
    TOWN_KEYS,
    Doc,
    Scope,
    TownFiles,
    relative_path,
    rig_name_problem,
)
from gastown_sandboxd.gtsettings.validation import contains_jwt, validate_patch

__all__ = [
    "AGENT_FIELDS",
    "EFFORTS",
    "MANAGED_KEYS",
    "PRESETS",
    "RIG_KEYS",
    "ROLES",
    "SECRET_ENV_NAMES",
    "TOWN_KEYS",
    "Doc",
    "Scope",
    "TownFiles",
    "apply_patch",
    "changed_keys",
    "contains_jwt",
    "managed_view",
    "member_key",
    "parse_document",
    "relative_path",
    "render",
    "revision",
    "revision_of",
    "rig_name_problem",
    "same",
    "validate_patch",
    "view_text",
]


def apply_patch(current: TownFiles, body: Mapping[str, Any]) -> TownFiles:
    """The files after `body` (already validated) is applied to `current`.

    Only the files the body names change. A file that did not exist becomes
    `{"type", "version", ...managed keys}`, unless the patch leaves it with nothing to
    hold: then it stays None (not created).
    """
    town = current.town
    town_patch = body.get("town")
    if isinstance(town_patch, Mapping):
        town = _apply_file(current.town, town_patch, "town")
    rigs = dict(current.rigs)
    rig_patches = body.get("rigs")
    if isinstance(rig_patches, Mapping):
        for name, rig_patch in rig_patches.items():
            if isinstance(rig_patch, Mapping):
                rigs[name] = _apply_file(current.rigs.get(name), rig_patch, "rig")
    return TownFiles(town=town, rigs=rigs, unreadable=current.unreadable)


def managed_view(doc: Mapping[str, Any] | None, scope: Scope) -> Doc:
    """The managed keys of `doc`, in the file's order; {} for no file.

    A new dict whose values are `doc`'s own objects: documents are never changed in place
    (`gtsettings.snapshot`), so a view is a dict of shared values, not a deep copy.
    """
    if doc is None:
        return {}
    keys = MANAGED_KEYS[scope]
    return {key: value for key, value in doc.items() if key in keys}


def view_text(doc: Mapping[str, Any] | None, scope: Scope) -> str:
    """One file's part of `revision`: canonical JSON (sorted keys) of its managed view.

    Assembled member by member, each member's text worked out once for the value it holds
    (`_member_text`): the file after a PATCH reworks only the members the PATCH changed."""
    view = managed_view(doc, scope)
    members = (f"{member_key(key)}:{_member_text(view[key])}" for key in sorted(view))
    return "{" + ",".join(members) + "}"


_CANONICAL = json.JSONEncoder(sort_keys=True, separators=(",", ":"), ensure_ascii=False)

# The canonical texts of the objects and arrays last worked out, by the identity of the value,
# which is kept here (so its id is never another value's while it is). Documents are never
# changed in place and a merge shares every value it did not change (`merge_patch`), so the
# value is the same object exactly while its text is the same. A town file's `agents` is
# most of its text and rarely what a PATCH changes.
_MEMBER_TEXTS: dict[int, tuple[Any, str]] = {}
_MEMBER_TEXTS_LOCK = threading.Lock()
_MEMBER_TEXTS_KEPT = 64


def _member_text(value: Any) -> str:
    if not isinstance(value, dict | list):
        return _CANONICAL.encode(value)
    with _MEMBER_TEXTS_LOCK:
        known = _MEMBER_TEXTS.get(id(value))
    if known is not None:  # the value itself: its id is no other value's while it is kept
        return known[1]
    text = _CANONICAL.encode(value)
    with _MEMBER_TEXTS_LOCK:
        _MEMBER_TEXTS[id(value)] = (value, text)
        while len(_MEMBER_TEXTS) > _MEMBER_TEXTS_KEPT:
            del _MEMBER_TEXTS[next(iter(_MEMBER_TEXTS))]
    return text


def revision(files: TownFiles) -> str:
    """A digest of the managed content of every file: the same settings give the same value.

    Canonical JSON (sorted keys) of the town's and each rig's managed view, rigs sorted;
    rigs without a settings file do not count; unreadable files count by their bytes.
    """
    rigs = {name: view_text(doc, "rig") for name, doc in files.rigs.items() if doc is not None}
    return revision_of(view_text(files.town, "town"), rigs, files.unreadable)


def revision_of(town: str, rigs: Mapping[str, str], unreadable: Mapping[str, str]) -> str:
    """`revision` from each file's `view_text`, so a caller can keep the texts of files
    that did not change: the text is exactly `json.dumps({"rigs", "town", "unreadable"},
    sort_keys=True, separators=(",", ":"), ensure_ascii=False)`, assembled from its parts."""
    members = ",".join(f"{member_key(name)}:{rigs[name]}" for name in sorted(rigs))
    lost = _CANONICAL.encode(dict(unreadable)) if unreadable else "{}"
    text = f'{{"rigs":{{{members}}},"town":{town},"unreadable":{lost}}}'
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:32]


@functools.lru_cache(maxsize=1024)
def member_key(name: str) -> str:
    """`name` as a JSON object's key, as `json.dumps(name, ensure_ascii=False)` writes it.
    A rig's name is ASCII letters, digits and '_' (`rig_name_problem`): JSON's quotes alone."""
    if name.isascii() and name.isprintable() and '"' not in name and "\\" not in name:
        return f'"{name}"'
    return json.dumps(name, ensure_ascii=False)


def changed_keys(old: Mapping[str, Any] | None, new: Mapping[str, Any] | None) -> list[str]:
    """Top-level keys whose values differ, managed or not: new order first, then removed."""
    before = old or {}
    after = new or {}
    keys = [key for key in after if key not in before or not same(before[key], after[key])]
    return keys + [key for key in before if key not in after]


def _apply_file(doc: Doc | None, patch: Mapping[str, Any], scope: Scope) -> Doc | None:
    managed = {key: value for key, value in patch.items() if key in MANAGED_KEYS[scope]}
    base = doc if doc is not None else {}
    merged: Doc = merge_patch(base, managed)
    for key in managed:
        # RFC 7396 turns `{"k": {"x": null}}` on an absent k into `"k": {}`; gt reads an absent
        # map and an empty one alike, so a deletion of what is not there changes nothing.
        if key not in base and merged.get(key) == {}:
            del merged[key]
    if doc is not None:
        return merged
    if not merged:
        return None
    return {"type": FILE_TYPES[scope], "version": SCHEMA_VERSION, **merged}
