"""Whether the agent names of a PATCH resolve once it is applied.

Names the body sets must resolve after the patch: a rig's through the rig's `agents`, the
town's `agents`, then the presets; the town's through its `agents` and the presets. A name
already in a file is not judged (gt may know agents from elsewhere) unless the body deletes
the agent it resolved to: that deletion is refused, naming the files and keys that use it,
in every readable rig of the town and not only the rigs the body names.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from gastown_sandboxd.errors import Problem
from gastown_sandboxd.gtsettings.merge_patch import merge_patch
from gastown_sandboxd.gtsettings.schema import (
    AGENT_NAME,
    MANAGED_KEYS,
    REFERENCE_KEYS,
    Doc,
    Scope,
    TownFiles,
    agent_names,
    pointer,
    references,
    relative_path,
    resolves,
    show,
)


def resolution_problems(
    current: TownFiles,
    town_patch: Mapping[str, Any] | None,
    rig_patches: Mapping[str, Mapping[str, Any]],
    presets: frozenset[str],
) -> list[Problem]:
    """Problems of the names of `town_patch` and `rig_patches` (bodies of existing rigs)."""
    resolution = _Resolution(current, presets, town_patch, rig_patches)
    resolution.check()
    return resolution.problems


class _Resolution:
    """Agent names after the patch: set by the body, or left dangling by a deletion."""

    def __init__(
        self,
        current: TownFiles,
        presets: frozenset[str],
        town_patch: Mapping[str, Any] | None,
        rig_patches: Mapping[str, Mapping[str, Any]],
    ) -> None:
        self.current = current
        self.presets = presets
        self.problems: list[Problem] = []
        self.town_patch = town_patch
        self.rig_patches = rig_patches
        self.town_after = _merged(self.current.town, town_patch, "town")
        self.town_agents = (agent_names(self.current.town), agent_names(self.town_after))

    def add(self, path: str, message: str) -> None:
        self.problems.append(Problem(path, message))

    def check(self) -> None:
        if self.town_patch is not None:
            self.body_names("town", self.town_patch, "/town", [])
        for name, patch in self.rig_patches.items():
            after = _merged(self.current.rigs.get(name), patch, "rig")
            self.body_names("rig", patch, pointer("rigs", name), [agent_names(after)])
        self.dangling()

    def body_names(
        self, scope: Scope, patch: Mapping[str, Any], base: str, own: list[frozenset[str]]
    ) -> None:
        levels = [*own, self.town_agents[1], self.presets]
        where_agents = "the rig's or the town's" if scope == "rig" else "the town's"
        for key, is_map in REFERENCE_KEYS[scope]:
            value = patch.get(key)
            if not is_map:
                named = [(pointer(key), value)]
            elif isinstance(value, Mapping):
                named = [(pointer(key, sub), name) for sub, name in value.items()]
            else:
                named = []
            for where, name in named:
                if not isinstance(name, str) or not AGENT_NAME.fullmatch(name):
                    continue  # reported as a bad name already
                if not resolves(name, *levels):
                    self.add(
                        base + where,
                        f"agent {show(name)} is not defined in {where_agents} agents "
                        "and is not a preset",
                    )

    def dangling(self) -> None:
        # A name stops resolving only when an agent leaves a file: a body that removes none
        # (nor replaces one with a non-object) leaves nothing dangling, and most bodies don't.
        patches = [self.town_patch, *self.rig_patches.values()]
        if not any(_may_remove_agents(patch) for patch in patches):
            return
        users: dict[str, list[str]] = {}
        files: list[tuple[str | None, Doc | None, Mapping[str, Any] | None]] = [
            (None, self.current.town, self.town_patch)
        ]
        files += [(rig, doc, self.rig_patches.get(rig)) for rig, doc in self.current.rigs.items()]
        for rig, before, patch in files:
            scope: Scope = "town" if rig is None else "rig"
            after = _merged(before, patch, scope)
            own = (
                (agent_names(before), agent_names(after))
                if rig is not None
                else (frozenset(), frozenset())
            )
            for where, name in references(after, scope):
                if _set_by(patch, where):
                    continue
                now = resolves(name, own[1], self.town_agents[1], self.presets)
                then = resolves(name, own[0], self.town_agents[0], self.presets)
                if then and not now:
                    path = self.deletion(rig, name, own[0])
                    users.setdefault(path, []).append(f"{where[1:]} in {relative_path(rig)}")
        for path, used_by in users.items():
            shown = ", ".join(used_by[:5]) + (
                f" and {len(used_by) - 5} more" if len(used_by) > 5 else ""
            )
            self.add(path, f"cannot delete this agent: still used by {shown}")

    def deletion(self, rig: str | None, name: str, rig_agents: frozenset[str]) -> str:
        # The body path that removed `name`: the rig's own agent first, as gt resolves it.
        if rig is not None and name in rig_agents:
            return _deleted_at(self.rig_patches.get(rig), name, pointer("rigs", rig))
        return _deleted_at(self.town_patch, name, "/town")


def _merged(doc: Doc | None, patch: Mapping[str, Any] | None, scope: Scope) -> Doc:
    base = doc if doc is not None else {}
    if patch is None:
        return base
    managed = {key: value for key, value in patch.items() if key in MANAGED_KEYS[scope]}
    result: Doc = merge_patch(base, managed)
    return result


def _may_remove_agents(patch: Mapping[str, Any] | None) -> bool:
    # Merging an object into an agent keeps it an object; null or anything else removes it.
    if patch is None or "agents" not in patch:
        return False
    agents = patch["agents"]
    return not isinstance(agents, Mapping) or any(
        not isinstance(agent, Mapping) for agent in agents.values()
    )


def _set_by(patch: Mapping[str, Any] | None, where: str) -> bool:
    # Whether the body itself sets the reference at `where` (then it is checked as the body's).
    if patch is None:
        return False
    key, _, sub = where[1:].partition("/")
    if not sub:
        return patch.get(key) is not None
    value = patch.get(key)
    sub = sub.replace("~1", "/").replace("~0", "~")
    return isinstance(value, Mapping) and value.get(sub) is not None


def _deleted_at(patch: Mapping[str, Any] | None, name: str, base: str) -> str:
    agents = patch.get("agents") if patch is not None else None
    if isinstance(agents, Mapping) and name in agents:
        return base + pointer("agents", name)
    return base + pointer("agents")
