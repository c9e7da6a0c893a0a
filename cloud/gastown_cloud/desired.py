"""Pure rules of the desired configuration: shape check, RFC 7396 merge and diff, state, ETag.

`desired` has the shape of a sandbox `PATCH /config` body, `{"town": {...}, "rigs": {name: {...}}}`,
holding only the managed keys; the sandbox makes the deep checks (roles, agents, secrets, rigs).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from enum import StrEnum
from typing import Any

from gastown_sandboxd.gtsettings.apply import merge_patch_between
from gastown_sandboxd.gtsettings.merge_patch import merge_patch as sandbox_merge_patch
from gastown_sandboxd.gtsettings.schema import holds_a_secret
from gastown_sandboxd.gtsettings.validation import contains_jwt
from gastown_sandboxd.ops.logs import Redactor

TOWN_KEYS = frozenset({"default_agent", "agents", "role_agents", "role_effort", "crew_agents"})
RIG_KEYS = frozenset({"agent", "agents", "role_agents", "worker_agents", "role_effort"})
# Managed keys whose value is one name, and those mapping names to names; `agents` maps to objects.
_NAME_KEYS = frozenset({"default_agent", "agent"})
_NAME_MAP_KEYS = frozenset({"role_agents", "role_effort", "crew_agents", "worker_agents"})
_NO_TOKENS_HERE = (
    "holds a secret: the cloud keeps and serves desired configuration and settings files are "
    "0644; agents get tokens through the env file"
)

Problem = dict[str, str]


class ConfigState(StrEnum):
    """What the dashboard shows: the sandbox runs the newest generation, not yet, or refused it."""

    APPLIED = "applied"
    PENDING = "pending"
    FAILED = "failed"


def config_state(generation: int, observed_generation: int, error: object | None) -> ConfigState:
    """`failed` when the last report on the current generation carried an error; `applied` when
    it carried none; `pending` while the sandbox has not reported on the current generation."""
    if observed_generation >= generation:
        return ConfigState.FAILED if error is not None else ConfigState.APPLIED
    return ConfigState.PENDING


def check_shape(patch: Mapping[str, Any]) -> list[Problem]:
    """One `{"path", "message"}` per problem of shape or secret; empty when `patch` may be merged.

    Secrets are refused here, not only by the sandbox, because the cloud keeps what it is sent:
    a JWT in any string, or a literal value for a token variable in an agent's `env`.
    """
    problems: list[Problem] = []
    _check_secrets(patch, "", problems)
    for key, value in patch.items():
        if key == "town":
            _check_section(value, TOWN_KEYS, "/town", problems)
        elif key == "rigs":
            _check_rigs(value, problems)
        else:
            problems.append(_problem(f"/{_escape(key)}", "is not a key: use town and rigs"))
    return problems


def _check_rigs(rigs: object, problems: list[Problem]) -> None:
    if rigs is None:
        return
    if not isinstance(rigs, dict):
        problems.append(_problem("/rigs", "must be an object of rig names"))
        return
    for name, rig in rigs.items():
        path = f"/rigs/{_escape(name)}"
        if not name.strip():
            problems.append(_problem(path, "a rig name must not be empty"))
        _check_section(rig, RIG_KEYS, path, problems)


def _check_section(
    section: object, keys: frozenset[str], path: str, problems: list[Problem]
) -> None:
    if section is None:
        return
    if not isinstance(section, dict):
        problems.append(_problem(path, "must be an object or null"))
        return
    for key, value in section.items():
        key_path = f"{path}/{_escape(key)}"
        if key not in keys:
            problems.append(_problem(key_path, f"is not a managed key ({', '.join(sorted(keys))})"))
        elif value is None:
            continue
        elif key in _NAME_KEYS:
            if not isinstance(value, str):
                problems.append(_problem(key_path, "must be an agent name (a string) or null"))
        elif not isinstance(value, dict):
            problems.append(_problem(key_path, "must be an object or null"))
        else:
            want, what = (str, "a string") if key in _NAME_MAP_KEYS else (dict, "an object")
            for entry, inner in value.items():
                if inner is not None and not isinstance(inner, want):
                    entry_path = f"{key_path}/{_escape(entry)}"
                    problems.append(_problem(entry_path, f"must be {what} or null"))


def _check_secrets(value: object, path: str, problems: list[Problem]) -> None:
    if isinstance(value, str):
        if contains_jwt(value):
            problems.append(_problem(path, _NO_TOKENS_HERE))
    elif isinstance(value, list):
        for index, item in enumerate(value):
            _check_secrets(item, f"{path}/{index}", problems)
    elif isinstance(value, dict):
        secret_names = path.endswith("/env")
        for key, item in value.items():
            item_path = f"{path}/{_escape(key)}"
            # A key is served back as a value is (GET …/config, the push to the sandbox); the
            # problem names it with the token scrubbed, as the logs do.
            if contains_jwt(key):
                problems.append(_problem(Redactor().scrub(item_path), _NO_TOKENS_HERE))
            elif secret_names and holds_a_secret(key, item):
                problems.append(_problem(item_path, _NO_TOKENS_HERE))
            else:
                _check_secrets(item, item_path, problems)


def merge_patch(target: object, patch: object) -> Any:
    """RFC 7396: `patch` applied to `target`, by the sandbox's own merge (the same key order);
    neither is changed, and the result shares nothing with either (the cloud keeps it)."""
    return _copy(sandbox_merge_patch(target, patch))


def push_patch(
    base: Mapping[str, Any], desired: Mapping[str, Any], patch: Mapping[str, Any]
) -> dict[str, Any]:
    """The patch that takes a sandbox standing on `base` to `desired`, which is `patch` merged
    into some later state: the difference, with `patch` laid over it so that the dashboard's own
    deletions and settings reach the files too (applying `patch` again to `desired` is a no-op).
    The difference is the sandbox's own (`merge_patch_between`): values of different JSON types
    differ even where Python calls them equal (`1`, `1.0`, `true`)."""
    return _overlay(merge_patch_between(base, desired), patch)


def _overlay(under: Mapping[str, Any], over: Mapping[str, Any]) -> dict[str, Any]:
    result: dict[str, Any] = _copy(dict(under))
    for key, value in over.items():
        below = result.get(key)
        if isinstance(value, dict) and isinstance(below, dict):
            result[key] = _overlay(below, value)
        else:
            result[key] = _copy(value)
    return result


def etag(body: Mapping[str, Any]) -> str:
    """A strong ETag (quoted) of a JSON body: equal bodies, equal tags."""
    canonical = json.dumps(body, sort_keys=True, separators=(",", ":")).encode()
    return '"' + hashlib.sha256(canonical).hexdigest()[:32] + '"'


def etag_matches(if_none_match: str, tag: str) -> bool:
    """True when an If-None-Match header names `tag` (weak comparison, as RFC 9110 asks) or `*`."""
    for candidate in if_none_match.split(","):
        candidate = candidate.strip()
        if candidate == "*" or candidate.removeprefix("W/") == tag:
            return True
    return False


def _copy(value: Any) -> Any:
    if isinstance(value, dict):
        return {key: _copy(inner) for key, inner in value.items()}
    if isinstance(value, list):
        return [_copy(inner) for inner in value]
    return value


def _escape(key: str) -> str:
    # JSON Pointer escaping (RFC 6901), so a path names exactly one key.
    return key.replace("~", "~0").replace("/", "~1")


def _problem(path: str, message: str) -> Problem:
    return {"path": path, "message": message}
