"""The real daemon under real supervisord (PyPI), started through container-entry.sh."""

from __future__ import annotations

import os
import pwd
import re
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.fixtures.cloud import CloudServer
from tests.fixtures.daemon import make_town, socket_accepts
from tests.waiting import wait_until

from .test_supervisord import BIN, DEADLINE, ENTRY, alive, render


class SupervisedDaemon:
    """supervisord running `gastown-sandboxd run` against a real cloud."""

    def __init__(self, tmp_path: Path, short_tmp: Path, cloud: CloudServer) -> None:
        town, token = cloud.create_town(user_id="user-sup", name="supervised")
        self.town_root = make_town(tmp_path / "gt")
        self.env_file = tmp_path / "home" / ".env.gateway"
        self.env_file.parent.mkdir()
        self.env_file.write_text(f"KILO_JWT={token}\n")
        self.socket = short_tmp / "sup.sock"
        user = pwd.getpwuid(os.getuid())
        self.config = render(
            tmp_path,
            {
                "command": f"{BIN / 'gastown-sandboxd'} run",
                "user": user.pw_name,
                "directory": str(tmp_path),
                "environment": (
                    f'HOME="{tmp_path / "home"}",GASTOWN_SANDBOXD_LISTEN="127.0.0.1:0",'
                    f'GASTOWN_SANDBOXD_SOCKET="{self.socket}",GT_TOWN_ROOT="{self.town_root}",'
                    f'GASTOWN_ENV_FILE="{self.env_file}",GASTOWN_SANDBOXD_LOG_FORMAT="json"'
                ),
                "startsecs": "1",
            },
        )
        self.env = {
            "PATH": os.pathsep.join([str(BIN), os.environ.get("PATH", "/usr/bin:/bin")]),
            "SUPERVISORD_CONF": str(self.config),
            "GASTOWN_SUPERVISOR_RUN": str(tmp_path / "run"),
            "TOWN_ID": town["id"],
            "CLOUD_API_URL": cloud.url,
            "INTERNAL_API_KEY": cloud.internal_key,
        }
        self.log_path = tmp_path / "supervisord.log"
        self.log = self.log_path.open("ab")
        self.process = subprocess.Popen(
            ["bash", str(ENTRY)], env=self.env, stdout=self.log, stderr=subprocess.STDOUT
        )

    def healthy(self) -> bool:
        # httpcore leaks its socket when a Unix connect fails: probe with one we close.
        if not socket_accepts(self.socket):
            return False
        try:
            with httpx.Client(
                transport=httpx.HTTPTransport(uds=str(self.socket)), timeout=2
            ) as client:
                return client.get("http://sandboxd/healthz").status_code == 200
        except httpx.TransportError:
            return False

    def running_pid(self, other_than: int | None = None) -> int:
        def check() -> int | None:
            result = subprocess.run(
                [str(BIN / "supervisorctl"), "-c", str(self.config), "status"],
                env=self.env,
                capture_output=True,
                text=True,
                check=False,
            )
            match = re.search(r"RUNNING\s+pid (\d+)", result.stdout)
            pid = int(match.group(1)) if match else None
            return pid if pid != other_than and self.healthy() else None

        pid = wait_until(check, "the daemon to be RUNNING and healthy", deadline=DEADLINE)
        assert isinstance(pid, int)
        return pid

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()
        self.log.close()


@pytest.fixture
def supervised_daemon(
    tmp_path: Path, short_tmp: Path, cloud: CloudServer
) -> Iterator[SupervisedDaemon]:
    if not (BIN / "supervisord").exists():
        pytest.skip("supervisor is not installed in the venv (the test extra)")
    started = SupervisedDaemon(tmp_path, short_tmp, cloud)
    try:
        yield started
    finally:
        started.close()


def test_daemon_restarts_after_sigkill_and_stops_cleanly(
    supervised_daemon: SupervisedDaemon,
) -> None:
    """SIGKILL → supervisord starts a new daemon that serves; SIGTERM → exit 0, socket gone."""
    first = supervised_daemon.running_pid()
    os.kill(first, signal.SIGKILL)
    second = supervised_daemon.running_pid(other_than=first)
    assert second != first
    assert not alive(first)

    supervised_daemon.process.send_signal(signal.SIGTERM)
    assert supervised_daemon.process.wait(timeout=DEADLINE) == 0
    wait_until(lambda: not alive(second), "the daemon to be gone", deadline=DEADLINE)
    log = supervised_daemon.log_path.read_text()
    assert "exited: gastown-sandboxd (terminated by SIGKILL; not expected)" in log
    assert "stopped: gastown-sandboxd (exit status 0)" in log
    assert '"event": "daemon_stopped"' in log
    assert not supervised_daemon.socket.exists()
