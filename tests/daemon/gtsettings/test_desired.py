"""The cloud client of the desired configuration: requests sent, answers mapped to 502/503/504."""

from __future__ import annotations

import json
import socket
import threading
from collections.abc import AsyncIterator

import anyio
import httpx
import pytest

from gastown_sandboxd import _http
from gastown_sandboxd.errors import DesiredConfigUnavailable
from gastown_sandboxd.gtsettings.desired import MAX_BODY_BYTES, DesiredConfigClient
from tests.fixtures.net import count_ca_loads, unused_port

KEY = "internal-key-0123456789"


def client_for(handler: httpx.MockTransport) -> DesiredConfigClient:
    return DesiredConfigClient(
        base_url="http://cloud.test/", internal_key=KEY, town_id="town-1", transport=handler
    )


async def test_fetch_sends_the_key_and_the_bearer_and_reads_the_record() -> None:
    """GET …/towns/{id}/config with both credentials; the record's fields come back."""
    seen: list[httpx.Request] = []

    def answer(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        record = {"generation": 3, "desired": {"town": {}}, "observedGeneration": 2}
        return httpx.Response(200, json={**record, "state": "pending"})

    async with client_for(httpx.MockTransport(answer)) as client:
        desired = await client.fetch("the-token")
    assert (desired.generation, desired.desired, desired.observed_generation) == (
        3,
        {"town": {}},
        2,
    )
    assert desired.state == "pending"
    request = seen[0]
    assert request.url == "http://cloud.test/api/gastown/towns/town-1/config"
    assert request.headers["x-internal-api-key"] == KEY
    assert request.headers["authorization"] == "Bearer the-token"


async def test_report_posts_the_status_body() -> None:
    """POST …/config/status with observedGeneration, revision and error."""
    bodies: list[object] = []

    def answer(request: httpx.Request) -> httpx.Response:
        bodies.append(json.loads(request.content))
        return httpx.Response(200, json={})

    async with client_for(httpx.MockTransport(answer)) as client:
        await client.report("t", observed_generation=4, revision="abc", error=None)
    assert bodies == [{"observedGeneration": 4, "revision": "abc", "error": None}]


@pytest.mark.parametrize(
    ("status", "body", "expected", "reason"),
    [
        (503, b"{}", 503, "http_503"),
        (429, b"{}", 503, "http_429"),
        (500, b"{}", 502, "http_500"),
        (401, b"{}", 502, "unauthorized"),
        (404, b"{}", 502, "town_inactive"),
        (200, b"not json", 502, "bad_json"),
        (200, b"[]", 502, "bad_body"),
        (200, b'{"generation": -1, "desired": {}}', 502, "bad_body"),
        (200, b'{"generation": 1, "desired": []}', 502, "bad_body"),
    ],
)
async def test_bad_answers_are_mapped_to_a_gateway_status(
    status: int, body: bytes, expected: int, reason: str
) -> None:
    """Every answer but a good 200 is a DesiredConfigUnavailable with the status to send."""
    transport = httpx.MockTransport(lambda request: httpx.Response(status, content=body))
    async with client_for(transport) as client:
        with pytest.raises(DesiredConfigUnavailable) as caught:
            await client.fetch(None)
    assert (caught.value.status, caught.value.reason) == (expected, reason)
    assert "not json" not in caught.value.message


async def _chunks(size: int) -> AsyncIterator[bytes]:
    for _ in range(size // 4096 + 1):
        yield b" " * 4096


@pytest.mark.parametrize(
    ("headers", "content", "reason"),
    [
        ({"content-encoding": "gzip"}, b"{}", "content_encoding"),
        ({"content-length": str(MAX_BODY_BYTES + 1)}, b"", "body_too_large"),
        ({}, None, "body_too_large"),
    ],
    ids=["compressed", "declared-too-large", "streamed-too-large"],
)
async def test_an_answer_that_could_grow_past_the_cap_is_not_read(
    headers: dict[str, str], content: bytes | None, reason: str
) -> None:
    """A compressed answer could expand past the cap, so it is refused unread; a body past
    the cap, declared or as it streams in (None), is refused before it is all held: 502."""
    body: bytes | AsyncIterator[bytes] = _chunks(MAX_BODY_BYTES + 1) if content is None else content

    def answer(request: httpx.Request) -> httpx.Response:
        response = httpx.Response(200, content=body)
        response.headers.update(headers)
        return response

    async with client_for(httpx.MockTransport(answer)) as client:
        with pytest.raises(DesiredConfigUnavailable) as caught:
            await client.fetch("t")
    assert (caught.value.status, caught.value.reason) == (502, reason)


async def test_a_report_the_cloud_refuses_is_a_gateway_status() -> None:
    """The status the sync sends is refused (500): a 502 saying so, for the sync to retry."""
    transport = httpx.MockTransport(lambda request: httpx.Response(500, json={}))
    async with client_for(transport) as client:
        with pytest.raises(DesiredConfigUnavailable) as caught:
            await client.report("t", observed_generation=1, revision="r", error=None)
    assert (caught.value.status, caught.value.reason) == (502, "http_500")


@pytest.mark.parametrize(
    ("error", "expected"),
    [
        (httpx.ConnectError("refused"), 503),
        (httpx.ReadTimeout("slow"), 504),
        (httpx.RemoteProtocolError("broken"), 502),
    ],
)
async def test_transport_failures_are_mapped_to_a_gateway_status(
    error: Exception, expected: int
) -> None:
    """Refused: 503; too slow: 504; a broken exchange: 502."""

    def fail(request: httpx.Request) -> httpx.Response:
        raise error

    async with client_for(httpx.MockTransport(fail)) as client:
        with pytest.raises(DesiredConfigUnavailable) as caught:
            await client.fetch("t")
    assert caught.value.status == expected


@pytest.mark.parametrize(("scheme", "loads"), [("http", 0), ("https", 1)])
async def test_the_ca_bundle_is_loaded_only_for_an_https_cloud(
    scheme: str, loads: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """No TLS is spoken to an http:// cloud, so its client never loads the CA bundle (a large
    part of an idle start's CPU); an https:// one does, once."""
    calls = count_ca_loads(monkeypatch)
    url = f"{scheme}://127.0.0.1:{unused_port()}"
    async with DesiredConfigClient(base_url=url, internal_key="k", town_id="t") as client:
        for _ in range(2):
            with pytest.raises(DesiredConfigUnavailable):
                await client.fetch(None)
    assert len(calls) == loads


class KeepAliveCloud:
    """A real HTTP/1.1 server on 127.0.0.1 that keeps every connection open and answers each
    request with a desired configuration; `connections` counts the connections it accepted."""

    RECORD = json.dumps({"generation": 1, "desired": {"town": {}}}).encode()

    def __init__(self) -> None:
        self.connections = 0
        self._server = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self._server.getsockname()[1]}"
        threading.Thread(target=self._accept, daemon=True).start()

    def close(self) -> None:
        self._server.close()

    def _accept(self) -> None:
        while True:
            try:
                peer = self._server.accept()[0]
            except OSError:
                return
            self.connections += 1
            threading.Thread(target=self._serve, args=(peer,), daemon=True).start()

    def _serve(self, peer: socket.socket) -> None:
        head = b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n"
        answer = head + b"content-length: %d\r\n\r\n%s" % (len(self.RECORD), self.RECORD)
        with peer:
            while data := peer.recv(65536):
                if b"\r\n\r\n" in data:
                    peer.sendall(answer)


async def test_an_idle_connection_to_the_cloud_is_not_kept_past_its_expiry(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Calls close together share one connection; a call after `KEEPALIVE_S` of quiet opens
    a new one, and so never meets a connection the cloud is closing at its own keep-alive
    limit (5 s for hypercorn, httpx's default expiry too). The expiry is shortened here so
    the test need not wait 2 s."""
    monkeypatch.setattr(_http, "KEEPALIVE_S", 0.1)
    cloud = KeepAliveCloud()
    try:
        async with DesiredConfigClient(base_url=cloud.url, internal_key=KEY, town_id="t") as c:
            await c.fetch(None)
            await c.fetch(None)
            together = cloud.connections
            await anyio.sleep(0.3)
            await c.fetch(None)
    finally:
        cloud.close()
    assert together == 1
    assert cloud.connections == 2
