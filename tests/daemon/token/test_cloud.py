"""The refresh call over HTTP: the request it sends and how every kind of answer maps."""

from __future__ import annotations

import email.utils
import gzip
import json
from collections.abc import AsyncIterator, Callable
from typing import Any

import anyio
import anyio.abc
import httpx
import pytest

from gastown_sandboxd.errors import RefreshError
from gastown_sandboxd.token.cloud import CloudClient
from tests.daemon.minting import mint

KEY = "internal-key-0123456789"
NEW = mint(1_800_000_000)
OLD = mint(1_799_990_000)
Handler = Callable[[httpx.Request], Any]


class FixedClock:
    def __init__(self, now: float) -> None:
        self.now = now

    def time(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        await anyio.sleep(0)


def client(handler: Handler, **kwargs: Any) -> CloudClient:
    kwargs.setdefault("base_url", "https://cloud.test")
    return CloudClient(
        internal_key=KEY, town_id="town-1", transport=httpx.MockTransport(handler), **kwargs
    )


async def refresh(handler: Handler, token: str | None = OLD, **kwargs: Any) -> str:
    async with client(handler, **kwargs) as cloud:
        return await cloud.refresh(token)


async def failure(handler: Handler, **kwargs: Any) -> RefreshError:
    with pytest.raises(RefreshError) as caught:
        await refresh(handler, **kwargs)
    return caught.value


def answer(status: int = 200, **kwargs: Any) -> Handler:
    return lambda request: httpx.Response(status, **kwargs)


async def test_request_shape() -> None:
    """POST to the refresh path with the town, the key, the old token and Accept."""
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(200, text=NEW)

    assert await refresh(handler, base_url="https://cloud.test/prefix/") == NEW
    (request,) = seen
    assert request.method == "POST"
    assert str(request.url) == "https://cloud.test/prefix/api/gastown/refresh-token"
    assert json.loads(request.content) == {"townId": "town-1"}
    assert request.headers["content-type"] == "application/json"
    assert request.headers["x-internal-api-key"] == KEY
    assert request.headers["authorization"] == f"Bearer {OLD}"
    assert request.headers["accept"] == "application/json, text/plain;q=0.9"


async def test_no_bearer_without_a_token() -> None:
    """Without a held token no Authorization header is sent."""
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(200, text=NEW)

    await refresh(handler, token=None)
    assert "authorization" not in seen[0].headers


@pytest.mark.parametrize(
    ("content_type", "body"),
    [
        ("text/plain", NEW),
        ("text/plain; charset=utf-8", NEW + "\n"),
        ("application/json", json.dumps({"token": NEW, "expiresAt": "2027-01-15T08:00:00Z"})),
        ("application/json; charset=utf-8", json.dumps({"result": {"data": NEW}})),
        ("application/json", json.dumps({"result": {"data": {"json": NEW}}})),
        ("application/vnd.trpc+json", json.dumps({"result": {"data": NEW}})),
    ],
)
async def test_token_is_read_from_every_answer_form(content_type: str, body: str) -> None:
    """Plain text, {"token"} and both tRPC envelopes all give the token."""
    assert await refresh(answer(text=body, headers={"content-type": content_type})) == NEW


@pytest.mark.parametrize("status", [401, 403])
async def test_refused_key_is_unauthorized(status: int) -> None:
    """401 and 403 are kind unauthorized."""
    error = await failure(answer(status, json={"error": "nope"}))
    assert (error.kind, error.reason, error.status) == ("unauthorized", "unauthorized", status)


@pytest.mark.parametrize("status", [404, 409, 410, 423])
async def test_unknown_stopped_or_destroyed_town_is_inactive(status: int) -> None:
    """404, 409, 410 and 423 are kind inactive."""
    error = await failure(answer(status))
    assert (error.kind, error.status) == ("inactive", status)


async def test_429_with_retry_after_seconds_is_busy() -> None:
    """429 with Retry-After in seconds is busy with that delay."""
    error = await failure(answer(429, headers={"retry-after": "120"}))
    assert (error.kind, error.status, error.retry_after) == ("busy", 429, 120.0)


async def test_429_with_a_retry_after_too_long_for_a_number_is_busy_not_a_crash() -> None:
    """A Retry-After of 5,000 digits is busy with an infinite delay (the schedule caps it),
    never an exception that would end the refresher."""
    error = await failure(answer(429, headers={"retry-after": "1" + "0" * 5000}))
    assert (error.kind, error.status, error.retry_after) == ("busy", 429, float("inf"))


async def test_429_without_retry_after_is_busy() -> None:
    """429 without Retry-After is still busy, with no delay given."""
    error = await failure(answer(429))
    assert (error.kind, error.retry_after) == ("busy", None)


async def test_503_with_retry_after_date_is_busy() -> None:
    """503 with an HTTP-date Retry-After is busy; the delay counts from the clock."""
    clock = FixedClock(1_800_000_000.0)
    date = email.utils.formatdate(clock.now + 45, usegmt=True)
    error = await failure(answer(503, headers={"retry-after": date}), clock=clock)
    assert (error.kind, error.status, error.retry_after) == ("busy", 503, 45.0)


async def test_503_without_retry_after_is_outage() -> None:
    """503 without Retry-After is an outage."""
    error = await failure(answer(503))
    assert (error.kind, error.reason) == ("outage", "http_503")


@pytest.mark.parametrize("status", [500, 502, 504, 599])
async def test_other_5xx_is_outage(status: int) -> None:
    """Other 5xx answers are outages."""
    error = await failure(answer(status, headers={"retry-after": "10"}))
    assert (error.kind, error.status, error.retry_after) == ("outage", status, None)


@pytest.mark.parametrize("status", [201, 204, 302, 400, 413, 418])
async def test_other_statuses_are_broken(status: int) -> None:
    """Anything else is a broken cloud (redirects are not followed)."""
    headers = {"location": "https://elsewhere.test/"} if status == 302 else {}
    error = await failure(answer(status, text=NEW, headers=headers))
    assert (error.kind, error.status) == ("broken", status)


@pytest.mark.parametrize(
    ("exc", "reason"),
    [
        (httpx.ConnectError("refused"), "connect_error"),
        (httpx.ConnectTimeout("slow"), "timeout"),
        (httpx.ReadTimeout("slow"), "timeout"),
        (httpx.RemoteProtocolError("bad"), "protocol_error"),
        (httpx.ReadError("reset"), "transport_error"),
    ],
)
async def test_network_errors_are_outages(exc: Exception, reason: str) -> None:
    """Connection errors and timeouts are outages."""

    def handler(request: httpx.Request) -> httpx.Response:
        raise exc

    error = await failure(handler)
    assert (error.kind, error.reason, error.status) == ("outage", reason, None)


async def test_whole_exchange_has_one_deadline() -> None:
    """A server that drips its body forever is cut off at the timeout."""

    async def drip() -> AsyncIterator[bytes]:
        while True:
            yield b"a"
            await anyio.sleep(0.02)

    error = await failure(
        answer(headers={"content-type": "text/plain"}, content=drip()), timeout=0.2
    )
    assert (error.kind, error.reason) == ("outage", "timeout")


async def test_body_over_64_kib_is_broken() -> None:
    """A streamed body over 64 KiB is broken and not read further."""

    async def big() -> AsyncIterator[bytes]:
        for _ in range(1024):
            yield b"x" * 1024

    error = await failure(answer(headers={"content-type": "text/plain"}, content=big()))
    assert (error.kind, error.reason) == ("broken", "body_too_large")


async def test_declared_length_over_64_kib_is_broken() -> None:
    """A Content-Length over 64 KiB is refused before reading."""
    error = await failure(answer(text="x" * (1024 * 1024)))
    assert (error.kind, error.reason) == ("broken", "body_too_large")


async def test_body_of_exactly_64_kib_is_read() -> None:
    """The limit is inclusive: 64 KiB of JSON is parsed (and has no token)."""
    body = json.dumps({"pad": "x" * (64 * 1024 - 11)}).encode()
    assert len(body) == 64 * 1024
    error = await failure(answer(content=body, headers={"content-type": "application/json"}))
    assert error.reason == "no_token_in_body"


async def test_compressed_body_is_refused() -> None:
    """A compressed body (which could expand past the cap) is broken."""
    headers = {"content-type": "text/plain", "content-encoding": "gzip"}
    error = await failure(answer(content=gzip.compress(NEW.encode()), headers=headers))
    assert (error.kind, error.reason) == ("broken", "content_encoding")


@pytest.mark.parametrize(
    ("content_type", "body", "reason"),
    [
        ("text/plain", b"", "empty_body"),
        ("application/json", b"  \n", "empty_body"),
        ("text/html", b"<html><body>502 Bad Gateway</body></html>", "bad_content_type"),
        ("", NEW.encode(), "bad_content_type"),
        ("application/json", b"{not json", "bad_json"),
        ("application/json", b'["a", "b"]', "no_token_in_body"),
        ("application/json", b'{"token": 5}', "no_token_in_body"),
        ("application/json", b'{"result": {"data": {"json": null}}}', "no_token_in_body"),
        ("application/json", b'{"result": "x"}', "no_token_in_body"),
        ("text/plain", b"\xff\xfe\xfd", "not_utf8"),
        ("application/json", b"[" * 100_00 + b"]" * 100_00, "bad_json"),
    ],
)
async def test_garbage_200_bodies_are_broken(content_type: str, body: bytes, reason: str) -> None:
    """A 200 whose body holds no token is broken, with a reason that never repeats the body."""
    headers = {"content-type": content_type} if content_type else {}
    error = await failure(answer(content=body, headers=headers))
    assert (error.kind, error.reason, error.status) == ("broken", reason, 200)
    assert "502 Bad" not in str(error)


async def test_extracted_text_is_returned_unjudged() -> None:
    """The client returns what the cloud sent; judging it is the refresher's job."""
    assert await refresh(answer(text="$(touch x)")) == "$(touch x)"


async def test_repr_hides_the_key() -> None:
    """The internal key is not in the client's repr."""
    async with client(answer(text=NEW)) as cloud:
        assert KEY not in repr(cloud)
        assert "town-1" in repr(cloud)


async def test_aclose_closes_the_http_client() -> None:
    """After aclose the client refuses further calls."""
    cloud = client(answer(text=NEW))
    await cloud.aclose()
    with pytest.raises(RuntimeError):
        await cloud.refresh(None)


async def test_each_refresh_has_its_own_connection_and_keeps_nothing() -> None:
    """Without an injected transport every refresh opens, uses and closes its own client:
    two refreshes against a real server are two connections, and nothing is held after."""
    connections = 0

    async def serve(stream: anyio.abc.SocketStream) -> None:
        nonlocal connections
        connections += 1
        async with stream:
            request = b""
            while b"\r\n\r\n" not in request:
                request += await stream.receive()
            head, _, body = request.partition(b"\r\n\r\n")
            length = int(head.lower().split(b"content-length:")[1].split(b"\r\n")[0])
            while len(body) < length:
                body += await stream.receive()
            answer_body = NEW.encode()
            await stream.send(
                b"HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\n"
                + f"content-length: {len(answer_body)}\r\n\r\n".encode()
                + answer_body
            )

    listener = await anyio.create_tcp_listener(local_host="127.0.0.1")
    port = listener.extra(anyio.abc.SocketAttribute.local_port)  # noqa: S610
    async with listener, anyio.create_task_group() as tg:
        tg.start_soon(listener.serve, serve)
        cloud = CloudClient(base_url=f"http://127.0.0.1:{port}", internal_key=KEY, town_id="t")
        async with cloud:
            assert await cloud.refresh(OLD) == NEW
            assert await cloud.refresh(NEW) == NEW
            assert cloud._shared is None
        assert connections == 2
        tg.cancel_scope.cancel()
