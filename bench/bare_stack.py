"""The bare stack: what any PATCH costs on hypercorn, Starlette and anyio, and no more.

A bare Starlette app on hypercorn that does the least a PATCH of the daemon must do: read
the body and parse it, render the town file with it (JSON, indented as gt writes it), hop
once to a worker thread and `write_atomic` it there (fsync of file and folder), put one SSE
frame (encoded once) in each subscriber's queue, answer. `GET /events` streams the frames
(`: connected` first, as the daemon's does) and `GET /status` gives the last event id, so
that `events_bench` can time the fan-out against it too. None of the daemon's own work: no
validation, no merge in gt's format, no check of the bytes on disk, journal, replay,
heartbeats, watcher or group commit.

`patch_bench` runs it beside the daemon on the same town file, with the same clients: the
daemon's figures over the bare stack's are what the daemon's own work costs, and a goal the
bare stack misses is out of reach of any daemon built on this stack. It serves the same two
routes the rounds use (`PATCH /config`, `GET /healthz`) on a Unix socket and on TCP (for
wrk; no key).

`python -m bench.bare_stack SOCKET PORT FILE` prints `READY` once both listen.
"""

from __future__ import annotations

import json
import select
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from ._daemon import READY_DEADLINE, Daemon, stop_process


def main() -> None:
    import anyio
    import anyio.to_thread
    from anyio.streams.memory import MemoryObjectSendStream
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import JSONResponse, StreamingResponse
    from starlette.routing import Route

    from gastown_sandboxd._hypercorn import Config, serve
    from gastown_sandboxd.atomic import write_atomic

    socket_path, port, town_file = sys.argv[1], int(sys.argv[2]), Path(sys.argv[3])
    doc: dict[str, Any] = json.loads(town_file.read_bytes())

    subscribers: set[MemoryObjectSendStream[bytes]] = set()
    last_id = 0

    async def patch(request: Request) -> JSONResponse:
        nonlocal last_id
        body = json.loads(await request.body())
        new = {**doc, **body.get("town", {})}
        data = (json.dumps(new, indent=2) + "\n").encode()
        await anyio.to_thread.run_sync(write_atomic, town_file, data)
        last_id += 1
        event = {"id": last_id, "type": "config.changed", "keys": sorted(body.get("town", {}))}
        frame = f"id: {last_id}\nevent: config.changed\ndata: {json.dumps(event)}\n\n".encode()
        for subscriber in subscribers:
            subscriber.send_nowait(frame)
        return JSONResponse({"changed": True})

    async def events(request: Request) -> StreamingResponse:
        send, receive = anyio.create_memory_object_stream[bytes](1000)

        async def frames() -> AsyncIterator[bytes]:
            subscribers.add(send)
            try:
                yield b": connected\n\n"
                async for frame in receive:
                    yield frame
            finally:
                subscribers.discard(send)

        return StreamingResponse(frames(), media_type="text/event-stream")

    async def status(request: Request) -> JSONResponse:
        return JSONResponse({"last_event_id": last_id})

    async def healthz(request: Request) -> JSONResponse:
        return JSONResponse({"status": "ok"})

    app = Starlette(
        routes=[
            Route("/config", patch, methods=["PATCH"]),
            Route("/events", events),
            Route("/status", status),
            Route("/healthz", healthz),
        ]
    )
    unix = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    unix.bind(socket_path)
    tcp = socket.create_server(("127.0.0.1", port))
    for listener in (unix, tcp):
        listener.listen(128)
    config = Config()
    config.bind = [f"fd://{unix.detach()}", f"fd://{tcp.detach()}"]
    config.accesslog = None
    config.errorlog = None
    print("READY", flush=True)
    anyio.run(lambda: serve(app, config, shutdown_trigger=anyio.Event().wait))


@contextmanager
def running_bare_stack(
    workdir: Path, town_file: Path, *, prefix: Sequence[str] = ()
) -> Iterator[Daemon]:
    """The bare stack serving `town_file`, as a `Daemon` (socket, TCP URL, pid) for the rounds;
    `prefix` goes before its argv (`_callgrind.prefix`)."""
    socket_path = workdir / "bare.sock"
    with socket.socket() as probe:  # a free port; the bare stack binds it at once
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    log = workdir / "bare.log"
    argv = [*prefix, sys.executable, "-m", "bench.bare_stack"]
    argv += [str(socket_path), str(port), str(town_file)]
    with log.open("wb") as sink:
        started_wall, started = time.time(), time.perf_counter()
        process = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=sink)
    try:
        assert process.stdout is not None
        # Its first line within the deadline: a server that hangs in its imports fails here,
        # not in a read that never returns.
        readable, _, _ = select.select([process.stdout], [], [], READY_DEADLINE)
        if not readable or process.stdout.readline().strip() != b"READY":
            raise RuntimeError(f"the bare stack did not start: {log.read_text()[-2000:]}")
        yield Daemon(
            process, f"http://127.0.0.1:{port}", "", socket_path, town_file.parent.parent, log,
            started, started_wall,
        )  # fmt: skip
    finally:
        stop_process(process)
        if process.stdout is not None:
            process.stdout.close()


if __name__ == "__main__":
    main()
