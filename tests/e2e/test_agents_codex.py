"""The real Codex CLI, started through its shim, takes the daemon's token from its provider's
`auth` command, and a token the gateway refuses is replaced at its next try.

Codex (npm `@openai/codex`, pinned and installed project-locally by `make tools`) reads its
credential from a model provider's `env_key`, a variable read once at start, or from the
provider's `auth` command (README "Agents"). Measured on 0.171.0 against the stand-in Responses
endpoint: with `env_key`, a refused token is sent five more times and the run fails; with
`auth`, Codex runs the command again at once after a 401 and retries with what it printed, and
the command inherits Codex's environment (the socket and env file that `exec` exported). Here
the README's provider, with `gastown-sandboxd token` as the command, runs against a real daemon
and a real cloud: the first request carries the current token (not the stale one in
`OPENAI_API_KEY`), and after the daemon refreshed and the gateway refused the old one, the next
request carries the new one.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.e2e._agents import NPM_BIN, responses_standin, start_agent_sandbox
from tests.fixtures.cloud import CloudServer
from tests.fixtures.daemon import DaemonFactory

CODEX = NPM_BIN / "codex"
# The console script the README's provider names (`/usr/local/bin/gastown-sandboxd` in the
# packaging); here the venv's.
GASTOWN_SANDBOXD = Path(sys.executable).parent / "gastown-sandboxd"

pytestmark = pytest.mark.skipif(
    not CODEX.exists(), reason=f"Codex is not installed at {CODEX}: run `make tools`"
)


def codex_config(base_url: str) -> str:
    """`~/.codex/config.toml` as the README gives it, for a gateway at `base_url`."""
    return (
        'model = "gpt-standin"\n'
        'model_provider = "kilo"\n'
        "\n"
        "[model_providers.kilo]\n"
        'name = "Kilo gateway"\n'
        f'base_url = "{base_url}"\n'
        'wire_api = "responses"\n'
        "\n"
        "[model_providers.kilo.auth]\n"
        f'command = "{GASTOWN_SANDBOXD}"\n'
        'args = ["token"]\n'
        "refresh_interval_ms = 300000\n"
    )


def test_codex_takes_the_token_from_the_daemon_and_after_a_401_the_new_one(
    cloud: CloudServer, daemon_factory: DaemonFactory, tmp_path: Path
) -> None:
    """First request: the current token; refused after a refresh; the next: the new one."""
    sandbox = start_agent_sandbox(cloud, daemon_factory, tmp_path, CODEX)
    stale = sandbox.town.mint(lifetime=600, now=int(time.time()) - 3600)
    fresh: list[str] = []

    def answer(bearer: str | None) -> str:
        """The first request waits for a refresh and is refused, as the gateway would refuse
        a revoked token; the rest are answered."""
        if fresh:
            return "text"
        fresh.append(sandbox.refresh())
        return "refuse"

    work = tmp_path / "work"
    work.mkdir()
    with responses_standin(answer) as standin:
        config = sandbox.home / ".codex" / "config.toml"
        config.parent.mkdir(parents=True)
        config.write_text(codex_config(f"{standin.url}/v1"))
        env = {k: v for k, v in os.environ.items() if not k.startswith(("OPENAI_", "CODEX_"))}
        env.update(
            PATH=f"{sandbox.shims}{os.pathsep}{env['PATH']}",
            HOME=str(sandbox.home),
            OPENAI_API_KEY=stale,
        )
        done = subprocess.run(
            [str(sandbox.shims / "codex"), "exec", "--skip-git-repo-check", "Say done."],
            env=env,
            cwd=work,
            capture_output=True,
            text=True,
            timeout=60,
        )
    assert done.returncode == 0, done.stderr
    assert "done" in done.stdout
    assert standin.bearers == [sandbox.town.token, fresh[0]]
    assert stale not in done.stdout + done.stderr
