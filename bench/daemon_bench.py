"""The daemon as a process: start-up, idle memory and CPU, and the refresh round trip.

Real processes on 127.0.0.1: the cloud (`gastown-cloud serve`) and `gastown-sandboxd run`.

- start-up: from `Popen` to the `daemon_ready` log line (its own timestamp) and to the first
  200 from `/healthz`, median of N starts; baseline: the interpreter importing the daemon.
- idle: VmRSS from /proc/PID/status after start and after an idle window; CPU from
  /proc/PID/stat (utime + stime) over that window (60 s, 10 s with `--quick`).
- refresh: `POST /token/refresh` over the socket (daemon → cloud → env file), p50/p95/p99;
  baseline in the same run: `CloudClient.refresh` called directly, with no daemon.
- push: `PUT /token` over TCP with a new token each time (check, atomic write with fsync).

`python -m bench.daemon_bench [--quick]`; `run(quick)` gives the rows to `python -m bench`.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import anyio
import httpx
from tests.fixtures.cloud import CloudServer, launch_cloud
from tests.fixtures.daemon import daemon_env, make_town

from gastown_sandboxd.cloud_client import CloudClient

from ._table import Row, print_table

DAEMON_KEY = "bench-daemon-key-0123456789abcdef"


@dataclass
class _Daemon:
    process: subprocess.Popen[bytes]
    url: str
    socket: Path
    log: Path
    started_wall: float
    started: float


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
    return port


def _launch(workdir: Path, cloud: CloudServer, town_id: str, token: str, name: str) -> _Daemon:
    """Start a daemon whose env file holds `token`; returns at once (not yet ready)."""
    home = workdir / name
    home.mkdir()
    env_file = home / ".env.gateway"
    env_file.write_text(f"KILO_JWT={token}\n")
    env_file.chmod(0o600)
    port = _free_port()
    socket_path = Path(tempfile.mkdtemp(prefix="gsd-b-")) / "d.sock"
    env = daemon_env(
        town_id=town_id,
        cloud_url=cloud.url,
        town_root=make_town(home / "town"),
        env_file=env_file,
        socket=socket_path,
        key=cloud.internal_key,
        extra={
            "GASTOWN_SANDBOXD_LISTEN": f"127.0.0.1:{port}",
            "GASTOWN_SANDBOXD_LOG_LEVEL": "info",
        },
    )
    log = home / "daemon.log"
    argv = [sys.executable, "-m", "gastown_sandboxd", "run"]
    with log.open("wb") as sink:
        started_wall, started = time.time(), time.perf_counter()
        process = subprocess.Popen(argv, env=env, stdout=sink, stderr=sink)
    return _Daemon(process, f"http://127.0.0.1:{port}", socket_path, log, started_wall, started)


def _ready_record(daemon: _Daemon) -> dict[str, object] | None:
    for line in daemon.log.read_text(errors="replace").splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if record.get("event") == "daemon_ready":
            return dict(record)
    return None


def _await_start(daemon: _Daemon, client: httpx.Client) -> tuple[float, float]:
    """Seconds from Popen to `daemon_ready` (by its log timestamp) and to the first 200."""
    healthy: float | None = None
    ready: dict[str, object] | None = None
    deadline = time.perf_counter() + 30
    while healthy is None or ready is None:
        if time.perf_counter() > deadline or daemon.process.poll() is not None:
            raise RuntimeError(f"the daemon did not start: {daemon.log.read_text()[-2000:]}")
        if healthy is None:
            try:
                if client.get(f"{daemon.url}/healthz").status_code == 200:
                    healthy = time.perf_counter() - daemon.started
            except httpx.TransportError:
                pass
        if ready is None:
            ready = _ready_record(daemon)
        time.sleep(0.002)
    stamp = datetime.fromisoformat(str(ready["timestamp"]).replace("Z", "+00:00")).timestamp()
    return stamp - daemon.started_wall, healthy


def _stop(daemon: _Daemon) -> None:
    if daemon.process.poll() is None:
        daemon.process.terminate()
        try:
            daemon.process.wait(10)
        except subprocess.TimeoutExpired:
            daemon.process.kill()
            daemon.process.wait()
    shutil.rmtree(daemon.socket.parent, ignore_errors=True)


def _vm_rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


def _cpu_seconds(pid: int) -> float:
    # Fields after the command name (which may hold spaces): utime and stime are 14 and 15.
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _percentiles(samples: list[float]) -> tuple[float, float, float]:
    cuts = statistics.quantiles(samples, n=100, method="inclusive")
    return cuts[49], cuts[94], cuts[98]


def _timed(calls: int, call: Callable[[], object]) -> list[float]:
    """Milliseconds per call."""
    times = []
    for _ in range(calls):
        started = time.perf_counter()
        call()
        times.append((time.perf_counter() - started) * 1000)
    return times


def _import_baseline_ms(repeats: int) -> float:
    """Median ms from Popen to a child that has imported the daemon's modules and said so."""
    code = "import gastown_sandboxd.daemon, gastown_sandboxd.cli; print('ok', flush=True)"
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        with subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE) as child:
            assert child.stdout is not None
            child.stdout.readline()
            times.append((time.perf_counter() - started) * 1000)
    return statistics.median(times)


async def _direct_refreshes(
    cloud: CloudServer, town_id: str, token: str, calls: int
) -> list[float]:
    """Milliseconds per `CloudClient.refresh` with no daemon in between."""
    times = []
    async with CloudClient(
        base_url=cloud.url, internal_key=cloud.internal_key, town_id=town_id
    ) as client:
        for _ in range(calls):
            started = time.perf_counter()
            token = await client.refresh(token)
            times.append((time.perf_counter() - started) * 1000)
    return times


@contextmanager
def _cloud(workdir: Path) -> Iterator[CloudServer]:
    server = launch_cloud(workdir / "cloud-home", token_lifetime=86400)
    try:
        yield server
    finally:
        server.stop()


def run(quick: bool) -> list[Row]:
    """Measure everything; `quick` shortens the idle window to 10 s and takes fewer samples."""
    starts, idle, calls = (5, 10.0, 100) if quick else (15, 60.0, 200)
    workdir = Path(tempfile.mkdtemp(prefix="daemon-bench-"))
    (workdir / "cloud-home").mkdir()
    try:
        with _cloud(workdir) as cloud, httpx.Client(timeout=5) as http:
            town, token = cloud.create_town(user_id="bench", organization_id="org-bench")
            rows = _startup_rows(workdir, cloud, town["id"], token, http, starts)
            daemon = _launch(workdir, cloud, town["id"], token, "idle")
            try:
                _await_start(daemon, http)
                rows += _idle_rows(daemon.process.pid, idle)
                rows += _refresh_rows(daemon, cloud, town["id"], token, calls)
                rows += _push_rows(daemon, cloud, town["id"], calls)
            finally:
                _stop(daemon)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    return rows


def _startup_rows(
    workdir: Path, cloud: CloudServer, town_id: str, token: str, http: httpx.Client, starts: int
) -> list[Row]:
    ready_ms, healthy_ms = [], []
    for index in range(starts):
        daemon = _launch(workdir, cloud, town_id, token, f"start-{index}")
        try:
            ready, healthy = _await_start(daemon, http)
        finally:
            _stop(daemon)
        ready_ms.append(ready * 1000)
        healthy_ms.append(healthy * 1000)
    baseline = _import_baseline_ms(starts)
    note = f"median of {starts}; baseline: a python that imports the daemon's modules"
    return [
        Row("start-up to daemon_ready", statistics.median(ready_ms), "ms", baseline, note),
        Row("start-up to first /healthz 200", statistics.median(healthy_ms), "ms", baseline),
    ]


def _idle_rows(pid: int, idle: float) -> list[Row]:
    rss_start, cpu_start = _vm_rss_mib(pid), _cpu_seconds(pid)
    time.sleep(idle)
    rss_idle, cpu_used = _vm_rss_mib(pid), _cpu_seconds(pid) - cpu_start
    return [
        Row("RSS after start", rss_start, "MiB", note="VmRSS once ready"),
        Row(f"RSS after {idle:.0f} s idle", rss_idle, "MiB"),
        Row(f"CPU over {idle:.0f} s idle", cpu_used / idle * 100, "% of a core",
            note=f"utime+stime {cpu_used * 1000:.0f} ms"),
    ]  # fmt: skip


def _refresh_rows(
    daemon: _Daemon, cloud: CloudServer, town_id: str, token: str, calls: int
) -> list[Row]:
    transport = httpx.HTTPTransport(uds=str(daemon.socket))
    with httpx.Client(transport=transport, base_url="http://d", timeout=15) as local:
        local.post("/token/refresh").raise_for_status()  # warm up

        def forced() -> None:
            local.post("/token/refresh").raise_for_status()

        via_daemon = _timed(calls, forced)
    direct = anyio.run(_direct_refreshes, cloud, town_id, token, calls)
    notes = {
        "p50": f"{calls} POST /token/refresh on the socket",
        "p95": "baseline: CloudClient.refresh with no daemon",
        "p99": "tokens of one second are equal: most calls write nothing",
    }
    return [
        Row(f"refresh round trip {label}", ours, "ms", theirs, notes[label])
        for label, ours, theirs in zip(
            ("p50", "p95", "p99"), _percentiles(via_daemon), _percentiles(direct), strict=True
        )
    ]


def _push_rows(daemon: _Daemon, cloud: CloudServer, town_id: str, calls: int) -> list[Row]:
    base = int(time.time()) - 600
    pushes = iter([cloud.mint("bench", town_id, "org-bench", now=base - k) for k in range(calls)])
    headers = {"x-internal-api-key": cloud.internal_key}
    with httpx.Client(base_url=daemon.url, headers=headers, timeout=15) as tcp:

        def push() -> None:
            tcp.put("/token", json={"token": next(pushes)}).raise_for_status()

        pushed = _timed(calls, push)
    p50, p95, p99 = _percentiles(pushed)
    return [
        Row("push p50", p50, "ms", note=f"{calls} PUT /token over TCP, each a new token"),
        Row("push p95", p95, "ms", note="checked, then written atomically with fsync"),
        Row("push p99", p99, "ms"),
    ]


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.daemon_bench", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="10 s idle window, fewer samples")
    args = parser.parse_args()
    print_table(run(quick=args.quick), title="daemon")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
