"""A full disk and a read-only disk under the real daemon: 503 naming the cause, files intact,
recovery once the disk is back; a town root the daemon cannot reach stops start-up with exit 2.

The town root and the env file live on a small tmpfs mounted inside a private mount namespace
(`unshare -m --propagation private`), so nothing leaks to the machine; the test reaches the
files through /proc/PID/root and remounts the tmpfs with `nsenter -t PID -m`. This needs root
with CAP_SYS_ADMIN, as on the development machine and in CI; elsewhere those tests are skipped
(the same failures are injected in-process by tests/daemon/test_settings_store.py and
tests/daemon/test_atomic.py).
"""

from __future__ import annotations

import errno
import functools
import json
import os
import shutil
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from gastown_sandboxd.token.claims import fingerprint
from gastown_sandboxd.token.envfile import read_env
from tests.fixtures.cloud import CloudServer
from tests.fixtures.daemon import START_DEADLINE, DaemonProcess, daemon_env

DISK_SIZE = "256k"
TOWN_FILE = {"type": "town-settings", "version": 1, "theme": "dark", "default_agent": "claude"}
RIG_FILE = {"type": "rig-settings", "version": 1, "agent": "codex", "merge_queue": {"on": True}}
ENV_OTHER = "# gateway\nexport KILO_API_URL=https://api.kilo.ai\n"

# Mount the tmpfs over $1, copy the seed $2 onto it, remount it read-only when $4 is set,
# then become the daemon: same pid, so /proc/PID/root and nsenter reach this namespace.
_WRAPPER = """set -e
mount -t tmpfs -o "size=$3,mode=0755" gastown-fault "$1"
cp -a "$2/." "$1/"
if [ -n "$4" ]; then mount -o remount,ro "$1"; fi
shift 4
exec "$@"
"""


@functools.cache
def namespace_problem() -> str | None:
    """None when this process may mount a tmpfs in a private namespace, else why not."""
    if shutil.which("unshare") is None or shutil.which("nsenter") is None:
        return "unshare or nsenter is missing"
    with tempfile.TemporaryDirectory() as folder:
        probe = subprocess.run(
            ["unshare", "-m", "--propagation", "private", "mount", "-t", "tmpfs", "t", folder],
            capture_output=True,
            text=True,
            timeout=10,
            check=False,
        )
    if probe.returncode != 0:
        return f"cannot mount a tmpfs in a private namespace: {probe.stderr.strip()}"
    return None


@dataclass
class Disk:
    """The tmpfs under the daemon, as the test sees it from outside the namespace."""

    daemon: DaemonProcess
    mount: Path  # the mount point, as the daemon sees it

    def outside(self, path: Path) -> Path:
        return Path(f"/proc/{self.daemon.process.pid}/root") / path.relative_to("/")

    @property
    def filler(self) -> Path:
        return self.outside(self.mount / "filler")

    def fill(self) -> None:
        """Write zeros until the tmpfs refuses (ENOSPC)."""
        chunk = b"\0" * 65536
        with self.filler.open("wb", buffering=0) as handle:
            for size in (65536, 4096, 1):
                try:
                    while True:
                        handle.write(chunk[:size])
                except OSError as exc:
                    if exc.errno != errno.ENOSPC:
                        raise

    def empty(self) -> None:
        self.filler.unlink()

    def remount(self, option: str) -> None:
        subprocess.run(
            [
                "nsenter",
                "-t",
                str(self.daemon.process.pid),
                "-m",
                "mount",
                "-o",
                f"remount,{option}",
                str(self.mount),
            ],
            check=True,
            timeout=10,
        )

    def snapshot(self) -> dict[str, tuple[bytes, int]]:
        """Every file on the tmpfs but the filler: its bytes and mode."""
        root = self.outside(self.mount)
        files = {}
        for path in sorted(root.rglob("*")):
            if path.is_file() and path.name != "filler":
                files[str(path.relative_to(root))] = (
                    path.read_bytes(),
                    stat.S_IMODE(path.stat().st_mode),
                )
        return files


@pytest.fixture
def disk_daemon(
    tmp_path: Path, short_tmp: Path, cloud: CloudServer
) -> Iterator[Callable[..., tuple[Disk, str, str]]]:
    """`start(read_only=False)` -> (disk, town id, user id): a daemon of a cloud town whose
    town root and env file live on a fresh tmpfs."""
    problem = namespace_problem()
    if problem is not None:
        pytest.skip(f"needs root with CAP_SYS_ADMIN: {problem}")
    started: list[DaemonProcess] = []

    def start(read_only: bool = False) -> tuple[Disk, str, str]:
        town_json, _ = cloud.create_town(user_id="user-disk", name="disk")
        town_id = town_json["id"]
        # Ten minutes old: fresh to the daemon, yet unlike what a refresh now brings.
        token = cloud.mint("user-disk", town_id, now=int(time.time()) - 600)
        seed = tmp_path / "seed"
        for folder in ("town/settings", "town/r1/settings", "town/r2", "home"):
            (seed / folder).mkdir(parents=True)
        (seed / "town/settings/config.json").write_text(json.dumps(TOWN_FILE, indent=2) + "\n")
        (seed / "town/settings/config.json").chmod(0o640)
        (seed / "town/r1/settings/config.json").write_text(json.dumps(RIG_FILE, indent=2) + "\n")
        (seed / "home/.env.gateway").write_text(f"{ENV_OTHER}KILO_JWT={token}\n")
        (seed / "home/.env.gateway").chmod(0o600)
        mount = tmp_path / "disk"
        mount.mkdir()
        env = daemon_env(
            town_id=town_id,
            cloud_url=cloud.url,
            town_root=mount / "town",
            env_file=mount / "home" / ".env.gateway",
            socket=short_tmp / "disk.sock",
            key=cloud.internal_key,
        )
        log_path = tmp_path / "daemon.log"
        argv = ["unshare", "-m", "--propagation", "private", "sh", "-c", _WRAPPER, "sh"]
        argv += [str(mount), str(seed), DISK_SIZE, "ro" if read_only else ""]
        argv += [sys.executable, "-m", "gastown_sandboxd", "run"]
        with log_path.open("ab") as log:
            process = subprocess.Popen(argv, env=env, stdout=log, stderr=log)
        daemon = DaemonProcess(
            process=process,
            url="",
            socket=short_tmp / "disk.sock",
            key=cloud.internal_key,
            town_root=mount / "town",
            env_file=mount / "home" / ".env.gateway",
            log_path=log_path,
        )
        started.append(daemon)
        daemon.wait_for_log("daemon_ready", deadline=START_DEADLINE)
        daemon.url = next(
            record["address"]
            for record in daemon.logs()
            if record.get("event") == "api_listening"
            and str(record.get("address", "")).startswith("http")
        )
        return Disk(daemon, mount), town_id, "user-disk"

    yield start
    for daemon in started:
        daemon.stop()


def patch(client: httpx.Client, body: dict[str, Any]) -> httpx.Response:
    return client.patch("/config", json=body)


def assert_refused(answer: httpx.Response, cause: str) -> None:
    """503 `storage_unavailable` whose message names `cause`."""
    assert answer.status_code == 503, answer.text
    body = answer.json()
    assert body["error"] == "storage_unavailable"
    assert cause in body["message"], body


def temp_files(disk: Disk) -> list[str]:
    return [name for name in disk.snapshot() if name.endswith(".tmp")]


NEW_AGENT = {"agents": {"kilo": {"provider": "claude", "command": "claude"}}}
TOWN_PATCH = {"town": {"default_agent": "kilo", **NEW_AGENT}}
NEW_RIG_PATCH = {"rigs": {"r2": {"agent": "codex"}}}


def refuse_every_write(disk: Disk, cloud: CloudServer, town_id: str, user: str, cause: str) -> str:
    """PATCH, PUT /token and a forced refresh all answer 503 naming `cause`; nothing changes.

    Returns the token that was refused, for the recovery step.
    """
    before = disk.snapshot()
    pushed = cloud.mint(user, town_id, now=int(time.time()) - 300)
    with disk.daemon.tcp() as client:
        assert_refused(patch(client, TOWN_PATCH), cause)
        assert_refused(patch(client, NEW_RIG_PATCH), cause)
        assert_refused(client.put("/token", json={"token": pushed}), cause)
        refreshed = client.post("/token/refresh")
        assert refreshed.status_code == 503, refreshed.text
        assert cause in refreshed.json()["message"]
        assert client.get("/healthz").status_code == 200
        assert client.get("/config").status_code == 200
    assert disk.snapshot() == before
    assert temp_files(disk) == []
    assert not disk.outside(disk.mount / "town/r2/settings").exists()
    return pushed


def recover(disk: Disk, pushed: str) -> None:
    """Once the disk takes writes again, the same requests succeed and land on disk."""
    with disk.daemon.tcp() as client:
        answer = patch(client, TOWN_PATCH)
        assert answer.status_code == 200, answer.text
        assert answer.json()["files"] == ["settings/config.json"]
        assert patch(client, NEW_RIG_PATCH).status_code == 200
        assert client.put("/token", json={"token": pushed}).status_code == 200
        # A refresh retried in the background may land after the push: ask for one more and
        # check that its token is the one on disk.
        refreshed = client.post("/token/refresh")
        assert refreshed.status_code == 200, refreshed.text
        assert client.get("/readyz").status_code == 200
    town_file = disk.outside(disk.daemon.town_root / "settings/config.json")
    doc = json.loads(town_file.read_bytes())
    assert doc["default_agent"] == "kilo"
    assert doc["theme"] == "dark"
    assert stat.S_IMODE(town_file.stat().st_mode) == 0o640
    rig = json.loads(disk.outside(disk.daemon.town_root / "r2/settings/config.json").read_bytes())
    assert rig["agent"] == "codex"
    env_file = disk.outside(disk.daemon.env_file)
    token = read_env(env_file).get("KILO_JWT")
    assert token is not None
    assert fingerprint(token) == refreshed.json()["token"]["fingerprint"]
    assert env_file.read_text().startswith(ENV_OTHER)
    assert stat.S_IMODE(env_file.stat().st_mode) == 0o600


def test_a_full_disk_answers_503_enospc_and_recovers(
    disk_daemon: Callable[..., tuple[Disk, str, str]], cloud: CloudServer
) -> None:
    """With the tmpfs full, every write answers 503 naming ENOSPC and leaves every file as it
    was; once the filler is gone the same PATCH and token push succeed."""
    disk, town_id, user = disk_daemon()
    disk.fill()
    pushed = refuse_every_write(disk, cloud, town_id, user, "ENOSPC")
    disk.empty()
    recover(disk, pushed)
    assert "Traceback" not in disk.daemon.log_text()


def test_a_read_only_disk_answers_503_erofs_and_recovers(
    disk_daemon: Callable[..., tuple[Disk, str, str]], cloud: CloudServer
) -> None:
    """With the tmpfs remounted read-only, writes answer 503 naming EROFS, /readyz says the
    town root is not writable, files stay as they were; remounted rw, everything recovers."""
    disk, town_id, user = disk_daemon()
    disk.remount("ro")
    with disk.daemon.tcp() as client:
        ready = client.get("/readyz")
        assert ready.status_code == 503
        assert "town root is not a writable folder" in ready.json()["reasons"]
    pushed = refuse_every_write(disk, cloud, town_id, user, "EROFS")
    disk.remount("rw")
    recover(disk, pushed)
    assert "Traceback" not in disk.daemon.log_text()


def test_a_town_root_read_only_from_the_start_is_served_but_not_ready(
    disk_daemon: Callable[..., tuple[Disk, str, str]],
) -> None:
    """A daemon started on a read-only town root serves reads, is not ready, and refuses
    PATCHes with 503 EROFS instead of crashing."""
    disk, _, _ = disk_daemon(read_only=True)
    with disk.daemon.tcp() as client:
        assert client.get("/readyz").status_code == 503
        assert client.get("/config").json()["town"]["default_agent"] == "claude"
        assert_refused(patch(client, TOWN_PATCH), "EROFS")
        assert client.get("/healthz").status_code == 200
    assert disk.daemon.process.poll() is None


def run_daemon(tmp_path: Path, town_root: Path, *prefix: str) -> subprocess.CompletedProcess[str]:
    env_file = tmp_path / "home" / ".env.gateway"
    env_file.parent.mkdir(parents=True, exist_ok=True)
    env = daemon_env(
        town_id="town-disk",
        cloud_url="http://127.0.0.1:9",
        town_root=town_root,
        env_file=env_file,
        socket=tmp_path / "d.sock",
    )
    return subprocess.run(
        [*prefix, sys.executable, "-m", "gastown_sandboxd", "run"],
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )


@pytest.mark.parametrize("case", ["missing", "a file", "behind a closed folder", "unreadable"])
def test_a_town_root_that_cannot_be_used_stops_start_up_with_one_line(
    tmp_path: Path, case: str
) -> None:
    """A missing, non-folder, unreachable or unreadable town root: exit 2 and one stderr line
    naming GT_TOWN_ROOT, nothing else started."""
    prefix: tuple[str, ...] = ()
    closed = tmp_path / "closed"
    town_root = {
        "missing": tmp_path / "no-town",
        "a file": tmp_path / "file",
        "behind a closed folder": closed / "town",
        "unreadable": closed,
    }[case]
    (tmp_path / "file").write_text("not a folder\n")
    (closed / "town").mkdir(parents=True)
    if case in {"behind a closed folder", "unreadable"}:
        closed.chmod(0)
        if os.geteuid() == 0:
            if shutil.which("setpriv") is None:
                pytest.skip("running as root without setpriv: root reads any folder")
            # Root without its power to ignore file modes.
            prefix = ("setpriv", "--inh-caps=-all", "--bounding-set=-all")
    try:
        done = run_daemon(tmp_path, town_root, *prefix)
    finally:
        closed.chmod(0o755)
    print(f"{case}: {done.stderr.strip()}")
    assert done.returncode == 2, done.stderr
    lines = done.stderr.splitlines()
    assert len(lines) == 1, done.stderr
    assert "GT_TOWN_ROOT" in lines[0]
    assert str(town_root) in lines[0]
    assert done.stdout == ""
    assert not (tmp_path / "d.sock").exists()
