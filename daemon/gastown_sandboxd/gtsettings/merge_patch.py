"""JSON Merge Patch (RFC 7396), keeping the order of the keys that already stand.

`merge_patch(target, patch)` never mutates its arguments and never shares a mutable value
with them. Keys of `target` keep their positions; keys the patch adds come after them, in
the patch's order. `null` in the patch deletes; an object merges into an object (or into
`{}` when the target is not an object); anything else replaces.
"""

from __future__ import annotations

import copy
from typing import Any


def merge_patch(target: Any, patch: Any) -> Any:
    """Return `target` with `patch` applied as RFC 7396 section 2 says."""
    return _merge(copy.deepcopy(target), patch)


def _merge(owned: Any, patch: Any) -> Any:
    # `owned` is already a private copy, so it is changed in place.
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    result: dict[str, Any] = owned if isinstance(owned, dict) else {}
    for key, value in patch.items():
        if value is None:
            result.pop(key, None)
        else:
            result[key] = _merge(result.get(key), value)
    return result
