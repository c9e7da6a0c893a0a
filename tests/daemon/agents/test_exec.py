"""The environment `exec` gives an agent: current token in, stale out, claude on its helper."""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

import pytest

from gastown_sandboxd.agents.claude import TTL_VARIABLE, helper_command
from gastown_sandboxd.agents.exec import (
    agent_environment,
    build_parser,
    help_formatter,
    is_gateway_token,
    read_values,
    resolve_command,
    usable,
)
from gastown_sandboxd.agents.shims import SHIM_MARKER
from tests.daemon.minting import mint
from tests.fixtures.entry import ImportingRun, run_importing

NOW = time.time()
CURRENT = mint(NOW)
STALE = mint(NOW - 3 * 86400)  # a token from three days ago, long expired
OPENAI_KEY = "sk-proj-operators-own-key"


def _helper_home(tmp_path: Path) -> dict[str, str]:
    """A home whose Claude settings hold a helper line of the daemon's that can run."""
    settings = tmp_path / ".claude" / "settings.json"
    settings.parent.mkdir()
    command = helper_command(python=sys.executable, env_file=tmp_path / "e", socket=tmp_path / "s")
    settings.write_text(json.dumps({"apiKeyHelper": command}))
    return {"HOME": str(tmp_path)}


def test_stale_tokens_in_any_variable_are_replaced_and_foreign_keys_kept() -> None:
    """Every inherited variable holding a gateway token gets the current one; other keys stay."""
    inherited = {
        "ANTHROPIC_AUTH_TOKEN": STALE,
        "KILO_JWT": STALE,
        "SOME_TOOL_TOKEN": STALE,
        "OPENAI_API_KEY": OPENAI_KEY,
        "PATH": "/usr/bin",
    }
    env = agent_environment(inherited, {"KILO_JWT": CURRENT}, CURRENT, program="kilo")
    assert env["ANTHROPIC_AUTH_TOKEN"] == env["KILOCODE_TOKEN"] == CURRENT
    assert env["KILO_JWT"] == env["SOME_TOOL_TOKEN"] == CURRENT
    assert env["OPENAI_API_KEY"] == OPENAI_KEY
    assert env["PATH"] == "/usr/bin"
    assert STALE not in env.values()


@pytest.mark.parametrize(
    ("program", "inherited", "expected"),
    [
        ("codex", {}, CURRENT),
        ("codex", {"OPENAI_API_KEY": STALE}, CURRENT),
        ("codex", {"OPENAI_API_KEY": OPENAI_KEY}, OPENAI_KEY),
        ("kilo", {}, None),
    ],
    ids=["codex unset", "codex stale", "codex own key", "not codex"],
)
def test_each_cli_gets_its_credential_variable_unless_it_holds_a_key_of_its_own(
    program: str, inherited: dict[str, str], expected: str | None
) -> None:
    """codex reads OPENAI_API_KEY: set to the token when unset or stale, never over a real key."""
    env = agent_environment(inherited, {}, CURRENT, program=program)
    assert env.get("OPENAI_API_KEY") == expected


def test_claude_without_the_helper_gets_the_token_in_anthropic_auth_token(tmp_path: Path) -> None:
    """No helper in Claude's settings: claude gets ANTHROPIC_AUTH_TOKEN, and no TTL variable."""
    inherited = {"HOME": str(tmp_path), "ANTHROPIC_AUTH_TOKEN": STALE}
    env = agent_environment(inherited, {}, CURRENT, program="claude")
    assert env["ANTHROPIC_AUTH_TOKEN"] == CURRENT
    assert TTL_VARIABLE not in env


def test_claude_with_the_helper_gets_no_auth_token_and_a_ttl(tmp_path: Path) -> None:
    """The daemon's helper in place: ANTHROPIC_AUTH_TOKEN (which would win) is dropped."""
    inherited = {
        **_helper_home(tmp_path),
        "ANTHROPIC_AUTH_TOKEN": STALE,
        "ANTHROPIC_API_KEY": STALE,
    }
    env = agent_environment(inherited, {}, CURRENT, program="claude", helper_ttl_ms=1000)
    assert "ANTHROPIC_AUTH_TOKEN" not in env
    assert "ANTHROPIC_API_KEY" not in env
    assert env[TTL_VARIABLE] == "1000"
    assert env["KILOCODE_TOKEN"] == CURRENT
    # Without any token at all the stale variable still goes: the helper fetches the token.
    env = agent_environment(inherited, {}, None, program="claude")
    assert "ANTHROPIC_AUTH_TOKEN" not in env


def test_a_ttl_already_set_is_kept(tmp_path: Path) -> None:
    """CLAUDE_CODE_API_KEY_HELPER_TTL_MS from the agent's environment wins over the default."""
    inherited = {**_helper_home(tmp_path), TTL_VARIABLE: "42"}
    env = agent_environment(inherited, {}, CURRENT, program="claude", helper_ttl_ms=1000)
    assert env[TTL_VARIABLE] == "42"


def test_claude_config_dir_selects_the_settings_exec_reads(tmp_path: Path) -> None:
    """A CLAUDE_CONFIG_DIR without the helper (a gt account folder): exec exports the token."""
    home = _helper_home(tmp_path)
    account = tmp_path / "account"
    account.mkdir()
    inherited = {**home, "CLAUDE_CONFIG_DIR": str(account)}
    env = agent_environment(inherited, {}, CURRENT, program="claude")
    assert env["ANTHROPIC_AUTH_TOKEN"] == CURRENT


@pytest.mark.parametrize(
    "settings",
    ["{not json", "[1, 2]", json.dumps({"apiKeyHelper": "/usr/local/bin/my-own-helper"})],
    ids=["not JSON", "not an object", "someone else's helper"],
)
def test_settings_without_the_daemons_helper_fall_back_to_the_token(
    tmp_path: Path, settings: str
) -> None:
    """A settings file that is not JSON, or holds another helper: claude gets the token."""
    (tmp_path / ".claude").mkdir()
    (tmp_path / ".claude" / "settings.json").write_text(settings)
    env = agent_environment({"HOME": str(tmp_path)}, {}, CURRENT, program="claude")
    assert env["ANTHROPIC_AUTH_TOKEN"] == CURRENT


def test_the_daemons_key_and_the_clouds_secret_never_reach_the_command() -> None:
    """An environment that carries INTERNAL_API_KEY or NEXTAUTH_SECRET (gt started without
    agent-env.sh): exec drops both, for every CLI; the agent (a model) could read them."""
    inherited = {"INTERNAL_API_KEY": "k" * 24, "NEXTAUTH_SECRET": "s" * 40, "KEEP": "1"}
    for program in ("claude", "codex", "kilo", "bash"):
        env = agent_environment(inherited, {}, CURRENT, program=program)
        assert "INTERNAL_API_KEY" not in env
        assert "NEXTAUTH_SECRET" not in env
        assert env["KEEP"] == "1"


def test_gateway_tokens_are_told_from_other_values() -> None:
    """Only sandbox tokens count as gateway tokens (any age or town)."""
    assert is_gateway_token(STALE)
    assert is_gateway_token(mint(NOW, town_id="another-town"))
    assert not is_gateway_token(OPENAI_KEY)
    assert not is_gateway_token(mint(NOW, type="something_else"))
    assert not is_gateway_token("a.b.c")
    assert not is_gateway_token("")
    assert not is_gateway_token('""')


@pytest.mark.parametrize("around", ["{}\n", " {}", "\t{} ", '"{}"', "'{}'", '" {}\n"'], ids=repr)
def test_a_stale_token_with_blanks_or_quotes_around_it_is_replaced(around: str) -> None:
    """A stale token copied with a line end, blanks or quotes around it is still one: exec
    puts the current token in its place (before, it passed as a key of its own, and a CLI
    that trims its variable sent the stale token)."""
    value = around.format(STALE)
    assert is_gateway_token(value)
    env = agent_environment({"OPENAI_API_KEY": value}, {}, CURRENT, program="codex")
    assert env["OPENAI_API_KEY"] == CURRENT


def test_usable_checks_expiry_and_the_town_only_when_known() -> None:
    """Expired is never usable; another town is usable only when no town is configured."""
    assert usable(CURRENT, None)
    assert usable(CURRENT, "town-1")
    assert not usable(CURRENT, "town-2")
    assert usable(mint(NOW, town_id="town-2"), None)
    assert not usable(STALE, None)
    assert not usable(None, None)


def test_read_values_of_a_missing_file_is_empty(tmp_path: Path) -> None:
    """A missing env file reads as no variables (exec still runs the command)."""
    assert read_values(tmp_path / "missing") == {}
    (tmp_path / "env").write_text(f"# c\nKILO_JWT={CURRENT}\nexport OTHER='a b'\n")
    assert read_values(tmp_path / "env") == {"KILO_JWT": CURRENT, "OTHER": "a b"}


def _light_exec(tmp_path: Path, env_file: Path) -> list[str]:
    """The shims' entry of `exec`, up to and including `--`."""
    light = [sys.executable, "-m", "gastown_sandboxd.agents", "exec"]
    return [*light, "--env-file", str(env_file), "--socket", str(tmp_path / "none.sock"), "--"]


def test_a_legacy_exec_wrapper_passes_over_the_shim_to_the_real_cli(tmp_path: Path) -> None:
    """`exec -- kilo` with the shim folder first on PATH runs the real kilo, not the shim."""
    shims, real = tmp_path / "shims", tmp_path / "real"
    for folder in (shims, real):
        folder.mkdir()
    flag = tmp_path / "shim-ran"
    (shims / "kilo").write_text(f"#!/bin/sh\n{SHIM_MARKER} for kilo\ntouch {flag}\nexit 9\n")
    (real / "kilo").write_text('#!/bin/sh\nprintf "%s" "$KILOCODE_TOKEN"\n')
    for path in (shims / "kilo", real / "kilo"):
        path.chmod(0o755)
    env_file = tmp_path / ".env.gateway"
    env_file.write_text(f"KILO_JWT={CURRENT}\n")
    assert resolve_command("kilo", f"{shims}{os.pathsep}{real}") == str(real / "kilo")
    assert resolve_command("./kilo", str(shims)) == "./kilo"
    assert resolve_command("nowhere", str(shims)) == "nowhere"
    done = subprocess.run(
        [*_light_exec(tmp_path, env_file), "kilo"],
        env={"PATH": f"{shims}{os.pathsep}{real}{os.pathsep}/usr/bin:/bin"},
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert (done.returncode, done.stdout, done.stderr) == (0, CURRENT, "")
    assert not flag.exists()


def test_the_command_gets_sigpipe_as_a_shell_gives_it(tmp_path: Path) -> None:
    """CPython ignores SIGPIPE and SIGXFSZ, and exec would pass that on to the agent and all it
    starts: through exec, `yes | head -1` ends as in a shell (141 for yes), and the command's
    ignored signals are the shell's own."""
    env_file = tmp_path / ".env.gateway"
    env_file.write_text(f"KILO_JWT={CURRENT}\n")
    script = 'grep SigIgn /proc/self/status; yes | head -1 >/dev/null; echo "${PIPESTATUS[0]}"'
    shell = subprocess.run(
        ["bash", "-c", script], env={"PATH": "/usr/bin:/bin"}, capture_output=True, text=True
    )
    done = subprocess.run(
        [*_light_exec(tmp_path, env_file), "bash", "-c", script],
        env={"PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert (done.returncode, done.stderr) == (0, "")
    assert done.stdout == shell.stdout
    assert done.stdout.splitlines()[-1] == "141"


def test_a_command_that_is_nowhere_exits_127(tmp_path: Path) -> None:
    """exec of a command that cannot be found: 127 and one line, as a shell does."""
    env_file = tmp_path / ".env.gateway"
    env_file.write_text(f"KILO_JWT={CURRENT}\n")
    done = subprocess.run(
        [*_light_exec(tmp_path, env_file), "no-such-agent-cli"],
        env={"PATH": str(tmp_path)},
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert done.returncode == 127
    assert done.stderr.count("\n") == 1
    assert "no-such-agent-cli" in done.stderr


def test_a_command_builds_only_its_own_parser_and_help_names_both(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """`token` and `exec` parse with their own parser alone; without a command, the parser
    has both, so `--help` and a usage error name them."""
    args = build_parser("token").parse_args(["token", "--env-file", "e", "--socket", "s"])
    assert (args.command, args.env_file, args.socket) == ("token", "e", "s")
    args = build_parser("exec").parse_args(["exec", "--socket", "s", "--", "kilo", "-v"])
    assert (args.command, args.argv) == ("exec", ["--", "kilo", "-v"])
    with pytest.raises(SystemExit):
        build_parser("token").parse_args(["exec", "--", "kilo"])
    assert "invalid choice: 'exec'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        build_parser().parse_args(["--help"])
    listed = capsys.readouterr().out
    assert "    exec " in listed
    assert "    token " in listed


@pytest.mark.parametrize(("columns", "width"), [("100", 98), ("0", 78), ("wide", 78), ("", 78)])
def test_help_is_as_wide_as_columns_says_else_80(
    monkeypatch: pytest.MonkeyPatch, columns: str, width: int
) -> None:
    """argparse's rule without `shutil`: `COLUMNS`, then the terminal (none under pytest's
    capture), else 80; less the 2 argparse takes off."""
    monkeypatch.setenv("COLUMNS", columns)
    formatter = help_formatter("gastown-sandboxd")
    assert formatter._width == width


# What the light entry must not load: each is paid by every agent start and helper call.
# dataclasses brings inspect (10-14 ms on 2 cores), hashlib and ssl OpenSSL (ssl 4-5 ms),
# pathlib urllib.parse and ipaddress (5-9 ms), shutil bz2, lzma and fnmatch (argparse imports
# it for the terminal's width unless given one: `help_formatter`); the rest are the daemon's.
NOT_ON_THE_LIGHT_PATH = {
    *("dataclasses", "inspect", "hashlib", "ssl", "pathlib", "shutil"),
    *("httpx", "anyio", "structlog"),
}


def _helper(tmp_path: Path, env_file: Path) -> ImportingRun:
    """`token` through the light entry, as Claude Code runs its helper (`python -I -m …`)."""
    paths = ["--env-file", str(env_file), "--socket", str(tmp_path / "none.sock")]
    return run_importing(["-I"], ["-m", "gastown_sandboxd.agents", "token", *paths])


def test_the_helper_prints_the_token_having_loaded_nothing_heavy(tmp_path: Path) -> None:
    """The helper's real entry prints the token and exits 0 (its ending skips the
    interpreter's finalization, so this also proves stdout was flushed), and `-X importtime`
    names none of `NOT_ON_THE_LIGHT_PATH` among what it imported."""
    env_file = tmp_path / ".env.gateway"
    env_file.write_text(f"KILO_JWT={CURRENT}\n")
    done = _helper(tmp_path, env_file)
    assert (done.returncode, done.stdout, done.stderr) == (0, CURRENT + "\n", "")
    assert "gastown_sandboxd.token.claims" in done.imported
    assert done.imported & NOT_ON_THE_LIGHT_PATH == set()


def test_a_shim_starting_claude_loads_nothing_heavy(tmp_path: Path) -> None:
    """`exec` of claude by absolute path, as a shim runs it, with the daemon's helper in Claude's
    settings: claude starts on its helper, and the light entry imported none of
    `NOT_ON_THE_LIGHT_PATH` on the way."""
    claude = tmp_path / "bin" / "claude"
    claude.parent.mkdir()
    printed = '"$KILOCODE_TOKEN" "${ANTHROPIC_AUTH_TOKEN-unset}"'
    claude.write_text(f'#!/bin/sh\nprintf "%s|%s" {printed}\n')
    claude.chmod(0o755)
    env_file = tmp_path / ".env.gateway"
    env_file.write_text(f"KILO_JWT={CURRENT}\n")
    paths = ["--env-file", str(env_file), "--socket", str(tmp_path / "none.sock")]
    done = run_importing(
        ["-I"],
        ["-m", "gastown_sandboxd.agents", "exec", *paths, "--", str(claude)],
        env={"PATH": "/usr/bin:/bin", **_helper_home(tmp_path)},
    )
    assert (done.returncode, done.stdout, done.stderr) == (0, f"{CURRENT}|unset", "")
    assert "gastown_sandboxd.agents.claude" in done.imported
    assert done.imported & NOT_ON_THE_LIGHT_PATH == set()


def test_the_option_loader_and_the_socket_client_load_no_ssl() -> None:
    """Without `--env-file`, `exec` and `token` load the option loader and the socket client
    to find the env file; neither speaks TLS, so neither may bring ssl (`_http` imports it
    only to verify a cloud)."""
    code = "import sys, gastown_sandboxd.options, gastown_sandboxd.client\n"
    code += "print('ssl' in sys.modules)"
    done = subprocess.run(
        [sys.executable, "-I", "-c", code], capture_output=True, text=True, check=True
    )
    assert done.stdout == "False\n"


def test_the_helper_with_no_acceptable_token_exits_1_with_one_line(tmp_path: Path) -> None:
    """Expired token, no daemon: the light entry exits 1, stdout empty, one line on stderr."""
    env_file = tmp_path / ".env.gateway"
    env_file.write_text(f"KILO_JWT={STALE}\n")
    done = _helper(tmp_path, env_file)
    assert (done.returncode, done.stdout) == (1, "")
    assert done.stderr.count("\n") == 2, done.stderr  # the daemon is away; nothing acceptable
    assert "no acceptable token" in done.stderr


def test_a_token_of_another_town_reaches_no_command_when_the_town_is_known(
    tmp_path: Path,
) -> None:
    """An env file copied from another town (a restored volume): with the town the shims
    carry (`--town-id`) and no TOWN_ID in the agent's environment, the command gets neither
    that token nor an inherited one of that town, and stderr says why; `token` exits 1. Before,
    both handed it over, and the gateway billed the other town for the agent's calls."""
    foreign = mint(NOW, town_id="town-other")
    env_file = tmp_path / ".env.gateway"
    env_file.write_text(f"KILO_JWT={foreign}\nKEPT=yes\n")
    script = 'printf "%s|%s|%s|%s" "$KILO_JWT" "$KILOCODE_TOKEN" "$ANTHROPIC_AUTH_TOKEN" "$KEPT"'
    light = _light_exec(tmp_path, env_file)
    done = subprocess.run(
        [*light[:-1], "--town-id", "town-1", "--", "bash", "-c", script],
        env={"PATH": "/usr/bin:/bin", "ANTHROPIC_AUTH_TOKEN": foreign},
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert (done.returncode, done.stdout) == (0, "|||yes")
    assert "of another town than town-1" in done.stderr
    paths = ["--env-file", str(env_file), "--socket", str(tmp_path / "none.sock")]
    printed = run_importing(
        ["-I"], ["-m", "gastown_sandboxd.agents", "token", *paths, "--town-id", "town-1"]
    )
    assert (printed.returncode, printed.stdout) == (1, "")


def _claude_beside_an_env_file(tmp_path: Path, printed: str) -> tuple[Path, Path]:
    """An env file holding CURRENT, and a folder whose `claude` prints `printed` (a shell
    word): the env file and the folder."""
    env_file = tmp_path / ".env.gateway"
    env_file.write_text(f"KILO_JWT={CURRENT}\n")
    real = tmp_path / "real"
    real.mkdir()
    (real / "claude").write_text(f'#!/bin/sh\nprintf "%s" {printed}\n')
    (real / "claude").chmod(0o755)
    return env_file, real


def test_exec_sets_the_helper_in_a_claude_config_dir_that_lacks_it(tmp_path: Path) -> None:
    """A gt account's CLAUDE_CONFIG_DIR: exec writes the daemon's helper into its settings
    (every other key kept) and starts claude without ANTHROPIC_AUTH_TOKEN; a settings file
    that is not JSON is left as it is, and claude gets the token, with one line saying so."""
    env_file, real = _claude_beside_an_env_file(tmp_path, '"$ANTHROPIC_AUTH_TOKEN"')
    light = _light_exec(tmp_path, env_file)
    for settings, token in (('{"theme": "dark"}\n', ""), ("{not json", CURRENT)):
        account = tmp_path / f"account-{len(token)}"
        account.mkdir()
        (account / "settings.json").write_text(settings)
        done = subprocess.run(
            [*light[:-1], "--town-id", "town-1", "--", str(real / "claude")],
            env={"PATH": "/usr/bin:/bin", "CLAUDE_CONFIG_DIR": str(account), "HOME": str(tmp_path)},
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
        assert (done.returncode, done.stdout) == (0, token), done.stderr
        if token:
            assert (account / "settings.json").read_text() == settings
            assert "apiKeyHelper not set" in done.stderr
            continue
        assert done.stderr == ""
        written = json.loads((account / "settings.json").read_text())
        assert written["theme"] == "dark"
        assert written["apiKeyHelper"] == helper_command(
            python=sys.executable,
            env_file=env_file,
            socket=tmp_path / "none.sock",
            town_id="town-1",
        )


def _stale_line(tmp_path: Path, case: str) -> str | None:
    """A helper line of the daemon's that is not the current one, or None (no line)."""
    if case == "another town":
        return helper_command(
            python=sys.executable,
            env_file=tmp_path / ".env.gateway",
            socket=tmp_path / "none.sock",
            town_id="town-old",
        )
    if case.startswith("a gone package"):
        return shlex.join(
            [
                "/bin/sh",
                "/opt/old-venv/lib/python3.10/site-packages/gastown_sandboxd/agents/token_helper.sh",
                str(tmp_path / ".env.gateway"),
                str(tmp_path / "none.sock"),
                "/opt/old-venv/bin/python",
                "town-1",
            ]
        )
    return None


@pytest.mark.parametrize("folder", ["default", "account"])
@pytest.mark.parametrize(
    "case", ["no file", "another town", "a gone package", "a gone package, no town"]
)
def test_exec_puts_the_current_helper_where_this_claude_reads_it(
    tmp_path: Path, folder: str, case: str
) -> None:
    """Before a claude starts, the settings it reads get the daemon's current helper line:
    the default folder before the keeper's pass (a claude started then got the token in
    ANTHROPIC_AUTH_TOKEN and sent it for life), and a line of the daemon's with another town
    or a package that is gone (claude got an empty bearer while exec took the token away)."""
    env_file, real = _claude_beside_an_env_file(tmp_path, '"${ANTHROPIC_AUTH_TOKEN-unset}"')
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path / "home")}
    settings = tmp_path / "home" / ".claude" / "settings.json"
    if folder == "account":
        settings = tmp_path / "account" / "settings.json"
        env["CLAUDE_CONFIG_DIR"] = str(settings.parent)
    stale = _stale_line(tmp_path, case)
    if stale is not None:
        settings.parent.mkdir(parents=True)
        settings.write_text(json.dumps({"theme": "dark", "apiKeyHelper": stale}))
    light = _light_exec(tmp_path, env_file)
    town = [] if case.endswith("no town") else ["--town-id", "town-1"]
    done = subprocess.run(
        [*light[:-1], *town, "--", str(real / "claude")],
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert (done.returncode, done.stdout, done.stderr) == (0, "unset", "")
    written = json.loads(settings.read_text())
    assert written["apiKeyHelper"] == helper_command(
        python=sys.executable,
        env_file=env_file,
        socket=tmp_path / "none.sock",
        town_id="town-1" if town else None,
    )
    assert written.get("theme") == (None if stale is None else "dark")


def test_a_helper_line_of_another_path_of_the_same_python_is_the_current_one(
    tmp_path: Path,
) -> None:
    """The keeper's line with the daemon's `venv/bin/python`, exec run as `venv/bin/python3`:
    the line is current (only the interpreter differs), so exec leaves it (the two rewrote
    each other's line, a reviewer); claude starts on the helper."""
    env_file, real = _claude_beside_an_env_file(tmp_path, '"${ANTHROPIC_AUTH_TOKEN-unset}"')
    other = tmp_path / "bin" / "python-other-name"
    other.parent.mkdir()
    other.symlink_to(sys.executable)
    keepers = helper_command(
        python=str(other), env_file=env_file, socket=tmp_path / "none.sock", town_id="town-1"
    )
    settings = tmp_path / "home" / ".claude" / "settings.json"
    settings.parent.mkdir(parents=True)
    settings.write_text(json.dumps({"apiKeyHelper": keepers}))
    before = settings.stat().st_mtime_ns
    light = _light_exec(tmp_path, env_file)
    done = subprocess.run(
        [*light[:-1], "--town-id", "town-1", "--", str(real / "claude")],
        env={"PATH": "/usr/bin:/bin", "HOME": str(tmp_path / "home")},
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert (done.returncode, done.stdout, done.stderr) == (0, "unset", "")
    assert settings.stat().st_mtime_ns == before
    assert json.loads(settings.read_text())["apiKeyHelper"] == keepers


def test_an_env_file_that_is_no_regular_file_or_too_large_reads_as_empty(tmp_path: Path) -> None:
    """A FIFO (no writer) and /dev/zero held an agent's start and the helper for ever; they
    and a file over 1 MiB now read as no variables, at once."""
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    large = tmp_path / "large"
    large.write_text(f"KILO_JWT={CURRENT}\n" + "#" * (1 << 20))
    for path in (fifo, Path("/dev/zero"), large):
        assert read_values(path) == {}
    assert read_values(tmp_path / "missing") == {}
