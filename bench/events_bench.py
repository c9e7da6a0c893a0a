"""Events of the real daemon: API change → SSE delivery, external edit → event, idle CPU.

One `gastown-sandboxd run` subprocess (info logs, a fresh 24 h token, so it never calls the
cloud) and, in this process, the SSE readers and the sender, all timed with `time.perf_counter`.

- API → SSE: `PATCH /config` over the socket, one at a time (the next once every reader has
  the event); latency from just before the request to each reader's receipt of the event,
  p50/p99 over every (PATCH, reader) pair, with 1 and with 100 readers (half on the socket,
  half on TCP with the key). Baselines: the PATCH's own answer time; the 1-reader figure.
  With 100 readers the figure includes this process parsing the 99 others' copies.
- API → arrival: the same PATCHes, with 1 and with 100 subscribers on TCP that this process
  reads as raw sockets with `SO_TIMESTAMPNS`: the kernel's receive time of each event at
  each subscriber's socket, which this process's own work cannot delay (`StampedReader`).
  Baselines: the PATCH's own answer; the 1-subscriber figure.
- external edit → event: the bench renames a new town settings file into place (temporary
  file, fsync, rename) and times until one reader has the `config.changed`; the watcher's
  batching (debounce 50 ms, step 10 ms) is most of it.
- a rewrite in place → wake-ups: bash rewrites the town settings file with the same bytes,
  a backup copy beside it, as a script or an editor saving without a change does; the
  daemon's context switches, all threads, over the 1.5 s after each, beside 1.5 s with none.
- idle CPU: utime + stime of the daemon from /proc/PID/stat over a window (60 s, 10 s with
  `--quick`) with 100 idle readers, beside the same window with none, in the same run.
- the arrival rows once more against the bare stack (`bare_stack.py`: the PATCH written, one
  frame queued per subscriber, Starlette's streaming answer on hypercorn): what the fan-out
  costs on this stack before any of the daemon's own work.

`python -m bench.events_bench [--quick]`; `run(quick)` gives the rows to `python -m bench`.
"""

from __future__ import annotations

import json
import os
import re
import socket
import struct
import tempfile
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio
import anyio.abc
import httpx
from httpx_sse import aconnect_sse
from tests.daemon.gt_samples import build_town
from tests.fixtures.daemon import make_town

from ._daemon import Daemon, running_cloud, running_daemon, tcp_client, uds_client
from ._stats import cpu_seconds, percentile, switches_since, thread_counters
from ._table import Row, main_of
from .bare_stack import running_bare_stack

READERS = 100
WAIT = 30.0
# SO_TIMESTAMPNS (Linux): each read also gives the CLOCK_REALTIME at which the kernel took in
# the data it returns; AF_UNIX stream sockets give none, TCP ones do.
SO_TIMESTAMPNS = getattr(socket, "SO_TIMESTAMPNS", 35)
_STAMP = struct.Struct("qq")  # struct timespec
_ID = re.compile(rb"^id: ([0-9]+)$", re.MULTILINE)
LIMITS = httpx.Limits(max_connections=READERS + 10, max_keepalive_connections=READERS)


def _uds(daemon: Daemon) -> httpx.AsyncClient:
    return uds_client(daemon.socket, timeout=WAIT, limits=LIMITS)


def _tcp(daemon: Daemon) -> httpx.AsyncClient:
    return tcp_client(daemon.url, daemon.key, timeout=WAIT, limits=LIMITS)


@dataclass
class Receipts:
    """When each reader received each event id; `all_in(id)` fires once every reader has it."""

    readers: int
    times: dict[int, list[float]] = field(default_factory=dict)
    events: dict[int, dict[str, Any]] = field(default_factory=dict)
    _complete: dict[int, anyio.Event] = field(default_factory=dict)

    def got(self, event: dict[str, Any], at: float) -> None:
        times = self.times.setdefault(event["id"], [])
        times.append(at)
        self.events.setdefault(event["id"], event)
        if len(times) == self.readers:
            self.all_in(event["id"]).set()

    def all_in(self, event_id: int) -> anyio.Event:
        return self._complete.setdefault(event_id, anyio.Event())


async def _read(
    client: httpx.AsyncClient,
    receipts: Receipts,
    *,
    task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED,
) -> None:
    async with aconnect_sse(client, "GET", "/events") as source:
        # The daemon sends the headers with its first frame, after registering the reader.
        task_status.started()
        async for sse in source.aiter_sse():
            at = time.perf_counter()
            if sse.data and sse.event not in ("gap", "lagged"):
                receipts.got(json.loads(sse.data), at)


@asynccontextmanager
async def readers(daemon: Daemon, count: int) -> AsyncIterator[Receipts]:
    """`count` SSE readers, alternately on the socket and on TCP, all registered on entry."""
    receipts = Receipts(count)
    async with _uds(daemon) as uds, _tcp(daemon) as tcp, anyio.create_task_group() as tg:
        for index in range(count):
            await tg.start(_read, uds if index % 2 == 0 else tcp, receipts)
        yield receipts
        tg.cancel_scope.cancel()


class StampedReader:
    """A raw TCP `GET /events` whose every read carries the kernel's receive time.

    The time an event reaches a subscriber's socket, whatever this process is doing then: a
    reader parsing with httpx in this process sees the event only after its turn in this
    loop, behind the other readers' copies, so the 100-reader receipts above include this
    process's own work. Here the kernel stamps the bytes as they arrive; this process may
    read them later.
    """

    def __init__(self, address: tuple[str, int], key: str) -> None:
        self._sock = socket.create_connection(address, timeout=WAIT)
        self._sock.setsockopt(socket.SOL_SOCKET, SO_TIMESTAMPNS, 1)
        request = f"GET /events HTTP/1.1\r\nHost: sandboxd\r\nx-internal-api-key: {key}\r\n\r\n"
        self._sock.sendall(request.encode())
        self._pending = b""
        self.arrivals: dict[int, float] = {}  # event id → CLOCK_REALTIME of its arrival
        head = b""
        while b": connected" not in head:  # registered on the bus: the first frame is sent
            chunk = self._sock.recv(65536)
            if not chunk:
                raise RuntimeError(f"the daemon closed the stream: {head[:200]!r}")
            head += chunk
        if not head.startswith(b"HTTP/1.1 200"):
            raise RuntimeError(f"GET /events answered {head[:80]!r}")
        self._sock.setblocking(False)

    async def read_until(self, event_id: int) -> float:
        """The arrival time of event `event_id` (reading every event up to it)."""
        while event_id not in self.arrivals:
            await anyio.wait_readable(self._sock)
            data, ancillary, _flags, _address = self._sock.recvmsg(65536, socket.CMSG_SPACE(16))
            if not data:
                raise RuntimeError("the daemon closed the stream")
            stamps = [
                _STAMP.unpack(payload[: _STAMP.size])
                for level, kind, payload in ancillary
                if level == socket.SOL_SOCKET and kind == SO_TIMESTAMPNS
            ]
            if not stamps:
                raise RuntimeError("no receive time: SO_TIMESTAMPNS is not supported here")
            seconds, nanoseconds = stamps[-1]
            text, _, self._pending = (self._pending + data).rpartition(b"\n")
            for match in _ID.finditer(text):
                self.arrivals[int(match.group(1))] = seconds + nanoseconds / 1e9
        return self.arrivals[event_id]

    def close(self) -> None:
        self._sock.close()


async def stamped_fan_out(
    daemon: Daemon, reader_count: int, patches: int
) -> tuple[list[float], list[float]]:
    """Milliseconds from sending each PATCH to its event's arrival at each of `reader_count`
    TCP subscribers (kernel receive stamps), and to the PATCH's answer."""
    host, port = daemon.url.removeprefix("http://").rsplit(":", 1)
    subscribers = [StampedReader((host, int(port)), daemon.key) for _ in range(reader_count)]
    arrivals: list[float] = []
    answers: list[float] = []
    try:
        async with _uds(daemon) as api:
            event_id = await _last_event_id(api)
            for n in range(patches):
                body = {"town": {"crew_agents": {f"stamped{reader_count}-{n}": "claude"}}}
                sent_wall, sent = time.time(), time.perf_counter()
                answer = await api.patch("/config", json=body)
                answers.append((time.perf_counter() - sent) * 1000)
                answer.raise_for_status()
                event_id += 1
                with anyio.fail_after(WAIT):
                    for subscriber in subscribers:
                        arrivals.append((await subscriber.read_until(event_id) - sent_wall) * 1000)
    finally:
        for subscriber in subscribers:
            subscriber.close()
    return arrivals, answers


async def _last_event_id(api: httpx.AsyncClient) -> int:
    last: int = (await api.get("/status")).json()["last_event_id"]
    return last


async def api_to_sse(
    daemon: Daemon, reader_count: int, patches: int
) -> tuple[list[float], list[float]]:
    """Milliseconds from sending each PATCH to each reader's receipt, and to the PATCH's answer."""
    delivery: list[float] = []
    answers: list[float] = []
    async with _uds(daemon) as api, readers(daemon, reader_count) as receipts:
        event_id = await _last_event_id(api)
        for n in range(patches):
            # A new crew name each time: every PATCH changes the town file, one event.
            body = {"town": {"crew_agents": {f"r{reader_count}-{n}": "claude"}}}
            sent = time.perf_counter()
            answer = await api.patch("/config", json=body)
            answers.append((time.perf_counter() - sent) * 1000)
            answer.raise_for_status()
            event_id += 1
            with anyio.fail_after(WAIT):
                await receipts.all_in(event_id).wait()
            if receipts.events[event_id]["revision"] != answer.json()["revision"]:
                raise RuntimeError(f"event {event_id} is not the PATCH's")
            delivery += [(at - sent) * 1000 for at in receipts.times[event_id]]
    return delivery, answers


async def edit_to_event(daemon: Daemon, edits: int) -> list[float]:
    """Milliseconds from renaming a new town settings file into place to its event."""
    path = daemon.town_root / "settings" / "config.json"
    latencies: list[float] = []
    async with _uds(daemon) as api, readers(daemon, 1) as receipts:
        event_id = await _last_event_id(api)
        for n in range(edits):
            data = json.dumps({"type": "town-settings", "version": 1, "bench": n}, indent=2)
            temporary = path.parent / f".config.json.bench{n}.tmp"
            temporary.write_text(data + "\n")
            with temporary.open("rb") as handle:
                os.fsync(handle.fileno())
            started = time.perf_counter()
            os.replace(temporary, path)
            event_id += 1
            with anyio.fail_after(WAIT):
                await receipts.all_in(event_id).wait()
            event = receipts.events[event_id]
            if event["source"] != "external":
                raise RuntimeError(f"event {event_id} is not the edit: {event}")
            latencies.append((receipts.times[event_id][0] - started) * 1000)
    return latencies


# A rewrite in place with the same bytes, a backup copy beside the file, as a script or an
# editor saving without a change does: the store reads it and finds nothing to report.
REWRITE_IN_PLACE = 'cat "$1" > "$1.orig" && cat "$1.orig" > "$1" && rm "$1.orig"'
EDIT_PAUSE = 1.5  # s after each rewrite: far longer than its collect


async def wakeups_per_rewrite(daemon: Daemon, rewrites: int) -> tuple[float, float]:
    """The daemon's wake-ups (all its threads) per rewrite of the town settings file by bash
    (`REWRITE_IN_PLACE`), over `EDIT_PAUSE` after each; and per `EDIT_PAUSE` with none."""
    path = daemon.town_root / "settings" / "config.json"
    if not path.exists():  # its first write is an edit too: done before the baseline
        path.write_text(json.dumps({"type": "town-settings", "version": 1}))
        await anyio.sleep(EDIT_PAUSE)
    before = thread_counters(daemon.pid)
    await anyio.sleep(2 * EDIT_PAUSE)
    idle = switches_since(daemon.pid, before) / 2
    before = thread_counters(daemon.pid)
    for _ in range(rewrites):
        await anyio.run_process(["bash", "-c", REWRITE_IN_PLACE, "bash", str(path)])
        await anyio.sleep(EDIT_PAUSE)
    return switches_since(daemon.pid, before) / rewrites, idle


async def idle_cpu(daemon: Daemon, reader_count: int, window: float) -> float:
    """The daemon's CPU use, in percent of one core, over `window` seconds with idle readers."""
    async with _uds(daemon) as api, readers(daemon, reader_count):
        status = (await api.get("/status")).json()
        if status["subscribers"] != reader_count:
            raise RuntimeError(f"{status['subscribers']} subscribers, not {reader_count}")
        before = cpu_seconds(daemon.pid)
        started = time.perf_counter()
        await anyio.sleep(window)
        used = cpu_seconds(daemon.pid) - before
        return 100 * used / (time.perf_counter() - started)


async def _measure(daemon: Daemon, quick: bool) -> list[Row]:
    patches = 50 if quick else 200
    edits = 30 if quick else 100
    window = 10.0 if quick else 60.0
    rows: list[Row] = []
    one, answers = await api_to_sse(daemon, 1, patches)
    many, _ = await api_to_sse(daemon, READERS, patches)
    rows += _fan_out_rows(
        "SSE", ("reader", "readers"), one, answers, many,
        (f"baseline: the PATCH's own answer; {patches} PATCHes",
         f"baseline: 1 reader; {patches} × {READERS} receipts"),
    )  # fmt: skip
    one_arrival, stamped_answers = await stamped_fan_out(daemon, 1, patches)
    many_arrivals, _ = await stamped_fan_out(daemon, READERS, patches)
    rows += _fan_out_rows(
        "arrival", ("subscriber", "subscribers"), one_arrival, stamped_answers, many_arrivals,
        ("kernel receive stamp on a TCP subscriber; baseline: the PATCH's own answer",
         f"kernel receive stamps on {READERS} TCP subscribers; baseline: 1 subscriber"),
    )  # fmt: skip
    external = await edit_to_event(daemon, edits)
    for percent in (50, 99):
        rows.append(
            Row(
                f"external rename → event p{percent}",
                percentile(external, percent),
                "ms",
                note=f"{edits} edits; watcher debounce 50 ms, step 10 ms",
            )
        )
    per_rewrite, per_pause = await wakeups_per_rewrite(daemon, 5 if quick else 10)
    rows.append(
        Row(
            "settings file rewritten in place with the same bytes (bash): daemon wake-ups",
            per_rewrite,
            "/rewrite",
            per_pause,
            f"all threads, {EDIT_PAUSE} s after each; baseline: {EDIT_PAUSE} s with none",
        )
    )
    idle = await idle_cpu(daemon, 0, window)
    busy = await idle_cpu(daemon, READERS, window)
    rows.append(
        Row(
            f"daemon CPU, {READERS} idle SSE readers",
            busy,
            "% of a core",
            idle,
            f"baseline: no reader; {window:.0f} s windows",
        )
    )
    return rows


def _fan_out_rows(
    what: str,
    nouns: tuple[str, str],
    one: list[float],
    answers: list[float],
    many: list[float],
    notes: tuple[str, str],
) -> list[Row]:
    """p50 and p99 of PATCH → `what` at 1 reader (baseline: the PATCH's own answer) and at
    `READERS` (baseline: 1 reader)."""
    rows = [
        Row(f"PATCH → {what} p{percent}, 1 {nouns[0]}", percentile(one, percent), "ms",
            percentile(answers, percent), notes[0])
        for percent in (50, 99)
    ]  # fmt: skip
    rows += [
        Row(f"PATCH → {what} p{percent}, {READERS} {nouns[1]}", percentile(many, percent), "ms",
            percentile(one, percent), notes[1])
        for percent in (50, 99)
    ]  # fmt: skip
    return rows


async def _bare_fan_out(bare: Daemon, quick: bool) -> list[Row]:
    """The arrival rows again, against the bare stack (`bare_stack.py`): a PATCH written and
    its frame queued for each subscriber, on the same server, framework and loop."""
    patches = 50 if quick else 200
    one, answers = await stamped_fan_out(bare, 1, patches)
    many, _ = await stamped_fan_out(bare, READERS, patches)
    return _fan_out_rows(
        "arrival, bare stack", ("subscriber", "subscribers"), one, answers, many,
        ("bench/bare_stack.py; baseline: its PATCH's own answer",
         f"bench/bare_stack.py, {READERS} TCP subscribers; baseline: 1 subscriber"),
    )  # fmt: skip


def run(quick: bool) -> list[Row]:
    """Measure everything once with one daemon, then the fan-out of the bare stack; the rows
    are printed by the caller."""
    with tempfile.TemporaryDirectory(prefix="events-bench-", ignore_cleanup_errors=True) as tmp:
        workdir = Path(tmp)
        # A real cloud, as in production: the idle baseline has no sync retries to a closed port.
        with running_cloud(workdir / "cloud") as cloud:
            town, token = cloud.create_town(name="events-bench")
            with running_daemon(
                workdir, make_town(workdir / "town"), town_id=town["id"], token=token,
                cloud_url=cloud.url,
            ) as daemon:  # fmt: skip
                rows = anyio.run(_measure, daemon, quick)
        bare_town = build_town(workdir / "bare" / "town")
        with running_bare_stack(workdir / "bare", bare_town / "settings" / "config.json") as bare:
            rows += anyio.run(_bare_fan_out, bare, quick)
        return rows


if __name__ == "__main__":
    quick = "shorter runs (CPU windows 10 s)"
    raise SystemExit(
        main_of(run, name="events_bench", doc=__doc__, quick=quick, title="events_bench")
    )
