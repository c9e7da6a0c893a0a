"""Every agent gt starts, in gt's exact shapes, sends the current token: a real tmux server.

The tmux server and every session start with a stale token in their environment, and gt bakes
its own (stale) ANTHROPIC_AUTH_TOKEN into each startup command (`BuildStartupCommand`,
`AgentEnv`); handoffs `export` it; dogs and `kilo run` start bare. The shim folder is first on
PATH, as the packaging sets it. Stand-in CLIs record the token they would send; after a real
refresh (real daemon, real cloud) every new start and every respawn sends the new one.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from gastown_sandboxd.token.claims import fingerprint
from tests.e2e._agents import make_standin_agents, read_records
from tests.e2e._town import create_town, start_daemon, wait_for_state, write_env
from tests.fixtures.cloud import CloudServer
from tests.fixtures.daemon import DaemonFactory, DaemonProcess

pytestmark = pytest.mark.skipif(shutil.which("tmux") is None, reason="tmux is missing (make tools)")


@dataclass
class Tmux:
    """A private tmux server (its own socket file), driven as gt drives its own."""

    socket: Path
    env: dict[str, str]

    def run(self, *args: str) -> str:
        done = subprocess.run(
            ["tmux", "-S", str(self.socket), "-f", os.devnull, *args],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=15,
            check=False,
        )
        assert done.returncode == 0, (args, done.stderr)
        return done.stdout

    def new_session(self, session: str, workdir: Path, command: str, stale: str) -> None:
        """gt's NewSessionWithCommandAndEnv: session with -e env, remain-on-exit, respawn."""
        self.run(
            "new-session", "-d", "-s", session, "-c", str(workdir),
            "-e", f"ANTHROPIC_AUTH_TOKEN={stale}", "-e", f"GT_SESSION={session}",
        )  # fmt: skip
        self.run("set-option", "-t", session, "remain-on-exit", "on")
        self.respawn(session, workdir, command)

    def respawn(self, session: str, workdir: Path, command: str) -> None:
        """gt's RespawnPaneWithWorkDir: how handoffs and gt's daemon restart an agent."""
        self.run("respawn-pane", "-k", "-t", session, "-c", str(workdir), command)


@dataclass(frozen=True)
class Sandbox:
    """The shim folder and the environment gt and its tmux server get (shims first on PATH)."""

    shims: Path
    env: dict[str, str]

    @property
    def record(self) -> Path:
        return Path(self.env["AGENT_RECORD"])


@pytest.fixture
def sandbox(tmp_path: Path) -> Sandbox:
    shims = tmp_path / "shims"
    real = make_standin_agents(tmp_path / "real-bin")
    home = tmp_path / "home"
    home.mkdir()
    env = {
        "PATH": f"{shims}{os.pathsep}{real}{os.pathsep}/usr/bin{os.pathsep}/bin",
        "HOME": str(home),
        "SHELL": "/bin/sh",
        "TERM": "xterm",
        "AGENT_RECORD": str(tmp_path / "agents.jsonl"),
    }
    return Sandbox(shims, env)


@pytest.fixture
def tmux_server(sandbox: Sandbox, short_tmp: Path) -> Iterator[Tmux]:
    """A private tmux server on a socket in a test folder; killed at teardown."""
    server = Tmux(short_tmp / "tmux.sock", dict(sandbox.env))
    yield server
    subprocess.run(
        ["tmux", "-S", str(server.socket), "kill-server"],
        env=sandbox.env,
        capture_output=True,
        timeout=15,
        check=False,
    )


def _wait_for_records(path: Path, count: int, deadline: float = 30.0) -> list[dict[str, Any]]:
    end = time.monotonic() + deadline
    while time.monotonic() < end:
        records = read_records(path)
        if len(records) >= count:
            return records
        time.sleep(0.05)
    raise AssertionError(f"expected {count} agent starts, saw {read_records(path)}")


def _refresh_to_a_new_token(daemon: DaemonProcess, old: str) -> str:
    """POST /token/refresh until the cloud mints a token other than `old` (iat is in seconds)."""
    end = time.monotonic() + 10
    with daemon.local() as local:
        while time.monotonic() < end:
            assert local.post("/token/refresh").status_code == 200
            token = daemon.env_file.read_text().split("KILO_JWT=", 1)[1].split("\n", 1)[0]
            if token != old:
                return token
            time.sleep(0.2)
    raise AssertionError("the cloud kept minting the same token")


def test_every_gt_spawn_shape_sends_the_current_token_before_and_after_a_refresh(
    cloud: CloudServer,
    daemon_factory: DaemonFactory,
    tmp_path: Path,
    sandbox: Sandbox,
    tmux_server: Tmux,
) -> None:
    """mayor, polecat, crew handoff, dog, `kilo run`: current token, then the refreshed one."""
    shims, env, server = sandbox.shims, sandbox.env, tmux_server
    town = create_town(cloud)
    env_file = write_env(tmp_path / "sandbox" / ".env.gateway", town.token)
    stale = town.mint(lifetime=600, now=int(time.time()) - 3600)
    daemon = start_daemon(
        daemon_factory,
        town,
        env_file,
        extra_env={
            "PATH": env["PATH"],
            "HOME": env["HOME"],
            "CLAUDE_CONFIG_DIR": "",
            "GASTOWN_SANDBOXD_SHIM_DIR": str(shims),
        },
    )
    wait_for_state(daemon, "fresh")
    assert sorted(os.listdir(shims)) == ["claude", "kilo"]
    town_root = daemon.town_root
    rig = town_root / "frontend"
    rig.mkdir()

    # gt resolves its default `claude` with LookPath: the shim's absolute path (shims first).
    gt_env = f"ANTHROPIC_AUTH_TOKEN={stale} BD_ACTOR=mayor CLAUDECODE= GT_ROLE=mayor"
    shapes = {
        "hq-mayor": (
            town_root,
            f"exec env {gt_env} GT_ROOT={town_root} NODE_OPTIONS= {shims / 'claude'} "
            f"--dangerously-skip-permissions --settings {town_root}/mayor/.claude/settings.json",
        ),
        "gt-frontend-nux": (
            rig,
            f"exec env ANTHROPIC_AUTH_TOKEN={stale} GT_ROLE=frontend/polecats/nux "
            f"GT_ROOT={town_root} claude --dangerously-skip-permissions",
        ),
        "gt-frontend-crew-alice": (
            rig,
            f"cd {rig} && export ANTHROPIC_AUTH_TOKEN={stale} BD_ACTOR=frontend/crew/alice "
            "GT_ROLE=frontend/crew/alice NODE_OPTIONS='' && exec claude "
            "--dangerously-skip-permissions '[GAS TOWN] handoff'",
        ),
        "hq-dog-alpha": (town_root, "claude --model haiku"),
        "gt-frontend-kilo": (rig, "kilo run 'fix the failing test'"),
    }
    server.env["ANTHROPIC_AUTH_TOKEN"] = stale  # the server starts holding a stale token
    server.run("new-session", "-d", "-s", "gt-keepalive")
    for session, (workdir, command) in shapes.items():
        server.new_session(session, workdir, command, stale)
    before = _wait_for_records(sandbox.record, len(shapes))
    fresh = _refresh_to_a_new_token(daemon, town.token)
    wait_for_state(daemon, "fresh")
    for session, (workdir, command) in shapes.items():
        server.respawn(session, workdir, command)
    server.new_session("gt-frontend-toast", rig, shapes["gt-frontend-nux"][1], stale)
    after = _wait_for_records(sandbox.record, 2 * len(shapes) + 1)[len(shapes) :]

    sent = {(r["name"], fingerprint(r["token"] or "")) for r in before}
    assert sent == {("claude", fingerprint(town.token)), ("kilo", fingerprint(town.token))}
    assert len(after) == len(shapes) + 1
    assert {(r["name"], r["token"]) for r in after} == {("claude", fresh), ("kilo", fresh)}
    # claude reached the token through the daemon's apiKeyHelper, not a variable gt could stale.
    assert {r["source"] for r in before + after if r["name"] == "claude"} == {"helper"}
    assert ["--model", "haiku"] in [r["args"] for r in after]
    assert ["run", "fix the failing test"] in [r["args"] for r in after]

    # No token in a shim, in Claude's settings or in the daemon's log.
    settings = Path(env["HOME"]) / ".claude" / "settings.json"
    texts = [p.read_text() for p in shims.iterdir()] + [settings.read_text(), daemon.log_text()]
    for token in (town.token, fresh, stale):
        signature = token.rsplit(".", 1)[1]
        assert not [t for t in texts if token in t or signature in t]
