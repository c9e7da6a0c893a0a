"""The daemon as a process: start-up, idle memory and CPU, and the refresh round trip.

Real processes on 127.0.0.1: the cloud (`gastown-cloud serve`) and `gastown-sandboxd run`.

- start-up: from `Popen` to the `daemon_ready` log line (its own timestamp) and to the first
  200 from `/healthz`, median of N starts; baseline: the interpreter importing the daemon.
- idle: VmRSS from /proc/PID/status after start and after an idle window; CPU from
  /proc/PID/stat (utime + stime) over that window (60 s, 10 s with `--quick`), opened `SETTLE`
  after ready.
- refresh: `POST /token/refresh` over the socket (daemon → cloud → env file), p50/p95/p99;
  baseline in the same run: `CloudClient.refresh` called directly, with no daemon.
- push: `PUT /token` over TCP with a new token each time (check, atomic write with fsync).
- short connections: N `GET /healthz` on the socket, each on a connection of its own that
  the client closes after its answer (32 at a time, as the CLI, shims and the cloud's
  pushes connect): the sockets of the run still open 0.2 s after the last, and RSS after them;
  baseline: RSS before them. Before `_hypercorn.py`, each stayed open for the 5 s keep-alive.

`python -m bench.daemon_bench [--quick]`; `run(quick)` gives the rows to `python -m bench`.
"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from contextlib import AbstractContextManager
from datetime import datetime
from pathlib import Path
from typing import Any

import anyio
import httpx
from tests.fixtures.cloud import CloudServer
from tests.fixtures.daemon import make_town
from tests.fixtures.net import unused_port

from gastown_sandboxd.token.cloud import CloudClient

from ._daemon import ONE_CONNECTION_EACH, Daemon, running_cloud, running_daemon, uds_client
from ._stats import cpu_seconds, percentile, rss_kib
from ._table import Row, main_of

SETTLE = 1.0  # seconds from ready to the idle window, as idle_bench waits


def _daemon(
    workdir: Path, cloud: CloudServer, town_id: str, token: str, name: str, *, wait: bool
) -> AbstractContextManager[Daemon]:
    """A daemon of this cloud whose env file holds `token`, on a port chosen here so its URL
    is known at once (`wait=False` yields it right after Popen)."""
    home = workdir / name
    return running_daemon(
        home, make_town(home / "town"), town_id=town_id, token=token, cloud_url=cloud.url,
        key=cloud.internal_key, listen=f"127.0.0.1:{unused_port()}", wait=wait,
    )  # fmt: skip


def _await_start(daemon: Daemon, client: httpx.Client) -> tuple[float, float]:
    """Seconds from Popen to `daemon_ready` (by its log timestamp) and to the first 200."""
    healthy: float | None = None
    ready: dict[str, Any] | None = None
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
            ready = next((r for r in daemon.records() if r.get("event") == "daemon_ready"), None)
        time.sleep(0.002)
    stamp = datetime.fromisoformat(str(ready["timestamp"]).replace("Z", "+00:00")).timestamp()
    return stamp - daemon.started_wall, healthy


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


def run(quick: bool) -> list[Row]:
    """Measure everything; `quick` shortens the idle window to 10 s and takes fewer samples."""
    starts, idle, calls = (5, 10.0, 100) if quick else (15, 60.0, 200)
    connections = 500 if quick else 4000
    with tempfile.TemporaryDirectory(prefix="daemon-bench-", ignore_cleanup_errors=True) as tmp:
        workdir = Path(tmp)
        with running_cloud(workdir / "cloud-home") as cloud, httpx.Client(timeout=5) as http:
            town, token = cloud.create_town(user_id="bench", organization_id="org-bench")
            rows = _startup_rows(workdir, cloud, town["id"], token, http, starts)
            with _daemon(workdir, cloud, town["id"], token, "idle", wait=True) as daemon:
                rows += _idle_rows(daemon.pid, idle)
                rows += _refresh_rows(daemon, cloud, town["id"], token, calls)
                rows += _push_rows(daemon, cloud, town["id"], calls)
                rows += _connection_rows(daemon, connections)
    return rows


def _startup_rows(
    workdir: Path, cloud: CloudServer, town_id: str, token: str, http: httpx.Client, starts: int
) -> list[Row]:
    ready_ms, healthy_ms = [], []
    for index in range(starts):
        with _daemon(workdir, cloud, town_id, token, f"start-{index}", wait=False) as daemon:
            ready, healthy = _await_start(daemon, http)
        ready_ms.append(ready * 1000)
        healthy_ms.append(healthy * 1000)
    baseline = _import_baseline_ms(starts)
    note = f"median of {starts}; baseline: a python that imports the daemon's modules"
    return [
        Row("start-up to daemon_ready", statistics.median(ready_ms), "ms", baseline, note),
        Row("start-up to first /healthz 200", statistics.median(healthy_ms), "ms", baseline),
    ]


def _idle_rows(pid: int, idle: float) -> list[Row]:
    rss_start = rss_kib(pid) / 1024
    # Past start-up's tail first (the first sync with the cloud, the shims): ~30 ms of CPU in
    # the half second after ready, which a window opened at ready counted as idle.
    time.sleep(SETTLE)
    cpu_start = cpu_seconds(pid)
    time.sleep(idle)
    rss_idle, cpu_used = rss_kib(pid) / 1024, cpu_seconds(pid) - cpu_start
    return [
        Row("RSS after start", rss_start, "MiB", note="VmRSS once ready"),
        Row(f"RSS after {idle:.0f} s idle", rss_idle, "MiB"),
        Row(f"CPU over {idle:.0f} s idle", cpu_used / idle * 100, "% of a core",
            note=f"utime+stime {cpu_used * 1000:.0f} ms, from {SETTLE:.0f} s after ready"),
    ]  # fmt: skip


def _refresh_rows(
    daemon: Daemon, cloud: CloudServer, town_id: str, token: str, calls: int
) -> list[Row]:
    transport = httpx.HTTPTransport(uds=str(daemon.socket))
    with httpx.Client(transport=transport, base_url="http://d", timeout=15) as local:
        local.post("/token/refresh").raise_for_status()  # warm up

        def forced() -> None:
            local.post("/token/refresh").raise_for_status()

        via_daemon = _timed(calls, forced)
    direct = anyio.run(_direct_refreshes, cloud, town_id, token, calls)
    notes = {
        50: f"{calls} POST /token/refresh on the socket",
        95: "baseline: CloudClient.refresh with no daemon",
        99: "tokens of one second are equal: most calls write nothing",
    }
    return [
        Row(f"refresh round trip p{p}", percentile(via_daemon, p), "ms", percentile(direct, p),
            notes[p])
        for p in (50, 95, 99)
    ]  # fmt: skip


def _push_rows(daemon: Daemon, cloud: CloudServer, town_id: str, calls: int) -> list[Row]:
    base = int(time.time()) - 600
    pushes = iter([cloud.mint("bench", town_id, "org-bench", now=base - k) for k in range(calls)])
    headers = {"x-internal-api-key": cloud.internal_key}
    with httpx.Client(base_url=daemon.url, headers=headers, timeout=15) as tcp:

        def push() -> None:
            tcp.put("/token", json={"token": next(pushes)}).raise_for_status()

        pushed = _timed(calls, push)
    p50, p95, p99 = (percentile(pushed, p) for p in (50, 95, 99))
    return [
        Row("push p50", p50, "ms", note=f"{calls} PUT /token over TCP, each a new token"),
        Row("push p95", p95, "ms", note="checked, then written atomically with fsync"),
        Row("push p99", p99, "ms"),
    ]


async def _short_connections(daemon: Daemon, count: int, at_once: int) -> None:
    async with uds_client(daemon.socket, timeout=15, limits=ONE_CONNECTION_EACH) as local:
        gate = anyio.Semaphore(at_once)

        async def one() -> None:
            async with gate:
                (await local.get("/healthz")).raise_for_status()

        async with anyio.create_task_group() as group:
            for _ in range(count):
                group.start_soon(one)


def _sockets(pid: int) -> set[str]:
    """The sockets a process holds open now, by inode (`socket:[N]`)."""
    descriptors = Path(f"/proc/{pid}/fd")
    held = set()
    for name in os.listdir(descriptors):
        try:
            target = os.readlink(descriptors / name)
        except OSError:  # closed meanwhile
            continue
        if target.startswith("socket:"):
            held.add(target)
    return held


def _connection_rows(daemon: Daemon, count: int) -> list[Row]:
    # Sockets new since before the run: a connection of an earlier row closing meanwhile (at
    # the end of its keep-alive) is not counted against this one.
    before, rss_before = _sockets(daemon.pid), rss_kib(daemon.pid) / 1024
    anyio.run(_short_connections, daemon, count, 32)
    time.sleep(0.2)
    still_open = len(_sockets(daemon.pid) - before)
    rss_after = rss_kib(daemon.pid) / 1024
    note = f"{count} GET /healthz, a connection each, 32 at a time"
    return [
        Row("connections still open 0.2 s after their close", still_open, "", note=note),
        Row(f"RSS after {count} short connections", rss_after, "MiB", rss_before,
            "baseline: RSS before them"),
    ]  # fmt: skip


if __name__ == "__main__":
    quick = "10 s idle window, fewer samples"
    raise SystemExit(main_of(run, name="daemon_bench", doc=__doc__, quick=quick, title="daemon"))
