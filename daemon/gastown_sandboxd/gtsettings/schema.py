"""What gt's settings files hold, as far as the daemon manages them.

The town file is `<town>/settings/config.json` (`"type": "town-settings"`), a rig file is
`<town>/<rig>/settings/config.json` (`"type": "rig-settings"`); both are `"version": 1`.
An agent name resolves through the rig's `agents`, then the town's `agents`, then gt's
presets and the daemon's extra presets. Every function here is pure.
"""

from __future__ import annotations

import functools
import json
import re
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

Scope = Literal["town", "rig"]
Doc = dict[str, Any]

TOWN_TYPE = "town-settings"
RIG_TYPE = "rig-settings"
SCHEMA_VERSION = 1
FILE_TYPES: Mapping[Scope, str] = {"town": TOWN_TYPE, "rig": RIG_TYPE}

TOWN_KEYS = ("default_agent", "agents", "role_agents", "role_effort", "crew_agents")
RIG_KEYS = ("agent", "agents", "role_agents", "worker_agents", "role_effort")
MANAGED_KEYS: Mapping[Scope, tuple[str, ...]] = {"town": TOWN_KEYS, "rig": RIG_KEYS}

ROLES = ("mayor", "deacon", "boot", "dog", "witness", "refinery", "polecat", "crew")
EFFORTS = ("low", "medium", "high", "max")
PRESETS = (
    "claude",
    "gemini",
    "codex",
    "cursor",
    "auggie",
    "amp",
    "opencode",
    "copilot",
    "pi",
    "omp",
    "vibe",
    "groq-compound",
)
AGENT_FIELDS = (
    "provider",
    "command",
    "args",
    "env",
    "initial_prompt",
    "prompt_mode",
    "exec_wrapper",
)
SECRET_ENV_NAMES = frozenset(
    {"KILO_JWT", "KILOCODE_TOKEN", "ANTHROPIC_AUTH_TOKEN", "ANTHROPIC_API_KEY", "OPENAI_API_KEY"}
)
# `$KILO_JWT` or `${KILO_JWT}`: a reference to a variable, not a secret.
_ENV_REFERENCE = re.compile(r"\$\{?[A-Za-z_][A-Za-z0-9_]*\}?")


def holds_a_secret(name: str, value: object) -> bool:
    """Whether an agent's `env` entry `name`: `value` sets a secret in a settings file: a
    name of `SECRET_ENV_NAMES` with a literal value (not empty, not `$NAME` or `${NAME}`).
    The sandbox refuses it in a PATCH, the cloud in the desired configuration."""
    return (
        name in SECRET_ENV_NAMES
        and isinstance(value, str)
        and bool(value)
        and not _ENV_REFERENCE.fullmatch(value)
    )


# Keys whose values name agents: (key, True when it maps names to agent names).
REFERENCE_KEYS: Mapping[Scope, tuple[tuple[str, bool], ...]] = {
    "town": (("default_agent", False), ("role_agents", True), ("crew_agents", True)),
    "rig": (("agent", False), ("role_agents", True), ("worker_agents", True)),
}

# Every settings file is <folder>/settings/config.json: the town's directly under the root.
SETTINGS = "settings"
CONFIG = "config.json"
TOWN_FILE = f"{SETTINGS}/{CONFIG}"
# Folders directly under the town root that belong to the town itself, not rigs.
NOT_RIGS = frozenset({"mayor", SETTINGS})

# Agent names: 1 to 128 characters, none of them whitespace or control characters.
AGENT_NAME = re.compile(r"[^\s\x00-\x1f\x7f]{1,128}")

_RIG_NAME = re.compile(r"[A-Za-z0-9_]+")
_RIG_FORBIDDEN = frozenset("-./\\")


@dataclass(frozen=True, slots=True)
class TownFiles:
    """The parsed settings files of one town.

    `town` is None when the town has no settings file. `rigs` holds every rig folder that
    may be addressed: a document, or None when the folder has no settings file yet.
    `unreadable` maps the relative path of each file that could not be parsed to the
    SHA-256 of its bytes, so that the revision still moves when such a file changes.
    """

    town: Doc | None = None
    rigs: Mapping[str, Doc | None] = field(default_factory=dict)
    unreadable: Mapping[str, str] = field(default_factory=dict)


def relative_path(rig: str | None) -> str:
    """The settings file of the town (rig None) or of a rig, relative to the town root."""
    return TOWN_FILE if rig is None else f"{rig}/{TOWN_FILE}"


def pointer(*parts: str) -> str:
    """A JSON pointer (RFC 6901) made of `parts`."""
    return "".join("/" + part.replace("~", "~0").replace("/", "~1") for part in parts)


@functools.lru_cache(maxsize=1024)
def rig_name_problem(name: str) -> str | None:
    """Why `name` cannot name a rig, or None when it can (the folder is checked elsewhere).

    Asked of every entry of the town root on every read of the town's files: kept for the
    last 1,024 names, a name of the allowed characters told apart by one match; the others
    are looked at closer, for the message."""
    if not _RIG_NAME.fullmatch(name):
        if not name:
            return "a rig name cannot be empty"
        if any(char in _RIG_FORBIDDEN or char.isspace() for char in name):
            return "rig names cannot contain '-', '.', '/', '\\' or whitespace"
        return "rig names are made of ASCII letters, digits and '_'"
    if name.lower() == "hq":
        return "'hq' is reserved for the town"
    if name in NOT_RIGS:
        return f"'{name}' is a folder of the town itself, not a rig"
    return None


def agent_names(doc: Mapping[str, Any] | None) -> frozenset[str]:
    """The agents a document defines (entries of `agents` whose value is an object)."""
    agents = doc.get("agents") if doc is not None else None
    if not isinstance(agents, Mapping):
        return frozenset()
    return frozenset(name for name, value in agents.items() if isinstance(value, Mapping))


def references(doc: Mapping[str, Any] | None, scope: Scope) -> Iterator[tuple[str, str]]:
    """Every agent name a document uses, as (JSON pointer inside the file, name)."""
    if doc is None:
        return
    for key, is_map in REFERENCE_KEYS[scope]:
        value = doc.get(key)
        if not is_map:
            if isinstance(value, str) and value:
                yield pointer(key), value
        elif isinstance(value, Mapping):
            for sub, name in value.items():
                if isinstance(name, str) and name:
                    yield pointer(key, sub), name


def resolves(name: str, *levels: Iterable[str]) -> bool:
    """Whether `name` is one of the agents of any level (rig, town, presets)."""
    return any(name in level for level in levels)


def show(value: Any) -> str:
    """A body value quoted for an error message, cut short (never used for env values)."""
    text = json.dumps(value, ensure_ascii=True)
    return text if len(text) <= 66 else text[:63] + "..."
