"""The real Claude Code CLI, started through its shim, sends the current token, then the new one.

Claude Code (npm `@anthropic-ai/claude-code`, pinned and installed project-locally by `make
tools`) talks to a stand-in Messages endpoint on 127.0.0.1 that records each request's
credentials. It starts with a stale ANTHROPIC_AUTH_TOKEN in its environment, as gt gives it;
its first request must carry the current token. The stand-in answers tool-use turns to keep the
session alive while the daemon refreshes (real daemon, real cloud); with a 1 s helper TTL the
later requests carry the new token. With an hour's TTL, a token the gateway refuses (401) is
replaced at Claude Code's next try: it runs the helper again after a 401 or 403 and retries
(measured on 2.1.337: ~1 s later, then backing off to ~40 s, 12 retries in ~4 min before it
gives up).
"""

from __future__ import annotations

import json
import os
import subprocess
import threading
import time
from pathlib import Path

import pytest

from tests.e2e._agents import (
    NPM_BIN,
    AgentSandbox,
    Seen,
    claude_env,
    messages_standin,
    start_agent_sandbox,
)
from tests.fixtures.cloud import CloudServer
from tests.fixtures.daemon import DaemonFactory

CLAUDE = NPM_BIN / "claude"
HELPER_TTL = 1.0
MAX_TURNS = 24
TURN_PACE = 0.15  # seconds per later turn: the helper's refresh runs beside the session

pytestmark = pytest.mark.skipif(
    not CLAUDE.exists(), reason=f"Claude Code is not installed at {CLAUDE}: run `make tools`"
)


def start_sandbox(
    cloud: CloudServer, daemon_factory: DaemonFactory, tmp_path: Path, helper_ttl: str
) -> AgentSandbox:
    """A daemon keeping the `claude` shim with `helper_ttl`, and Claude's settings holding a
    key of the user's own (`theme`) before it starts."""
    return start_agent_sandbox(
        cloud,
        daemon_factory,
        tmp_path,
        CLAUDE,
        agents_toml=f'claude_helper_ttl = "{helper_ttl}"\n',
        home_files={".claude/settings.json": '{"theme": "dark"}\n'},
    )


def start_claude(
    sandbox: AgentSandbox, base_url: str, stale: str, config_dir: Path | None = None
) -> subprocess.Popen[str]:
    """`claude -p` through its shim, with the `stale` token gt would hand it, and the
    `CLAUDE_CONFIG_DIR` gt sets for an account, if any."""
    env = claude_env(base_url, sandbox.home)
    env.update(PATH=f"{sandbox.shims}{os.pathsep}{env['PATH']}", ANTHROPIC_AUTH_TOKEN=stale)
    if config_dir is not None:
        env["CLAUDE_CONFIG_DIR"] = str(config_dir)
    return subprocess.Popen(
        [str(sandbox.shims / "claude"), "-p", "Run `true` with Bash.", "--allowedTools", "Bash"],
        env=env,
        cwd=sandbox.home,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


@pytest.mark.parametrize("folder", ["default", "account"])
def test_claude_through_its_shim_sends_the_current_token_and_then_the_refreshed_one(
    cloud: CloudServer, daemon_factory: DaemonFactory, tmp_path: Path, folder: str
) -> None:
    """First request: current token (not the stale one); after a refresh: the new one. Also
    in a gt account's CLAUDE_CONFIG_DIR, whose settings the keeper never saw: the shim's
    exec sets the helper there (before, claude got the token in ANTHROPIC_AUTH_TOKEN and
    sent that one for its whole life, a reviewer's session 34 s past its expiry)."""
    sandbox = start_sandbox(cloud, daemon_factory, tmp_path, f"{HELPER_TTL}s")
    town, home = sandbox.town, sandbox.home
    config_dir = home / ".claude"
    if folder == "account":
        config_dir = home / "accounts" / "work"
        config_dir.mkdir(parents=True)
        (config_dir / "settings.json").write_text('{"theme": "dark"}\n')
    stale = town.mint(lifetime=600, now=int(time.time()) - 3600)

    refreshed = threading.Event()
    fresh: list[str] = []

    def answer(seen: Seen) -> str:
        """Tool turns until a request after the refresh carries the new token (bounded)."""
        turn = len(standin.messages())
        if turn == 2:
            # Hold the session until the refresh is done and one helper TTL has passed.
            assert refreshed.wait(20)
            time.sleep(HELPER_TTL + 0.2)
        elif turn > 2:
            time.sleep(TURN_PACE)
        got_new = bool(fresh) and any(m.bearer == fresh[0] for m in standin.messages())
        return "text" if got_new or turn >= MAX_TURNS else "tool"

    with messages_standin(answer) as standin:
        account = config_dir if folder == "account" else None
        with start_claude(sandbox, standin.url, stale, account) as claude:
            try:
                standin.wait_for(lambda messages: len(messages) >= 1, deadline=30)
                fresh.append(sandbox.refresh())
                refreshed.set()
                out, err = claude.communicate(timeout=60)
            finally:
                refreshed.set()
                if claude.poll() is None:
                    claude.kill()
        messages = standin.messages()
        requests = list(standin.requests)

    print(json.dumps([(m.bearer or "")[-8:] for m in messages]))
    assert claude.returncode == 0, err
    assert "done" in out
    # The first request carries the token that was current, in both headers (helper output).
    assert (messages[0].bearer, messages[0].api_key) == (town.token, town.token)
    assert all(stale not in (r.bearer, r.api_key) for r in requests)
    # Later requests carry the new token, and once they do, never the old one again.
    bearers = [m.bearer for m in messages]
    assert fresh[0] in bearers, bearers
    first_new = bearers.index(fresh[0])
    assert first_new > 0
    assert set(bearers[first_new:]) == {fresh[0]}
    assert set(bearers[:first_new]) == {town.token}
    settings = json.loads((config_dir / "settings.json").read_text())
    assert settings["theme"] == "dark"
    assert town.token not in json.dumps(settings)
    assert settings["apiKeyHelper"].endswith(f" {town.id}")


def test_a_token_the_gateway_refuses_is_replaced_at_claudes_next_try_not_after_the_ttl(
    cloud: CloudServer, daemon_factory: DaemonFactory, tmp_path: Path
) -> None:
    """With an hour's helper TTL, the session keeps its token after a refresh; the gateway's
    401 for it makes Claude Code run the helper again, and its next try carries the new one."""
    sandbox = start_sandbox(cloud, daemon_factory, tmp_path, "1h")
    current = sandbox.town.token
    stale = sandbox.town.mint(lifetime=600, now=int(time.time()) - 3600)
    fresh: list[str] = []
    answered: list[tuple[str | None, str]] = []  # (bearer, answer) of each model call

    def answer(seen: Seen) -> str:
        """A tool turn; the next, after a refresh, another (the TTL keeps the token); then the
        old token refused, the new one answered with the final text."""
        if not answered:
            kind = "tool"
        elif len(answered) == 1:
            fresh.append(sandbox.refresh())
            kind = "tool"
        elif seen.bearer == fresh[0] or len(answered) >= MAX_TURNS:
            kind = "text"
        else:
            kind = "refuse"
        answered.append((seen.bearer, kind))
        return kind

    with messages_standin(answer) as standin, start_claude(sandbox, standin.url, stale) as claude:
        try:
            out, err = claude.communicate(timeout=60)
        finally:
            if claude.poll() is None:
                claude.kill()

    print(json.dumps([((bearer or "")[-8:], kind) for bearer, kind in answered]))
    assert claude.returncode == 0, err
    assert "done" in out
    assert answered == [
        (current, "tool"),
        (current, "tool"),  # refreshed before this answer: the session still holds its token
        (current, "refuse"),
        (fresh[0], "text"),  # the next try, seconds later, not an hour
    ]
