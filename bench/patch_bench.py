"""PATCH /config under load: latency and throughput at 1, 8 and 32 concurrent clients.

A real `gastown-sandboxd run` serves a realistic gt town (gt's town file, two rigs). Every
PATCH sets one crew member's agent to the other of two presets, so each one changes the town
file and is written (atomically, with fsync of file and folder) and announced as an event.
Clients are httpx.AsyncClient on the local socket, each sending its PATCHes one after another.

Baselines measured in the same run, on the same file system:
- `write_atomic` of the same bytes the daemon wrote (the two versions of the town file in
  turn), directly in this process: the floor that any PATCH pays;
- `SettingsStore.patch` in this process with no HTTP: read, validate, merge, render, write.

PATCHes are serialised by the daemon, so more clients add queueing, not throughput.
`python -m bench.patch_bench [--quick]`; `run(quick)` gives the rows to `python -m bench`.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
import httpx
from tests.daemon.gt_samples import build_town
from tests.daemon.minting import mint
from tests.fixtures.daemon import daemon_env

from gastown_sandboxd.atomic import write_atomic
from gastown_sandboxd.settings_store import SettingsStore

from ._table import Row, print_table

TOWN_ID = "town-bench"
LEVELS = (1, 8, 32)
PRESETS = ("claude", "codex")
TOWN_FILE = Path("settings") / "config.json"


@dataclass(frozen=True)
class Daemon:
    """A daemon process serving `town_root` on the Unix socket `socket`."""

    process: subprocess.Popen[bytes]
    socket: Path
    town_root: Path
    log: Path


@dataclass(frozen=True)
class Sample:
    """Latencies in ms of one run, its wall time and the daemon's CPU time in seconds."""

    latencies: list[float]
    wall: float
    cpu: float = 0.0

    @property
    def rate(self) -> float:
        return len(self.latencies) / self.wall


@contextmanager
def running_daemon(workdir: Path) -> Iterator[Daemon]:
    """A daemon on a fresh gt town in `workdir`, holding a valid token; stopped on exit."""
    town_root = build_town(workdir / "town", rigs=("backend", "frontend"))
    env_file = workdir / ".env.gateway"
    env_file.write_text(f"KILO_JWT={mint(time.time(), town_id=TOWN_ID)}\n")
    socket_dir = Path(tempfile.mkdtemp(prefix="gsd-p-"))
    env = daemon_env(
        town_id=TOWN_ID,
        cloud_url="http://127.0.0.1:9",  # never called: the token is fresh
        town_root=town_root,
        env_file=env_file,
        socket=socket_dir / "d.sock",
        extra={"GASTOWN_SANDBOXD_LOG_LEVEL": "info"},
    )
    log = workdir / "daemon.log"
    with log.open("wb") as sink:
        process = subprocess.Popen(
            [sys.executable, "-m", "gastown_sandboxd", "run"], env=env, stdout=sink, stderr=sink
        )
    daemon = Daemon(process, socket_dir / "d.sock", town_root, log)
    try:
        _await_ready(daemon)
        yield daemon
    finally:
        process.terminate()
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        shutil.rmtree(socket_dir, ignore_errors=True)


def _await_ready(daemon: Daemon) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and daemon.process.poll() is None:
        for line in daemon.log.read_text(errors="replace").splitlines():
            if '"daemon_ready"' in line:
                return
        time.sleep(0.01)
    raise RuntimeError(f"the daemon did not start: {daemon.log.read_text()[-2000:]}")


def _body(client: int, n: int) -> dict[str, Any]:
    # Each PATCH flips this client's crew member to the other preset: always a real write.
    return {"town": {"crew_agents": {f"bench{client}": PRESETS[n % 2]}}}


async def patch_round(daemon: Daemon, clients: int, per_client: int, offset: int) -> Sample:
    """`clients` concurrent clients each sending `per_client` PATCHes; every one must apply."""
    latencies: list[float] = []

    async def client(index: int) -> None:
        transport = httpx.AsyncHTTPTransport(uds=str(daemon.socket))
        async with httpx.AsyncClient(
            transport=transport, base_url="http://sandboxd", timeout=120
        ) as http:
            for n in range(offset, offset + per_client):
                started = time.perf_counter()
                answer = await http.patch("/config", json=_body(index, n))
                latencies.append((time.perf_counter() - started) * 1000)
                if answer.status_code != 200 or not answer.json()["changed"]:
                    raise RuntimeError(f"PATCH answered {answer.status_code}: {answer.text}")

    cpu, started = cpu_seconds(daemon.process.pid), time.perf_counter()
    async with anyio.create_task_group() as tg:
        for index in range(clients):
            tg.start_soon(client, index)
    wall = time.perf_counter() - started
    return Sample(latencies, wall, cpu_seconds(daemon.process.pid) - cpu)


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process, from /proc (fields 14 and 15, after the command name)."""
    with open(f"/proc/{pid}/stat") as stat:
        fields = stat.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def direct_writes(path: Path, versions: tuple[bytes, bytes], count: int) -> Sample:
    """`write_atomic` of the two versions in turn, in this process."""
    latencies = []
    started = time.perf_counter()
    for n in range(count):
        begin = time.perf_counter()
        write_atomic(path, versions[n % 2])
        latencies.append((time.perf_counter() - begin) * 1000)
    return Sample(latencies, time.perf_counter() - started)


async def store_patches(town_root: Path, count: int) -> Sample:
    """`SettingsStore.patch` of the same bodies, in this process, without HTTP."""

    def ignore(kind: str, fields: Mapping[str, Any]) -> None:
        return None

    store = SettingsStore(town_root=town_root, emit=ignore)
    await store.load()
    latencies = []
    started = time.perf_counter()
    for n in range(count):
        begin = time.perf_counter()
        result = await store.patch(_body(0, n))
        latencies.append((time.perf_counter() - begin) * 1000)
        if not result.changed:
            raise RuntimeError("the in-process PATCH changed nothing")
    return Sample(latencies, time.perf_counter() - started)


def percentile(samples: list[float], percent: int) -> float:
    return statistics.quantiles(samples, n=100, method="inclusive")[percent - 1]


def run(quick: bool) -> list[Row]:
    """Measure every level and both baselines; `quick` takes fewer PATCHes per level."""
    total = 256 if quick else 1024
    workdir = Path(tempfile.mkdtemp(prefix="patch-bench-"))
    try:
        with running_daemon(workdir / "daemon") as daemon:
            anyio.run(patch_round, daemon, 1, 20, 0)  # warm-up: imports, caches, first files
            town_file = daemon.town_root / TOWN_FILE
            anyio.run(patch_round, daemon, 1, 1, 0)
            first = town_file.read_bytes()
            anyio.run(patch_round, daemon, 1, 1, 1)
            versions = (first, town_file.read_bytes())
            rounds = {}
            for clients in LEVELS:
                rounds[clients] = anyio.run(patch_round, daemon, clients, total // clients, 0)
        direct_root = build_town(workdir / "direct", rigs=("backend", "frontend"))
        direct = direct_writes(direct_root / TOWN_FILE, versions, total)
        in_process = anyio.run(store_patches, build_town(workdir / "store"), total)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    return _rows(rounds, direct, in_process, total, len(versions[0]))


def _rows(
    rounds: dict[int, Sample], direct: Sample, in_process: Sample, total: int, size: int
) -> list[Row]:
    d50, d99 = percentile(direct.latencies, 50), percentile(direct.latencies, 99)
    rows = [
        Row("write_atomic p50 (baseline)", d50, "ms", note=f"{total} writes of {size} B, fsync"),
        Row("write_atomic p99 (baseline)", d99, "ms"),
        Row("store.patch in-process p50", percentile(in_process.latencies, 50), "ms", d50,
            note="read, validate, merge, render, write; no HTTP"),
        Row("store.patch in-process p99", percentile(in_process.latencies, 99), "ms", d99),
    ]  # fmt: skip
    for clients, sample in rounds.items():
        label = f"{clients} client{'s' if clients > 1 else ''}"
        note = f"{len(sample.latencies)} PATCHes on the socket" if clients == 1 else ""
        rows += [
            Row(f"PATCH p50, {label}", percentile(sample.latencies, 50), "ms", d50, note),
            Row(f"PATCH p99, {label}", percentile(sample.latencies, 99), "ms", d99),
            Row(f"PATCH throughput, {label}", sample.rate, "req/s", direct.rate,
                "baseline: write_atomic calls/s" if clients == 1 else ""),
            Row(f"daemon CPU per PATCH, {label}", sample.cpu / len(sample.latencies) * 1000, "ms",
                note="utime+stime of the daemon process" if clients == 1 else ""),
        ]  # fmt: skip
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.patch_bench", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="256 PATCHes per level, not 1,024")
    args = parser.parse_args()
    print_table(run(quick=args.quick), title="patch")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
