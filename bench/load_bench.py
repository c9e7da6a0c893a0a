"""Load: 1,000 PATCHes from 32 concurrent clients while 100 SSE subscribers listen.

A real `gastown-sandboxd run` serves a town with one rig per client. Every PATCH adds one
agent to its client's rig, so at the end each rig must hold every agent its client added;
every subscriber (half on the local socket, half on TCP with the key) must receive each
`config.changed` once and in order. Reported: PATCH latency and throughput, the delay from a
PATCH's answer to the last subscriber's copy of its event, the daemon's CPU time and its RSS
before and after.

Baseline, measured in the same run: the same storm with no subscriber, so the figures show
what 100 listeners cost. `storm()` is also the engine of tests/e2e/test_load.py.
`python -m bench.load_bench [--quick]`; `run(quick)` gives the rows to `python -m bench`.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio
import httpx
from httpx_sse import aconnect_sse
from tests.daemon.minting import mint
from tests.fixtures.daemon import DAEMON_KEY, daemon_env, make_town

from ._table import Row, print_table

TOWN_ID = "town-load"
PATCHES, CLIENTS, SUBSCRIBERS = 1000, 32, 100


@dataclass(frozen=True)
class Target:
    """A running daemon: where to reach it, its pid, and its town root."""

    url: str
    key: str
    socket: Path
    pid: int
    town_root: Path


@dataclass
class LoadResult:
    """What a storm did: answers per rig, events per subscriber, timings and memory."""

    patches: int
    clients: int
    subscribers: int
    wall: float = 0.0  # s, first PATCH sent to last event delivered
    latencies: list[float] = field(default_factory=list)  # ms per PATCH
    answers: dict[str, list[dict[str, Any]]] = field(default_factory=dict)  # rig -> answers
    answered_at: dict[str, float] = field(default_factory=dict)  # revision -> monotonic time
    received: list[list[dict[str, Any]]] = field(default_factory=list)  # per subscriber
    delivered_at: dict[int, float] = field(default_factory=dict)  # event id -> last copy time
    errors: list[str] = field(default_factory=list)
    rss_before_kib: int = 0
    rss_after_kib: int = 0
    cpu_seconds: float = 0.0

    @property
    def throughput(self) -> float:
        return self.patches / self.wall

    def fanout_ms(self) -> list[float]:
        """Per event: from its PATCH's answer to the last subscriber's copy, in ms."""
        delays = []
        for events in self.received[:1]:
            for event in events:
                answered = self.answered_at.get(event.get("revision", ""))
                if answered is not None and event["id"] in self.delivered_at:
                    delays.append(max(0.0, self.delivered_at[event["id"]] - answered) * 1000)
        return delays


def rig_names(clients: int) -> list[str]:
    return [f"r{index:02d}" for index in range(clients)]


def agent_name(index: int) -> str:
    return f"a{index:04d}"


def patch_body(rig: str, index: int) -> dict[str, Any]:
    """The `index`-th PATCH of a client: one more agent in its rig."""
    agent = {"provider": "claude", "command": "claude", "args": ["--n", str(index)]}
    return {"rigs": {rig: {"agents": {agent_name(index): agent}}}}


def share(patches: int, clients: int, client: int) -> int:
    """How many of the PATCHes client number `client` sends."""
    return patches // clients + (1 if client < patches % clients else 0)


def memory_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for pid {pid}")


def cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as stat:
        fields = stat.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def storm(
    target: Target,
    *,
    patches: int = PATCHES,
    clients: int = CLIENTS,
    subscribers: int = SUBSCRIBERS,
    deadline: float = 110.0,
) -> LoadResult:
    """Run the storm against `target`; the result holds everything needed to judge it."""
    result = LoadResult(patches, clients, subscribers)
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
    timeout = httpx.Timeout(30.0, read=None)
    tcp = httpx.AsyncClient(
        base_url=target.url, headers={"x-internal-api-key": target.key}, limits=limits,
        timeout=timeout,
    )  # fmt: skip
    uds = httpx.AsyncClient(
        transport=httpx.AsyncHTTPTransport(uds=str(target.socket), limits=limits),
        base_url="http://sandboxd",
        timeout=timeout,
    )
    result.received = [[] for _ in range(subscribers)]
    async with tcp, uds:
        with anyio.fail_after(deadline):
            async with anyio.create_task_group() as listeners:
                for index in range(subscribers):
                    client = uds if index % 2 else tcp
                    listeners.start_soon(_listen, client, result, index)
                await _await_subscribers(uds, subscribers)
                result.rss_before_kib = memory_kib(target.pid)
                cpu_before = cpu_seconds(target.pid)
                started = time.monotonic()
                async with anyio.create_task_group() as senders:
                    for client_index, rig in enumerate(rig_names(clients)):
                        count = share(patches, clients, client_index)
                        senders.start_soon(_send, uds, result, rig, count)
            result.wall = time.monotonic() - started
            result.cpu_seconds = cpu_seconds(target.pid) - cpu_before
            result.rss_after_kib = memory_kib(target.pid)
    return result


async def _await_subscribers(client: httpx.AsyncClient, count: int) -> None:
    # The daemon counts its SSE clients in /status: nothing to wait on across processes.
    while True:
        if (await client.get("/status")).json()["subscribers"] >= count:
            return
        await anyio.sleep(0.01)


async def _listen(client: httpx.AsyncClient, result: LoadResult, index: int) -> None:
    """One subscriber: every event from the first (Last-Event-ID 0) until all PATCHes came."""
    events = result.received[index]
    wanted = result.patches
    seen = 0
    headers = {"Last-Event-ID": "0"}
    async with aconnect_sse(client, "GET", "/events", headers=headers) as source:
        async for sse in source.aiter_sse():
            if sse.event in {"gap", "lagged"}:
                result.errors.append(f"subscriber {index}: {sse.event} {sse.data}")
                return
            event = json.loads(sse.data)
            events.append(event)
            result.delivered_at[event["id"]] = time.monotonic()
            if event["type"] == "config.changed":
                seen += 1
                if seen == wanted:
                    return


async def _send(client: httpx.AsyncClient, result: LoadResult, rig: str, count: int) -> None:
    """One PATCH client: `count` PATCHes of its rig, one after another."""
    answers = result.answers.setdefault(rig, [])
    for index in range(count):
        began = time.perf_counter()
        answer = await client.patch("/config", json=patch_body(rig, index))
        result.latencies.append((time.perf_counter() - began) * 1000)
        if answer.status_code != 200:
            result.errors.append(f"{rig} PATCH {index}: {answer.status_code} {answer.text}")
            return
        body = answer.json()
        answers.append(body)
        result.answered_at[body["revision"]] = time.monotonic()


def problems(result: LoadResult, town_root: Path) -> list[str]:
    """Everything that went wrong: lost or changed PATCHes, missed or repeated events."""
    found = list(result.errors)
    for client_index, rig in enumerate(rig_names(result.clients)):
        sent = share(result.patches, result.clients, client_index)
        expected = {agent_name(index) for index in range(sent)}
        answers = result.answers.get(rig, [])
        if len(answers) != len(expected) or not all(a["changed"] for a in answers):
            found.append(f"{rig}: {len(answers)} answers for {len(expected)} PATCHes")
        doc = json.loads((town_root / rig / "settings" / "config.json").read_bytes())
        if set(doc.get("agents", {})) != expected:
            found.append(f"{rig}: {len(doc.get('agents', {}))} agents on disk, not {len(expected)}")
    revisions = {a["revision"] for answers in result.answers.values() for a in answers}
    reference: list[int] | None = None
    for index, events in enumerate(result.received):
        ids = [event["id"] for event in events]
        changed = [e for e in events if e["type"] == "config.changed"]
        if not ids or ids != list(range(ids[0], ids[0] + len(ids))):
            found.append(f"subscriber {index}: ids not consecutive (or none)")
        if len(changed) != result.patches or {e["revision"] for e in changed} != revisions:
            found.append(f"subscriber {index}: {len(changed)} config.changed, not each once")
        if reference is None:
            reference = ids
        elif ids != reference:
            found.append(f"subscriber {index}: another sequence than subscriber 0")
    return found


def percentile(samples: list[float], percent: int) -> float:
    if len(samples) < 2:
        return samples[0] if samples else 0.0
    return statistics.quantiles(samples, n=100, method="inclusive")[percent - 1]


@contextmanager
def running_daemon(workdir: Path, clients: int) -> Iterator[Target]:
    """A daemon on a town with one rig per client, holding a fresh token; stopped on exit."""
    town_root = make_town(workdir / "town", tuple(rig_names(clients)))
    env_file = workdir / ".env.gateway"
    env_file.write_text(f"KILO_JWT={mint(time.time(), town_id=TOWN_ID)}\n")
    socket_dir = Path(tempfile.mkdtemp(prefix="gsd-l-"))
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
    try:
        url = _await_ready(process, log)
        yield Target(url, DAEMON_KEY, socket_dir / "d.sock", process.pid, town_root)
    finally:
        process.terminate()
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        shutil.rmtree(socket_dir, ignore_errors=True)


def _await_ready(process: subprocess.Popen[bytes], log: Path) -> str:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and process.poll() is None:
        records = [json.loads(line) for line in log.read_text().splitlines() if line[:1] == "{"]
        if any(record.get("event") == "daemon_ready" for record in records):
            return next(
                str(record["address"])
                for record in records
                if record.get("event") == "api_listening"
                and str(record.get("address")).startswith("http")
            )
        time.sleep(0.01)
    raise RuntimeError(f"the daemon did not start: {log.read_text()[-2000:]}")


def measure(subscribers: int) -> LoadResult:
    """One storm of PATCHES on a fresh daemon with `subscribers` listeners; checked."""
    workdir = Path(tempfile.mkdtemp(prefix="load-bench-"))
    try:
        with running_daemon(workdir, CLIENTS) as target:
            result = anyio.run(_storm, target, subscribers)
            found = problems(result, target.town_root)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    if found:
        raise RuntimeError("the storm lost something: " + "; ".join(found[:5]))
    return result


async def _storm(target: Target, subscribers: int) -> LoadResult:
    return await storm(target, subscribers=subscribers, deadline=600)


def run(quick: bool) -> list[Row]:
    """The full storm with 100 subscribers; unless `quick`, the baseline with none too."""
    loaded = measure(SUBSCRIBERS)
    base = None if quick else measure(0)
    fanout = loaded.fanout_ms()

    def baseline(pick: Any) -> float | None:
        return None if base is None else float(pick(base))

    return [
        Row("PATCH throughput", loaded.throughput, "req/s", baseline(lambda r: r.throughput),
            f"{PATCHES} PATCHes, {CLIENTS} clients, {SUBSCRIBERS} SSE subscribers; "
            "baseline: no subscriber"),
        Row("PATCH p50", percentile(loaded.latencies, 50), "ms",
            baseline(lambda r: percentile(r.latencies, 50))),
        Row("PATCH p99", percentile(loaded.latencies, 99), "ms",
            baseline(lambda r: percentile(r.latencies, 99))),
        Row("event fan-out p50", percentile(fanout, 50), "ms",
            note="PATCH answered -> its event at the last of 100 subscribers"),
        Row("event fan-out p99", percentile(fanout, 99), "ms"),
        Row("events delivered", len(loaded.received) * PATCHES, "events",
            note="each subscriber got every config.changed once, in order"),
        Row("daemon CPU per PATCH", loaded.cpu_seconds / PATCHES * 1000, "ms",
            baseline(lambda r: r.cpu_seconds / PATCHES * 1000), "utime+stime, fan-out included"),
        Row("daemon RSS before", loaded.rss_before_kib / 1024, "MiB",
            baseline(lambda r: r.rss_before_kib / 1024), "subscribers connected"),
        Row("daemon RSS after", loaded.rss_after_kib / 1024, "MiB",
            baseline(lambda r: r.rss_after_kib / 1024)),
        Row("wall time of the storm", loaded.wall, "s", baseline(lambda r: r.wall)),
    ]  # fmt: skip


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.load_bench", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="skip the no-subscriber baseline")
    args = parser.parse_args()
    print_table(run(quick=args.quick), title="load")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
