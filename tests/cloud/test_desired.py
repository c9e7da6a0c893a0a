"""The pure rules of the desired configuration: shape, merge, diff, push patch, state, ETag."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gastown_cloud.desired import (
    ConfigState,
    check_shape,
    config_state,
    etag,
    etag_matches,
    merge_patch,
    push_patch,
)
from gastown_sandboxd.gtsettings.apply import merge_patch_between

KEYS = st.sampled_from(["a", "b", "c", "role_agents", "mayor"])
LEAVES = st.one_of(st.integers(-3, 3), st.sampled_from(["x", "y"]), st.lists(st.integers(0, 2)))
# JSON objects as merged states hold them: no nulls anywhere.
STATES = st.recursive(LEAVES, lambda inner: st.dictionaries(KEYS, inner, max_size=4), max_leaves=12)
OBJECTS = st.dictionaries(KEYS, STATES, max_size=4)
# Merge patches: like states, plus nulls (deletions).
PATCH_VALUES = st.recursive(
    st.one_of(LEAVES, st.none()),
    lambda inner: st.dictionaries(KEYS, inner, max_size=4),
    max_leaves=12,
)
PATCHES = st.dictionaries(KEYS, PATCH_VALUES, max_size=4)
# No per-example deadline: a loaded machine must not turn a slow example into a failure.
UNHURRIED = settings(deadline=None)


def _has_null(value: Any) -> bool:
    if isinstance(value, dict):
        return any(inner is None or _has_null(inner) for inner in value.values())
    return False


@UNHURRIED
@given(OBJECTS, PATCHES)
def test_merge_is_idempotent_and_drops_nulls(target: dict[str, Any], patch: dict[str, Any]) -> None:
    """Merging a patch twice equals merging it once; the result holds no null."""
    once = merge_patch(target, patch)
    assert merge_patch(once, patch) == once
    assert not _has_null(once)


@UNHURRIED
@given(OBJECTS, OBJECTS)
def test_diff_turns_old_into_new(old: dict[str, Any], new: dict[str, Any]) -> None:
    """The diff, merged into `old`, gives `new`; equal objects give an empty diff."""
    assert merge_patch(old, merge_patch_between(old, new)) == new
    assert merge_patch_between(new, new) == {}


@UNHURRIED
@given(OBJECTS, OBJECTS, PATCHES)
def test_push_patch_takes_any_base_to_desired(
    base: dict[str, Any], old: dict[str, Any], patch: dict[str, Any]
) -> None:
    """Whatever generation the sandbox stands on, the pushed patch brings it to `desired`."""
    desired = merge_patch(old, patch)
    assert merge_patch(base, push_patch(base, desired, patch)) == desired


@UNHURRIED
@given(OBJECTS, PATCHES)
def test_push_patch_from_the_previous_state_is_the_patch(
    old: dict[str, Any], patch: dict[str, Any]
) -> None:
    """A sandbox on the previous generation is sent exactly what the dashboard sent."""
    assert push_patch(old, merge_patch(old, patch), patch) == patch


@pytest.mark.parametrize(("before", "after"), [(1, True), (0, False), (1, 1.0), (1.0, 1)])
def test_push_patch_changes_a_value_to_an_equal_one_of_another_json_type(
    before: object, after: object
) -> None:
    """`true` is not `1` in JSON, though Python calls them equal: the push carries the change."""
    base = {"town": {"role_effort": {"mayor": before}}}
    desired = {"town": {"role_effort": {"mayor": after}}}
    pushed = push_patch(base, desired, {})
    assert pushed == desired
    assert type(pushed["town"]["role_effort"]["mayor"]) is type(after)


def test_merge_does_not_change_its_inputs() -> None:
    """merge_patch returns a new object and shares nothing with target or patch."""
    target = {"town": {"role_agents": {"mayor": "a"}}}
    patch = {"town": {"role_agents": {"mayor": None, "dog": "b"}, "agents": {"k": {"args": [1]}}}}
    merged = merge_patch(target, patch)
    merged["town"]["agents"]["k"]["args"].append(2)
    assert target == {"town": {"role_agents": {"mayor": "a"}}}
    assert patch["town"]["agents"] == {"k": {"args": [1]}}
    assert merged["town"]["role_agents"] == {"dog": "b"}


def test_contract_example_has_the_right_shape() -> None:
    """The contract's PATCH example, and nulls at every level, pass the shape check."""
    example = {
        "town": {
            "default_agent": "kilo-sonnet",
            "agents": {"kilo-sonnet": {"provider": "claude", "args": ["--model", "m"]}, "x": None},
            "role_agents": {"mayor": "kilo-sonnet", "polecat": None},
            "role_effort": {"mayor": "high"},
            "crew_agents": {"alice": "codex"},
        },
        "rigs": {"frontend": {"role_agents": {"polecat": "codex"}}, "old": None},
    }
    assert check_shape(example) == []
    assert check_shape({"town": None, "rigs": None}) == []
    assert check_shape({}) == []
    rig: dict[str, Any] = {
        "agent": None,
        "agents": {},
        "role_agents": {},
        "worker_agents": {},
        "role_effort": {},
    }
    assert check_shape({"rigs": {"api": rig}}) == []


@pytest.mark.parametrize(
    ("patch", "path"),
    [
        ({"towns": {}}, "/towns"),
        ({"town": []}, "/town"),
        ({"town": {"cost_tier": "x"}}, "/town/cost_tier"),
        ({"town": {"agent": "x"}}, "/town/agent"),
        ({"town": {"default_agent": 3}}, "/town/default_agent"),
        ({"town": {"role_agents": ["mayor"]}}, "/town/role_agents"),
        ({"town": {"role_agents": {"mayor": {"x": 1}}}}, "/town/role_agents/mayor"),
        ({"town": {"agents": {"k": "claude"}}}, "/town/agents/k"),
        ({"rigs": ["frontend"]}, "/rigs"),
        ({"rigs": {"frontend": "x"}}, "/rigs/frontend"),
        ({"rigs": {"frontend": {"default_agent": "x"}}}, "/rigs/frontend/default_agent"),
        ({"rigs": {"a/b": {"crew_agents": {}}}}, "/rigs/a~1b/crew_agents"),
        ({"rigs": {" ": {}}}, "/rigs/ "),
    ],
)
def test_shape_problems_name_their_path(patch: dict[str, Any], path: str) -> None:
    """Each problem of shape comes back with the JSON Pointer of the bad key."""
    problems = check_shape(patch)
    assert [p["path"] for p in problems] == [path]
    assert problems[0]["message"]


def test_every_problem_is_listed() -> None:
    """Several problems give several details, in body order."""
    problems = check_shape({"town": {"x": 1, "role_effort": "high"}, "extra": 1})
    assert [p["path"] for p in problems] == ["/town/x", "/town/role_effort", "/extra"]


@pytest.mark.parametrize(
    ("generation", "observed", "error", "state"),
    [
        (0, 0, None, ConfigState.APPLIED),
        (3, 3, None, ConfigState.APPLIED),
        (3, 2, None, ConfigState.PENDING),
        (3, 2, {"message": "old failure"}, ConfigState.PENDING),
        (3, 3, {"message": "bad rig"}, ConfigState.FAILED),
    ],
)
def test_state_rules(generation: int, observed: int, error: object, state: ConfigState) -> None:
    """applied, pending and failed follow the contract's table."""
    assert config_state(generation, observed, error) is state


def test_etag_follows_content() -> None:
    """Equal bodies give equal quoted tags whatever the key order; a change changes the tag."""
    tag = etag({"a": 1, "b": [1, 2]})
    assert tag == etag({"b": [1, 2], "a": 1})
    assert tag != etag({"a": 2, "b": [1, 2]})
    assert tag.startswith('"')
    assert tag.endswith('"')
    assert etag_matches(tag, tag)
    assert etag_matches(f'"other", W/{tag}', tag)
    assert etag_matches("*", tag)
    assert not etag_matches('"other"', tag)
    assert not etag_matches("", tag)


JWT = "eyJhbGciOiJIUzI1NiIsInR5cCI6IkpXVCJ9.eyJzdWIiOiJ1In0.c2lnbmF0dXJlc2lnbmF0dXJlc2lnbmF0dXJl"


def test_secrets_are_refused_where_they_stand() -> None:
    """A JWT in any string, or a literal token variable in an agent's env, is a problem; a
    reference such as `$KILO_JWT`, an empty value and a null are not."""
    agent = {
        "command": "claude",
        "args": ["--header", f"Authorization: Bearer {JWT}"],
        "env": {
            "ANTHROPIC_API_KEY": "sk-ant-literal",
            "KILO_JWT": "$KILO_JWT",
            "KILOCODE_TOKEN": "${KILO_JWT}",
            "OPENAI_API_KEY": "",
            "ANTHROPIC_AUTH_TOKEN": None,
            "ANTHROPIC_BASE_URL": "https://api.kilo.ai/api/gateway",
        },
    }
    patch = {"town": {"agents": {"k": agent}}, "rigs": {"api": {"agent": JWT}}}
    assert [p["path"] for p in check_shape(patch)] == [
        "/town/agents/k/args/1",
        "/town/agents/k/env/ANTHROPIC_API_KEY",
        "/rigs/api/agent",
    ]
    assert all(JWT not in p["message"] for p in check_shape(patch))
