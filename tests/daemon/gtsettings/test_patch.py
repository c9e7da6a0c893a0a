"""gt's settings model without I/O: parsing, merge patch, rendering, revision and every rule."""

from __future__ import annotations

import base64
import copy
import hashlib
import json
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gastown_sandboxd.errors import Problem, SettingsFileUnreadable
from gastown_sandboxd.gtsettings.merge_patch import merge_patch
from gastown_sandboxd.gtsettings.patch import (
    PRESETS,
    TownFiles,
    apply_patch,
    changed_keys,
    contains_jwt,
    managed_view,
    parse_document,
    render,
    revision,
    revision_of,
    rig_name_problem,
    validate_patch,
    view_text,
)
from gastown_sandboxd.gtsettings.schema import MANAGED_KEYS
from tests.daemon.gt_samples import (
    RIG_SETTINGS,
    TOWN_SETTINGS,
    contract_patch,
    members,
    rig_doc,
    town_doc,
)

TOWN_MANAGED = {"default_agent", "agents", "role_agents", "role_effort", "crew_agents"}


def _files() -> TownFiles:
    return TownFiles(town=town_doc(), rigs={"frontend": rig_doc(), "backend": None})


def _jwt(header: dict[str, Any]) -> str:
    def part(value: dict[str, Any]) -> str:
        return base64.urlsafe_b64encode(json.dumps(value).encode()).decode().rstrip("=")

    return f"{part(header)}.{part({'sub': 'u1', 'exp': 1})}.c2lnbmF0dXJl"


def _paths(body: Any, files: TownFiles | None = None, **kwargs: Any) -> list[str]:
    return [p.path for p in validate_patch(body, current=files or _files(), **kwargs)]


# --- merge patch (RFC 7396) ---------------------------------------------------------------

RFC_7396_EXAMPLES = [
    ({"a": "b"}, {"a": "c"}, {"a": "c"}),
    ({"a": "b"}, {"b": "c"}, {"a": "b", "b": "c"}),
    ({"a": "b"}, {"a": None}, {}),
    ({"a": "b", "b": "c"}, {"a": None}, {"b": "c"}),
    ({"a": ["b"]}, {"a": "c"}, {"a": "c"}),
    ({"a": "c"}, {"a": ["b"]}, {"a": ["b"]}),
    ({"a": {"b": "c"}}, {"a": {"b": "d", "c": None}}, {"a": {"b": "d"}}),
    ({"a": [{"b": "c"}]}, {"a": [1]}, {"a": [1]}),
    (["a", "b"], ["c", "d"], ["c", "d"]),
    ({"a": "b"}, ["c"], ["c"]),
    ({"a": "foo"}, None, None),
    ({"a": "foo"}, "bar", "bar"),
    ({"e": None}, {"a": 1}, {"e": None, "a": 1}),
    ([1, 2], {"a": "b", "c": None}, {"a": "b"}),
    ({}, {"a": {"bb": {"ccc": None}}}, {"a": {"bb": {}}}),
]


@pytest.mark.parametrize(("target", "patch", "expected"), RFC_7396_EXAMPLES)
def test_merge_patch_matches_rfc_7396_appendix_a(target: Any, patch: Any, expected: Any) -> None:
    """Every example of RFC 7396 appendix A gives the documented result."""
    assert merge_patch(target, patch) == expected


def _reference_merge(target: Any, patch: Any) -> Any:
    # RFC 7396 section 2, transcribed literally.
    if isinstance(patch, dict):
        if not isinstance(target, dict):
            target = {}
        target = dict(target)
        for name, value in patch.items():
            if value is None:
                target.pop(name, None)
            else:
                target[name] = _reference_merge(target.get(name), value)
        return target
    return patch


_keys = st.sampled_from(["a", "b", "c", "agents", "role_agents", "x y", "é"])
_json = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=5),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(_keys, inner, max_size=4),
    max_leaves=12,
)


@settings(max_examples=300, deadline=None)
@given(target=_json, patch=_json)
def test_merge_patch_agrees_with_the_rfc_reference(target: Any, patch: Any) -> None:
    """On any JSON, the merge equals the RFC's pseudo-code, is idempotent and mutates nothing."""
    target_before = copy.deepcopy(target)
    patch_before = copy.deepcopy(patch)
    result = merge_patch(target, patch)
    assert result == _reference_merge(target, patch)
    assert merge_patch(result, patch) == result
    assert (target, patch) == (target_before, patch_before)
    if isinstance(target, dict) and isinstance(result, dict):
        kept = [key for key in target if key in result]
        assert [key for key in result if key in target] == kept


# --- property: unmanaged keys survive every PATCH ----------------------------------------

_names = st.sampled_from(["claude", "codex", "kilo-a", "kilo-b"])
_town_patch = st.fixed_dictionaries(
    {},
    optional={
        "default_agent": st.none() | _names,
        "role_agents": st.none()
        | st.dictionaries(st.sampled_from(["mayor", "polecat", "crew"]), st.none() | _names),
        "role_effort": st.none()
        | st.dictionaries(
            st.sampled_from(["mayor", "witness"]), st.none() | st.sampled_from(["low", "max"])
        ),
        "agents": st.none()
        | st.dictionaries(
            st.sampled_from(["kilo-a", "kilo-b", "claude-haiku"]),
            st.none()
            | st.fixed_dictionaries(
                {},
                optional={
                    "args": st.none() | st.lists(st.text(max_size=4), max_size=2),
                    "command": st.sampled_from(["claude", "codex"]),
                },
            ),
        ),
    },
)
_unmanaged = st.dictionaries(
    st.text(min_size=1, max_size=6).filter(lambda key: key not in TOWN_MANAGED),
    _json,
    max_size=5,
)


@settings(max_examples=150, deadline=None)
@given(unmanaged=_unmanaged, patch=_town_patch, split=st.integers(0, 5))
def test_unmanaged_keys_are_always_preserved(
    unmanaged: dict[str, Any], patch: dict[str, Any], split: int
) -> None:
    """After any PATCH of managed keys, every other key keeps its value, order and text."""
    managed = managed_view(town_doc(), "town")
    items = list(unmanaged.items())
    doc = {**dict(items[:split]), **managed, **dict(items[split:])}
    original = render(doc)
    after = apply_patch(TownFiles(town=doc), {"town": patch}).town
    assert after is not None
    text = render(after, original=original)
    reread = json.loads(text)
    assert [key for key in reread if key not in TOWN_MANAGED] == list(unmanaged)
    assert {key: reread[key] for key in unmanaged} == unmanaged
    before_members = members(original)
    after_members = members(text)
    for key in unmanaged:
        assert after_members[key] == before_members[key]
    # No exec_wrapper is added: the merge is the plain RFC 7396 merge (the shims wrap agents).
    assert managed_view(reread, "town") == merge_patch(managed, patch)


# --- parsing --------------------------------------------------------------------------------


def test_parse_document_reads_gt_files() -> None:
    """gt's own files parse to their documents; a file without type or version is accepted."""
    assert parse_document(TOWN_SETTINGS, "town", file="settings/config.json") == town_doc()
    assert parse_document(RIG_SETTINGS, "rig", file="r/settings/config.json") == rig_doc()
    assert parse_document(b'{"agent": "codex"}', "rig", file="f") == {"agent": "codex"}


@pytest.mark.parametrize(
    ("raw", "reason"),
    [
        (b"{not json", "is not valid JSON"),
        (b"", "is not valid JSON"),
        (b"\xff\xfe{}", "is not UTF-8"),
        (b"[1, 2]", "does not hold a JSON object"),
        (b'{"a": NaN}', "is not valid JSON"),
        (b'{"type": "rig-settings", "version": 1}', "has type"),
        (b'{"type": 7}', "has type"),
        (b'{"type": "town-settings", "version": 2}', "has version 2"),
        (b'{"version": "1"}', "not an integer"),
        (b'{"version": true}', "not an integer"),
        (b"[" * 100_000 + b"]" * 100_000, "not valid JSON"),
        (b'{"role_agents": {"mayor": "claude\\ud800"}}', "holds a lone surrogate"),
        (b'{"\\uDFFF": 1}', "holds a lone surrogate"),
    ],
)
def test_parse_document_refuses_what_gt_did_not_write(raw: bytes, reason: str) -> None:
    """Not JSON, not UTF-8, not an object, another type or a newer version: unreadable."""
    with pytest.raises(SettingsFileUnreadable) as caught:
        parse_document(raw, "town", file="settings/config.json")
    assert reason in caught.value.message
    assert caught.value.message.startswith("settings/config.json ")


def test_escaped_surrogate_pairs_and_other_escapes_are_read() -> None:
    """A pair of surrogate escapes is one character (as Go reads it), and other escapes
    are text like any other: only a lone surrogate makes a file unreadable."""
    raw = b'{"agent": "\\ud83d\\ude00 \\u00e9 \\\\ud800"}'
    assert parse_document(raw, "rig", file="f") == {"agent": "\U0001f600 \u00e9 \\ud800"}


# --- rendering ------------------------------------------------------------------------------


def test_render_writes_two_space_json_ending_as_the_file_did() -> None:
    """A document renders as indent-2 JSON, non-ASCII kept, with no newline at the end, as
    gt's SaveTownSettings and SaveRigSettings write it; over a file that ended with one, it
    keeps it."""
    doc = {"type": "rig-settings", "version": 1, "agent": "café", "role_agents": {}}
    as_gt = json.dumps(doc, indent=2, ensure_ascii=False).encode()
    assert render(doc) == as_gt
    assert render({}) == b"{}"
    assert render(doc, original=as_gt) == as_gt
    assert render(doc, original=as_gt + b"\n") == as_gt + b"\n"
    assert render({}, original=b"{}\n") == b"{}\n"


def test_render_keeps_unchanged_members_byte_exact() -> None:
    """Unchanged top-level values keep their text (Go escapes, 1e-7, 2.50); changed ones are new."""
    doc = town_doc()
    assert render(doc, original=TOWN_SETTINGS) == TOWN_SETTINGS
    doc["role_effort"]["polecat"] = "max"
    text = render(doc, original=TOWN_SETTINGS)
    before, after = members(TOWN_SETTINGS), members(text)
    assert [key for key in before if before[key] != after[key]] == ["role_effort"]
    assert '"jitter": 1e-7' in after["scheduler"]
    assert json.loads(text) == doc


def test_render_with_an_unparsable_original_renders_afresh() -> None:
    """An original that is not a JSON object gives the plain rendering."""
    doc = {"a": 1}
    assert render(doc, original=b"[1]") == render(doc)
    assert render(doc, original=b"{broken") == render(doc)
    assert render(doc, original=b"{}") == render(doc)


# --- apply_patch ---------------------------------------------------------------------------


def test_apply_patch_changes_only_the_managed_keys_named() -> None:
    """Role agents merge key by key, null deletes, everything else stays."""
    files = _files()
    after = apply_patch(files, {"town": {"role_agents": {"mayor": "codex", "polecat": None}}})
    assert after.town is not None
    assert after.town["role_agents"] == {"mayor": "codex", "witness": "claude-haiku"}
    assert {k: v for k, v in after.town.items() if k != "role_agents"} == {
        k: v for k, v in town_doc().items() if k != "role_agents"
    }
    assert after.rigs == files.rigs
    assert files.town == town_doc()


def test_new_agents_get_an_exec_wrapper_only_when_the_body_sets_one() -> None:
    """No default wrapper (the shims wrap every agent CLI); an explicit list is kept."""
    body = {
        "town": {
            "agents": {
                "kilo": {"provider": "claude", "args": ["--model", "anthropic/claude-sonnet-4.5"]},
                "own": {"command": "codex", "exec_wrapper": ["firejail", "--"]},
                "none": {"command": "codex", "exec_wrapper": None},
            }
        }
    }
    town = apply_patch(_files(), body).town
    assert town is not None
    assert "exec_wrapper" not in town["agents"]["kilo"]
    assert town["agents"]["own"]["exec_wrapper"] == ["firejail", "--"]
    assert "exec_wrapper" not in town["agents"]["none"]


def test_changing_an_existing_agent_keeps_its_fields_and_wrapper() -> None:
    """A PATCH of an agent merges into it: session, tmux and exec_wrapper stay as they were."""
    body = {"town": {"agents": {"claude-haiku": {"args": ["--model", "sonnet"]}}}}
    town = apply_patch(_files(), body).town
    assert town is not None
    agent = town["agents"]["claude-haiku"]
    original = town_doc()["agents"]["claude-haiku"]
    assert agent == {**original, "args": ["--model", "sonnet"]}
    codex = apply_patch(_files(), {"town": {"agents": {"codex-default": {"command": "cx"}}}}).town
    assert codex is not None
    assert "exec_wrapper" not in codex["agents"]["codex-default"]


def test_args_null_and_empty_list_stay_distinct() -> None:
    """`args: null` (preset defaults) and `args: []` (no arguments) survive a PATCH unchanged."""
    town = apply_patch(_files(), {"town": {"default_agent": "codex"}}).town
    assert town is not None
    assert town["agents"]["codex-default"]["args"] is None
    assert town["agents"]["opencode-bare"]["args"] == []
    cleared = apply_patch(_files(), {"town": {"agents": {"opencode-bare": {"args": None}}}}).town
    assert cleared is not None
    assert "args" not in cleared["agents"]["opencode-bare"]


def test_a_missing_file_is_created_with_type_and_version_first() -> None:
    """A rig without a file gets one starting with type and version; an empty PATCH makes none."""
    after = apply_patch(_files(), {"rigs": {"backend": {"role_agents": {"polecat": "codex"}}}})
    assert list(after.rigs["backend"] or {}) == ["type", "version", "role_agents"]
    assert (after.rigs["backend"] or {})["type"] == "rig-settings"
    assert apply_patch(_files(), {"rigs": {"backend": {}}}).rigs["backend"] is None
    town = apply_patch(TownFiles(), {"town": {"default_agent": "codex"}}).town
    assert town == {"type": "town-settings", "version": 1, "default_agent": "codex"}


def test_managed_keys_absent_from_a_file_are_created() -> None:
    """Merging into an absent managed key creates it after the existing keys."""
    rig = apply_patch(_files(), {"rigs": {"frontend": {"worker_agents": {"denali": "codex"}}}})
    doc = rig.rigs["frontend"] or {}
    assert list(doc)[-1] == "worker_agents"
    assert doc["worker_agents"] == {"denali": "codex"}


# --- views, revision, changed keys ----------------------------------------------------------


def test_managed_view_holds_only_managed_keys_in_file_order() -> None:
    """The town view lists the managed keys in the file's order; the rig view its own keys."""
    assert list(managed_view(town_doc(), "town")) == [
        "default_agent",
        "agents",
        "role_agents",
        "role_effort",
    ]
    assert managed_view(rig_doc(), "rig") == {
        "agent": "claude",
        "role_agents": {"polecat": "codex"},
    }
    assert managed_view(None, "rig") == {}


def test_revision_follows_managed_content_only() -> None:
    """Unmanaged edits and key order leave the revision; managed edits and new rigs move it."""
    base = revision(_files())
    assert len(base) == 32
    unmanaged = _files()
    assert unmanaged.town is not None
    unmanaged.town["cost_tier"] = "premium"
    assert revision(unmanaged) == base
    reordered = TownFiles(town=dict(reversed(town_doc().items())), rigs=_files().rigs)
    assert revision(reordered) == base
    managed = _files()
    assert managed.town is not None
    managed.town["role_effort"]["crew"] = "max"
    assert revision(managed) != base
    with_rig = TownFiles(town=town_doc(), rigs={"frontend": rig_doc(), "backend": {}})
    assert revision(with_rig) != base
    broken = TownFiles(town=town_doc(), rigs=_files().rigs, unreadable={"docs/x": "ab"})
    assert revision(broken) != base


_CANONICAL = json.JSONEncoder(sort_keys=True, separators=(",", ":"), ensure_ascii=False)


@settings(max_examples=200, deadline=None)
@given(
    rigs=st.dictionaries(
        st.text(max_size=6), st.dictionaries(st.sampled_from(["agent", "role_agents"]), st.text())
    ),
    unreadable=st.dictionaries(st.text(max_size=6), st.text(max_size=6)),
)
def test_revision_is_the_digest_of_one_canonical_text(
    rigs: dict[str, dict[str, str]], unreadable: dict[str, str]
) -> None:
    """`revision_of`, assembled from each file's text, is the digest of the canonical JSON of
    the whole, whatever the rig names hold (quotes, backslashes, controls, any script) and
    with or without unreadable files."""
    town = {"default_agent": "kilo", "role_agents": {"mayor": "kilo"}}
    whole = _CANONICAL.encode({"rigs": rigs, "town": town, "unreadable": unreadable})
    texts = {name: _CANONICAL.encode(view) for name, view in rigs.items()}
    assembled = revision_of(_CANONICAL.encode(town), texts, unreadable)
    assert assembled == hashlib.sha256(whole.encode("utf-8")).hexdigest()[:32]


_managed = st.sampled_from(sorted(MANAGED_KEYS["town"]))
_member = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=5),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(_keys, inner, max_size=4),
    max_leaves=12,
)


@settings(max_examples=300, deadline=None)
@given(
    doc=st.dictionaries(_managed | _keys, _member, max_size=6),
    patch=st.dictionaries(_managed, _member, max_size=3),
)
def test_a_files_revision_text_is_its_canonical_json_before_and_after_a_merge(
    doc: dict[str, Any], patch: dict[str, Any]
) -> None:
    """`view_text`, assembled member by member with the texts of values it has seen, is the
    canonical JSON of the managed view: of a document, and of its merge with a patch (which
    shares every value it did not change) right after."""
    merged = merge_patch(doc, patch)
    for current in (doc, merged, doc):
        expected = _CANONICAL.encode(managed_view(current, "town"))
        assert view_text(current, "town") == expected


def test_changed_keys_lists_differing_top_level_keys() -> None:
    """Added, changed and removed keys are listed; 1, 1.0 and true count as different."""
    old = {"type": "t", "a": 1, "b": {"x": 1}, "gone": True}
    new = {"type": "t", "a": 1.0, "b": {"x": 1}, "c": True}
    assert changed_keys(old, new) == ["a", "c", "gone"]
    assert changed_keys(None, {"type": "t"}) == ["type"]
    assert changed_keys({"type": "t"}, None) == ["type"]
    assert changed_keys(old, old) == []


# --- validation: every rule ----------------------------------------------------------------


def test_a_valid_body_has_no_problems() -> None:
    """The contract's example body (with its agent defined) validates cleanly."""
    body = contract_patch()
    body["town"]["agents"]["kilo-sonnet"].update(
        initial_prompt="", prompt_mode="arg", exec_wrapper=["gastown-sandboxd", "exec", "--"]
    )
    body["rigs"]["frontend"]["worker_agents"] = {"denali": "kilo-sonnet"}
    assert validate_patch(body, current=_files()) == []
    assert validate_patch({}, current=TownFiles()) == []


def test_five_problems_are_reported_at_once() -> None:
    """One body with five mistakes gives five details with the right JSON pointers."""
    body = {
        "town": {
            "role_agents": {"majer": "claude", "mayor": "nobody"},
            "role_effort": {"witness": "huge"},
            "agents": {"k": {"model": "x"}},
        },
        "rigs": {"hq": {}},
    }
    problems = validate_patch(body, current=_files())
    assert len(problems) == 5
    assert sorted(p.path for p in problems) == [
        "/rigs/hq",
        "/town/agents/k/model",
        "/town/role_agents/majer",
        "/town/role_agents/mayor",
        "/town/role_effort/witness",
    ]
    assert all(isinstance(p, Problem) and p.message for p in problems)


@pytest.mark.parametrize(
    ("body", "path"),
    [
        ([], ""),
        ({"towns": {}}, "/towns"),
        ({"town": None}, "/town"),
        ({"town": []}, "/town"),
        ({"rigs": []}, "/rigs"),
        ({"rigs": {"frontend": 3}}, "/rigs/frontend"),
        ({"town": {"type": "town-settings"}}, "/town/type"),
        ({"town": {"cost_tier": "x"}}, "/town/cost_tier"),
        ({"town": {"agent": "codex"}}, "/town/agent"),
        ({"rigs": {"frontend": {"default_agent": "codex"}}}, "/rigs/frontend/default_agent"),
        ({"rigs": {"frontend": {"crew_agents": {}}}}, "/rigs/frontend/crew_agents"),
        ({"town": {"role_agents": {"majer": "codex"}}}, "/town/role_agents/majer"),
        ({"town": {"role_effort": {"Mayor": "low"}}}, "/town/role_effort/Mayor"),
        ({"town": {"role_effort": {"mayor": "extreme"}}}, "/town/role_effort/mayor"),
        ({"town": {"role_effort": {"mayor": "HIGH"}}}, "/town/role_effort/mayor"),
        ({"town": {"role_effort": {"mayor": 3}}}, "/town/role_effort/mayor"),
        ({"town": {"role_effort": ["mayor"]}}, "/town/role_effort"),
        ({"town": {"role_agents": "codex"}}, "/town/role_agents"),
        ({"town": {"role_agents": {"mayor": 5}}}, "/town/role_agents/mayor"),
        ({"town": {"default_agent": ""}}, "/town/default_agent"),
        ({"town": {"default_agent": "two words"}}, "/town/default_agent"),
        ({"town": {"default_agent": ["codex"]}}, "/town/default_agent"),
        ({"town": {"default_agent": "nobody"}}, "/town/default_agent"),
        ({"town": {"crew_agents": {"alice": "nobody"}}}, "/town/crew_agents/alice"),
        ({"town": {"crew_agents": {"../alice": "codex"}}}, "/town/crew_agents/..~1alice"),
        ({"town": {"crew_agents": {"alice": 1}}}, "/town/crew_agents/alice"),
        ({"rigs": {"frontend": {"agent": "nobody"}}}, "/rigs/frontend/agent"),
        (
            {"rigs": {"frontend": {"worker_agents": {"denali": "nobody"}}}},
            "/rigs/frontend/worker_agents/denali",
        ),
        ({"rigs": {"frontend": {"worker_agents": {"": "codex"}}}}, "/rigs/frontend/worker_agents/"),
        (
            {"rigs": {"frontend": {"role_agents": {"polecat": "nobody"}}}},
            "/rigs/frontend/role_agents/polecat",
        ),
        ({"town": {"agents": []}}, "/town/agents"),
        ({"town": {"agents": {"k": "claude"}}}, "/town/agents/k"),
        ({"town": {"agents": {"a b": {}}}}, "/town/agents/a b"),
        ({"town": {"agents": {"k": {"model": "opus"}}}}, "/town/agents/k/model"),
        ({"town": {"agents": {"k": {"session": {}}}}}, "/town/agents/k/session"),
        ({"town": {"agents": {"k": {"provider": 1}}}}, "/town/agents/k/provider"),
        ({"town": {"agents": {"k": {"command": ""}}}}, "/town/agents/k/command"),
        ({"town": {"agents": {"k": {"command": ["claude"]}}}}, "/town/agents/k/command"),
        ({"town": {"agents": {"k": {"prompt_mode": False}}}}, "/town/agents/k/prompt_mode"),
        ({"town": {"agents": {"k": {"initial_prompt": 5}}}}, "/town/agents/k/initial_prompt"),
        ({"town": {"agents": {"k": {"args": "--model x"}}}}, "/town/agents/k/args"),
        ({"town": {"agents": {"k": {"args": ["--model", 4]}}}}, "/town/agents/k/args/1"),
        ({"town": {"agents": {"k": {"exec_wrapper": "wrap"}}}}, "/town/agents/k/exec_wrapper"),
        ({"town": {"agents": {"k": {"exec_wrapper": ["x", ""]}}}}, "/town/agents/k/exec_wrapper/1"),
        ({"town": {"agents": {"k": {"env": ["A=1"]}}}}, "/town/agents/k/env"),
        ({"town": {"agents": {"k": {"env": {"lower": "1"}}}}}, "/town/agents/k/env/lower"),
        ({"town": {"agents": {"k": {"env": {"1ABC": "1"}}}}}, "/town/agents/k/env/1ABC"),
        ({"town": {"agents": {"k": {"env": {"A-B": "1"}}}}}, "/town/agents/k/env/A-B"),
        ({"town": {"agents": {"k": {"env": {"A": 1}}}}}, "/town/agents/k/env/A"),
    ],
)
def test_each_rule_reports_its_path(body: Any, path: str) -> None:
    """Each broken rule gives exactly one problem at the JSON pointer of the bad value."""
    assert _paths(body) == [path]


@pytest.mark.parametrize(
    "name",
    sorted(
        [
            "KILO_JWT",
            "KILOCODE_TOKEN",
            "ANTHROPIC_AUTH_TOKEN",
            "ANTHROPIC_API_KEY",
            "OPENAI_API_KEY",
        ]
    ),
)
def test_secret_names_refuse_any_literal_value(name: str) -> None:
    """A literal value for a token variable is refused; "" and a $reference are allowed."""
    bad = {"town": {"agents": {"k": {"env": {name: "sk-ant-not-a-jwt"}}}}}
    problems = validate_patch(bad, current=_files())
    assert [p.path for p in problems] == [f"/town/agents/k/env/{name}"]
    assert "sk-ant" not in problems[0].message
    for allowed in ("", f"${name}", "${KILO_JWT}", None):
        assert _paths({"town": {"agents": {"k": {"env": {name: allowed}}}}}) == []


def test_a_jwt_is_refused_in_any_env_value_and_agent_string() -> None:
    """A JWT under any name, or in args, exec_wrapper, command or prompt, is refused unseen."""
    token = _jwt({"alg": "HS256", "typ": "JWT"})
    body = {
        "town": {
            "agents": {
                "k": {
                    "env": {"MY_HEADER": f"Bearer {token}", "FINE": "a.b.c"},
                    "args": ["--token", token],
                    "exec_wrapper": [f"x={token}"],
                    "command": token,
                    "initial_prompt": f"use {token} please",
                }
            }
        }
    }
    problems = validate_patch(body, current=_files())
    assert [p.path for p in problems] == [
        "/town/agents/k/env/MY_HEADER",
        "/town/agents/k/args/1",
        "/town/agents/k/exec_wrapper/0",
        "/town/agents/k/command",
        "/town/agents/k/initial_prompt",
    ]
    assert all(token not in p.message and token[:20] not in p.message for p in problems)


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (_jwt({"alg": "HS256"}), True),
        (_jwt({"alg": "none", "typ": "JWT"}), True),
        ("Bearer " + _jwt({"alg": "RS256"}), True),
        (_jwt({"typ": "JWT"}), False),
        ("anthropic/claude-sonnet-4.5", False),
        ("https://api.kilo.ai/api/gateway", False),
        ("a.b.c", False),
        ("eyJub3QganNvbg.x.y", False),
        ("W10.e30.x", False),
        ("", False),
    ],
)
def test_contains_jwt(value: str, expected: bool) -> None:
    """A JWT is a segment decoding to a JSON object with `alg`; dotted model names are not."""
    assert contains_jwt(value) is expected


@pytest.mark.parametrize(
    ("name", "fragment"),
    [
        ("", "empty"),
        ("..", "cannot contain"),
        ("../etc", "cannot contain"),
        ("/etc", "cannot contain"),
        ("a\\b", "cannot contain"),
        ("front-end", "cannot contain"),
        ("front end", "cannot contain"),
        ("tab\there", "cannot contain"),
        (".git", "cannot contain"),
        ("%2e%2e", "ASCII"),
        ("．．", "ASCII"),
        ("a／b", "ASCII"),
        ("a∕b", "ASCII"),
        ("café", "ASCII"),
        ("hq", "reserved"),
        ("HQ", "reserved"),
        ("mayor", "town itself"),
        ("settings", "town itself"),
    ],
)
def test_rig_name_rules(name: str, fragment: str) -> None:
    """Separators, dots, whitespace, look-alikes, hq and the town's own folders are no rigs."""
    problem = rig_name_problem(name)
    assert problem is not None
    assert fragment in problem


def test_plain_rig_names_pass() -> None:
    """ASCII letters, digits and underscores make a rig name."""
    assert [rig_name_problem(n) for n in ("frontend", "my_rig", "Rig2", "hqx")] == [None] * 4


def test_rig_bodies_for_unknown_rigs_are_refused() -> None:
    """A rig that is not among the town's rig folders is refused, and its body still checked."""
    problems = validate_patch({"rigs": {"ghost": {"role_effort": {"x": "low"}}}}, current=_files())
    assert [p.path for p in problems] == ["/rigs/ghost", "/rigs/ghost/role_effort/x"]


def test_agent_names_resolve_through_rig_town_and_presets() -> None:
    """A rig name resolves to its own agents, the town's (after the patch) and the presets."""
    town = {"agents": {"kilo": {"command": "claude"}}}
    rigs = {
        "frontend": {
            "agents": {"local": {"command": "codex"}},
            "role_agents": {"polecat": "local", "crew": "kilo", "witness": "claude-haiku"},
            "agent": "groq-compound",
        }
    }
    assert validate_patch({"town": town, "rigs": rigs}, current=_files()) == []
    town_uses_rig_agent = {"town": {**town, "role_agents": {"mayor": "local"}}, "rigs": rigs}
    assert _paths(town_uses_rig_agent) == ["/town/role_agents/mayor"]


def test_extra_presets_resolve() -> None:
    """Presets from the daemon's settings resolve like gt's own."""
    body = {"town": {"default_agent": "kilo-house"}}
    assert _paths(body) == ["/town/default_agent"]
    assert _paths(body, extra_presets=["kilo-house"]) == []
    assert "claude" in PRESETS


def test_deleting_an_agent_still_in_use_is_refused() -> None:
    """Deleting an agent that a role of the town or of any rig resolves to names the users."""
    frontend = rig_doc()
    frontend["role_agents"]["crew"] = "claude-haiku"
    files = TownFiles(town=town_doc(), rigs={"frontend": frontend})
    problems = validate_patch({"town": {"agents": {"claude-haiku": None}}}, current=files)
    assert [p.path for p in problems] == ["/town/agents/claude-haiku"]
    assert "role_agents/witness in settings/config.json" in problems[0].message
    assert "role_agents/crew in frontend/settings/config.json" in problems[0].message
    everything = validate_patch({"town": {"agents": None}}, current=files)
    assert [p.path for p in everything] == ["/town/agents"]
    moved = {"town": {"agents": {"claude-haiku": None}, "role_agents": {"witness": "codex"}}}
    assert [p.path for p in validate_patch(moved, current=_files())] == []


def test_deleting_a_rig_agent_falls_back_to_the_town() -> None:
    """A rig agent shadowing a town agent may go; one used only in the rig may not."""
    files = TownFiles(
        town={"agents": {"shared": {}}},
        rigs={
            "frontend": {
                "agents": {"shared": {}, "own": {}},
                "role_agents": {"polecat": "shared", "crew": "own"},
            }
        },
    )
    ok = {"rigs": {"frontend": {"agents": {"shared": None}}}}
    assert validate_patch(ok, current=files) == []
    bad = {"rigs": {"frontend": {"agents": {"own": None}}}}
    assert [p.path for p in validate_patch(bad, current=files)] == ["/rigs/frontend/agents/own"]


def test_existing_references_are_not_judged() -> None:
    """Names already in a file that resolve nowhere (gt's agents.json) do not block a PATCH."""
    files = TownFiles(town={"role_agents": {"mayor": "from-agents-json"}}, rigs={})
    assert validate_patch({"town": {"role_effort": {"mayor": "low"}}}, current=files) == []


def test_unknown_fields_in_the_file_are_not_judged() -> None:
    """An agent's fields gt knows (session, tmux) stay and are never reported."""
    body = {"town": {"agents": {"claude-haiku": {"command": "claude"}}}}
    assert validate_patch(body, current=_files()) == []
