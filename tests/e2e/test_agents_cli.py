"""`exec`, `token`, the shims and the start-up checks through real processes and a real daemon."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from gastown_sandboxd.token.claims import acceptability_reasons
from tests.e2e._agents import make_standin_agents
from tests.e2e._town import (
    cli,
    create_town,
    local_token,
    start_daemon,
    wait_for_state,
    write_env,
)
from tests.fixtures.cloud import CloudServer
from tests.fixtures.daemon import DaemonFactory, DaemonProcess, daemon_env, make_town
from tests.fixtures.net import unused_port
from tests.waiting import wait_until

TOWN = "town-agents"
PRINT_TOKENS = 'printf "%s %s" "$KILOCODE_TOKEN" "$ANTHROPIC_AUTH_TOKEN"'


def _offline_daemon(
    daemon_factory: DaemonFactory, tmp_path: Path, token: str | None, **extra: str
) -> DaemonProcess:
    """A daemon of TOWN on a non-default env file, its cloud down."""
    env_file = write_env(tmp_path / "elsewhere" / "gateway.env", token)
    return daemon_factory(
        town_id=TOWN,
        cloud_url=f"http://127.0.0.1:{unused_port()}",
        env_file=env_file,
        extra_env=extra,
    )


def _socket_only_env(daemon: DaemonProcess, tmp_path: Path, **extra: str) -> dict[str, str]:
    """An agent's environment that names the daemon's socket and nothing else of it."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("GASTOWN_", "GT_"))}
    for name in ("KILO_JWT", "ANTHROPIC_AUTH_TOKEN", "KILOCODE_TOKEN", "TOWN_ID"):
        env.pop(name, None)
    home = tmp_path / "agent-home"
    home.mkdir(exist_ok=True)
    env.update(HOME=str(home), GASTOWN_SANDBOXD_SOCKET=str(daemon.socket), **extra)
    return env


def test_exec_with_only_the_socket_finds_the_daemons_env_file_and_refreshes_nothing(
    daemon_factory: DaemonFactory, tmp_path: Path
) -> None:
    """A non-default env file, only the socket set: the token from the daemon's file, no refresh."""
    token = local_token(TOWN)
    daemon = _offline_daemon(daemon_factory, tmp_path, token)
    env = _socket_only_env(daemon, tmp_path)
    for _ in range(3):
        done = cli("exec", "--", "bash", "-c", PRINT_TOKENS, env=env)
        assert (done.returncode, done.stdout, done.stderr) == (0, f"{token} {token}", "")
    status = wait_for_state(daemon, "fresh")
    # A refresh against the cloud that is down would have failed, counted and logged.
    assert status["consecutive_failures"] == 0
    assert not [r for r in daemon.logs() if r.get("event") == "token_refresh_failed"]
    assert status["env_file"] == str(daemon.env_file)


def test_token_prints_the_token_and_nothing_else(
    daemon_factory: DaemonFactory, tmp_path: Path
) -> None:
    """`token` writes exactly the token and a newline on stdout, nothing on stderr."""
    token = local_token(TOWN)
    daemon = _offline_daemon(daemon_factory, tmp_path, token)
    done = cli("token", env=_socket_only_env(daemon, tmp_path))
    assert (done.returncode, done.stdout, done.stderr) == (0, token + "\n", "")


def test_token_with_nothing_acceptable_exits_1_with_stdout_empty(
    daemon_factory: DaemonFactory, tmp_path: Path
) -> None:
    """Expired token, cloud down; no token at all; no daemon: exit 1, stdout empty."""
    expired = local_token(TOWN, lifetime=600, now=int(time.time()) - 700)
    daemon = _offline_daemon(daemon_factory, tmp_path, expired)
    env = _socket_only_env(daemon, tmp_path)
    first = cli("token", env=env)
    write_env(daemon.env_file, None)
    second = cli("token", env=env)
    third = cli(
        "token",
        "--env-file",
        str(daemon.env_file),
        "--socket",
        str(tmp_path / "no-daemon.sock"),
        env=env,
    )
    for done in (first, second, third):
        assert done.returncode == 1
        assert done.stdout == ""
        assert "no acceptable token" in done.stderr
        assert expired not in done.stderr


def test_token_refreshes_an_expired_token_through_the_daemon_first(
    cloud: CloudServer, daemon_factory: DaemonFactory, tmp_path: Path
) -> None:
    """An expired token on disk: `token` asks the daemon, which refreshes; the new one prints."""
    town = create_town(cloud)
    env_file = write_env(tmp_path / "home" / ".env.gateway", town.token)
    daemon = start_daemon(daemon_factory, town, env_file)
    wait_for_state(daemon, "fresh")
    expired = town.mint(lifetime=600, now=int(time.time()) - 700)
    # The daemon adopts the edit and would refresh on its own; either way `token` must print a
    # fresh token, asking first when the file still holds the expired one.
    write_env(env_file, expired)
    done = cli("token", env=_socket_only_env(daemon, tmp_path))
    assert done.returncode == 0, done.stderr
    printed = done.stdout.removesuffix("\n")
    assert printed != expired
    assert acceptability_reasons(printed, town_id=town.id, now=time.time()) == []


def test_shims_are_written_for_the_clis_on_the_daemons_path_and_status_names_the_folder(
    daemon_factory: DaemonFactory, tmp_path: Path
) -> None:
    """Stand-in claude and kilo on the daemon's PATH: their shims, no others; /status says where."""
    real = make_standin_agents(tmp_path / "real-bin")
    shims = tmp_path / "shims"
    path = f"{shims}{os.pathsep}{real}{os.pathsep}{os.environ['PATH']}"
    daemon = _offline_daemon(
        daemon_factory,
        tmp_path,
        local_token(TOWN),
        PATH=path,
        GASTOWN_SANDBOXD_SHIM_DIR=str(shims),
    )
    assert sorted(os.listdir(shims)) == ["claude", "kilo"]
    with daemon.local() as local:
        status = local.get("/status").json()
    assert status["shim_dir"] == str(shims)
    absent = [r["name"] for r in daemon.logs() if r.get("event") == "agent_cli_absent"]
    assert sorted(absent) == ["codex", "gemini", "opencode"]
    assert f"-- {real / 'kilo'}" in (shims / "kilo").read_text()


def test_a_cli_dropped_from_the_shim_list_at_a_sighup_loses_its_shim(
    daemon_factory: DaemonFactory, tmp_path: Path
) -> None:
    """`agents.shims` loses kilo and the daemon is told by SIGHUP: kilo's shim goes at once
    (it stayed for good, and after a later change of env file still named the old one)."""
    real = make_standin_agents(tmp_path / "real-bin")
    shims = tmp_path / "shims"
    daemon = daemon_factory(
        town_id=TOWN,
        cloud_url=f"http://127.0.0.1:{unused_port()}",
        env_file=write_env(tmp_path / "home" / ".env.gateway", local_token(TOWN)),
        config_toml='[agents]\nshims = ["claude", "kilo"]\n',
        extra_env={
            "PATH": f"{shims}{os.pathsep}{real}{os.pathsep}{os.environ['PATH']}",
            "GASTOWN_SANDBOXD_SHIM_DIR": str(shims),
        },
    )
    assert sorted(os.listdir(shims)) == ["claude", "kilo"]
    (config,) = tmp_path.glob("daemon-*.toml")
    config.write_text('[agents]\nshims = ["claude"]\n')
    daemon.process.send_signal(signal.SIGHUP)
    daemon.wait_for_log("options_reloaded")
    wait_until(lambda: os.listdir(shims) == ["claude"], deadline=10, what="kilo's shim removed")
    daemon.wait_for_log("agent_shim_removed", name="kilo", reason="not_in_agents_shims")
    assert daemon.stop() == 0


def test_an_unwritable_shim_folder_stops_start_up_with_exit_2_and_one_line(tmp_path: Path) -> None:
    """A shim folder under a regular file: exit 2, one stderr line naming the setting."""
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    env_file = write_env(tmp_path / "home" / ".env.gateway", local_token(TOWN))
    env = daemon_env(
        town_id=TOWN,
        cloud_url=f"http://127.0.0.1:{unused_port()}",
        town_root=make_town(tmp_path / "town"),
        env_file=env_file,
        socket=tmp_path / "d.sock",
        extra={"GASTOWN_SANDBOXD_SHIM_DIR": str(blocker / "bin")},
    )
    done = subprocess.run(
        [sys.executable, "-m", "gastown_sandboxd", "run"],
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert done.returncode == 2, done.stderr
    lines = done.stderr.splitlines()
    assert len(lines) == 1, done.stderr
    assert "GASTOWN_SANDBOXD_SHIM_DIR" in lines[0]
    assert str(blocker / "bin") in lines[0]
    assert not (tmp_path / "d.sock").exists()


def test_readyz_without_a_token_says_where_the_first_one_comes_from(
    daemon_factory: DaemonFactory, tmp_path: Path
) -> None:
    """No token on disk: 503, and the reason names provisioning and PUT /token."""
    daemon = _offline_daemon(daemon_factory, tmp_path, None)
    with daemon.local() as local:
        answer = local.get("/readyz")
    assert answer.status_code == 503
    reasons = json.dumps(answer.json()["reasons"])
    assert "PUT /token" in reasons
    assert "provisioning" in reasons
