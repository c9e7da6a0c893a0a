"""Security suites against the real daemon, and the few helpers they share."""

from __future__ import annotations

import contextlib
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping
from pathlib import Path

from tests.daemon.minting import mint
from tests.fixtures.daemon import (
    DAEMON_KEY,
    START_DEADLINE,
    DaemonFactory,
    DaemonProcess,
    daemon_env,
    make_town,
)
from tests.fixtures.net import unused_port

TOWN = "town-sec"


def local_daemon(
    daemon_factory: DaemonFactory,
    tmp_path: Path,
    *,
    rigs: tuple[str, ...] = (),
    token: str | None = None,
    extra_env: Mapping[str, str] | None = None,
) -> DaemonProcess:
    """A daemon of TOWN with a fresh token on disk; its cloud is a closed port."""
    env_file = tmp_path / "home" / ".env.gateway"
    env_file.parent.mkdir(parents=True, exist_ok=True)
    env_file.write_text(f"KILO_JWT={token or mint(time.time(), town_id=TOWN)}\n")
    env_file.chmod(0o600)
    return daemon_factory(
        town_id=TOWN,
        cloud_url=f"http://127.0.0.1:{unused_port()}",
        town_root=make_town(tmp_path / "town", rigs),
        env_file=env_file,
        extra_env=extra_env,
    )


def api_url(daemon: DaemonProcess) -> str:
    """The TCP listener's URL, from the daemon's `api_listening` log line."""
    for record in daemon.logs():
        address = str(record.get("address", ""))
        if record.get("event") == "api_listening" and address.startswith("http"):
            return address
    raise AssertionError(f"no TCP listener in the log:\n{daemon.log_text()[-2000:]}")


@contextlib.contextmanager
def shared_daemon(
    workdir: Path,
    *,
    rigs: tuple[str, ...] = (),
    extra_env: Mapping[str, str] | None = None,
) -> Iterator[DaemonProcess]:
    """Like `local_daemon`, for a module-scoped fixture (daemon_factory is per test)."""
    sockets = Path(tempfile.mkdtemp(prefix="gss-"))
    town = make_town(workdir / "town", rigs)
    env_file = workdir / "home" / ".env.gateway"
    env_file.parent.mkdir(parents=True, exist_ok=True)
    env_file.write_text(f"KILO_JWT={mint(time.time(), town_id=TOWN)}\n")
    env_file.chmod(0o600)
    env = daemon_env(
        town_id=TOWN,
        cloud_url=f"http://127.0.0.1:{unused_port()}",
        town_root=town,
        env_file=env_file,
        socket=sockets / "d.sock",
        extra=extra_env,
    )
    log_path = workdir / "daemon.log"
    with log_path.open("ab") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "gastown_sandboxd", "run"], env=env, stdout=log, stderr=log
        )
    daemon = DaemonProcess(
        process=process,
        url="",
        socket=sockets / "d.sock",
        key=DAEMON_KEY,
        town_root=town,
        env_file=env_file,
        log_path=log_path,
    )
    try:
        daemon.wait_for_log("daemon_ready", deadline=START_DEADLINE)
        daemon.url = api_url(daemon)
        yield daemon
    finally:
        daemon.stop()
        shutil.rmtree(sockets, ignore_errors=True)
