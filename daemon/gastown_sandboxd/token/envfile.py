"""The env file that shells and `exec` source: `KEY=VALUE` lines, one of them `KILO_JWT=…`.

Parsing keeps every byte of every line so that setting the token changes that line only.
Reading a value follows bash for the simple cases (`export`, quotes, trailing comments).
The daemon writes the token unquoted: it matches the JWT pattern, so it is shell-safe.
"""

from __future__ import annotations

import errno
import os
import re
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, NamedTuple

from gastown_sandboxd._files import read_regular
from gastown_sandboxd.errors import AtomicWriteError

if TYPE_CHECKING:
    from _typeshed import StrPath

TOKEN_KEY = "KILO_JWT"  # noqa: S105 - the name of the variable, not a secret
ENV_FILE_MODE = 0o600

_ASSIGNMENT = re.compile(r"[ \t]*(?:export[ \t]+)?([A-Za-z_][A-Za-z0-9_]*)=(.*)", re.DOTALL)


class EnvFile(NamedTuple):
    """The lines of an env file, each with its own line ending, exactly as read.

    A `NamedTuple` for the agents' light path, as `token/claims.py` says.
    """

    lines: tuple[str, ...] = ()

    @classmethod
    def parse(cls, text: str) -> EnvFile:
        # Split on "\n" only, as bash does (str.splitlines would also split on \v, \x1c…).
        return cls(tuple(re.findall(r"[^\n]*\n|[^\n]+", text)))

    @classmethod
    def from_bytes(cls, data: bytes) -> EnvFile:
        return cls.parse(data.decode("utf-8", "surrogateescape"))

    def render(self) -> str:
        return "".join(self.lines)

    def to_bytes(self) -> bytes:
        return self.render().encode("utf-8", "surrogateescape")

    def get(self, key: str) -> str | None:
        """The value bash would see after sourcing the file (the last assignment wins)."""
        value: str | None = None
        for line in self.lines:
            parsed = _assignment(line)
            if parsed is not None and parsed[0] == key:
                value = parsed[1]
        return value

    def values(self, environ: Mapping[str, str] | None = None) -> dict[str, str]:
        """Every variable the file assigns, with the value bash would see (`read_env_values`)."""
        values: dict[str, str] = {}

        def lookup(name: str) -> str | None:
            found = values.get(name)
            return found if found is not None else environ.get(name) if environ else None

        for line in self.lines:
            parsed = _assignment(line, lookup if environ is not None else None)
            if parsed is not None:
                values[parsed[0]] = parsed[1]
        return values

    def with_value(self, key: str, value: str) -> EnvFile:
        """The file with exactly one `KEY=value` line: the first replaced, others dropped."""
        new_line = f"{key}={value}\n"
        lines: list[str] = []
        placed = False
        for line in self.lines:
            if _key_of(line) == key:
                if not placed:
                    lines.append(new_line)
                    placed = True
                continue
            lines.append(line)
        if not placed:
            if lines and not lines[-1].endswith("\n"):
                lines[-1] += "\n"
            lines.append(new_line)
        return EnvFile(tuple(lines))


def read_env_values(text: str, environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """Every variable the text assigns, with the value bash would see (the last one wins).

    With `environ` (the environment the file is sourced in), `$NAME` and `${NAME}` in a value
    are expanded, as bash does, from the lines before it and then from `environ`: an env file
    line `ANTHROPIC_BASE_URL=$KILO_API_URL/api/gateway/anthropic` was exported as written,
    where a shell that sources the file gets the URL."""
    return EnvFile.parse(text).values(environ)


MAX_ENV_FILE_BYTES = 1 << 20


def read_env(path: StrPath) -> EnvFile:
    """The env file at `path`; an empty one when it does not exist.

    Raises `OSError` when it cannot be read, is no regular file or is over 1 MiB
    (`read_regular`: a FIFO there held a worker thread in `open` for ever, and the daemon
    with it, past SIGTERM; /dev/zero was read until the memory ran out)."""
    try:
        data = read_regular(path, MAX_ENV_FILE_BYTES + 1)
    except FileNotFoundError:
        return EnvFile()
    if len(data) > MAX_ENV_FILE_BYTES:
        raise OSError(errno.EFBIG, "larger than 1 MiB", os.fspath(path))
    return EnvFile.from_bytes(data)


def read_token(path: StrPath) -> str | None:
    """The `KILO_JWT` value of the env file at `path`, None when absent or empty."""
    return read_env(path).get(TOKEN_KEY) or None


async def write_token(path: StrPath, token: str) -> bool:
    """Set `KILO_JWT=token` in the env file atomically (mode 0600); False when unchanged.

    The caller must have checked the token: this writes what it is given.
    """
    # Imported here: agent shims read env files with the standard library alone (start-up cost).
    import anyio.to_thread

    return await anyio.to_thread.run_sync(_write_token_sync, path, token)


def write_atomic(path: StrPath, data: bytes, *, mode: int | None = None) -> bool:
    """`atomic.write_atomic`, imported on first write (readers of the file never pay for it)."""
    from gastown_sandboxd.atomic import write_atomic as write

    return write(path, data, mode=mode)


def _write_token_sync(path: StrPath, token: str) -> bool:
    # A symlink at the path is written where it leads, looked up at each write (it need not
    # exist yet): the rename would replace the link with a file, and the file it led to,
    # which others read, kept the old token for good (a reviewer). Looked up once at start,
    # a link swapped for a file later (`sed -i`) was never written again (the next one).
    if os.path.islink(path):
        path = os.path.realpath(path)
    try:
        current = read_env(path)
    except OSError as exc:  # nothing written: the file is as it was, as a failed replace
        message = f"cannot read {os.fspath(path)}: {exc.strerror}"
        raise AtomicWriteError(exc.errno, message) from exc
    old = current.to_bytes()
    new = current.with_value(TOKEN_KEY, token).to_bytes()
    if new == old:
        return False
    from gastown_sandboxd.own_writes import note_own_write  # writers only, as `write_atomic`

    note_own_write(os.fspath(path), new)  # the watcher knows the write for the daemon's own
    write_atomic(path, new, mode=ENV_FILE_MODE)
    return True


def _key_of(line: str) -> str | None:
    match = _ASSIGNMENT.fullmatch(line)
    return match.group(1) if match else None


def _assignment(
    line: str, lookup: Callable[[str], str | None] | None = None
) -> tuple[str, str] | None:
    match = _ASSIGNMENT.fullmatch(line)
    if match is None:
        return None
    key, rest = match.groups()
    # Only the first word counts: what follows is a comment (or a command bash would run).
    value = _first_word(rest, lookup)
    return None if value is None else (key, value)


_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_BLANKS = " \t\r\n"  # \r too: a CRLF file's values end before it
_WORD_ENDS = _BLANKS + ";&|<>()"  # bash's metacharacters: each ends an unquoted word
_ESCAPED_IN_DOUBLE_QUOTES = '$`"\\\n'


def _first_word(text: str, lookup: Callable[[str], str | None] | None) -> str | None:
    """The first shell word of `text` as bash reads an assignment's value: it ends at an
    unquoted blank or control character (`KILO_JWT=…; export KILO_JWT` is the token, where
    the `;` stayed on it and the token was refused), quotes removed, backslashes resolved
    and, with `lookup`, `$NAME` and `${NAME}` expanded outside single quotes (an unset name
    gives nothing). A command substitution (`$(…)`, backquotes) and any other `${…}` are
    kept whole as written, blanks inside included: nothing is run. None for an unterminated
    quote or substitution."""
    out: list[str] = []
    i, end = 0, len(text)
    while i < end and text[i] not in _WORD_ENDS:
        char = text[i]
        if char == "`" or (char == "$" and text.startswith(("$(", "${"), i)):
            close = _substitution_end(text, i)
            if close is None:
                return None
            simple = text.startswith("${", i) and lookup is not None
            braced = _NAME.fullmatch(text, i + 2, close - 1) if simple else None
            if braced is not None and lookup is not None:
                out.append(lookup(braced.group()) or "")  # `${NAME}`
            else:
                out.append(text[i:close])
            i = close
            continue
        if char == "'":
            close = text.find("'", i + 1)
            if close < 0:
                return None
            out.append(text[i + 1 : close])
            i = close + 1
        elif char == '"':
            i += 1
            while i < end and text[i] != '"':
                if text[i] == "\\" and i + 1 < end and text[i + 1] in _ESCAPED_IN_DOUBLE_QUOTES:
                    out.append("" if text[i + 1] == "\n" else text[i + 1])
                    i += 2
                elif text[i] == "$":
                    i = _expand(text, i, out, lookup)
                else:
                    out.append(text[i])
                    i += 1
            if i >= end:
                return None
            i += 1
        elif char == "\\":
            out.append("" if text[i + 1 : i + 2] == "\n" else text[i + 1 : i + 2])
            i += 2
        elif char == "$":
            i = _expand(text, i, out, lookup)
        else:
            out.append(char)
            i += 1
    return "".join(out)


def _substitution_end(text: str, at: int) -> int | None:
    """The index just past the `$(…)`, `${…}` or backquoted text that starts at `at` (nested
    parentheses and braces and quotes inside followed as bash does, roughly); None when it
    never closes."""
    if text[at] == "`":
        close = text.find("`", at + 1)
        return None if close < 0 else close + 1
    opener = text[at + 1]
    closer = ")" if opener == "(" else "}"
    depth, i, end = 1, at + 2, len(text)
    while i < end:
        char = text[i]
        if char == "\\":
            i += 2
            continue
        if char in "'\"`":
            close = text.find(char, i + 1)
            if close < 0:
                return None
            i = close + 1
            continue
        if char == opener:
            depth += 1
        elif char == closer:
            depth -= 1
            if depth == 0:
                return i + 1
        i += 1
    return None


def _expand(text: str, at: int, out: list[str], lookup: Callable[[str], str | None] | None) -> int:
    # `text[at]` is "$": the value of `$NAME` or `${NAME}` into `out`, else "$" as written.
    if lookup is not None:
        name = _NAME.match(text, at + 1)
        if name is not None:
            out.append(lookup(name.group()) or "")
            return name.end()
        braced = _NAME.match(text, at + 2) if text.startswith("{", at + 1) else None
        if braced is not None and text.startswith("}", braced.end()):
            out.append(lookup(braced.group()) or "")
            return braced.end() + 1
    out.append("$")
    return at + 1
