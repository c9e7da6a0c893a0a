"""Realistic gt settings files, as gt writes them (Go's MarshalIndent: indent 2, `<>&` escaped)."""

from __future__ import annotations

import copy
import json
import os
import shutil
from pathlib import Path
from typing import Any

# A town file the way a long-lived town has it: gt's own keys, agents with fields the API
# does not set (`session`, `tmux`), `args` null (preset defaults) and [] (no arguments),
# and numbers Python would print differently (1e-7, 2.50).
TOWN_SETTINGS = b"""{
  "type": "town-settings",
  "version": 1,
  "_comment": "model choices come from the dashboard \\u0026 are pushed by the cloud",
  "default_agent": "claude",
  "agents": {
    "claude-haiku": {
      "provider": "claude",
      "command": "claude",
      "args": [
        "--dangerously-skip-permissions",
        "--model",
        "haiku"
      ],
      "session": {
        "session_id_env": "CLAUDE_SESSION_ID",
        "config_dir_env": "CLAUDE_CONFIG_DIR"
      },
      "tmux": {
        "process_names": [
          "claude",
          "node"
        ],
        "ready_prompt_prefix": "\\u003e ",
        "ready_delay_ms": 8000
      },
      "exec_wrapper": [
        "gastown-sandboxd",
        "exec",
        "--"
      ]
    },
    "codex-default": {
      "provider": "codex",
      "command": "codex",
      "args": null,
      "prompt_mode": "none"
    },
    "opencode-bare": {
      "provider": "opencode",
      "command": "opencode",
      "args": []
    }
  },
  "role_agents": {
    "mayor": "claude",
    "witness": "claude-haiku",
    "polecat": "codex-default"
  },
  "role_effort": {
    "mayor": "high",
    "witness": "low"
  },
  "cost_tier": "standard",
  "scheduler": {
    "max_polecats": 4,
    "spawn_delay": "30s",
    "jitter": 1e-7,
    "budget_usd": 2.50
  },
  "_comment_scheduler": "caf\\u00e9 \\u2014 kept as gt wrote it",
  "include_project_claude_files": true
}
"""

# A rig file with gt's merge queue and name pool around the managed keys.
RIG_SETTINGS = b"""{
  "type": "rig-settings",
  "version": 1,
  "merge_queue": {
    "enabled": true,
    "target_branch": "main",
    "integration_branches": true,
    "on_conflict": "assign_back",
    "run_tests": true,
    "test_command": "go test ./... \\u0026\\u0026 golangci-lint run",
    "delete_merged_branches": true,
    "retry_flaky_tests": 1,
    "poll_interval": "30s",
    "max_concurrent": 1
  },
  "namepool": {
    "style": "mad-max",
    "max_before_numbering": 50
  },
  "agent": "claude",
  "role_agents": {
    "polecat": "codex"
  },
  "theme": {
    "name": "ocean"
  }
}
"""

RIGS = ("backend", "docs", "frontend")


def town_doc() -> dict[str, Any]:
    """The town sample, parsed."""
    result: dict[str, Any] = json.loads(TOWN_SETTINGS)
    return result


def rig_doc() -> dict[str, Any]:
    """The rig sample, parsed."""
    result: dict[str, Any] = json.loads(RIG_SETTINGS)
    return result


def build_town(root: Path, *, rigs: tuple[str, ...] = RIGS, with_files: bool = True) -> Path:
    """A town on disk: the town file, rig folders (with the rig file when `with_files`)."""
    (root / "settings").mkdir(parents=True)
    (root / "settings" / "config.json").write_bytes(TOWN_SETTINGS)
    (root / "mayor").mkdir()
    (root / ".beads").mkdir()
    for rig in rigs:
        (root / rig / "crew").mkdir(parents=True)
        if with_files:
            (root / rig / "settings").mkdir()
            (root / rig / "settings" / "config.json").write_bytes(RIG_SETTINGS)
    return root


def members(text: bytes) -> dict[str, str]:
    """The exact text of each top-level member of a two-space indented document, by key."""
    lines = text.decode("utf-8").removesuffix("\n").split("\n")[1:-1]
    found: dict[str, list[str]] = {}
    current: list[str] = []
    for line in lines:
        if line.startswith('  "'):
            current = [line]
            key, _ = json.JSONDecoder().raw_decode(line, 2)
            found[key] = current
        else:
            current.append(line)
    return {key: "\n".join(body).removesuffix(",") for key, body in found.items()}


# The example body of PATCH /config in the contract (§4), as it stands there.
CONTRACT_PATCH: dict[str, Any] = {
    "town": {
        "default_agent": "kilo-sonnet",
        "agents": {
            "kilo-sonnet": {
                "provider": "claude",
                "command": "claude",
                "args": ["--model", "anthropic/claude-sonnet-4.5"],
                "env": {"ANTHROPIC_BASE_URL": "https://api.kilo.ai/api/gateway"},
            }
        },
        "role_agents": {"mayor": "kilo-sonnet", "polecat": None},
        "role_effort": {"mayor": "high"},
        "crew_agents": {"alice": "codex"},
    },
    "rigs": {"frontend": {"role_agents": {"polecat": "codex"}}},
}


def contract_patch() -> dict[str, Any]:
    """A private copy of CONTRACT_PATCH to extend."""
    return copy.deepcopy(CONTRACT_PATCH)


# The town the config API suites serve: the town file, rig `frontend` with gt's rig file, rig
# `backend` without one.
TOWN_FILE = "settings/config.json"
FRONTEND_FILE = "frontend/settings/config.json"
BACKEND_FILE = "backend/settings/config.json"
WRAPPER = ["gastown-sandboxd", "exec", "--"]


def make_config_town(root: Path) -> Path:
    """gt's town file, rig `frontend` with gt's rig file, rig `backend` without one."""
    build_town(root, rigs=("backend", "frontend"))
    shutil.rmtree(root / "backend" / "settings")
    return root


def pairs(data: bytes) -> Any:
    """The JSON document with every object as a list of (key, value) pairs: order counts."""
    return json.loads(data, object_pairs_hook=list)


def unmanaged(data: bytes, managed: tuple[str, ...]) -> list[tuple[str, Any]]:
    """The top-level members that the API does not manage, in file order, order kept inside."""
    return [(key, value) for key, value in pairs(data) if key not in managed]


def tree(root: Path) -> dict[str, tuple[bytes | str, int]]:
    """Every entry under `root` (symlinks not followed): its bytes or link target, and mtime."""
    entries: dict[str, tuple[bytes | str, int]] = {}
    for folder, dirs, files in os.walk(root):
        for name in dirs + files:
            path = Path(folder) / name
            info = path.lstat()
            if path.is_symlink():
                entries[str(path.relative_to(root))] = (os.readlink(path), info.st_mtime_ns)
            elif path.is_file():
                entries[str(path.relative_to(root))] = (path.read_bytes(), info.st_mtime_ns)
            else:
                entries[str(path.relative_to(root)) + "/"] = (b"", info.st_mtime_ns)
    return entries
