"""The command line as agents and operators use it: `python -m gastown_sandboxd …` subprocesses
against a real daemon (and a real cloud where a refresh must succeed).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from gastown_sandboxd.cli import build_parser
from gastown_sandboxd.token.claims import acceptability_reasons, fingerprint
from tests.e2e._town import (
    cli,
    client_env,
    create_town,
    env_text,
    local_token,
    source_token,
    start_daemon,
    wait_for_state,
    wait_for_status,
    write_env,
)
from tests.fixtures.cloud import CloudServer
from tests.fixtures.daemon import DaemonFactory, DaemonProcess
from tests.fixtures.net import unused_port

TOWN = "town-cli"
PRINT_TOKEN = 'printf %s "$ANTHROPIC_AUTH_TOKEN"'


def _offline_daemon(
    daemon_factory: DaemonFactory, tmp_path: Path, token: str | None
) -> DaemonProcess:
    """A daemon of TOWN whose cloud is down, holding `token`."""
    env_file = write_env(tmp_path / "home" / ".env.gateway", token)
    return daemon_factory(
        town_id=TOWN, cloud_url=f"http://127.0.0.1:{unused_port()}", env_file=env_file
    )


def _no_daemon_env(tmp_path: Path, env_file: Path) -> dict[str, str]:
    """An agent's environment whose socket has no daemon behind it."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("GASTOWN_", "GT_"))}
    for name in ("KILO_JWT", "ANTHROPIC_AUTH_TOKEN", "KILOCODE_TOKEN"):
        env.pop(name, None)
    env.update(
        GASTOWN_SANDBOXD_SOCKET=str(tmp_path / "no-daemon.sock"),
        GASTOWN_ENV_FILE=str(env_file),
        TOWN_ID=TOWN,
    )
    return env


def _assert_no_secret(token: str, *texts: str) -> None:
    signature = token.rsplit(".", 1)[1]
    for text in texts:
        assert token not in text
        assert signature not in text


def test_status_prints_a_summary_and_json_without_the_token(
    daemon_factory: DaemonFactory, tmp_path: Path
) -> None:
    """`status` names the town, state and fingerprint; `--json` gives /status; no token."""
    token = local_token(TOWN)
    daemon = _offline_daemon(daemon_factory, tmp_path, token)
    env = client_env(daemon, TOWN)
    done = cli("status", env=env)
    print(done.stdout)
    assert done.returncode == 0, done.stderr
    assert TOWN in done.stdout
    assert "fresh" in done.stdout
    assert fingerprint(token) in done.stdout
    status = cli("status", "--json", env=env)
    assert status.returncode == 0
    body = json.loads(status.stdout)
    assert (body["town_id"], body["state"]) == (TOWN, "fresh")
    assert body["token"]["fingerprint"] == fingerprint(token)
    _assert_no_secret(token, done.stdout, done.stderr, status.stdout, status.stderr)


def test_status_without_a_daemon_exits_1_with_one_line(tmp_path: Path) -> None:
    """`status` with nothing on the socket: exit 1 and one line on stderr."""
    env_file = write_env(tmp_path / ".env.gateway", None)
    done = cli("status", env=_no_daemon_env(tmp_path, env_file))
    assert done.returncode == 1
    assert done.stdout == ""
    assert len(done.stderr.splitlines()) == 1
    assert "no-daemon.sock" in done.stderr


def test_refresh_prints_the_new_metadata(
    cloud: CloudServer, daemon_factory: DaemonFactory, tmp_path: Path
) -> None:
    """`refresh` gets a new token through the daemon and prints its metadata, not the token."""
    town = create_town(cloud)
    env_file = write_env(tmp_path / "home" / ".env.gateway", town.token)
    daemon = start_daemon(daemon_factory, town, env_file)
    done = cli("refresh", env=client_env(daemon, town.id))
    assert done.returncode == 0, done.stderr
    shown = json.loads(done.stdout)
    token = env_file.read_text().split("KILO_JWT=", 1)[1].split("\n", 1)[0]
    assert shown["fingerprint"] == fingerprint(token)
    assert (shown["sub"], shown["organization_id"]) == (town.user_id, town.organization_id)
    assert shown["exp"] - shown["iat"] == 86400
    _assert_no_secret(token, done.stdout, done.stderr)


def test_refresh_with_the_cloud_down_exits_1_with_one_line(
    daemon_factory: DaemonFactory, tmp_path: Path
) -> None:
    """`refresh` when the cloud cannot be reached: exit 1, one stderr line, the token kept."""
    token = local_token(TOWN)
    daemon = _offline_daemon(daemon_factory, tmp_path, token)
    done = cli("refresh", env=client_env(daemon, TOWN))
    print(done.stderr)
    assert done.returncode == 1
    assert done.stdout == ""
    lines = done.stderr.splitlines()
    assert len(lines) == 1
    assert "refresh failed" in lines[0]
    assert daemon.env_file.read_text() == env_text(token)


@pytest.mark.parametrize("source", ["env file", "bare token file", "stdin", "default env file"])
@pytest.mark.parametrize("fresh", [True, False], ids=["fresh", "expired"])
def test_inspect_token_shows_claims_and_acceptability_never_the_token(
    tmp_path: Path, source: str, fresh: bool
) -> None:
    """`inspect-token` reads an env file, a bare token or stdin; exit 0 when acceptable."""
    now = int(time.time())
    issued, lifetime = (now, 86400) if fresh else (now - 700, 600)
    token = local_token(TOWN, lifetime=lifetime, now=issued)
    env_file = write_env(tmp_path / ".env.gateway", token)
    bare = tmp_path / "token.txt"
    bare.write_text(token + "\n")
    env = _no_daemon_env(tmp_path, env_file)
    args = {
        "env file": [str(env_file)],
        "bare token file": [str(bare)],
        "stdin": ["-"],
        "default env file": [],
    }[source]
    stdin = token if source == "stdin" else None
    done = cli("inspect-token", *args, env=env, stdin=stdin)
    as_json = cli("inspect-token", "--json", *args, env=env, stdin=stdin)
    print(done.stdout)
    assert done.returncode == (0 if fresh else 1), done.stderr
    assert as_json.returncode == done.returncode
    report = json.loads(as_json.stdout)
    assert report["acceptable"] is fresh
    assert report["reasons"] == ([] if fresh else ["expired"])
    assert report["claims"]["town_id"] == TOWN
    assert (report["claims"]["iat"], report["claims"]["exp"]) == (issued, issued + lifetime)
    assert report["fingerprint"] == fingerprint(token)
    assert ("expired" in done.stdout) is not fresh
    assert fingerprint(token) in done.stdout
    _assert_no_secret(token, done.stdout, done.stderr, as_json.stdout, as_json.stderr)


def test_inspect_token_of_a_file_without_a_token_exits_1(tmp_path: Path) -> None:
    """An env file with no KILO_JWT line, or a missing file: exit 1 with one line."""
    env_file = write_env(tmp_path / ".env.gateway", None)
    env = _no_daemon_env(tmp_path, env_file)
    for path in (env_file, tmp_path / "missing"):
        done = cli("inspect-token", str(path), env=env)
        assert done.returncode == 1
        assert len(done.stderr.splitlines()) == 1
        assert str(path) in done.stderr


def test_inspect_token_reads_an_env_file_with_a_line_that_is_not_utf8(tmp_path: Path) -> None:
    """A latin-1 comment beside the token, which the daemon reads: inspect-token reads it too
    (before: UnicodeDecodeError and a traceback)."""
    token = local_token(TOWN)
    env_file = tmp_path / ".env.gateway"
    env_file.write_bytes(b"# caf\xe9\nKILO_JWT=" + token.encode() + b"\n")
    done = cli("inspect-token", "--json", str(env_file), env=_no_daemon_env(tmp_path, env_file))
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["fingerprint"] == fingerprint(token)


def test_exec_keeps_the_pid_and_passes_the_exit_code(
    daemon_factory: DaemonFactory, tmp_path: Path
) -> None:
    """`exec` becomes the command: same PID, its exit code, the token in its environment."""
    token = local_token(TOWN)
    daemon = _offline_daemon(daemon_factory, tmp_path, token)
    env = client_env(daemon, TOWN)
    assert cli("exec", "--", "bash", "-c", "exit 7", env=env).returncode == 7
    script = 'printf "%s %s %s" "$$" "$KILOCODE_TOKEN" "$GT_EXTRA"'
    with subprocess.Popen(
        [sys.executable, "-m", "gastown_sandboxd", "exec", "--", "bash", "-c", script],
        env=env,
        stdout=subprocess.PIPE,
        text=True,
    ) as process:
        out, _ = process.communicate(timeout=30)
    assert process.returncode == 0
    assert out == f"{process.pid} {token} kept as written"


def test_exec_passes_signals_to_the_command(daemon_factory: DaemonFactory, tmp_path: Path) -> None:
    """SIGTERM sent to the exec'd process reaches the command's own handler."""
    daemon = _offline_daemon(daemon_factory, tmp_path, local_token(TOWN))
    script = "trap 'echo got-term; exit 3' TERM; echo ready; while :; do sleep 0.05; done"
    with subprocess.Popen(
        [sys.executable, "-m", "gastown_sandboxd", "exec", "--", "bash", "-c", script],
        env=client_env(daemon, TOWN),
        stdout=subprocess.PIPE,
        text=True,
    ) as process:
        assert process.stdout is not None
        assert process.stdout.readline() == "ready\n"
        process.send_signal(signal.SIGTERM)
        rest, _ = process.communicate(timeout=10)
    assert process.returncode == 3
    assert rest == "got-term\n"


def test_exec_with_an_expired_token_asks_the_daemon_and_runs_with_the_fresh_one(
    cloud: CloudServer, daemon_factory: DaemonFactory, tmp_path: Path
) -> None:
    """An expired token on disk: exec asks the running daemon to refresh, then runs with it.

    The daemon starts on the expired token while the town is stopped: its refresh at start is
    refused (409) and it probes only hourly, so the token on disk stays expired until exec
    asks. (A daemon holding a good token puts it back over an expired one someone writes.)"""
    town = create_town(cloud)
    expired = town.mint(lifetime=600, now=int(time.time()) - 700)
    env_file = write_env(tmp_path / "home" / ".env.gateway", expired)
    cloud.set_status(town.id, "stop")
    daemon = start_daemon(daemon_factory, town, env_file)
    status = wait_for_status(daemon, lambda status: status["state"] == "town_inactive")
    assert status["token"]["fingerprint"] == fingerprint(expired)
    assert source_token(env_file) == expired
    cloud.set_status(town.id, "start")

    done = cli("exec", "--", "bash", "-c", PRINT_TOKEN, env=client_env(daemon, town.id))
    assert done.returncode == 0, done.stderr
    assert done.stderr == ""
    assert done.stdout != expired
    assert acceptability_reasons(done.stdout, town_id=town.id, now=time.time()) == []
    assert env_file.read_text() == env_text(done.stdout)
    assert wait_for_state(daemon, "fresh")["token"]["fingerprint"] == fingerprint(done.stdout)


def test_exec_without_a_daemon_runs_anyway_and_says_so(tmp_path: Path) -> None:
    """No daemon and an expired token: the command still runs, with a note on stderr."""
    expired = local_token(TOWN, lifetime=600, now=int(time.time()) - 700)
    env_file = write_env(tmp_path / ".env.gateway", expired)
    done = cli("exec", "--", "bash", "-c", PRINT_TOKEN, env=_no_daemon_env(tmp_path, env_file))
    print(done.stderr)
    assert done.returncode == 0
    assert done.stdout == expired
    assert "running the command anyway" in done.stderr
    _assert_no_secret(expired, done.stderr)


@pytest.mark.parametrize("args", [["exec"], ["exec", "--"]], ids=["no --", "--"])
def test_exec_without_a_command_exits_2(tmp_path: Path, args: list[str]) -> None:
    """`exec` with nothing to run is bad usage: exit 2."""
    env_file = write_env(tmp_path / ".env.gateway", local_token(TOWN))
    done = cli(*args, env=_no_daemon_env(tmp_path, env_file))
    assert done.returncode == 2
    assert done.stderr.strip()


def _commands() -> dict[str, argparse.ArgumentParser]:
    for action in build_parser()._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    raise AssertionError("the parser has no commands")


def test_every_command_has_help_that_names_each_of_its_options(tmp_path: Path) -> None:
    """`--help` of the program and of every command exits 0 and names every option."""
    commands = _commands()
    assert set(commands) >= {"run", "status", "events", "refresh", "inspect-token", "exec"}
    env = _no_daemon_env(tmp_path, tmp_path / ".env.gateway")
    runs = {
        name: subprocess.Popen(
            [sys.executable, "-m", "gastown_sandboxd", *([name] if name else []), "--help"],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for name in ["", *commands]
    }
    for name, process in runs.items():
        out, err = process.communicate(timeout=30)
        assert process.returncode == 0, (name, err)
        if not name:
            assert all(command in out for command in commands)
            continue
        options = [o for a in commands[name]._actions for o in a.option_strings]
        assert "--help" in options
        missing = [option for option in options if option not in out]
        assert missing == [], name
