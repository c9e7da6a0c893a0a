"""The three-way merge of the cloud's desired configuration: properties and the PATCH body."""

from __future__ import annotations

import copy
import json
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from gastown_sandboxd.gtsettings.apply import (
    desired_patch,
    merge_desired,
    merge_patch_between,
    without_nulls,
)
from gastown_sandboxd.gtsettings.merge_patch import merge_patch
from gastown_sandboxd.gtsettings.patch import apply_patch, validate_patch
from gastown_sandboxd.gtsettings.schema import TownFiles

# Few key names, so that the three documents share many keys at every depth.
KEYS = st.sampled_from(["agents", "role_agents", "a", "b", "c", "mayor", "env"])
LEAVES = st.one_of(
    st.integers(-3, 3),
    st.sampled_from(["x", "y", "claude"]),
    st.booleans(),
    st.lists(st.text(max_size=2), max_size=2),
)
DOCS = st.recursive(
    LEAVES, lambda inner: st.dictionaries(KEYS, inner, max_size=4), max_leaves=12
).filter(lambda value: isinstance(value, dict))
# Desired configurations may hold nulls (they mean absent).
DESIRED = st.recursive(
    st.one_of(LEAVES, st.none()),
    lambda inner: st.dictionaries(KEYS, inner, max_size=4),
    max_leaves=12,
).filter(lambda value: isinstance(value, dict))

PROPERTY = settings(max_examples=150, deadline=None)


def paths(doc: Any, prefix: tuple[str, ...] = ()) -> set[tuple[str, ...]]:
    """Every key path of `doc`, at every depth."""
    found: set[tuple[str, ...]] = set()
    if isinstance(doc, dict):
        for key, value in doc.items():
            found.add((*prefix, key))
            found |= paths(value, (*prefix, key))
    return found


def leaves(doc: dict[str, Any], prefix: tuple[str, ...] = ()) -> dict[tuple[str, ...], Any]:
    """Every non-object value (and empty object) of `doc` by its key path."""
    found: dict[tuple[str, ...], Any] = {}
    for key, value in doc.items():
        if isinstance(value, dict) and value:
            found |= leaves(value, (*prefix, key))
        else:
            found[(*prefix, key)] = value
    return found


def at(doc: Any, path: tuple[str, ...]) -> Any:
    for key in path:
        doc = doc[key]
    return doc


def has(doc: Any, path: tuple[str, ...]) -> bool:
    for key in path:
        if not isinstance(doc, dict) or key not in doc:
            return False
        doc = doc[key]
    return True


@PROPERTY
@given(current=DOCS, desired=DESIRED, last=DOCS)
def test_applying_the_same_desired_twice_equals_once(
    current: dict[str, Any], desired: dict[str, Any], last: dict[str, Any]
) -> None:
    """Once applied, desired is the last-applied copy: a second apply changes nothing."""
    once = merge_desired(current, desired, last)
    assert merge_desired(once, desired, without_nulls(desired)) == once


@PROPERTY
@given(current=DOCS, desired=DESIRED, last=DOCS)
def test_the_result_equals_desired_on_every_cloud_managed_key(
    current: dict[str, Any], desired: dict[str, Any], last: dict[str, Any]
) -> None:
    """Every value desired names (at any depth) is in the result, as desired has it."""
    result = merge_desired(current, desired, last)
    for path, value in leaves(without_nulls(desired)).items():
        if value == {}:
            assert isinstance(at(result, path), dict)
        else:
            assert at(result, path) == value, path


@PROPERTY
@given(current=DOCS, desired=DESIRED, last=DOCS)
def test_keys_nobody_from_the_cloud_set_are_never_touched(
    current: dict[str, Any], desired: dict[str, Any], last: dict[str, Any]
) -> None:
    """A value of the files that no value of desired or last-applied covers stays as it is."""
    result = merge_desired(current, desired, last)
    wanted = without_nulls(desired)
    named = paths(wanted) | paths(last)  # keys the cloud sets or set, at any depth
    whole = set(leaves(wanted)) | set(leaves(last))  # values the cloud sets as a whole
    for path, value in leaves(current).items():
        if path in named or any(path[:n] in whole for n in range(1, len(path))):
            continue
        assert has(result, path), path
        assert at(result, path) == value, path


@PROPERTY
@given(current=DOCS, desired=DESIRED, last=DOCS)
def test_only_keys_the_cloud_set_before_can_be_removed(
    current: dict[str, Any], desired: dict[str, Any], last: dict[str, Any]
) -> None:
    """A key of the files missing from the result was in last-applied and is not desired
    (or lay inside such a key, or inside a value desired replaced)."""
    wanted = without_nulls(desired)
    result = merge_desired(current, desired, last)
    for path in paths(current):
        if has(result, path):
            continue
        assert any(
            (has(last, path[:n]) and not has(wanted, path[:n]))
            or (has(wanted, path[:n]) and not isinstance(at(wanted, path[:n]), dict))
            for n in range(1, len(path) + 1)
        ), path


@PROPERTY
@given(current=DOCS, desired=DESIRED, last=DOCS)
def test_the_merge_is_pure(
    current: dict[str, Any], desired: dict[str, Any], last: dict[str, Any]
) -> None:
    """The inputs are not changed, and the result shares nothing mutable with them."""
    copies = copy.deepcopy((current, desired, last))
    result = merge_desired(current, desired, last)
    assert (current, desired, last) == copies
    json.dumps(result)  # JSON all through
    if isinstance(result.get("agents"), dict):
        result["agents"]["probe"] = 1
        assert (current, desired, last) == copies


@PROPERTY
@given(old=DOCS, new=DOCS)
def test_the_patch_between_two_documents_turns_one_into_the_other(
    old: dict[str, Any], new: dict[str, Any]
) -> None:
    """RFC 7396 of `merge_patch_between(old, new)` on `old` gives `new` (no nulls in `new`)."""
    new = without_nulls(new)
    assert merge_patch(old, merge_patch_between(old, new)) == new


def test_a_hand_edit_of_a_cloud_key_is_put_back_and_a_hand_added_key_kept() -> None:
    """The cloud set role_agents.mayor; a hand changed it and added role_agents.crew."""
    last = {"role_agents": {"mayor": "kilo"}}
    desired = {"role_agents": {"mayor": "kilo"}}
    current = {"role_agents": {"mayor": "codex", "crew": "claude"}, "crew_agents": {"a": "b"}}
    assert merge_desired(current, desired, last) == {
        "role_agents": {"mayor": "kilo", "crew": "claude"},
        "crew_agents": {"a": "b"},
    }


def test_a_key_the_cloud_dropped_is_removed_and_only_that_one() -> None:
    """Last-applied had role_effort.mayor and default_agent; desired keeps only the agent."""
    last = {"default_agent": "claude", "role_effort": {"mayor": "high"}}
    desired = {"default_agent": "claude"}
    current = {"default_agent": "claude", "role_effort": {"mayor": "high", "crew": "low"}}
    assert merge_desired(current, desired, last) == {
        "default_agent": "claude",
        "role_effort": {"crew": "low"},
    }


def test_desired_patch_is_empty_when_the_files_already_agree() -> None:
    """Nothing to do: an empty body (the sync writes nothing)."""
    town = {"type": "town-settings", "version": 1, "default_agent": "codex", "theme": "dark"}
    current = TownFiles(town=town, rigs={"web": {"type": "rig-settings", "agent": "claude"}})
    desired = {"town": {"default_agent": "codex"}, "rigs": {"web": {"agent": "claude"}}}
    assert desired_patch(current, desired, desired) == {}


def test_desired_patch_names_a_rig_that_is_not_there_so_the_checks_refuse_it() -> None:
    """A rig folder that does not exist yet: the body names it; validation says so."""
    current = TownFiles(town={"type": "town-settings", "version": 1}, rigs={})
    desired = {"rigs": {"later": {"agent": "codex"}}}
    body = desired_patch(current, desired, None)
    assert body == {"rigs": {"later": {"agent": "codex"}}}
    problems = validate_patch(body, current=current)
    assert [p.path for p in problems] == ["/rigs/later"]


def test_desired_patch_removes_what_the_cloud_dropped_and_applies_through_apply_patch() -> None:
    """The body, applied as PATCH /config applies it, gives the three-way merge."""
    town = {
        "type": "town-settings",
        "version": 1,
        "default_agent": "old",
        "agents": {"old": {"command": "o"}, "mine": {"command": "m"}},
        "theme": "dark",
    }
    current = TownFiles(town=town, rigs={"web": {"type": "rig-settings", "agent": "old"}})
    last = {
        "town": {"default_agent": "old", "agents": {"old": {"command": "o"}}},
        "rigs": {"web": {"agent": "old"}},
    }
    desired = {"town": {"default_agent": "codex"}, "rigs": {}}
    body = desired_patch(current, desired, last)
    assert body == {
        "town": {"default_agent": "codex", "agents": {"old": None}},
        "rigs": {"web": {"agent": None}},
    }
    after = apply_patch(current, body)
    assert after.town == {
        "type": "town-settings",
        "version": 1,
        "default_agent": "codex",
        "agents": {"mine": {"command": "m"}},
        "theme": "dark",
    }
    assert after.rigs["web"] == {"type": "rig-settings"}


def test_desired_parts_of_the_wrong_shape_are_passed_on_for_the_checks() -> None:
    """Unknown top-level keys and a town that is not an object reach validation."""
    current = TownFiles(town=None, rigs={})
    body = desired_patch(current, {"town": "codex", "extra": 1}, None)
    assert body == {"extra": 1, "town": "codex"}
    assert {p.path for p in validate_patch(body, current=current)} == {"/extra", "/town"}
