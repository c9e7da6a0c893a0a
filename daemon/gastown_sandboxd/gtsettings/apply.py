"""The three-way merge of the cloud's desired configuration, like `kubectl apply`. No I/O.

Three inputs per settings file: `current` (the managed keys on disk), `desired` (what the
cloud wants now) and `last` (what the cloud wanted when the daemon last applied it, kept in
the state folder). Objects merge key by key, at every depth:

- a key in `desired` is set to the desired value (objects in both merge, recursively);
- a key in `last` that `desired` no longer has is removed: the cloud set it, and dropped it
  (an object goes only as far as the cloud filled it: keys added by hand inside it stay);
- a key in neither is left alone: nobody from the cloud set it (a hand-added key).

So a hand edit of a key the cloud manages is put back, and a hand-added key is kept.
`null` in `desired` means absent (RFC 7396 deletes it). `desired_patch` turns the result
into a PATCH body (RFC 7396 from the current files to the result), so applying goes through
the same checks (the 422 rules) and the same crash-safe writer as PATCH /config.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Any

from gastown_sandboxd.gtsettings.json_text import same
from gastown_sandboxd.gtsettings.patch import managed_view
from gastown_sandboxd.gtsettings.schema import Doc, Scope, TownFiles

SCOPES = ("town", "rigs")


def merge_desired(
    current: Mapping[str, Any] | None,
    desired: Mapping[str, Any] | None,
    last: Mapping[str, Any] | None,
) -> Doc:
    """`current` with `desired` applied and what `last` had but `desired` dropped removed.

    Pure: never mutates its arguments and shares no mutable value with them.
    """
    result: Doc = copy.deepcopy(dict(current)) if isinstance(current, Mapping) else {}
    wanted = without_nulls(desired) if isinstance(desired, Mapping) else {}
    before = last if isinstance(last, Mapping) else {}
    for key, value in wanted.items():
        here = result.get(key)
        if isinstance(value, dict) and isinstance(here, dict):
            previous = before.get(key)
            result[key] = merge_desired(here, value, previous if isinstance(previous, dict) else {})
        else:
            result[key] = copy.deepcopy(value)
    for key, previous in before.items():
        if key in wanted or key not in result:
            continue
        here = result[key]
        if isinstance(previous, dict) and isinstance(here, dict) and here:
            # Only what the cloud set inside goes; an object left empty by that goes too.
            rest = merge_desired(here, {}, previous)
            if rest:
                result[key] = rest
            else:
                del result[key]
        else:
            del result[key]
    return result


def keys_of_both(first: Mapping[str, Any], second: Mapping[str, Any]) -> Doc:
    """Every key of `first` and of `second`, at every depth where both hold an object there
    (`second`'s value otherwise): as `last`, the keys the cloud set in either. Pure."""
    union: Doc = copy.deepcopy(dict(first))
    for key, value in second.items():
        here = union.get(key)
        if isinstance(value, Mapping) and isinstance(here, dict):
            union[key] = keys_of_both(here, value)
        else:
            union[key] = copy.deepcopy(value)
    return union


def merge_patch_between(old: Mapping[str, Any], new: Mapping[str, Any]) -> Doc:
    """The RFC 7396 patch that turns `old` into `new` (`{}` when they are the same)."""
    patch: Doc = {key: None for key in old if key not in new}
    for key, value in new.items():
        if key not in old:
            patch[key] = copy.deepcopy(value)
        elif isinstance(value, dict) and isinstance(old[key], dict):
            sub = merge_patch_between(old[key], value)
            if sub:
                patch[key] = sub
        elif not same(old[key], value):
            patch[key] = copy.deepcopy(value)
    return patch


def desired_patch(
    current: TownFiles, desired: Mapping[str, Any], last: Mapping[str, Any] | None
) -> Doc:
    """The PATCH /config body that brings `current` to the three-way merge; `{}`: nothing to do.

    Parts of `desired` that are not of the PATCH shape (unknown top-level keys, a `town`
    or a rig that is not an object) are passed on as they are, so that the PATCH checks
    report them. A rig that `desired` names but that is no rig of the town is compared
    against an empty file, so the body names it and the checks refuse it.
    """
    before = last if isinstance(last, Mapping) else {}
    body: Doc = {key: copy.deepcopy(value) for key, value in desired.items() if key not in SCOPES}
    town = _file_patch(current.town, desired.get("town"), before.get("town"), "town")
    if town is not None:
        body["town"] = town
    wanted_rigs = desired.get("rigs")
    last_rigs = before.get("rigs")
    if wanted_rigs is not None and not isinstance(wanted_rigs, Mapping):
        body["rigs"] = copy.deepcopy(wanted_rigs)
        return body
    wanted_rigs = wanted_rigs or {}
    last_rigs = last_rigs if isinstance(last_rigs, Mapping) else {}
    rigs: Doc = {}
    for name in [*wanted_rigs, *(name for name in last_rigs if name not in wanted_rigs)]:
        on_disk = current.rigs.get(name)
        if name not in wanted_rigs and on_disk is None:
            continue  # dropped by the cloud, and no file holds it any more
        rig = _file_patch(on_disk, wanted_rigs.get(name), last_rigs.get(name), "rig")
        if rig is not None:
            rigs[name] = rig
    if rigs:
        body["rigs"] = rigs
    return body


def without_nulls(value: Any) -> Any:
    """`value` with every object member whose value is null removed, at every depth."""
    if isinstance(value, Mapping):
        return {key: without_nulls(item) for key, item in value.items() if item is not None}
    return copy.deepcopy(value)


def _file_patch(doc: Doc | None, desired: Any, last: Any, scope: Scope) -> Any:
    if desired is not None and not isinstance(desired, Mapping):
        return copy.deepcopy(desired)  # not an object: the checks say so
    current = managed_view(doc, scope)
    merged = merge_desired(current, desired, last if isinstance(last, Mapping) else None)
    patch = merge_patch_between(current, merged)
    return patch or None
