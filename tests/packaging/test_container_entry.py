"""packaging/container-entry.sh: the daemon mode execs in place; other commands pass through.

The supervisord mode is proven with supervisord itself in test_supervisord.py.
"""

from __future__ import annotations

import json
import os
import pwd
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

ENTRY = Path(__file__).resolve().parents[2] / "packaging" / "container-entry.sh"

# Stands in for gastown-sandboxd: reports what it was started with.
STANDIN = f"""#!{sys.executable}
import json, os, sys
print(json.dumps({{
    "pid": os.getpid(),
    "uid": os.getuid(),
    "argv": sys.argv[1:],
    "home": os.environ.get("HOME"),
    "listen": os.environ.get("GASTOWN_SANDBOXD_LISTEN"),
}}))
"""


@pytest.fixture
def standin(tmp_path: Path) -> Path:
    path = tmp_path / "gastown-sandboxd"
    path.write_text(STANDIN)
    path.chmod(0o755)
    return path


def entry(args: list[str], env: dict[str, str]) -> tuple[int, subprocess.CompletedProcess[str]]:
    """Run the entry script; its pid and its result."""
    full = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), **env}
    process = subprocess.Popen(
        ["bash", str(ENTRY), *args], env=full, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    out, err = process.communicate(timeout=30)
    result = subprocess.CompletedProcess(
        process.args, process.returncode, out.decode(), err.decode()
    )
    return process.pid, result


def test_daemon_mode_execs_the_daemon_in_place(standin: Path) -> None:
    """`daemon` runs `gastown-sandboxd run ARGS` as the same process, listening on 0.0.0.0."""
    user = pwd.getpwuid(os.getuid())
    pid, result = entry(
        ["daemon", "--config", "/etc/x.toml"],
        {"GASTOWN_SANDBOXD_BIN": str(standin), "GASTOWN_SANDBOXD_USER": user.pw_name},
    )
    assert result.returncode == 0, result.stderr
    seen = json.loads(result.stdout)
    # Same pid: bash and setpriv exec'd, so the container's signals reach the daemon itself.
    assert seen["pid"] == pid
    assert seen["uid"] == user.pw_uid
    assert seen["argv"] == ["run", "--config", "/etc/x.toml"]
    assert seen["listen"] == "0.0.0.0:8080"
    if os.getuid() == 0:
        assert seen["home"] == user.pw_dir


def test_daemon_mode_keeps_a_set_listen_address(standin: Path) -> None:
    """A GASTOWN_SANDBOXD_LISTEN given to the container wins over the entry's default."""
    user = pwd.getpwuid(os.getuid())
    _, result = entry(
        ["daemon"],
        {
            "GASTOWN_SANDBOXD_BIN": str(standin),
            "GASTOWN_SANDBOXD_USER": user.pw_name,
            "GASTOWN_SANDBOXD_LISTEN": "127.0.0.1:9000",
        },
    )
    assert json.loads(result.stdout)["listen"] == "127.0.0.1:9000"


def test_daemon_mode_unknown_user(standin: Path) -> None:
    """As root, a user missing from the image stops start-up with exit 2 and one line."""
    if os.getuid() != 0:
        pytest.skip("only root switches users; others run the daemon as themselves")
    _, result = entry(
        ["daemon"],
        {"GASTOWN_SANDBOXD_BIN": str(standin), "GASTOWN_SANDBOXD_USER": "no-such-user-here"},
    )
    assert result.returncode == 2
    assert result.stdout == ""
    assert result.stderr == "container-entry: no user no-such-user-here in this image\n"


def test_other_commands_pass_through() -> None:
    """Any other first argument is run as given, with its exit code."""
    pid, result = entry(["sh", "-c", 'echo "$$"; exit 3'], {})
    assert result.returncode == 3
    assert result.stdout == f"{pid}\n"


def test_daemon_mode_runs_as_a_user_whose_group_has_another_name() -> None:
    """As root, a user whose primary group is not named after it (nobody's is nogroup;
    `useradd -N` gives `users`): the daemon runs with that user's ids (before, setpriv was
    given the user's name as a group and refused: `failed to parse regid`)."""
    if os.getuid() != 0:
        pytest.skip("only root switches users; others run the daemon as themselves")
    user = pwd.getpwnam("nobody")
    folder = Path(tempfile.mkdtemp(prefix="entry-"))  # one nobody can enter, unlike tmp_path
    try:
        folder.chmod(0o755)
        standin = folder / "gastown-sandboxd"
        standin.write_text('#!/bin/sh\nprintf \'{"uid": %s, "gid": %s}\' "$(id -u)" "$(id -g)"\n')
        standin.chmod(0o755)
        _, result = entry(
            ["daemon"], {"GASTOWN_SANDBOXD_BIN": str(standin), "GASTOWN_SANDBOXD_USER": "nobody"}
        )
    finally:
        shutil.rmtree(folder)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == {"uid": user.pw_uid, "gid": user.pw_gid}
