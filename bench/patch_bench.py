"""PATCH /config under load: latency and throughput at 1, 4, 8 and 32 concurrent clients.

A real `gastown-sandboxd run` serves a realistic gt town (gt's town file, two rigs). Every
PATCH sets one crew member's agent to the other of two presets, so each one changes the town
file and is written (atomically, with fsync of file and folder) and announced as an event.
Clients are httpx.AsyncClient on the local socket, each sending its PATCHes one after another;
one more round sends them from a raw HTTP/1.1 client on the socket (`raw_round`), whose
latency is the daemon's answer time without httpx's own work in this process.

Baselines measured in the same run, on the same file system:
- `write_atomic` of the same bytes the daemon wrote (the two versions of the town file in
  turn), directly in this process: the least any PATCH pays;
- `SettingsStore.patch` in this process with no HTTP: read, validate, merge, render, write.

Also: the daemon's CPU per PATCH at the dashboard's cadence (one every 50 ms, beside back to
back; and by thread: the event loop's, the worker threads', watchfiles'), the same for
PATCHes pushed by the cloud (the dashboard's path: `X-Gastown-Generation`, so the
last-applied copy is kept as well), and per
`GET /healthz` at that cadence (HTTP alone, which no PATCH can go below), and
`wrk` with 8 connections over TCP (each request flips a crew member, so each writes).
The bare stack (`bare_stack.py`: Starlette on hypercorn that parses, renders, hops once and
calls `write_atomic`, and does nothing else) gets the raw client, the paced client and wrk
too: what any daemon on this stack pays, beside what this one pays. Both serve at once and
are measured in turn, so each pair of figures sees the same host; wrk takes three turns of
5 s on each, and its rows give the median. Last, each of the two serves the raw client alone
under callgrind (`_callgrind.py`), which counts the instructions of each thread per PATCH:
the one figure here that the host's load does not move, to tell two versions apart.
PATCHes that arrive while one is being written are written together (group commit), so
more clients share each write's fsyncs and thread hop.
A town of `BIG_TOWN_RIGS` rigs gets the raw client too (`big_town_round`): each PATCH
still changes the town file alone, and every rig's file is looked at on every PATCH (its
stat: is it the one cached?), so this shows what each rig of a town adds to every PATCH.
`python -m bench.patch_bench [--quick]`; `run(quick)` gives the rows to `python -m bench`.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import statistics
import subprocess
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio
import httpx
from tests.daemon.gt_samples import build_town
from tests.fixtures.net import read_answer

from gastown_sandboxd.atomic import write_atomic
from gastown_sandboxd.events.types import DomainEvent
from gastown_sandboxd.gtsettings.snapshot import QUIET_NS
from gastown_sandboxd.gtsettings.store import SettingsStore

from . import _callgrind
from ._daemon import Daemon, running_daemon, uds_client
from ._stats import Counters, cpu_seconds, percentile, since, thread_counters
from ._table import Row, main_of
from .bare_stack import running_bare_stack

TOWN_ID = "town-bench"
LEVELS = (1, 4, 8, 32)
BIG_TOWN_RIGS = 100
PRESETS = ("claude", "codex")
TOWN_FILE = Path("settings") / "config.json"


@dataclass(frozen=True)
class Sample:
    """Latencies in ms of one run, its wall time and the daemon's CPU time in seconds."""

    latencies: list[float]
    wall: float
    cpu: float = 0.0
    threads: dict[str, float] = field(default_factory=dict)  # CPU seconds by thread

    @property
    def rate(self) -> float:
        return len(self.latencies) / self.wall

    @property
    def cpu_ms(self) -> float:
        """The daemon's CPU per request, in ms."""
        return self.cpu / len(self.latencies) * 1000

    def thread_cpu_ms(self, kind: str) -> float:
        """The CPU per request of one kind of thread (`_by_thread`), in ms."""
        return self.threads.get(kind, 0.0) / len(self.latencies) * 1000


def _body(client: int, n: int) -> dict[str, Any]:
    # Each PATCH flips this client's crew member to the other preset: always a real write.
    return {"town": {"crew_agents": {f"bench{client}": PRESETS[n % 2]}}}


Send = Callable[[httpx.AsyncClient, int, int], Awaitable[httpx.Response]]


def _patch(http: httpx.AsyncClient, client: int, n: int) -> Awaitable[httpx.Response]:
    """Client `client`'s `n`th PATCH: its crew member flipped, so it always writes."""
    return http.patch("/config", json=_body(client, n))


def _pushed(http: httpx.AsyncClient, client: int, n: int) -> Awaitable[httpx.Response]:
    """Client `client`'s `n`th PATCH as the cloud pushes the dashboard's changes: with
    `X-Gastown-Generation`, so the daemon also keeps its last-applied copy (section 10)."""
    headers = {"X-Gastown-Generation": str(n + 1)}
    return http.patch("/config", json=_body(client, n), headers=headers)


def _healthz(http: httpx.AsyncClient, client: int, n: int) -> Awaitable[httpx.Response]:
    """`GET /healthz`: what HTTP alone costs the daemon (hypercorn, h11, Starlette and its
    middleware, with no work behind the route)."""
    return http.get("/healthz")


def _check(answer: httpx.Response) -> None:
    # Every request must succeed, and a PATCH must have changed something.
    if answer.status_code != 200 or not answer.json().get("changed", True):
        raise RuntimeError(f"{answer.request.method} answered {answer.status_code}: {answer.text}")


async def patch_round(daemon: Daemon, clients: int, per_client: int, offset: int) -> Sample:
    """`clients` concurrent clients each sending `per_client` PATCHes; every one must apply.

    Every client is made and connected (one GET /healthz) before the clock starts: a client
    still being set up would hold the event loop while the others' PATCHes wait."""
    latencies: list[float] = []
    go = anyio.Event()

    async def client(http: httpx.AsyncClient, index: int) -> None:
        await go.wait()
        for n in range(offset, offset + per_client):
            started = time.perf_counter()
            answer = await _patch(http, index, n)
            latencies.append((time.perf_counter() - started) * 1000)
            _check(answer)

    async with contextlib.AsyncExitStack() as stack:
        https = [
            await stack.enter_async_context(uds_client(daemon.socket, timeout=120))
            for _ in range(clients)
        ]
        for http in https:
            (await http.get("/healthz")).raise_for_status()
        async with anyio.create_task_group() as tg:
            for index, http in enumerate(https):
                tg.start_soon(client, http, index)
            cpu, started = cpu_seconds(daemon.pid), time.perf_counter()
            go.set()
        wall = time.perf_counter() - started
        return Sample(latencies, wall, cpu_seconds(daemon.pid) - cpu)


async def paced_round(daemon: Daemon, count: int, interval: float, send: Send = _patch) -> Sample:
    """One client sending a request every `interval` seconds (the dashboard's cadence): a
    PATCH, or what `send` sends (`_healthz`: HTTP alone at the same cadence)."""
    latencies: list[float] = []
    async with uds_client(daemon.socket, timeout=120) as http:
        threads = thread_counters(daemon.pid)
        cpu, started = cpu_seconds(daemon.pid), time.perf_counter()
        for n in range(count):
            due = started + n * interval
            await anyio.sleep(max(0.0, due - time.perf_counter()))
            begin = time.perf_counter()
            answer = await send(http, 99, n)
            latencies.append((time.perf_counter() - begin) * 1000)
            _check(answer)
        # The watcher's handling of the last write is part of that PATCH's cost.
        await anyio.sleep(interval)
        wall = time.perf_counter() - started
        by_thread = _by_thread(daemon.pid, threads, thread_counters(daemon.pid))
        return Sample(latencies, wall, cpu_seconds(daemon.pid) - cpu, by_thread)


MAIN, WORKERS, WATCHFILES = "the main thread (event loop)", "worker threads", "watchfiles' thread"


def _by_thread(pid: int, before: Counters, after: Counters) -> dict[str, float]:
    # CPU seconds between two readings, by kind of thread: the main thread runs the event
    # loop; watchfiles' Rust thread is named by notify; every other one is a worker.
    spent: dict[str, float] = {}
    for tid, (name, seconds, _switches) in since(before, after).items():
        kind = MAIN if tid == pid else WATCHFILES if name.startswith("notify") else WORKERS
        spent[kind] = spent.get(kind, 0.0) + seconds
    return spent


# One turn of wrk on one server (`wrk_turns_of`), quick or not.
WRK_TURN_S = 5

WRK_SCRIPT = """
local threads = 0
function setup(thread)
  threads = threads + 1
  thread:set("tid", threads)
end
local counter = 0
function request()
  counter = counter + 1
  -- Each request flips one of 16 crew members of this thread: every PATCH writes.
  local slot = counter % 16
  local agent = (math.floor(counter / 16) % 2 == 0) and "claude" or "codex"
  local body = string.format('{"town":{"crew_agents":{"wrk%d_%d":"%s"}}}', tid, slot, agent)
  return wrk.format("PATCH", "/config", HEADERS, body)
end
"""

# The same load on the cheapest route: what the HTTP stack alone serves.
WRK_HEALTHZ_SCRIPT = """
function request()
  return wrk.format("GET", "/healthz", HEADERS)
end
"""


def wrk_round(
    daemon: Daemon, connections: int, seconds: int, requests: str = WRK_SCRIPT
) -> tuple[float, str] | None:
    """`wrk` PATCHing over TCP with the key (or sending the `requests` of another script):
    (requests per second, its summary), or None when wrk is not installed."""
    wrk = shutil.which("wrk")
    if wrk is None:
        return None
    headers = (
        '{["Content-Type"] = "application/json", ["x-internal-api-key"] = "' + daemon.key + '"}'
    )
    with tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False) as script:
        script.write(f"HEADERS = {headers}\n{requests}")
    try:
        out = subprocess.run(
            [wrk, "-t2", f"-c{connections}", f"-d{seconds}s", "-s", script.name, daemon.url],
            capture_output=True, text=True, check=True, timeout=seconds + 60,
        )  # fmt: skip
    finally:
        os.unlink(script.name)
    rate = next(
        float(line.split()[1]) for line in out.stdout.splitlines()
        if line.startswith("Requests/sec:")
    )  # fmt: skip
    errors = [line.strip() for line in out.stdout.splitlines() if "Non-2xx" in line]
    return rate, "; ".join(errors) or "all 2xx"


def wrk_turns_of(
    runs: list[tuple[Daemon, str]], connections: int, seconds: int, turns: int
) -> list[tuple[float, str] | None]:
    """`wrk_round` of each (server, script) in turn, `turns` times over: per pair, the median
    rate and a summary naming every turn's rate (None when wrk is not installed). Taking
    turns puts the same moments of the host under each, which one long run apiece did not:
    the same daemon gave 757, 915 and 1,110 PATCHes/s in three runs of one day."""
    rates: list[list[float]] = [[] for _ in runs]
    summaries: list[set[str]] = [set() for _ in runs]
    for _ in range(turns):
        for index, (server, script) in enumerate(runs):
            result = wrk_round(server, connections, seconds, script)
            if result is None:
                return [None for _ in runs]
            rates[index].append(result[0])
            summaries[index].add(result[1])

    def told(found: list[float], summary: set[str]) -> str:
        parts = sorted(summary)
        if turns > 1:
            each = ", ".join(f"{rate:,.0f}" for rate in found)
            parts.insert(0, f"median of {turns} turns of {seconds} s ({each})")
        return "; ".join(parts)

    return [
        (statistics.median(found), told(found, summary))
        for found, summary in zip(rates, summaries, strict=True)
    ]


def direct_writes(path: Path, versions: tuple[bytes, bytes], count: int) -> Sample:
    """`write_atomic` of the two versions in turn, in this process."""
    latencies = []
    started = time.perf_counter()
    for n in range(count):
        begin = time.perf_counter()
        write_atomic(path, versions[n % 2])
        latencies.append((time.perf_counter() - begin) * 1000)
    return Sample(latencies, time.perf_counter() - started)


def raw_round(daemon: Daemon, count: int) -> Sample:
    """PATCHes one after another from a raw HTTP/1.1 client on the socket: the daemon's own
    answer time, without httpx's work in this process (about a quarter of the httpx
    client's p50 here) between the clock and the socket."""
    latencies = []
    with contextlib.ExitStack() as stack:
        sock = None
        started, cpu = time.perf_counter(), cpu_seconds(daemon.pid)
        for n in range(count):
            if sock is None:
                sock = stack.enter_context(socket.socket(socket.AF_UNIX, socket.SOCK_STREAM))
                sock.settimeout(60)
                sock.connect(str(daemon.socket))
            body = json.dumps(_body(0, n)).encode()
            request = (
                b"PATCH /config HTTP/1.1\r\nHost: sandboxd\r\n"
                b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n%s"
            ) % (len(body), body)
            begin = time.perf_counter()
            sock.sendall(request)
            answer, close = read_answer(sock)
            latencies.append((time.perf_counter() - begin) * 1000)
            if not answer.startswith(b"HTTP/1.1 200 "):
                raise RuntimeError(f"PATCH answered {answer[:200]!r}")
            if close:  # hypercorn ends a connection after 1,000 requests
                sock = None
        return Sample(latencies, time.perf_counter() - started, cpu_seconds(daemon.pid) - cpu)


def wait_until_quiet(built: float) -> None:
    """Wait until the files of a town built at `built` are older than the read cache's quiet
    time (`snapshot.QUIET_NS`): in a real town every file but the ones just written is, and
    the cache serves those from a stat. Without it, the first second of a round reads and
    parses the rigs' files on every PATCH."""
    time.sleep(max(0.0, built + QUIET_NS / 1e9 + 0.1 - time.time()))


def big_town_round(workdir: Path, count: int) -> Sample:
    """The raw client's PATCHes of the town file on a daemon of its own serving a town of
    `BIG_TOWN_RIGS` rigs, each with gt's rig file."""
    rigs = tuple(f"rig{n:03d}" for n in range(BIG_TOWN_RIGS))
    town_root = build_town(workdir / "big" / "town", rigs=rigs)
    built = time.time()
    with running_daemon(workdir / "big", town_root, town_id=TOWN_ID) as daemon:
        raw_round(daemon, 20)  # warm-up
        wait_until_quiet(built)
        return raw_round(daemon, count)


Counted = tuple[list[int], list[int]]  # instructions by thread: the daemon's, the bare stack's


def counted_round(workdir: Path, count: int) -> Counted | str:
    """Instructions by thread for `count` PATCHes from the raw client, counted by callgrind
    (`_callgrind.py`): the daemon's, then the bare stack's, each alone on the host; or why
    they could not be counted (valgrind is not installed, callgrind did not answer)."""
    if not _callgrind.available():
        return "valgrind is not installed (make bench installs it)"
    found = []
    for name in ("daemon", "bare"):
        home = workdir / f"counted-{name}"
        town_root = build_town(home / "town", rigs=("backend", "frontend"))
        out = home / "callgrind"
        out.mkdir()
        prefix = _callgrind.prefix(out)
        server = (
            running_daemon(home, town_root, town_id=TOWN_ID, prefix=prefix)
            if name == "daemon"
            else running_bare_stack(home, town_root / TOWN_FILE, prefix=prefix)
        )
        built = time.time()
        with server as running:
            raw_round(running, 20)  # warm-up: imports, caches, first files
            wait_until_quiet(built)
            try:
                found.append(
                    _callgrind.count_instructions(
                        running.pid, out, lambda: raw_round(running, count)
                    )
                )
            except _callgrind.NotCounted as exc:
                return str(exc)
    return found[0], found[1]


async def store_patches(town_root: Path, count: int) -> Sample:
    """`SettingsStore.patch` of the same bodies, in this process, without HTTP."""

    def ignore(event: DomainEvent) -> None:
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


def run(quick: bool) -> list[Row]:
    """Measure every level and both baselines; `quick` takes fewer PATCHes per level."""
    total = 256 if quick else 1024
    paced_count, wrk_turns, counted_count = (40, 1, 50) if quick else (200, 3, 200)
    with tempfile.TemporaryDirectory(prefix="patch-bench-", ignore_cleanup_errors=True) as tmp:
        workdir = Path(tmp)
        town_root = build_town(workdir / "daemon" / "town", rigs=("backend", "frontend"))
        stack_root = build_town(workdir / "bare" / "town", rigs=("backend", "frontend"))
        built = time.time()
        # Both serve at once, idle in turn, so each figure of the daemon is measured right
        # beside the bare stack's: the host's speed swings by a third between runs here.
        with (
            running_daemon(workdir / "daemon", town_root, town_id=TOWN_ID) as daemon,
            running_bare_stack(workdir / "bare", stack_root / TOWN_FILE) as stack,
        ):
            anyio.run(patch_round, daemon, 1, 20, 0)  # warm-up: imports, caches, first files
            anyio.run(patch_round, stack, 1, 20, 0)
            wait_until_quiet(built)
            town_file = daemon.town_root / TOWN_FILE
            anyio.run(patch_round, daemon, 1, 1, 0)
            first = town_file.read_bytes()
            anyio.run(patch_round, daemon, 1, 1, 1)
            versions = (first, town_file.read_bytes())
            rounds = {}
            for clients in LEVELS:
                rounds[clients] = anyio.run(patch_round, daemon, clients, total // clients, 0)
            raw, stack_raw = raw_round(daemon, total), raw_round(stack, total)
            paced = anyio.run(paced_round, daemon, paced_count, 0.05)
            pushed = anyio.run(paced_round, daemon, paced_count, 0.05, _pushed)
            stack_paced = anyio.run(paced_round, stack, paced_count, 0.05)
            healthz = anyio.run(paced_round, daemon, paced_count, 0.05, _healthz)
            wrk, stack_wrk, wrk_healthz = wrk_turns_of(
                [(daemon, WRK_SCRIPT), (stack, WRK_SCRIPT), (daemon, WRK_HEALTHZ_SCRIPT)],
                8, WRK_TURN_S, wrk_turns,
            )  # fmt: skip
        big = big_town_round(workdir, total)
        counted = counted_round(workdir, counted_count)
        direct_root = build_town(workdir / "direct", rigs=("backend", "frontend"))
        direct = direct_writes(direct_root / TOWN_FILE, versions, total)
        in_process = anyio.run(store_patches, build_town(workdir / "store"), total)
    rows = _rows(rounds, direct, in_process, total, len(versions[0]))
    rows.append(
        Row("PATCH p50, 1 raw HTTP/1.1 client", percentile(raw.latencies, 50), "ms",
            percentile(direct.latencies, 50),
            f"{len(raw.latencies)} PATCHes on the socket, no httpx; baseline: write_atomic p50")
    )  # fmt: skip
    rows.append(
        Row("daemon CPU per PATCH, one every 50 ms", paced.cpu_ms,
            "ms", rounds[1].cpu_ms,
            f"the dashboard's cadence, {len(paced.latencies)} PATCHes; baseline: back to back")
    )  # fmt: skip
    rows.append(
        Row("daemon CPU per PATCH pushed by the cloud, one every 50 ms", pushed.cpu_ms,
            "ms", paced.cpu_ms,
            "the dashboard's changes come with X-Gastown-Generation: the last-applied copy is "
            "kept too; baseline: the paced PATCH above")
    )  # fmt: skip
    rows.append(
        Row("  its p50", percentile(pushed.latencies, 50), "ms",
            percentile(paced.latencies, 50), "baseline: the paced PATCH's p50")
    )  # fmt: skip
    for kind in (MAIN, WORKERS, WATCHFILES):
        rows.append(
            Row(f"  of which {kind}", paced.thread_cpu_ms(kind), "ms", paced.cpu_ms,
                "CPU by thread (the scheduler's count, in ns); baseline: the whole")
        )  # fmt: skip
    rows.append(
        Row("daemon CPU per GET /healthz, one every 50 ms",
            healthz.cpu_ms, "ms",
            paced.cpu_ms,
            "HTTP alone at the same cadence; baseline: the paced PATCH above")
    )  # fmt: skip
    rows += _stack_rows(stack_raw, stack_paced, raw, paced, direct)
    rows += [
        Row(f"PATCH p50, 1 raw client, a town of {BIG_TOWN_RIGS} rigs",
            percentile(big.latencies, 50), "ms", percentile(raw.latencies, 50),
            "each PATCH changes the town file alone; baseline: the raw client's p50 above "
            "(two rigs)"),
        Row(f"daemon CPU per PATCH, a town of {BIG_TOWN_RIGS} rigs", big.cpu_ms, "ms",
            raw.cpu_ms, "baseline: the raw client's above (two rigs)"),
    ]  # fmt: skip
    rows += _counted_rows(counted, counted_count)
    if wrk is None:
        rows.append(Row("PATCH throughput, 8 connections (wrk)", 0.0, "req/s", None,
                        "wrk is not installed (make bench installs it)"))  # fmt: skip
    else:
        note = f"TCP with the key, 2 threads; {wrk[1]}; baseline: write_atomic/s"
        rows.append(
            Row("PATCH throughput, 8 connections (wrk)", wrk[0], "req/s", direct.rate, note)
        )
    if wrk is not None and wrk_healthz is not None:
        note = f"HTTP alone, same load; {wrk_healthz[1]}; baseline: the PATCHes above"
        rows.append(Row("GET /healthz throughput, 8 connections (wrk)", wrk_healthz[0], "req/s",
                        wrk[0], note))  # fmt: skip
    if wrk is not None and stack_wrk is not None:
        note = f"{STACK}, same load; {stack_wrk[1]}; baseline: the daemon's PATCHes above"
        rows.append(Row("bare stack: PATCH throughput, 8 connections (wrk)", stack_wrk[0],
                        "req/s", wrk[0], note))  # fmt: skip
    return rows


STACK = "bench/bare_stack.py (Starlette on hypercorn: parse, render, one hop, write_atomic)"


def _stack_rows(
    stack_raw: Sample, stack_paced: Sample, raw: Sample, paced: Sample, direct: Sample
) -> list[Row]:
    """The bare stack beside the daemon: the same clients against `bench/bare_stack.py`."""
    stack_p50, daemon_p50 = percentile(stack_raw.latencies, 50), percentile(raw.latencies, 50)
    return [
        Row("bare stack: PATCH p50, 1 raw HTTP/1.1 client", stack_p50,
            "ms", percentile(direct.latencies, 50),
            f"{STACK}; baseline: write_atomic p50; the daemon's p50 above is "
            f"{daemon_p50 / stack_p50:.2f}x this"),
        Row("bare stack: CPU per PATCH, one every 50 ms",
            stack_paced.cpu_ms, "ms",
            paced.cpu_ms,
            f"{STACK}; baseline: the daemon's at the same cadence"),
    ]  # fmt: skip


def _counted_rows(counted: Counted | str, count: int) -> list[Row]:
    """Instructions per PATCH by thread, the daemon's beside the bare stack's."""
    if isinstance(counted, str):
        return [Row("instructions per PATCH (callgrind)", 0.0, "k", None, counted)]
    daemon, stack = counted
    note = (f"{count} PATCHes from the raw client under callgrind, which counts the same "
            "whatever the host's load; baseline: the bare stack's")  # fmt: skip
    return [
        Row("instructions per PATCH, the event loop's thread", daemon[0] / count / 1000, "k",
            stack[0] / count / 1000, note),
        Row("instructions per PATCH, the other threads", sum(daemon[1:]) / count / 1000, "k",
            sum(stack[1:]) / count / 1000,
            f"daemon: {len(daemon) - 1} (worker threads, watchfiles'); the bare stack: "
            f"{len(stack) - 1} (worker threads)"),
    ]  # fmt: skip


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
            Row(f"daemon CPU per PATCH, {label}", sample.cpu_ms, "ms",
                note="utime+stime of the daemon process" if clients == 1 else ""),
        ]  # fmt: skip
    return rows


if __name__ == "__main__":
    quick = "256 PATCHes per level, not 1,024"
    raise SystemExit(main_of(run, name="patch_bench", doc=__doc__, quick=quick, title="patch"))
