"""packaging/supervisord.conf + supervisord-program.conf, started by container-entry.sh.

The daemon's place is taken by a stand-in that behaves as `gastown-sandboxd run` does towards
its supervisor (runs until SIGTERM, then exits 0). To run the real daemon instead, render with
`command` set to the venv's `gastown-sandboxd run` and its settings in the environment.
"""

from __future__ import annotations

import os
import pwd
import re
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator, Mapping
from pathlib import Path

import pytest

from tests.waiting import wait_until

PACKAGING = Path(__file__).resolve().parents[2] / "packaging"
ENTRY = PACKAGING / "container-entry.sh"
BIN = Path(sys.executable).parent
DEADLINE = 15.0

STANDIN = """\
import os, pathlib, signal, sys
state = pathlib.Path(sys.argv[1])
(state / f"started-{os.getpid()}").write_text(os.environ.get("GASTOWN_SANDBOXD_LISTEN", ""))
def stop(signum, frame):
    (state / f"stopped-{os.getpid()}").write_text(signal.Signals(signum).name)
    sys.exit(0)
signal.signal(signal.SIGTERM, stop)
while True:
    signal.pause()
"""


def render(folder: Path, program: Mapping[str, str]) -> Path:
    """Copy both files into `folder`, replacing the program's `key=value` lines; the config."""
    shutil.copy(PACKAGING / "supervisord.conf", folder / "supervisord.conf")
    lines = (PACKAGING / "supervisord-program.conf").read_text().splitlines()
    replaced = set()
    for index, line in enumerate(lines):
        key = line.partition("=")[0]
        if key in program and not line.startswith(";"):
            lines[index] = f"{key}={program[key]}"
            replaced.add(key)
    assert replaced == set(program)
    text = "\n".join(lines) + "\n"
    (folder / "supervisord-program.conf").write_text(text)
    return folder / "supervisord.conf"


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


class Supervised:
    """supervisord started through container-entry.sh, with the stand-in as the program."""

    def __init__(self, tmp_path: Path) -> None:
        self.state = tmp_path / "state"
        self.state.mkdir()
        standin = tmp_path / "standin.py"
        standin.write_text(STANDIN)
        user = pwd.getpwuid(os.getuid())
        self.config = render(
            tmp_path,
            {
                "command": f"{sys.executable} {standin} {self.state}",
                "user": user.pw_name,
                "directory": str(tmp_path),
                # The stand-in is ready at once; the daemon's start-up needs the real value.
                "startsecs": "0",
            },
        )
        self.env = {
            "PATH": os.pathsep.join([str(BIN), os.environ.get("PATH", "/usr/bin:/bin")]),
            "SUPERVISORD_CONF": str(self.config),
            "GASTOWN_SUPERVISOR_RUN": str(tmp_path / "run"),
        }
        # Append mode: supervisord reopens /dev/stdout for the program's output, at its own offset.
        self.log = (tmp_path / "supervisord.log").open("ab")
        self.process = subprocess.Popen(
            ["bash", str(ENTRY)], env=self.env, stdout=self.log, stderr=subprocess.STDOUT
        )

    def status(self) -> str:
        result = subprocess.run(
            [str(BIN / "supervisorctl"), "-c", str(self.config), "status", "gastown-sandboxd"],
            env=self.env,
            capture_output=True,
            text=True,
            check=False,
        )
        return result.stdout

    def started_pid(self, other_than: int | None = None) -> int:
        """Wait until a stand-in other than `other_than` has started; its pid."""

        def check() -> int | None:
            pids = [int(p.name.split("-")[1]) for p in self.state.glob("started-*")]
            fresh = [pid for pid in pids if pid != other_than and alive(pid)]
            return fresh[0] if fresh else None

        pid = wait_until(check, "the program to start", deadline=DEADLINE)
        assert isinstance(pid, int)
        return pid

    def running_pid(self, other_than: int | None = None) -> int:
        """Wait until supervisord reports the program RUNNING with a new pid; that pid."""
        self.started_pid(other_than)

        def check() -> int | None:
            match = re.search(r"RUNNING\s+pid (\d+)", self.status())
            pid = int(match.group(1)) if match else None
            return pid if pid != other_than else None

        pid = wait_until(check, "the program to be RUNNING", deadline=DEADLINE)
        assert isinstance(pid, int)
        return pid

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()
        for started in self.state.glob("started-*"):
            pid = int(started.name.split("-")[1])
            if alive(pid):
                os.kill(pid, signal.SIGKILL)
        self.log.close()


@pytest.fixture
def supervised(tmp_path: Path) -> Iterator[Supervised]:
    if not (BIN / "supervisord").exists():
        pytest.skip("supervisor is not installed in the venv (the test extra)")
    started = Supervised(tmp_path)
    try:
        yield started
    finally:
        started.close()


def test_runs_restarts_after_sigkill_and_stops_on_sigterm(
    supervised: Supervised, tmp_path: Path
) -> None:
    """The program runs with its environment, comes back after SIGKILL, stops cleanly on TERM."""
    first = supervised.running_pid()
    assert (supervised.state / f"started-{first}").read_text() == "0.0.0.0:8080"
    # supervisorctl answered over a 0700 socket in a 0700 folder; there is no TCP port.
    run = tmp_path / "run"
    assert (run / "supervisor.sock").stat().st_mode & 0o777 == 0o700
    assert run.stat().st_mode & 0o777 == 0o700
    assert "inet_http_server" not in supervised.config.read_text()

    os.kill(first, signal.SIGKILL)
    second = supervised.running_pid(other_than=first)
    assert not alive(first)

    supervised.process.send_signal(signal.SIGTERM)
    assert supervised.process.wait(timeout=DEADLINE) == 0
    assert (supervised.state / f"stopped-{second}").read_text() == "SIGTERM"
    wait_until(lambda: not alive(second), "the program to be gone", deadline=DEADLINE)
    log = (tmp_path / "supervisord.log").read_text()
    assert "exited: gastown-sandboxd (terminated by SIGKILL; not expected)" in log
    assert "stopped: gastown-sandboxd (exit status 0)" in log
