"""A TCP proxy on 127.0.0.1 that breaks HTTP/1.1 exchanges on purpose, in front of a real server.

One request per connection: the proxy reads the client's request (head, and a body framed by
`Content-Length`), asks the upstream with `Connection: close`, reads its whole answer, and then
answers the client as the current `Fault` says and closes. Pass-through is byte for byte (the
upstream itself says `connection: close`), so a client never reuses a connection across a
change of fault, and every request is one `Hit`.

    async with chaos_proxy(cloud.url) as proxy:
        proxy.set(Fault(Mode.STORM, retry_after="120"), times=3)  # then pass-through again
        ... CloudClient(base_url=proxy.url, ...)
"""

from __future__ import annotations

import enum
import socket
import struct
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager, suppress
from dataclasses import dataclass
from urllib.parse import urlsplit

import anyio
import anyio.abc
from anyio.streams.buffered import BufferedByteReceiveStream

MAX_HEAD = 64 * 1024
_END_OF_HEAD = b"\r\n\r\n"
# Everything a broken peer can make a proxy task see; none of it may stop the proxy.
_PEER_ERRORS = (
    OSError,
    anyio.BrokenResourceError,
    anyio.ClosedResourceError,
    anyio.EndOfStream,
    anyio.IncompleteRead,
    anyio.DelimiterNotFound,
)


class Mode(enum.StrEnum):
    PASS = "pass"  # the upstream's answer, byte for byte
    RESET = "reset"  # RST right after accept (SO_LINGER 0)
    RESET_AFTER_REQUEST = "reset_after_request"  # read the request, then RST
    STALL = "stall"  # read the request, never answer
    DRIBBLE = "dribble"  # the upstream's answer one byte at a time, `delay` apart
    TRUNCATE = "truncate"  # status line and headers, `keep` bytes of the body, close
    STORM = "storm"  # the proxy's own `status` answer, with `retry_after` if given
    GARBAGE = "garbage"  # `garbage` instead of the upstream's answer, then close


@dataclass(frozen=True, slots=True)
class Fault:
    """What the proxy does to the next requests; only the fields of its mode matter."""

    mode: Mode = Mode.PASS
    delay: float = 0.002
    keep: int = 16
    # False: drop Content-Length, so the cut body looks complete (close-delimited framing).
    framed: bool = True
    status: int = 503
    retry_after: str | None = None
    garbage: bytes = b"\x00\xff\x13 not HTTP at all\r\n\r\n"


@dataclass(frozen=True, slots=True)
class Hit:
    """One connection the proxy accepted: when (by `stamp`) and the mode it met."""

    at: float
    mode: Mode


class ChaosProxy:
    """The proxy's state: the current fault, and every connection it saw."""

    def __init__(self, upstream: tuple[str, int], port: int, *, stamp: Callable[[], float]) -> None:
        self.upstream = upstream
        self.url = f"http://127.0.0.1:{port}"
        # Tests with a simulated clock stamp hits with its time.
        self.stamp = stamp
        self.hits: list[Hit] = []
        self._fault = Fault()
        self._times: int | None = None

    def set(self, fault: Fault, *, times: int | None = None) -> None:
        """Apply `fault` to the next `times` connections (all, when None), then pass through."""
        self._fault = fault
        self._times = times

    def _take(self) -> Fault:
        fault = self._fault
        if self._times is not None:
            self._times -= 1
            if self._times <= 0:
                self._fault, self._times = Fault(), None
        return fault

    async def handle(self, client: anyio.abc.SocketStream) -> None:
        """Serve one connection under the current fault; peer errors end it quietly."""
        fault = self._take()
        self.hits.append(Hit(self.stamp(), fault.mode))
        async with client:
            with suppress(*_PEER_ERRORS):
                await self._serve(client, fault)

    async def _serve(self, client: anyio.abc.SocketStream, fault: Fault) -> None:
        if fault.mode is Mode.RESET:
            _reset(client)
            return
        reader = BufferedByteReceiveStream(client)
        request = await _read_request(reader)
        if fault.mode is Mode.RESET_AFTER_REQUEST:
            _reset(client)
        elif fault.mode is Mode.STALL:
            await anyio.sleep_forever()
        elif fault.mode is Mode.STORM:
            await client.send(_storm_answer(fault))
        elif fault.mode is Mode.GARBAGE:
            await client.send(fault.garbage)
        else:
            answer = await self._ask_upstream(request)
            await _deliver(client, answer, fault)

    async def _ask_upstream(self, request: bytes) -> bytes:
        host, port = self.upstream
        chunks: list[bytes] = []
        async with await anyio.connect_tcp(host, port) as upstream:
            await upstream.send(request)
            while True:
                try:
                    chunks.append(await upstream.receive())
                except anyio.EndOfStream:
                    break
        return b"".join(chunks)


@asynccontextmanager
async def chaos_proxy(
    upstream_url: str, *, stamp: Callable[[], float] = time.monotonic
) -> AsyncIterator[ChaosProxy]:
    """A proxy on an ephemeral port of 127.0.0.1 in front of `upstream_url`; closed on exit."""
    parts = urlsplit(upstream_url)
    assert parts.hostname is not None
    assert parts.port is not None
    listener = await anyio.create_tcp_listener(local_host="127.0.0.1", local_port=0)
    async with listener, anyio.create_task_group() as tg:
        port = listener.extra(anyio.abc.SocketAttribute.local_port)  # noqa: S610
        proxy = ChaosProxy((parts.hostname, parts.port), port, stamp=stamp)
        tg.start_soon(listener.serve, proxy.handle)
        try:
            yield proxy
        finally:
            # Stalled and dribbling connections end here, with the listener.
            tg.cancel_scope.cancel()


async def _read_request(reader: BufferedByteReceiveStream) -> bytes:
    """The client's request, re-framed with `Connection: close` for the upstream."""
    head = await reader.receive_until(_END_OF_HEAD, MAX_HEAD)
    lines = head.split(b"\r\n")
    fields = [line for line in lines[1:] if not line.lower().startswith(b"connection:")]
    length = 0
    for line in fields:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value.strip())
    body = await reader.receive_exactly(length) if length else b""
    return b"\r\n".join([lines[0], *fields, b"Connection: close"]) + _END_OF_HEAD + body


async def _deliver(client: anyio.abc.SocketStream, answer: bytes, fault: Fault) -> None:
    if fault.mode is Mode.DRIBBLE:
        for index in range(len(answer)):
            await client.send(answer[index : index + 1])
            await anyio.sleep(fault.delay)
    elif fault.mode is Mode.TRUNCATE:
        head, _, body = answer.partition(_END_OF_HEAD)
        if not fault.framed:
            lines = head.split(b"\r\n")
            head = b"\r\n".join(
                line for line in lines if not line.lower().startswith(b"content-length:")
            )
        await client.send(head + _END_OF_HEAD + body[: fault.keep])
    else:
        await client.send(answer)


def _storm_answer(fault: Fault) -> bytes:
    body = b'{"error": "unavailable", "message": "The chaos proxy is answering."}'
    head = [
        f"HTTP/1.1 {fault.status} Chaos".encode(),
        b"Content-Type: application/json",
        f"Content-Length: {len(body)}".encode(),
        b"Connection: close",
    ]
    if fault.retry_after is not None:
        head.append(f"Retry-After: {fault.retry_after}".encode())
    return b"\r\n".join(head) + _END_OF_HEAD + body


def _reset(client: anyio.abc.SocketStream) -> None:
    """Make the coming close a TCP reset: SO_LINGER on with a zero timeout."""
    raw = client.extra(anyio.abc.SocketAttribute.raw_socket)  # noqa: S610
    raw.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
