"""The daemon's agent component: keeps the shims and Claude Code's `apiKeyHelper` in place.

At start and every `interval` seconds it rewrites a shim that is missing or wrong and puts the
helper back into Claude's user settings, keeping every other key. A settings file that is not
JSON is never written; a CLI that is absent gets no shim. Each such problem is logged once,
until it changes. No token is read or written here.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import anyio
import anyio.abc
import anyio.to_thread
import structlog

from gastown_sandboxd.agents import claude
from gastown_sandboxd.agents.shims import ShimSpec, sync_shims
from gastown_sandboxd.atomic import remove_stale_temporaries

log = structlog.get_logger(__name__)


@dataclass(kw_only=True)
class AgentKeeper:
    """Shims for `names` in `shim_dir`, and the Claude helper when `claude` is found."""

    shim_dir: Path
    names: Sequence[str]
    env_file: Path
    socket: Path
    claude_helper_ttl: float
    town_id: str | None = None
    environ: Mapping[str, str] = field(default_factory=lambda: dict(os.environ))
    python: str = field(default_factory=lambda: sys.executable)
    interval: float = 30.0
    _reported: dict[str, str] = field(default_factory=dict, init=False)
    # An empty settings file seen at the last pass (inode, size, mtime): written at the next.
    _empty: tuple[int, int, int] | None = field(default=None, init=False)

    @property
    def spec(self) -> ShimSpec:
        return ShimSpec(
            python=self.python,
            env_file=self.env_file,
            socket=self.socket,
            claude_helper_ttl_ms=max(1, round(self.claude_helper_ttl * 1000)),
            town_id=self.town_id,
        )

    async def run(
        self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED
    ) -> None:
        await anyio.to_thread.run_sync(self.remove_stale_temporaries)
        await anyio.to_thread.run_sync(self.guarded_sync)
        task_status.started()
        while True:
            await anyio.sleep(self.interval)
            await anyio.to_thread.run_sync(self.guarded_sync)

    def guarded_sync(self) -> None:
        """`sync`, whose known problems it logs itself; anything else it meets (a file of a
        shape no one foresaw) is logged here and the next pass tries again: the keeper works
        on files others own, and must never stop the daemon's token work with it."""
        try:
            self.sync()
        except Exception as exc:
            self._once("pass", "agent_keeper_pass_failed", error=f"{type(exc).__name__}: {exc}")
        else:
            self._reported.pop("pass", None)

    def remove_stale_temporaries(self) -> None:
        """Temporary files of shim and settings writes that a SIGKILL interrupted."""
        for name in self.names:
            remove_stale_temporaries(self.shim_dir / name)
        remove_stale_temporaries(claude.settings_path(self.environ))

    def update(self, *, names: Sequence[str], claude_helper_ttl: float) -> None:
        """New `agents.shims` and helper TTL (SIGHUP); the next `sync` rewrites what changed."""
        self.names = tuple(names)
        self.claude_helper_ttl = claude_helper_ttl

    def sync(self) -> None:
        """One pass: shims, then Claude's settings; problems are logged, never raised."""
        claude_found = False
        try:
            changes = sync_shims(
                self.names, shim_dir=self.shim_dir, spec=self.spec, environ=self.environ
            )
        except OSError as exc:
            self._once("shims", "agent_shims_failed", folder=str(self.shim_dir), error=exc.strerror)
            return
        self._reported.pop("shims", None)
        for change in changes:
            if change.action == "absent":
                self._once(f"absent:{change.name}", "agent_cli_absent", name=change.name)
                continue
            self._reported.pop(f"absent:{change.name}", None)
            if change.action == "written":
                log.info("agent_shim_written", name=change.name, target=str(change.target))
            elif change.action in ("removed", "unlisted"):
                reason = "cli_gone" if change.action == "removed" else "not_in_agents_shims"
                log.info("agent_shim_removed", name=change.name, reason=reason)
            claude_found |= change.name == "claude" and change.target is not None
        if claude_found:
            self.keep_claude_helper()

    def keep_claude_helper(self) -> None:
        """Set `apiKeyHelper` in Claude's user settings, every other key kept."""
        path = claude.settings_path(self.environ)
        command = claude.helper_command(
            python=self.python, env_file=self.env_file, socket=self.socket, town_id=self.town_id
        )
        done = claude.set_helper(path, command, empty_seen=self._empty)
        if done.outcome == "unreadable":
            self._once("claude", "claude_settings_unreadable", path=str(path), error=done.detail)
            return
        if done.outcome == "not_json":
            self._not_json(path, done.detail)
            return
        self._reported.pop("claude", None)
        # An empty file is written once it stayed so for a whole pass (`set_helper`).
        self._empty = done.seen if done.outcome == "empty" else None
        if done.outcome == "unwritable":
            self._once("claude", "claude_settings_unwritable", path=str(path), error=done.detail)
        elif done.outcome == "written":
            log.info("claude_api_key_helper_set", path=str(path))

    def _not_json(self, path: Path, problem: str) -> None:
        self._once(
            "claude",
            "claude_settings_not_json",
            path=str(path),
            problem=problem,
            effect="left untouched; exec exports the token to claude instead",
        )

    def _once(self, key: str, event: str, **fields: object) -> None:
        """Log `event` once per problem `key` until the problem changes or goes away."""
        signature = f"{event}:{sorted(fields.items())}"
        if self._reported.get(key) == signature:
            return
        self._reported[key] = signature
        log.warning(event, **fields)
