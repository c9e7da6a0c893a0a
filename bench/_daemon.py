"""A real `gastown-sandboxd run` subprocess for the benches: started, ready, stopped, cleaned.

`running_daemon(home, town_root, town_id=…)` writes a token (a fresh 24 h one unless given)
into `home/.env.gateway`, starts the daemon with info logs as JSON in `home/daemon.log` and its
socket in a short folder of its own, waits for `daemon_ready`, reads the TCP URL from
`api_listening`, and yields a `Daemon`. On exit it terminates the daemon (kill after 10 s) and
removes the socket folder; `home` and `town_root` are the caller's.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import httpx
from tests.daemon.minting import mint
from tests.fixtures.cloud import CloudServer, launch_cloud
from tests.fixtures.daemon import DAEMON_KEY, client_limits, daemon_env
from tests.fixtures.net import LocalCA, tls

# A port nothing listens on: a daemon holding a fresh token does not refresh, but its sync of
# the desired configuration retries there (after 5, 10, 20 … s; idle_bench uses a real cloud).
NO_CLOUD = "http://127.0.0.1:9"
READY_DEADLINE = 30.0
STOP_DEADLINE = 10.0


@dataclass(frozen=True)
class Daemon:
    """A started daemon: its process, TCP URL and key, socket, town root and log file."""

    process: subprocess.Popen[bytes]
    url: str
    key: str
    socket: Path
    town_root: Path
    log: Path
    started: float  # time.perf_counter() just before Popen
    started_wall: float  # time.time() just before Popen

    @property
    def pid(self) -> int:
        return self.process.pid

    def records(self) -> list[dict[str, Any]]:
        """The JSON log records written so far (other lines skipped)."""
        records = []
        for line in self.log.read_text(errors="replace").splitlines():
            try:
                record = json.loads(line)
            except ValueError:
                continue
            if isinstance(record, dict):
                records.append(record)
        return records


@contextmanager
def running_daemon(
    home: Path,
    town_root: Path,
    *,
    town_id: str,
    token: str | None = None,
    cloud_url: str = NO_CLOUD,
    key: str = DAEMON_KEY,
    listen: str = "127.0.0.1:0",
    wait: bool = True,
    config: Path | None = None,
    env: dict[str, str] | None = None,
    prefix: Sequence[str] = (),
) -> Iterator[Daemon]:
    """A daemon serving `town_root`; `wait=False` yields right after Popen, when `url` is
    `http://{listen}` (right only if `listen` names a port); `config`: a TOML file (--config);
    `env` adds to its environment; `prefix` goes before its argv (`_callgrind.prefix`)."""
    home.mkdir(parents=True, exist_ok=True)
    env_file = home / ".env.gateway"
    env_file.write_text(f"KILO_JWT={token or mint(time.time(), town_id=town_id)}\n")
    env_file.chmod(0o600)
    socket_dir = Path(tempfile.mkdtemp(prefix="gsd-bench-"))
    try:
        env = daemon_env(
            town_id=town_id,
            cloud_url=cloud_url,
            town_root=town_root,
            env_file=env_file,
            socket=socket_dir / "d.sock",
            key=key,
            extra={"GASTOWN_SANDBOXD_LISTEN": listen, "GASTOWN_SANDBOXD_LOG_LEVEL": "info"}
            | (env or {}),
        )
        log = home / "daemon.log"
        argv = [*prefix, sys.executable, "-m", "gastown_sandboxd", "run"]
        if config is not None:
            argv += ["--config", str(config)]
        with log.open("wb") as sink:
            started_wall, started = time.time(), time.perf_counter()
            process = subprocess.Popen(argv, env=env, stdout=sink, stderr=sink)
        daemon = Daemon(
            process, f"http://{listen}", key, socket_dir / "d.sock", town_root, log,
            started, started_wall,
        )  # fmt: skip
        try:
            yield _ready(daemon) if wait else daemon
        finally:
            stop_process(process)
    finally:
        shutil.rmtree(socket_dir, ignore_errors=True)


def _ready(daemon: Daemon) -> Daemon:
    """`daemon` with the URL of its `api_listening` line, once `daemon_ready` is logged."""
    deadline = time.monotonic() + READY_DEADLINE
    while time.monotonic() < deadline and daemon.process.poll() is None:
        records = daemon.records()
        if any(record.get("event") == "daemon_ready" for record in records):
            for record in records:
                address = str(record.get("address", ""))
                if record.get("event") == "api_listening" and address.startswith("http"):
                    return replace(daemon, url=address)
        time.sleep(0.01)
    tail = daemon.log.read_text(errors="replace")[-3000:]
    raise RuntimeError(f"the daemon did not start:\n{tail}")


def stop_process(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(STOP_DEADLINE)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


# Each request on a connection of its own, closed after its answer (as the cloud pushes).
ONE_CONNECTION_EACH = httpx.Limits(max_connections=None, max_keepalive_connections=0)


def uds_client(
    socket: Path, *, timeout: float | httpx.Timeout, limits: httpx.Limits | None = None
) -> httpx.AsyncClient:
    """An async client of a daemon's local socket (no key); no connection limit unless given,
    idle connections kept for half the daemon's keep-alive time (`client_limits`).
    No TLS on a Unix socket, so no CA bundle: loading one took ~25 ms of the bench's CPU per
    client, which the first PATCHes of a many-client round used to wait for."""
    transport = httpx.AsyncHTTPTransport(
        uds=str(socket), limits=limits or client_limits(), verify=False
    )
    return httpx.AsyncClient(transport=transport, base_url="http://sandboxd", timeout=timeout)


def tcp_client(
    url: str, key: str, *, timeout: float | httpx.Timeout, limits: httpx.Limits | None = None
) -> httpx.AsyncClient:
    """An async client of a daemon's TCP listener, sending `key`; no connection limit unless
    given, idle connections kept as `uds_client` keeps them.
    It shares the tests' one TLS context (`tests/fixtures/net.py`)."""
    headers = {"x-internal-api-key": key}
    return httpx.AsyncClient(
        base_url=url, headers=headers, limits=limits or client_limits(), timeout=timeout,
        verify=tls(),
    )  # fmt: skip


@contextmanager
def running_cloud(folder: Path, *, tls: LocalCA | None = None, **env: str) -> Iterator[CloudServer]:
    """A real `gastown-cloud serve` (24 h tokens) with its database in `folder`, stopped after;
    over HTTPS with `tls`'s certificate; `env` adds to its environment."""
    folder.mkdir(parents=True, exist_ok=True)
    server = launch_cloud(folder, token_lifetime=86400, tls=tls, **env)
    try:
        yield server
    finally:
        server.stop()
