"""Claude Code's `apiKeyHelper`: where its settings live and what the helper line says.

Claude Code runs `apiKeyHelper` again every `CLAUDE_CODE_API_KEY_HELPER_TTL_MS`, and before
each retry after a 401 or 403 (2.1.337: ~1 s after the refusal, then backing off), and sends
its output as the credential, but only while `ANTHROPIC_AUTH_TOKEN` is unset (a set variable
wins). So the daemon keeps the helper in Claude Code's user settings, `exec` sets it at a
claude start in the settings that claude reads when they lack it or hold a stale line (a gt
account's folder, which the keeper never sees; a default folder before the keeper's pass),
and `exec` starts `claude` without that variable whenever the helper is in place. The
helper is `token_helper.sh` (beside this module): a fresh token costs a shell, not Python.
Pure and standard-library only: `exec` reads these rules on every agent start.
"""

from __future__ import annotations

import json
import os
import shlex
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, Literal, NamedTuple

from gastown_sandboxd._files import NotRegularFile, read_regular

if TYPE_CHECKING:
    from pathlib import Path

    from _typeshed import StrPath

HELPER_KEY = "apiKeyHelper"
TTL_VARIABLE = "CLAUDE_CODE_API_KEY_HELPER_TTL_MS"
# The module `gastown-sandboxd token` runs in; the helper line of earlier releases ran it.
HELPER_MODULE = "gastown_sandboxd.agents"
# What follows the interpreter in that line (and in the script's hand-over to Python).
TOKEN_WORDS = ("-I", "-m", HELPER_MODULE, "token")
# The shell script the helper line runs (beside this module, in the installed package), and
# how a line names it whatever the installation's path.
HELPER_SCRIPT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "token_helper.sh")
_SCRIPT_TAIL = os.sep + os.path.join(*HELPER_MODULE.split("."), "token_helper.sh")
HELPER_SHELL = "/bin/sh"


class SettingsNotJson(ValueError):
    """Claude's settings file holds something that is not a JSON object: never overwrite it."""


def settings_path(env: Mapping[str, str]) -> Path:
    """`$CLAUDE_CONFIG_DIR/settings.json`, else `~/.claude/settings.json` (Claude Code's order)."""
    from pathlib import Path

    return Path(_settings_file(env))


def _settings_file(env: Mapping[str, str]) -> str:
    """`settings_path` as text: the light path reads it without importing pathlib."""
    folder = env.get("CLAUDE_CONFIG_DIR")
    if folder:
        return os.path.join(folder, "settings.json")
    home = env.get("HOME") or os.path.expanduser("~")
    return os.path.join(home, ".claude", "settings.json")


def helper_command(
    *, python: str, env_file: StrPath, socket: StrPath, town_id: str | None = None
) -> str:
    """The shell line Claude Code runs, by absolute paths and with no secret: `token_helper.sh`,
    which prints a plainly acceptable token from the env file itself and otherwise becomes
    `gastown-sandboxd token` (`python -I -m gastown_sandboxd.agents token …`).

    Claude Code runs it once per helper TTL in every session. Measured on 2 cores, 40 runs
    each, CPU per run: 4.6-5.3 ms for the script (dash, `date` and `base64`) against
    46.7-49.4 ms for `gastown-sandboxd token`, most of it the interpreter and its imports.
    """
    town = [town_id] if town_id else []
    if not os.path.isfile(HELPER_SCRIPT):
        # Not a file on disk (the package imported from a zip): the command itself, as the
        # helper line of earlier releases ran it.
        paths = ["--env-file", str(env_file), "--socket", str(socket)]
        paths += ["--town-id", town_id] if town_id else []
        return shlex.join([python, *TOKEN_WORDS, *paths])
    return shlex.join([HELPER_SHELL, HELPER_SCRIPT, str(env_file), str(socket), python, *town])


def _helper_words(value: object) -> tuple[list[str], bool] | None:
    """The words of a helper line this daemon wrote (any paths), and whether it is the
    script's line (else the `token` line earlier releases wrote); None for any other value."""
    if not isinstance(value, str):
        return None
    try:
        words = shlex.split(value)
    except ValueError:
        return None
    if len(words) in (5, 6) and words[1].endswith(_SCRIPT_TAIL):
        return words, True
    return (words, False) if tuple(words[1:5]) == TOKEN_WORDS else None


def is_daemon_helper(value: object) -> bool:
    """True when an `apiKeyHelper` value is a helper this daemon wrote (any paths): the
    script's line, or the `token` line earlier releases wrote (the keeper replaces it)."""
    return _helper_words(value) is not None


def same_helper(found: object, command: str) -> bool:
    """Whether the line `found` is `command` but perhaps for its interpreter (the fifth word
    of the script's line, which only the script's fallback runs): `exec` under another path
    of the same Python (`venv/bin/python3` where the daemon runs `venv/bin/python`) and the
    keeper rewrote each other's line (a reviewer)."""
    if found == command:
        return True
    ours, theirs = _helper_words(command), _helper_words(found)
    if ours is None or theirs is None or not (ours[1] and theirs[1]):
        return False
    return ours[0][:4] + ours[0][5:] == theirs[0][:4] + theirs[0][5:]


def helper_can_run(value: object) -> bool:
    """Whether a helper line of the daemon's names files that are there: the script and the
    interpreter (the script's line), or the interpreter (the `token` line). A line left by a
    package that moved prints nothing, and claude sends an empty bearer."""
    found = _helper_words(value)
    if found is None:
        return False
    words, script = found
    if script:
        return os.path.isfile(words[1]) and os.access(words[4], os.X_OK)
    return os.access(words[0], os.X_OK)


def read_settings(path: str) -> str:
    """The settings file's text. Raises `FileNotFoundError` when there is none, `OSError` or
    `UnicodeDecodeError` when it cannot be read, and `SettingsNotJson` when it is no regular
    file: opened without blocking, so a FIFO there never holds up the daemon or an agent."""
    try:
        data = read_regular(path)
    except NotRegularFile:
        raise SettingsNotJson("not a regular file") from None
    return data.decode("utf-8")


def parse_settings(text: str) -> dict[str, Any]:
    """The settings object; an empty file is an empty object; raise `SettingsNotJson` else.

    Numbers that JSON cannot write back (NaN, Infinity, 1e400, which Python reads as inf) are
    refused: rewriting the file would turn them into text Claude Code cannot parse.
    """
    if not text.strip():
        return {}
    try:
        data = json.loads(text, parse_constant=_not_json, parse_float=_finite)
    except RecursionError:
        raise SettingsNotJson("nested too deeply to read") from None
    except ValueError:
        raise SettingsNotJson("not JSON") from None
    if not isinstance(data, dict):
        raise SettingsNotJson("not a JSON object")
    return data


def _not_json(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _finite(text: str) -> float:
    number = float(text)
    if number in (float("inf"), float("-inf")):
        raise ValueError(f"{text} is beyond a double")
    return number


def with_helper(text: str, command: str) -> str | None:
    """The settings text with `apiKeyHelper` set to `command`, every other key kept in order.

    None when the file already says so (nothing to write). Raises `SettingsNotJson`. Text
    that UTF-8 cannot hold (a lone surrogate, which `"\\ud83d"` decodes to and Node writes)
    is written back as the escape it was read from.
    """
    data = parse_settings(text)
    if data.get(HELPER_KEY) == command:
        return None
    data[HELPER_KEY] = command
    new = json.dumps(data, indent=2, ensure_ascii=False) + "\n"
    try:
        new.encode("utf-8")
    except UnicodeEncodeError:
        new = json.dumps(data, indent=2, ensure_ascii=True) + "\n"
    return new


SETTINGS_MODE = 0o600
# How `set_helper` ended: written, or why not.
Outcome = Literal["written", "in_place", "empty", "changed", "unreadable", "not_json", "unwritable"]


class HelperSet(NamedTuple):
    """What `set_helper` did; `detail` says why it wrote nothing, `seen` is the empty file's
    stat key when it was left for now."""

    outcome: Outcome
    detail: str = ""
    seen: tuple[int, int, int] | None = None


def set_helper(
    path: Path, command: str, *, empty_seen: tuple[int, int, int] | None = None
) -> HelperSet:
    """Set `apiKeyHelper` to `command` in the settings file at `path`, every other key kept
    (blocking). A symlink (a dotfiles checkout) is written where it leads, the link kept,
    with the mode of the file it leads to; a new file gets 0600.

    Claude Code writes its settings by truncating the file: an empty file may be one between
    its truncate and its write, which a rename now would lose, so an empty file is written
    only when its stat key is `empty_seen` (it stayed so since a look before: the keeper's
    last pass). A file changed between the read and the write is left for the next try.
    """
    from pathlib import Path

    from gastown_sandboxd.atomic import write_atomic
    from gastown_sandboxd.errors import AtomicWriteError

    target = Path(os.path.realpath(path))
    seen = _stat_key(target)
    try:
        text = read_settings(str(target))
        mode: int | None = None  # keep the file's own mode
    except FileNotFoundError:
        text, mode = "", SETTINGS_MODE
    except (OSError, UnicodeDecodeError) as exc:
        return HelperSet("unreadable", getattr(exc, "strerror", None) or "not UTF-8")
    except SettingsNotJson as exc:
        return HelperSet("not_json", str(exc))
    try:
        new = with_helper(text, command)
    except SettingsNotJson as exc:
        return HelperSet("not_json", str(exc))
    if new is None:
        return HelperSet("in_place")
    if seen is not None and not text.strip() and empty_seen != seen:
        return HelperSet("empty", seen=seen)
    if _stat_key(target) != seen:
        return HelperSet("changed")
    try:
        target.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        write_atomic(target, new.encode("utf-8"), mode=mode)
    except (OSError, AtomicWriteError) as exc:
        return HelperSet("unwritable", exc.strerror or str(exc))
    return HelperSet("written")


def _stat_key(path: Path) -> tuple[int, int, int] | None:
    """What tells a file unchanged between a read and a write: inode, size, mtime (ns)."""
    try:
        info = os.stat(path)
    except OSError:
        return None
    return (info.st_ino, info.st_size, info.st_mtime_ns)


def current_helper(env: Mapping[str, str]) -> object:
    """The `apiKeyHelper` of the Claude settings that `env` selects; None when the file has
    none or cannot be read as JSON."""
    try:
        return parse_settings(read_settings(_settings_file(env))).get(HELPER_KEY)
    except (OSError, UnicodeDecodeError, SettingsNotJson):
        return None


def helper_in_place(env: Mapping[str, str]) -> bool:
    """True when the Claude settings that `env` selects hold the daemon's helper."""
    return is_daemon_helper(current_helper(env))
