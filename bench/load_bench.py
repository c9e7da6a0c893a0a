"""Load: 1,000 PATCHes from 32 concurrent clients while 100 SSE subscribers listen.

A real `gastown-sandboxd run` serves a town with one rig per client. Every PATCH adds one
agent to its client's rig, so at the end each rig must hold every agent its client added;
every subscriber (half on the local socket, half on TCP with the key) must receive each
`config.changed` once and in order. Each PATCH goes on a connection of its own
(`patch_client`). Reported: PATCH latency and throughput, the delay from a PATCH's answer to
the last subscriber's copy of its event, the daemon's CPU time and its RSS before and after.

Baseline, measured in the same run: the same storm with no subscriber, so the figures show
what 100 listeners cost. `storm()` is also the engine of tests/e2e/test_load.py.
`python -m bench.load_bench [--quick]`; `run(quick)` gives the rows to `python -m bench`.
"""

from __future__ import annotations

import json
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio
import httpx
from httpx_sse import aconnect_sse
from tests.fixtures.daemon import make_town

from ._daemon import ONE_CONNECTION_EACH, running_daemon, tcp_client, uds_client
from ._stats import cpu_seconds, percentile, rss_kib
from ._table import Row, main_of

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
    sent_at: dict[str, float] = field(default_factory=dict)  # revision -> monotonic time sent
    received: list[list[dict[str, Any]]] = field(default_factory=list)  # per subscriber
    delivered_at: dict[int, float] = field(default_factory=dict)  # event id -> last copy time
    errors: list[str] = field(default_factory=list)
    resumed: int = 0  # readers dropped as lagged that came back with Last-Event-ID
    rss_before_kib: int = 0
    rss_after_kib: int = 0
    cpu_seconds: float = 0.0

    @property
    def throughput(self) -> float:
        return self.patches / self.wall

    def fanout_ms(self) -> list[float]:
        """Per event: from its PATCH being sent to the last subscriber's copy, in ms (a group
        commit sends a group's events before its answers, so the answer is no start line)."""
        delays = []
        for events in self.received[:1]:
            for event in events:
                sent = self.sent_at.get(event.get("revision", ""))
                if sent is not None and event["id"] in self.delivered_at:
                    delays.append(max(0.0, self.delivered_at[event["id"]] - sent) * 1000)
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
    tcp = tcp_client(target.url, target.key, timeout=timeout, limits=limits)
    uds = uds_client(target.socket, timeout=timeout, limits=limits)
    patching = patch_client(target.socket, timeout=timeout)
    result.received = [[] for _ in range(subscribers)]
    async with tcp, uds, patching:
        with anyio.fail_after(deadline):
            async with anyio.create_task_group() as listeners:
                for index in range(subscribers):
                    client = uds if index % 2 else tcp
                    listeners.start_soon(_listen, client, result, index)
                await _await_subscribers(uds, subscribers)
                result.rss_before_kib = rss_kib(target.pid)
                cpu_before = cpu_seconds(target.pid)
                started = time.monotonic()
                async with anyio.create_task_group() as senders:
                    for client_index, rig in enumerate(rig_names(clients)):
                        count = share(patches, clients, client_index)
                        senders.start_soon(_send, patching, result, rig, count)
            result.wall = time.monotonic() - started
            result.cpu_seconds = cpu_seconds(target.pid) - cpu_before
            result.rss_after_kib = rss_kib(target.pid)
    return result


def patch_client(socket: Path, *, timeout: httpx.Timeout) -> httpx.AsyncClient:
    """The PATCH clients' client of the socket: each PATCH on a connection of its own, as the
    cloud pushes its PATCHes.

    The daemon closes a connection idle for its keep-alive time (`HEADER_TIMEOUT` of
    `gastown_sandboxd.http.server`, 5 s), and a PATCH is never retried. With kept connections,
    on 2 cores beside busy loops, 5 storms of 37 failed with "Server disconnected without
    sending a response": a PATCH went into a connection idle 4.5-4.9 s by the client's clock,
    which starts once it has read the answer, later than the daemon's. Keeping idle connections
    1 s at most failed 2 storms of 12 instead (ReadError: the client's own pool had closed the
    connection under a PATCH). A new connection has the whole timer for its request head: in
    36 storms the daemon had each head within 1.6 s of the connect, and none failed.
    """
    return uds_client(socket, timeout=timeout, limits=ONE_CONNECTION_EACH)


async def _await_subscribers(client: httpx.AsyncClient, count: int) -> None:
    # The daemon counts its SSE clients in /status: nothing to wait on across processes.
    while True:
        if (await client.get("/status")).json()["subscribers"] >= count:
            return
        await anyio.sleep(0.01)


async def _listen(client: httpx.AsyncClient, result: LoadResult, index: int) -> None:
    """One subscriber: every event from the first (Last-Event-ID 0) until all PATCHes came.

    A reader the daemon drops for falling behind (`lagged`, on a starved machine) comes back
    with the last id it got, as the contract asks of clients; the events it then gets must
    still be every one, once and in order. A `gap` (events lost) is an error."""
    events = result.received[index]
    wanted = result.patches
    seen = 0
    last_id = 0
    while True:
        headers = {"Last-Event-ID": str(last_id)}
        async with aconnect_sse(client, "GET", "/events", headers=headers) as source:
            async for sse in source.aiter_sse():
                if sse.event == "lagged":
                    result.resumed += 1
                    break
                if sse.event == "gap":
                    result.errors.append(f"subscriber {index}: gap {sse.data}")
                    return
                event = json.loads(sse.data)
                events.append(event)
                last_id = event["id"]
                result.delivered_at[event["id"]] = time.monotonic()
                if event["type"] == "config.changed":
                    seen += 1
                    if seen == wanted:
                        return
            else:
                result.errors.append(f"subscriber {index}: the stream ended after id {last_id}")
                return


async def _send(client: httpx.AsyncClient, result: LoadResult, rig: str, count: int) -> None:
    """One PATCH client: `count` PATCHes of its rig, one after another."""
    answers = result.answers.setdefault(rig, [])
    for index in range(count):
        began, sent = time.perf_counter(), time.monotonic()
        answer = await client.patch("/config", json=patch_body(rig, index))
        result.latencies.append((time.perf_counter() - began) * 1000)
        if answer.status_code != 200:
            result.errors.append(f"{rig} PATCH {index}: {answer.status_code} {answer.text}")
            return
        body = answer.json()
        answers.append(body)
        result.sent_at[body["revision"]] = sent


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


def measure(subscribers: int) -> LoadResult:
    """One storm of PATCHES on a fresh daemon with `subscribers` listeners; checked."""
    with tempfile.TemporaryDirectory(prefix="load-bench-", ignore_cleanup_errors=True) as tmp:
        workdir = Path(tmp)
        town_root = make_town(workdir / "town", tuple(rig_names(CLIENTS)))
        with running_daemon(workdir, town_root, town_id=TOWN_ID) as daemon:
            target = Target(daemon.url, daemon.key, daemon.socket, daemon.pid, town_root)
            result = anyio.run(_storm, target, subscribers)
            found = problems(result, town_root)
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
            note="PATCH sent -> its event at the last of 100 subscribers"),
        Row("event fan-out p99", percentile(fanout, 99), "ms"),
        Row("events delivered", len(loaded.received) * PATCHES, "events",
            note="each subscriber got every config.changed once, in order; "
            f"{loaded.resumed} came back after being dropped as lagged"),
        Row("daemon CPU per PATCH", loaded.cpu_seconds / PATCHES * 1000, "ms",
            baseline(lambda r: r.cpu_seconds / PATCHES * 1000), "utime+stime, fan-out included"),
        Row("daemon RSS before", loaded.rss_before_kib / 1024, "MiB",
            baseline(lambda r: r.rss_before_kib / 1024), "subscribers connected"),
        Row("daemon RSS after", loaded.rss_after_kib / 1024, "MiB",
            baseline(lambda r: r.rss_after_kib / 1024)),
        Row("wall time of the storm", loaded.wall, "s", baseline(lambda r: r.wall)),
    ]  # fmt: skip


if __name__ == "__main__":
    quick = "skip the no-subscriber baseline"
    raise SystemExit(main_of(run, name="load_bench", doc=__doc__, quick=quick, title="load"))
