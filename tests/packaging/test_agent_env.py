"""How the sandbox starts gt and its tmux server: shims first on PATH, no token variable.

packaging/agent-env.sh (also container-entry.sh's pass-through mode), gt.service and
supervisord-gt.conf, each run for real where this machine can: bash, tmux, supervisord,
systemd-analyze.
"""

from __future__ import annotations

import configparser
import json
import os
import pwd
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.packaging.test_systemd_unit import parse, verify

PACKAGING = Path(__file__).resolve().parents[2] / "packaging"
AGENT_ENV = PACKAGING / "agent-env.sh"
ENTRY = PACKAGING / "container-entry.sh"
BIN = Path(sys.executable).parent
TOKENS = ("ANTHROPIC_AUTH_TOKEN", "KILOCODE_TOKEN", "KILO_JWT")
# The daemon's key and the cloud's signing secret: no agent's either.
SECRETS = ("INTERNAL_API_KEY", "NEXTAUTH_SECRET")
STALE = "eyJhbGciOiJIUzI1NiJ9.eyJ0eXBlIjoiZ2FzdG93bl9zYW5kYm94In0.c3RhbGU"
# Prints the process id and its environment as JSON.
REPORT = (
    f"#!{sys.executable}\nimport json, os\nprint(json.dumps([os.getpid(), dict(os.environ)]))\n"
)


def _caller_env(tmp_path: Path, shims: Path) -> dict[str, str]:
    """An environment as a careless image gives it: stale tokens, shims last, an empty entry."""
    return {
        "HOME": str(tmp_path),
        "PATH": f"/usr/bin::/bin:{shims}",
        "GASTOWN_SANDBOXD_SHIM_DIR": str(shims),
        "KEEP_ME": "kept",
        **dict.fromkeys(TOKENS, STALE),
        **dict.fromkeys(SECRETS, "a-secret-of-the-daemon"),
    }


def _report(tmp_path: Path) -> Path:
    path = tmp_path / "report"
    path.write_text(REPORT)
    path.chmod(0o755)
    return path


@pytest.mark.parametrize("script", [AGENT_ENV, ENTRY], ids=["agent-env.sh", "container-entry.sh"])
def test_a_command_gets_the_shims_first_and_no_token(tmp_path: Path, script: Path) -> None:
    """Same PID (exec), shim folder first and once, tokens gone, everything else kept."""
    shims = tmp_path / "shims"
    report = _report(tmp_path)
    with subprocess.Popen(
        ["bash", str(script), str(report)],
        env=_caller_env(tmp_path, shims),
        stdout=subprocess.PIPE,
        text=True,
    ) as process:
        out, _ = process.communicate(timeout=30)
    pid, env = json.loads(out)
    assert process.returncode == 0
    assert pid == process.pid
    assert env["PATH"] == f"{shims}:/usr/bin:/bin"
    assert not set(TOKENS) & set(env)
    assert not set(SECRETS) & set(env)
    assert env["KEEP_ME"] == "kept"


def _first_on_path(report: Path, env: dict[str, str], cwd: Path | None = None) -> str:
    """The first PATH entry a command run through agent-env.sh with `env` gets."""
    out = subprocess.run(
        [str(AGENT_ENV), str(report)],
        env=env,
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    ).stdout
    first: str = json.loads(out)[1]["PATH"].split(":")[0]
    return first


def test_the_default_shim_folder_follows_the_daemons(tmp_path: Path) -> None:
    """No GASTOWN_SANDBOXD_SHIM_DIR: $XDG_DATA_HOME's, else ~/.local/share's, as the daemon's."""
    report = _report(tmp_path)
    base = {"HOME": str(tmp_path), "PATH": "/usr/bin:/bin"}
    for extra, expected in (
        ({}, tmp_path / ".local/share/gastown-sandboxd/bin"),
        ({"XDG_DATA_HOME": "/xdg"}, Path("/xdg/gastown-sandboxd/bin")),
    ):
        assert _first_on_path(report, {**base, **extra}) == str(expected)


def test_a_shim_folder_written_with_a_tilde_or_relative_is_the_daemons(tmp_path: Path) -> None:
    """GASTOWN_SANDBOXD_SHIM_DIR as a systemd EnvironmentFile or a Dockerfile ENV leaves it
    (`~/…`) or relative: expanded as the daemon expands it (before, PATH held `~/…` as is,
    which neither LookPath nor tmux expands: agents bypassed their shims)."""
    report = _report(tmp_path)
    (tmp_path / "cwd").mkdir()
    for given, expected in (
        ("~/.local/share/gastown-sandboxd/bin", tmp_path / ".local/share/gastown-sandboxd/bin"),
        ("shims", tmp_path / "cwd" / "shims"),
    ):
        env = {"HOME": str(tmp_path), "PATH": "/bin", "GASTOWN_SANDBOXD_SHIM_DIR": given}
        assert _first_on_path(report, env, cwd=tmp_path / "cwd") == str(expected)


def test_no_command_is_bad_usage(tmp_path: Path) -> None:
    """agent-env.sh with nothing to run: exit 2 and one line."""
    done = subprocess.run(
        [str(AGENT_ENV)], env={"HOME": str(tmp_path)}, capture_output=True, text=True, check=False
    )
    assert done.returncode == 2
    assert len(done.stderr.splitlines()) == 1


@pytest.mark.skipif(shutil.which("tmux") is None, reason="tmux is missing (make tools)")
def test_a_tmux_server_started_through_it_hands_agents_the_shims_and_no_token(
    tmp_path: Path, short_tmp: Path
) -> None:
    """The tmux server's global environment has no token; `claude` in a pane is the shim."""
    shims = tmp_path / "shims"
    shims.mkdir()
    (shims / "claude").write_text("#!/bin/sh\n")
    (shims / "claude").chmod(0o755)
    sock = short_tmp / "tmux.sock"
    out = tmp_path / "pane"
    env = {**_caller_env(tmp_path, shims), "SHELL": "/bin/sh", "TERM": "xterm"}
    tmux = [str(AGENT_ENV), "tmux", "-S", str(sock), "-f", os.devnull]
    try:
        pane = f'command -v claude > {out}; printf "%s" "${{ANTHROPIC_AUTH_TOKEN:-none}}" >> {out}'
        pane += "; exec sleep 60"  # the server lives while a pane does; kill-server ends it
        subprocess.run([*tmux, "new-session", "-d", "-s", "gt", pane], env=env, check=True)
        shown = subprocess.run(
            ["tmux", "-S", str(sock), "show-environment", "-g"],
            env=env,
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        deadline = time.monotonic() + 15
        while not (out.exists() and out.read_text().endswith("none")):
            assert time.monotonic() < deadline, "the pane never ran"
            time.sleep(0.05)
    finally:
        subprocess.run(["tmux", "-S", str(sock), "kill-server"], env=env, check=False)
    lines = dict(line.split("=", 1) for line in shown.splitlines() if "=" in line)
    assert not set(TOKENS) & set(lines)
    assert lines["PATH"].startswith(f"{shims}:")
    assert out.read_text() == f"{shims / 'claude'}\nnone"


def test_gt_service_puts_the_daemons_shim_folder_first_and_unsets_the_tokens(
    tmp_path: Path,
) -> None:
    """gt.service: PATH starts with the daemon unit's shim folder; tokens unset; verify is clean."""
    gt = parse((PACKAGING / "gt.service").read_text())
    daemon = parse((PACKAGING / "gastown-sandboxd.service").read_text())
    daemon_env = dict(item.split("=", 1) for item in daemon["Service"]["Environment"])
    gt_env = dict(item.split("=", 1) for item in gt["Service"]["Environment"])
    assert gt_env["PATH"].split(":")[0] == daemon_env["GASTOWN_SANDBOXD_SHIM_DIR"]
    assert set(" ".join(gt["Service"]["UnsetEnvironment"]).split()) == set(TOKENS)
    assert "EnvironmentFile" not in gt["Service"]
    assert gt["Unit"]["After"] == ["gastown-sandboxd.service"]
    assert gt["Service"]["KillMode"] == ["process"]
    assert gt["Service"]["User"] == daemon["Service"]["User"]
    copy = tmp_path / "gt.service"
    unit_text = (PACKAGING / "gt.service").read_text()
    copy.write_text(unit_text.replace("/usr/local/bin/gt", "/bin/true"))
    if shutil.which("systemd-analyze") is None:
        pytest.skip("systemd-analyze is not installed (package systemd)")
    code, about_unit = verify(copy)
    assert (code, about_unit) == (0, [])


def test_supervisord_starts_gt_through_agent_env(tmp_path: Path) -> None:
    """supervisord started with stale tokens runs the gt program with shims first, no token."""
    if not (BIN / "supervisord").exists():
        pytest.skip("supervisor is not installed in the venv (the test extra)")
    program = configparser.ConfigParser(interpolation=None)
    program.read(PACKAGING / "supervisord-gt.conf")
    section = program["program:gt"]
    assert section["command"].split()[0].endswith("/agent-env.sh")
    assert section["command"].split()[1:] == ["/usr/local/bin/gt", "daemon", "run"]
    shims, state = tmp_path / "shims", tmp_path / "state.json"
    standin = tmp_path / "gt"
    standin.write_text(
        f"#!{sys.executable}\nimport json, os, signal\n"
        f"open({str(state)!r}, 'w').write(json.dumps(dict(os.environ)))\nsignal.pause()\n"
    )
    standin.chmod(0o755)
    text = (PACKAGING / "supervisord-gt.conf").read_text()
    text = text.replace("/usr/local/lib/gastown-sandboxd/agent-env.sh", str(AGENT_ENV))
    text = text.replace("/usr/local/bin/gt daemon run", f"{standin} daemon run")
    text = text.replace("user=gt", f"user={pwd.getpwuid(os.getuid()).pw_name}")
    text = text.replace('HOME="/home/gt"', f'HOME="{tmp_path}"')
    text = text.replace("directory=/home/gt/gt", f"directory={tmp_path}")
    (tmp_path / "supervisord-gt.conf").write_text(text)
    (tmp_path / "supervisord.conf").write_text(
        f"[supervisord]\nnodaemon=true\nlogfile=/dev/null\nlogfile_maxbytes=0\n"
        f"pidfile={tmp_path}/supervisord.pid\n[include]\nfiles = supervisord-gt.conf\n"
    )
    env = {**_caller_env(tmp_path, shims), "PATH": f"{BIN}:/usr/bin:/bin"}
    env.pop("GASTOWN_SANDBOXD_SHIM_DIR")
    supervisord = subprocess.Popen(
        [str(BIN / "supervisord"), "-c", str(tmp_path / "supervisord.conf")],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 15
        while not state.exists() or not state.read_text():
            assert time.monotonic() < deadline, "supervisord never started the program"
            time.sleep(0.05)
        seen = json.loads(state.read_text())
    finally:
        supervisord.terminate()
        supervisord.wait(15)
    assert seen["PATH"].split(":")[0] == str(tmp_path / ".local/share/gastown-sandboxd/bin")
    assert not set(TOKENS) & set(seen)


PROFILE_D = PACKAGING / "profile.d" / "gastown-sandboxd.sh"


@pytest.mark.parametrize("shell", ["bash", "sh"])
def test_a_login_shell_keeps_the_shim_folder_first_with_the_profile_snippet(
    tmp_path: Path, shell: str
) -> None:
    """A real login shell (`agent-env.sh bash -l`, a tmux pane without a command) runs
    /etc/profile, which on Debian sets PATH anew: the shim folder was gone (a reviewer: the
    shell's `claude` was the real one). The snippet, sourced after it as /etc/profile.d's are
    (here from the home's login file, which a login shell reads after /etc/profile), puts it
    back first, once; it passes shellcheck as POSIX sh."""
    home = tmp_path / "home"
    home.mkdir()
    for login_file in (".bash_profile", ".profile"):
        (home / login_file).write_text(f". {PROFILE_D}\n")
    shims = home / ".local/share/gastown-sandboxd/bin"
    done = subprocess.run(
        [str(AGENT_ENV), shell, "-l", "-c", 'printf "%s" "$PATH"'],
        env={"HOME": str(home), "PATH": f"/usr/bin:/bin:{shims}"},
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    )
    entries = done.stdout.split(":")
    assert entries[0] == str(shims)
    assert entries.count(str(shims)) == 1
    tool = shutil.which("shellcheck")
    if tool is not None:
        checked = subprocess.run(
            [tool, "--shell=sh", "--enable=all", "--exclude=SC2250", str(PROFILE_D)],
            capture_output=True,
            text=True,
            check=False,
        )
        assert checked.returncode == 0, checked.stdout
