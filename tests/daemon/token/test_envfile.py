"""The env file: parse and render keep every other byte; the token line is set exactly once."""

from __future__ import annotations

import errno
import os
import stat
import subprocess
from pathlib import Path

import pytest

from gastown_sandboxd.errors import AtomicWriteError
from gastown_sandboxd.token.envfile import (
    EnvFile,
    read_env,
    read_env_values,
    read_token,
    write_token,
)
from tests.daemon.minting import mint

TOKEN = mint(1_800_000_000)
OTHER = mint(1_800_000_100)


def set_token(text: str, token: str = TOKEN) -> str:
    return EnvFile.parse(text).with_value("KILO_JWT", token).render()


@pytest.mark.parametrize(
    "text",
    [
        "",
        "A=1\n",
        "A=1",
        "# comment\n\nA='x y'\r\nexport B=\"$HOME\"\n  \n",
        "weird line without equals\n\x0bvertical\x1ctab\n",
        "KILO_JWT=old\nKILO_JWT=older\n",
    ],
)
def test_parse_render_round_trip(text: str) -> None:
    """Rendering a parsed file gives back the same text, byte for byte."""
    assert EnvFile.parse(text).render() == text


def test_bytes_that_are_not_utf8_survive() -> None:
    """Invalid UTF-8 in other lines is kept as it was."""
    data = b"A=\xff\xfe\nKILO_JWT=old\n"
    result = EnvFile.from_bytes(data).with_value("KILO_JWT", TOKEN).to_bytes()
    assert result == b"A=\xff\xfe\nKILO_JWT=" + TOKEN.encode() + b"\n"


def test_set_replaces_the_line_and_keeps_others() -> None:
    """Setting the token changes its line only, comments and order kept."""
    text = "# gateway\nA=1\nKILO_JWT=old # note\n\nB='two words'\n"
    assert set_token(text) == f"# gateway\nA=1\nKILO_JWT={TOKEN}\n\nB='two words'\n"


def test_set_appends_when_absent() -> None:
    """A file without the line gets it at the end."""
    assert set_token("A=1\n") == f"A=1\nKILO_JWT={TOKEN}\n"


def test_set_in_an_empty_file() -> None:
    """An empty file becomes the single line."""
    assert set_token("") == f"KILO_JWT={TOKEN}\n"


def test_set_after_a_last_line_without_newline() -> None:
    """A last line without a newline gets one before the appended line."""
    assert set_token("A=1") == f"A=1\nKILO_JWT={TOKEN}\n"


def test_set_on_a_last_line_without_newline_adds_it() -> None:
    """Replacing a last line that lacked a newline leaves a trailing newline."""
    assert set_token("A=1\nKILO_JWT=old") == f"A=1\nKILO_JWT={TOKEN}\n"


def test_duplicates_are_dropped_and_the_first_replaced() -> None:
    """Exactly one KILO_JWT line remains, where the first was."""
    text = "KILO_JWT=a\nA=1\nexport KILO_JWT=b\n  KILO_JWT='c'\nB=2\n"
    assert set_token(text) == f"KILO_JWT={TOKEN}\nA=1\nB=2\n"


def test_commented_and_similar_keys_are_not_touched() -> None:
    """A commented line or a longer key is not the token line."""
    text = "# KILO_JWT=old\nKILO_JWT_OLD=x\nXKILO_JWT=y\n"
    assert set_token(text) == text + f"KILO_JWT={TOKEN}\n"


def test_crlf_lines_are_kept_and_the_token_line_ends_with_lf() -> None:
    """Other CRLF lines stay; the token line ends with a bare LF so bash reads no CR."""
    text = "A=1\r\nKILO_JWT=old\r\nB=2\r\n"
    assert set_token(text) == f"A=1\r\nKILO_JWT={TOKEN}\nB=2\r\n"


@pytest.mark.parametrize(
    ("line", "value"),
    [
        ("KILO_JWT=abc\n", "abc"),
        ("export KILO_JWT=abc\n", "abc"),
        ("  export   KILO_JWT=abc\n", "abc"),
        ("KILO_JWT='a b'\n", "a b"),
        ('KILO_JWT="a \\"b\\""\n', 'a "b"'),
        ("KILO_JWT=abc # comment\n", "abc"),
        ("KILO_JWT=#notacomment\n", "#notacomment"),
        ("KILO_JWT=a'b c'd\n", "ab cd"),
        ("KILO_JWT=\n", ""),
        ("KILO_JWT=abc\r\n", "abc"),
    ],
)
def test_values_read_as_bash_reads_them(line: str, value: str) -> None:
    """Quotes, export and comments are read as bash would for the simple cases."""
    assert EnvFile.parse(line).get("KILO_JWT") == value


def test_values_match_bash(tmp_path: Path) -> None:
    """What get() reads is what bash sees after `set -a; . file`."""
    text = 'A=plain\nexport B=\'single q\'\nC="double \\" q"\nD=x#y # c\nE=a\'b\'"c"\n'
    path = tmp_path / "env"
    path.write_text(text)
    script = f'set -a; . "{path}"; set +a; printf "%s\\0" "$A" "$B" "$C" "$D" "$E"'
    out = subprocess.run(["bash", "-c", script], capture_output=True, check=True, env={})
    expected = out.stdout.decode().split("\0")[:-1]
    parsed = EnvFile.parse(text)
    assert [parsed.get(k) for k in "ABCDE"] == expected


def test_unterminated_quote_is_no_value() -> None:
    """A line bash could not parse has no value."""
    assert EnvFile.parse("KILO_JWT='abc\n").get("KILO_JWT") is None


def test_last_assignment_wins_when_reading() -> None:
    """Like sourcing, the last of several assignments is the value."""
    assert EnvFile.parse("KILO_JWT=a\nKILO_JWT=b\n").get("KILO_JWT") == "b"


def test_read_env_values_lists_every_variable() -> None:
    """read_env_values maps each assigned name to its value."""
    assert read_env_values("# c\nA=1\nexport B='2 3'\nA=4\nbad line\n") == {"A": "4", "B": "2 3"}


# Lines whose values bash expands, quotes or escapes; every value here is what bash gives.
EXPANDED = r"""KILO_API_URL=https://api.kilo.example
ANTHROPIC_BASE_URL=$KILO_API_URL/api/gateway/anthropic
BRACED="${KILO_API_URL}/v1" # a comment
FROM_OUTSIDE=$OUTSIDE-x
UNSET=a${NOT_SET_ANYWHERE}b
SINGLE='$KILO_API_URL'
ESCAPED=\$KILO_API_URL
QUOTED="say \"hi\" \$5 and \\"
MIXED=pre'$A'"$OUTSIDE"post
EMPTY= # nothing
SEMICOLON=tok-1; export SEMICOLON
AND=tok-2&&true
REDIRECTED=tok-3>/dev/null
"""


def test_values_are_expanded_as_bash_expands_them(tmp_path: Path) -> None:
    """With the environment it is sourced in, `$NAME` and `${NAME}` expand from the lines
    before and then from that environment, outside single quotes: each value equals what
    bash itself gives after `set -a; . FILE`. Before, `exec` exported `$KILO_API_URL/...`
    as written (a reviewer: codex sent the literal `${KILO_JWT}` as its key)."""
    path = tmp_path / "env"
    path.write_text(EXPANDED)
    outside = {"OUTSIDE": "from the environment"}
    values = read_env_values(EXPANDED, outside)
    shell = 'set -a; . "$1"; set +a; for n in "${@:2}"; do printf "%s\\0" "${!n}"; done'
    done = subprocess.run(
        ["bash", "-c", shell, "_", str(path), *values],
        env={"PATH": "/usr/bin:/bin", **outside},
        capture_output=True,
        check=True,
    )
    assert dict(zip(values, done.stdout.decode().split("\0")[:-1], strict=True)) == values
    assert values["ANTHROPIC_BASE_URL"] == "https://api.kilo.example/api/gateway/anthropic"
    assert read_env_values(EXPANDED)["ANTHROPIC_BASE_URL"] == "$KILO_API_URL/api/gateway/anthropic"


def test_a_command_substitution_is_kept_as_written_and_never_run(tmp_path: Path) -> None:
    """`$(…)`, backquotes and `${NAME:-…}` are kept whole as they are written, blanks and
    nested parentheses inside included (`$(echo pwned)` was cut to `$(echo`): nothing is
    run. One that never closes, like an unterminated quote, is no value."""
    marker = tmp_path / "ran"
    text = (
        f"A=$(touch\t{marker})\nB=$(id)\nC=${{B:-x y}}\nD='unterminated\n"
        f"E=pre$(echo $(id -u) ')')post tail\nF=`date +%s`\nG=$(never closed\n"
        f"H=${{B}}x\n"
    )
    values = read_env_values(text, {})
    assert values == {
        "A": f"$(touch\t{marker})",
        "B": "$(id)",
        "C": "${B:-x y}",
        "E": "pre$(echo $(id -u) ')')post",
        "F": "`date +%s`",
        "H": "$(id)x",
    }
    assert not marker.exists()


def test_read_token_of_missing_file_is_none(tmp_path: Path) -> None:
    """No file, no token."""
    assert read_token(tmp_path / "nope") is None
    assert read_env(tmp_path / "nope") == EnvFile()


def test_read_token_of_empty_value_is_none(tmp_path: Path) -> None:
    """An empty KILO_JWT= is no token."""
    path = tmp_path / "env"
    path.write_text("KILO_JWT=\n")
    assert read_token(path) is None


async def test_write_token_creates_the_file_0600(tmp_path: Path) -> None:
    """A new env file is created with mode 0600 and the single line."""
    path = tmp_path / "env"
    assert await write_token(path, TOKEN) is True
    assert path.read_text() == f"KILO_JWT={TOKEN}\n"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert read_token(path) == TOKEN


async def test_write_token_keeps_other_lines_and_sets_0600(tmp_path: Path) -> None:
    """An existing 0644 file keeps its other lines and becomes 0600."""
    path = tmp_path / "env"
    path.write_text("# keep\nA=1\nKILO_JWT=old\n")
    path.chmod(0o644)
    assert await write_token(path, TOKEN) is True
    assert path.read_text() == f"# keep\nA=1\nKILO_JWT={TOKEN}\n"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


async def test_write_token_skips_an_unchanged_file(tmp_path: Path) -> None:
    """Writing the same token again does not touch the file."""
    path = tmp_path / "env"
    await write_token(path, TOKEN)
    before = path.stat()
    assert await write_token(path, TOKEN) is False
    after = path.stat()
    assert (before.st_ino, before.st_mtime_ns) == (after.st_ino, after.st_mtime_ns)


async def test_write_token_rewrites_to_drop_duplicates(tmp_path: Path) -> None:
    """Same token but a duplicate line: the file changes, so it is written."""
    path = tmp_path / "env"
    path.write_text(f"KILO_JWT={TOKEN}\nKILO_JWT={OTHER}\n")
    assert await write_token(path, TOKEN) is True
    assert path.read_text() == f"KILO_JWT={TOKEN}\n"


async def test_written_file_sources_in_bash(tmp_path: Path) -> None:
    """`set -a; . file; set +a` gives the token, as the contract promises."""
    path = tmp_path / "env"
    path.write_text("A=1\r\n# comment\n")
    await write_token(path, TOKEN)
    out = subprocess.run(
        ["bash", "-c", f'set -a; . "{path}"; set +a; printf %s "$KILO_JWT"'],
        capture_output=True,
        check=True,
        env={},
    )
    assert out.stdout.decode() == TOKEN


async def test_write_token_failure_leaves_the_old_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A refused rename raises AtomicWriteError; the old file and its mode stay."""
    path = tmp_path / "env"
    path.write_text("KILO_JWT=old\n")

    def refuse(src: object, dst: object) -> None:
        raise PermissionError(errno.EACCES, "Permission denied")

    monkeypatch.setattr(os, "replace", refuse)
    with pytest.raises(AtomicWriteError) as caught:
        await write_token(path, TOKEN)
    assert caught.value.errno == errno.EACCES
    assert path.read_text() == "KILO_JWT=old\n"
    assert [p.name for p in tmp_path.iterdir()] == ["env"]


def test_unterminated_quote_in_a_trailing_comment_is_ignored() -> None:
    """Only the value word is read; an apostrophe in a comment does not spoil it."""
    assert EnvFile.parse("KILO_JWT=abc # don't\n").get("KILO_JWT") == "abc"


def test_empty_value_before_a_comment() -> None:
    """`KEY= # c` is an empty value, as in bash."""
    assert EnvFile.parse("KILO_JWT= # c\n").get("KILO_JWT") == ""
