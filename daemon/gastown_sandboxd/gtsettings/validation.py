"""Every rule a PATCH /config body must follow, reported all at once.

`validate_patch` returns one `Problem` per rule broken, located by a JSON pointer into the
body. Besides the contract's rules it decides:

- `crew_agents` (town) and `worker_agents` (rig) map a worker name (an ASCII letter or digit,
  then letters, digits, `_` or `-`, at most 64) to an agent name that must resolve like a
  role's agent; `null` deletes an entry.
- Agent names are 1 to 128 characters with no whitespace or control characters.
- A secret is refused in `env` (a JWT anywhere in a value, or any value of a secret name
  other than "" or a reference such as `$KILO_JWT`), and a JWT is refused in every other
  string of an agent (`args`, `exec_wrapper`, `command`, ...): settings files are 0644.
- Names the body sets must resolve after the patch. A reference already in a file is not
  judged (gt may know agents from elsewhere), unless the body deletes the agent it used:
  that deletion is refused with the files and keys that still use it.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from gastown_sandboxd._types import all_unicode
from gastown_sandboxd.errors import Problem
from gastown_sandboxd.gtsettings.agent_resolution import resolution_problems
from gastown_sandboxd.gtsettings.schema import (
    AGENT_FIELDS,
    AGENT_NAME,
    EFFORTS,
    MANAGED_KEYS,
    PRESETS,
    ROLES,
    Scope,
    TownFiles,
    holds_a_secret,
    pointer,
    rig_name_problem,
    show,
)

_ENV_NAME = re.compile(r"[A-Z_][A-Z0-9_]*")
_WORKER_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,63}")
# A base64url run right before a dot: the first segment of a JWT (or a JWE).
_JWT_HEAD = re.compile(r"([A-Za-z0-9_-]{2,})=*\.")
_STRING_FIELDS = ("provider", "command", "prompt_mode")
_LIST_FIELDS = ("args", "exec_wrapper")


def validate_patch(
    body: Any, *, current: TownFiles, extra_presets: Iterable[str] = ()
) -> list[Problem]:
    """Every problem of `body` against the town as `current` holds it; [] when it may apply."""
    checker = _Checker(current, frozenset(PRESETS) | frozenset(extra_presets))
    unicode = all_unicode(body)
    if not unicode:
        _unicode_problems(body, "", checker.problems)
    checker.check(body)
    if unicode:
        return checker.problems
    # A lone surrogate in a key would make the answer itself unwritable as UTF-8.
    return [Problem(_printable(p.path), _printable(p.message)) for p in checker.problems]


def _unicode_problems(value: Any, path: str, problems: list[Problem]) -> None:
    """Strings, keys too, that are not Unicode: a lone surrogate (`"\\ud800"` is JSON that
    decodes to one) cannot be written as UTF-8, so no settings file can hold it."""
    if isinstance(value, str):
        if not is_unicode(value):
            problems.append(Problem(path, f"is {_LONE_SURROGATE}; send the text as Unicode"))
    elif isinstance(value, Mapping):
        for key, item in value.items():
            child = path + pointer(str(key))
            if isinstance(key, str) and not is_unicode(key):
                problems.append(Problem(child, f"this key is {_LONE_SURROGATE}"))
            _unicode_problems(item, child, problems)
    elif isinstance(value, list):
        for index, item in enumerate(value):
            _unicode_problems(item, f"{path}/{index}", problems)


_LONE_SURROGATE = "not Unicode: it holds a lone surrogate (an unpaired \\ud800-\\udfff escape)"


def is_unicode(text: str) -> bool:
    """Whether UTF-8 can hold `text` (a lone surrogate, which `"\\ud800"` decodes to, it
    cannot)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _printable(text: str) -> str:
    return text if is_unicode(text) else text.encode("utf-8", "backslashreplace").decode()


def contains_jwt(value: str) -> bool:
    """Whether a JWT stands in `value`: a segment that decodes to a JSON object with `alg`."""
    for match in _JWT_HEAD.finditer(value):
        segment = match.group(1)
        try:
            header = json.loads(base64.urlsafe_b64decode(segment + "=" * (-len(segment) % 4)))
        except (ValueError, binascii.Error):
            continue
        if isinstance(header, dict) and "alg" in header:
            return True
    return False


class _Checker:
    def __init__(self, current: TownFiles, presets: frozenset[str]) -> None:
        self.current = current
        self.presets = presets
        self.problems: list[Problem] = []

    def add(self, path: str, message: str) -> None:
        self.problems.append(Problem(path, message))

    def check(self, body: Any) -> None:
        if not isinstance(body, Mapping):
            self.add("", "the body must be a JSON object with 'town' and/or 'rigs'")
            return
        for key in body:
            if key not in ("town", "rigs"):
                self.add(pointer(key), f"unknown key {show(key)}; expected 'town' or 'rigs'")
        town = body.get("town")
        if "town" in body:
            if isinstance(town, Mapping):
                self.check_file(town, "town", "/town")
            else:
                self.add("/town", "must be an object of the town's managed keys")
                town = None
        rigs = body.get("rigs")
        if "rigs" in body and not isinstance(rigs, Mapping):
            self.add("/rigs", "must be an object mapping rig names to objects")
        good_rigs: dict[str, Mapping[str, Any]] = {}
        for name, rig in rigs.items() if isinstance(rigs, Mapping) else ():
            path = pointer("rigs", name)
            problem = rig_name_problem(name)
            if problem is None and name not in self.current.rigs:
                problem = (
                    f"{show(name)} is not a rig of this town: no plain folder of that name "
                    "directly under the town root (a symlink is not a rig)"
                )
            if problem is not None:
                self.add(path, problem)
            if not isinstance(rig, Mapping):
                self.add(path, "must be an object of the rig's managed keys")
            else:
                self.check_file(rig, "rig", path)
                if problem is None:
                    good_rigs[name] = rig
        sound_town = _sound(town, "town") if isinstance(town, Mapping) else None
        sound_rigs = {name: _sound(rig, "rig") for name, rig in good_rigs.items()}
        self.problems += resolution_problems(self.current, sound_town, sound_rigs, self.presets)

    def check_file(self, patch: Mapping[str, Any], scope: Scope, base: str) -> None:
        managed = MANAGED_KEYS[scope]
        for key, value in patch.items():
            path = base + pointer(key)
            if key not in managed:
                self.add(path, f"unknown key {show(key)}; the {scope} keys are {_list(managed)}")
            elif value is None:
                continue
            elif key in ("default_agent", "agent"):
                self.agent_name(value, path)
            elif key == "agents":
                self.agents(value, path)
            elif key == "role_effort":
                self.mapping(value, path, self.role, self.effort)
            elif key == "role_agents":
                self.mapping(value, path, self.role, self.agent_name)
            else:
                self.mapping(value, path, self.worker, self.agent_name)

    def mapping(
        self,
        value: Any,
        path: str,
        check_key: Callable[[str, str], None],
        check_value: Callable[[Any, str], None],
    ) -> None:
        if not isinstance(value, Mapping):
            self.add(path, "must be an object")
            return
        for key, item in value.items():
            sub = path + pointer(key)
            check_key(key, sub)
            if item is not None:
                check_value(item, sub)

    def role(self, role: str, path: str) -> None:
        if role not in ROLES:
            self.add(path, f"unknown role {show(role)}; roles are {_list(ROLES)}")

    def effort(self, effort: Any, path: str) -> None:
        if effort not in EFFORTS:
            self.add(path, f"unknown effort {show(effort)}; efforts are {_list(EFFORTS)}")

    def worker(self, name: str, path: str) -> None:
        if not _WORKER_NAME.fullmatch(name):
            self.add(
                path,
                "worker names are an ASCII letter or digit, then letters, digits, "
                "'_' or '-', at most 64 characters",
            )

    def agent_name(self, value: Any, path: str) -> None:
        if not isinstance(value, str) or not AGENT_NAME.fullmatch(value):
            self.add(path, "must be an agent name: 1 to 128 characters, no whitespace")

    def agents(self, value: Any, path: str) -> None:
        if not isinstance(value, Mapping):
            self.add(path, "must be an object mapping agent names to agents")
            return
        for name, agent in value.items():
            sub = path + pointer(name)
            self.agent_name(name, sub)
            if agent is None:
                continue
            if not isinstance(agent, Mapping):
                self.add(sub, "must be an agent object, or null to delete the agent")
            else:
                self.agent(agent, sub)

    def agent(self, agent: Mapping[str, Any], path: str) -> None:
        for field, value in agent.items():
            sub = path + pointer(field)
            if field not in AGENT_FIELDS:
                self.add(
                    sub, f"unknown agent field {show(field)}; the API sets {_list(AGENT_FIELDS)}"
                )
            elif value is None:
                continue
            elif field in _STRING_FIELDS:
                if not isinstance(value, str) or not value:
                    self.add(sub, "must be a non-empty string")
                else:
                    self.no_jwt(value, sub)
            elif field == "initial_prompt":
                if not isinstance(value, str):
                    self.add(sub, "must be a string")
                else:
                    self.no_jwt(value, sub)
            elif field in _LIST_FIELDS:
                self.strings(value, sub, allow_empty=field == "args")
            else:
                self.env(value, sub)

    def strings(self, value: Any, path: str, *, allow_empty: bool) -> None:
        what = "strings" if allow_empty else "non-empty strings"
        if not isinstance(value, list):
            self.add(path, f"must be a list of {what}, or null")
            return
        for index, item in enumerate(value):
            sub = f"{path}/{index}"
            if not isinstance(item, str) or (not item and not allow_empty):
                self.add(sub, f"must be one of a list of {what}")
            else:
                self.no_jwt(item, sub)

    def env(self, value: Any, path: str) -> None:
        if not isinstance(value, Mapping):
            self.add(path, "must be an object mapping variable names to strings")
            return
        for name, item in value.items():
            sub = path + pointer(name)
            if not _ENV_NAME.fullmatch(name):
                self.add(sub, "variable names must match ^[A-Z_][A-Z0-9_]*$")
            if item is None:
                continue
            if not isinstance(item, str):
                self.add(sub, "must be a string, or null to delete the variable")
            elif holds_a_secret(name, item):
                self.add(
                    sub,
                    f"{name} must not be set in a settings file (they are 0644 and "
                    "never refreshed); agents get tokens through the env file",
                )
            else:
                self.no_jwt(item, sub)

    def no_jwt(self, value: str, path: str) -> None:
        if contains_jwt(value):
            self.add(
                path,
                "holds a JWT: tokens must not be written to a settings file "
                "(they are 0644 and never refreshed); agents get them from the env file",
            )


def _sound(patch: Mapping[str, Any], scope: Scope) -> dict[str, Any]:
    # The part of a file's patch whose shape resolution can rely on (the rest is reported).
    sound: dict[str, Any] = {}
    for key, value in patch.items():
        if key not in MANAGED_KEYS[scope]:
            continue
        if key in ("default_agent", "agent"):
            if value is None or isinstance(value, str):
                sound[key] = value
        elif key == "agents" and isinstance(value, Mapping):
            sound[key] = {n: a for n, a in value.items() if a is None or isinstance(a, Mapping)}
        elif value is None or isinstance(value, Mapping):
            sound[key] = value
    return sound


def _list(items: Iterable[str]) -> str:
    return " ".join(items)
