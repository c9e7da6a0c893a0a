"""The env file that shells and `exec` source: `KEY=VALUE` lines, one of them `KILO_JWT=…`.

Parsing keeps every byte of every line so that setting the token changes that line only.
Reading a value follows bash for the simple cases (`export`, quotes, trailing comments).
The daemon writes the token unquoted: it matches the JWT pattern, so it is shell-safe.
"""

from __future__ import annotations

import os
import re
import shlex
from typing import TYPE_CHECKING, NamedTuple

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


def read_env_values(text: str) -> dict[str, str]:
    """Every variable the text assigns, with the value bash would see (the last one wins)."""
    values: dict[str, str] = {}
    for line in EnvFile.parse(text).lines:
        parsed = _assignment(line)
        if parsed is not None:
            values[parsed[0]] = parsed[1]
    return values


def read_env(path: StrPath) -> EnvFile:
    """The env file at `path`; an empty one when it does not exist."""
    try:
        with open(path, "rb") as handle:
            return EnvFile.from_bytes(handle.read())
    except FileNotFoundError:
        return EnvFile()


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
    current = read_env(path)
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


def _assignment(line: str) -> tuple[str, str] | None:
    match = _ASSIGNMENT.fullmatch(line)
    if match is None:
        return None
    key, rest = match.groups()
    # Only the first word counts: what follows is a comment (or a command bash would run).
    # The dummy "_=" makes an empty value a word of its own, as `KEY= # c` is in bash.
    lexer = shlex.shlex("_=" + rest, posix=True)
    lexer.whitespace_split = True
    lexer.commenters = ""
    try:
        word = lexer.get_token()
    except ValueError:
        return None
    if word is None or not word.startswith("_="):
        return None
    return key, word[2:]
