"""Malformed and hostile HTTP over raw sockets against the live daemon's TCP listener.

Every case ends with a 4xx (or the server closing the connection), never a 5xx, nothing
applied, and /healthz still 200. A request head sent slowly is cut by the keep-alive timer
(`server.HEADER_TIMEOUT`), which runs from the connection's start until a whole head came.
"""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass
from urllib.parse import urlsplit

import httpx
import pytest

from gastown_sandboxd.http.server import HEADER_TIMEOUT, MAX_HEADER_BYTES
from tests.fixtures.daemon import DaemonProcess

from . import shared_daemon

PATCH_BODY = b'{"town": {"default_agent": "codex"}}'


@dataclass(frozen=True)
class Exchange:
    """What came back on a raw connection: the bytes, and how the server ended it."""

    data: bytes
    closed: bool
    reset: bool = False  # a reset may discard an answer the server did send

    @property
    def statuses(self) -> list[int]:
        return [
            int(line.split()[1])
            for line in self.data.split(b"\r\n")
            if line.startswith(b"HTTP/1.1 ") and len(line.split()) > 1
        ]

    def json(self) -> dict[str, object]:
        body: dict[str, object] = json.loads(self.data.split(b"\r\n\r\n", 1)[1])
        return body


@pytest.fixture(scope="module")
def module_daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DaemonProcess]:
    with shared_daemon(tmp_path_factory.mktemp("limits"), rigs=("r1",)) as daemon:
        yield daemon


@pytest.fixture
def daemon(module_daemon: DaemonProcess) -> Iterator[DaemonProcess]:
    """The module's daemon; after each test it is alive and logged no ASGI error."""
    yield module_daemon
    assert module_daemon.process.poll() is None, "the daemon died"
    assert "Error in ASGI" not in module_daemon.log_text()
    assert "Traceback" not in module_daemon.log_text()


def address(daemon: DaemonProcess) -> tuple[str, int]:
    parts = urlsplit(daemon.url)
    assert parts.hostname is not None
    assert parts.port is not None
    return parts.hostname, parts.port


def exchange(
    daemon: DaemonProcess, data: bytes, *, half_close: bool = False, wait: float = 5.0
) -> Exchange:
    """Send `data` on a new connection (then maybe shut our side) and read until the server
    closes it or `wait` seconds pass without a byte."""
    with socket.create_connection(address(daemon), timeout=wait) as conn:
        conn.sendall(data)
        if half_close:
            conn.shutdown(socket.SHUT_WR)
        received = b""
        try:
            while chunk := conn.recv(65536):
                received += chunk
        except TimeoutError:
            return Exchange(received, closed=False)
        except ConnectionResetError:
            return Exchange(received, closed=True, reset=True)
    return Exchange(received, closed=True)


def head(daemon: DaemonProcess, method: str, path: str, *lines: str) -> bytes:
    """A request head with the key, ending in the blank line."""
    fields = [f"{method} {path} HTTP/1.1", "Host: sandboxd", f"x-internal-api-key: {daemon.key}"]
    return ("\r\n".join([*fields, *lines]) + "\r\n\r\n").encode()


def assert_alive_and_unchanged(daemon: DaemonProcess) -> None:
    """/healthz answers and no PATCH of these tests reached the settings files."""
    with daemon.tcp() as client:
        assert client.get("/healthz").status_code == 200
        assert client.get("/config").json()["town"].get("default_agent") is None
    assert not (daemon.town_root / "settings" / "config.json").exists()


@pytest.mark.parametrize(
    ("case", "content_length"),
    [("non-numeric", "abc"), ("negative", "-5"), ("signed", "+2"), ("hex", "0x10")],
)
def test_a_bad_content_length_is_400_and_closed(
    daemon: DaemonProcess, case: str, content_length: str
) -> None:
    """A Content-Length that is not a decimal number: 400 and the connection closed."""
    data = head(
        daemon,
        "PATCH",
        "/config",
        "Content-Type: application/json",
        f"Content-Length: {content_length}",
    )
    # The head alone: a body the server never reads could turn its close into a reset.
    answer = exchange(daemon, data)
    assert answer.statuses == [400], (case, answer.data)
    assert answer.closed
    assert_alive_and_unchanged(daemon)


def test_two_different_content_lengths_are_400(daemon: DaemonProcess) -> None:
    """Two Content-Length fields that disagree: 400, nothing applied."""
    data = head(
        daemon,
        "PATCH",
        "/config",
        "Content-Type: application/json",
        f"Content-Length: {len(PATCH_BODY)}",
        "Content-Length: 2",
    )
    answer = exchange(daemon, data)
    assert answer.statuses == [400]
    assert answer.closed
    assert_alive_and_unchanged(daemon)


@pytest.mark.parametrize("route", [("PATCH", "/config"), ("PUT", "/token")])
def test_a_body_shorter_than_its_content_length_then_close_is_400(
    daemon: DaemonProcess, route: tuple[str, str]
) -> None:
    """The peer declares more than it sends and closes: 400 `incomplete_body`, nothing applied."""
    data = head(daemon, *route, "Content-Type: application/json", "Content-Length: 100")
    answer = exchange(daemon, data + PATCH_BODY[:20], half_close=True)
    assert answer.statuses == [400], answer.data
    # The HTTP layer may see the close first and answer 400 itself (`bad_request`).
    assert answer.json()["error"] in {"incomplete_body", "bad_request"}
    assert_alive_and_unchanged(daemon)


def test_content_length_with_transfer_encoding_is_refused_and_smuggles_nothing(
    daemon: DaemonProcess,
) -> None:
    """Content-Length and Transfer-Encoding together: 400, connection closed, and the request
    hidden after the chunked body is never answered."""
    smuggled = b"GET /status HTTP/1.1\r\nHost: sandboxd\r\n\r\n"
    body = b"0\r\n\r\n" + smuggled
    data = head(
        daemon,
        "PATCH",
        "/config",
        "Content-Type: application/json",
        f"Content-Length: {len(body)}",
        "Transfer-Encoding: chunked",
    )
    answer = exchange(daemon, data + body)
    assert answer.closed
    assert answer.statuses == [400] or (answer.reset and not answer.statuses), answer.data
    if answer.statuses:
        assert answer.json()["error"] == "ambiguous_framing"
    answer = exchange(daemon, data)  # the head alone, to read the answer for sure
    assert answer.statuses == [400]
    assert answer.json()["error"] == "ambiguous_framing"
    assert_alive_and_unchanged(daemon)


@pytest.mark.parametrize(
    ("case", "body", "half_close"),
    [
        ("bad chunk size", b"zz\r\n" + PATCH_BODY + b"\r\n0\r\n\r\n", False),
        ("negative chunk size", b"-5\r\n" + PATCH_BODY + b"\r\n0\r\n\r\n", False),
        ("chunk longer than said", b"3\r\n" + PATCH_BODY + b"\r\n0\r\n\r\n", False),
        ("missing final chunk", b"%x\r\n" % len(PATCH_BODY) + PATCH_BODY + b"\r\n", True),
    ],
)
def test_odd_chunking_is_refused(
    daemon: DaemonProcess, case: str, body: bytes, half_close: bool
) -> None:
    """Broken chunked bodies: 400 (or the connection dropped), never 5xx, nothing applied."""
    data = head(
        daemon,
        "PATCH",
        "/config",
        "Content-Type: application/json",
        "Transfer-Encoding: chunked",
    )
    answer = exchange(daemon, data + body, half_close=half_close)
    assert answer.closed, case
    assert answer.statuses == [400] or (answer.reset and not answer.statuses), (case, answer)
    assert_alive_and_unchanged(daemon)


def test_an_unknown_transfer_coding_is_refused(daemon: DaemonProcess) -> None:
    """`Transfer-Encoding: gzip, chunked` is not served: 501 from the HTTP layer, nothing else."""
    data = head(
        daemon,
        "PATCH",
        "/config",
        "Content-Type: application/json",
        "Transfer-Encoding: gzip, chunked",
    )
    answer = exchange(daemon, data)
    assert answer.statuses == [501]
    assert answer.json()["error"] == "not_implemented"  # JSON, as every error (§4)
    assert answer.closed
    assert_alive_and_unchanged(daemon)


def test_a_request_h11_cannot_read_is_a_json_400(daemon: DaemonProcess) -> None:
    """A head that is not HTTP is refused by hypercorn itself, before the app: 400 with the
    JSON error body (it had no body at all)."""
    answer = exchange(daemon, b"GARBAGE\r\n\r\n")
    assert answer.statuses == [400]
    assert answer.json() == {
        "error": "bad_request",
        "message": "the request could not be read as HTTP/1.1 (malformed, or cut short)",
        "details": [],
    }
    assert answer.closed
    assert_alive_and_unchanged(daemon)


@pytest.mark.parametrize(
    ("case", "lines"),
    [
        ("one long header", [f"X-Big: {'a' * (MAX_HEADER_BYTES + 1)}"]),
        ("many headers", [f"X-Field-{i}: {'b' * 60}" for i in range(400)]),
        ("beyond one read", [f"X-Big-{i}: {'c' * 8000}" for i in range(12)]),
    ],
)
def test_a_header_block_over_16_kib_is_refused(
    daemon: DaemonProcess, case: str, lines: list[str]
) -> None:
    """A header block above 16 KiB: 431 (or 400) and closed, never a 5xx."""
    answer = exchange(daemon, head(daemon, "GET", "/status", *lines))
    assert answer.closed, case
    assert answer.statuses in ([431], [400]), (case, answer.data[:200])
    assert answer.json()["error"] in {"headers_too_large", "bad_request"}, case
    with daemon.tcp() as client:
        assert client.get("/healthz").status_code == 200


def test_a_header_block_just_under_the_limit_is_served(daemon: DaemonProcess) -> None:
    """The limit is the header block: a request a little under 16 KiB is answered normally."""
    answer = exchange(
        daemon,
        head(daemon, "GET", "/healthz", f"X-Big: {'a' * (MAX_HEADER_BYTES - 300)}"),
        wait=1.0,
    )
    assert answer.statuses == [200]


def test_a_request_head_sent_one_byte_at_a_time_is_cut_off(daemon: DaemonProcess) -> None:
    """A peer dribbling its request head is disconnected by the header timer long before it
    finishes, and other clients are served meanwhile."""
    step = 0.05
    data = head(daemon, "GET", "/status", f"X-Slow: {'s' * int(4 * HEADER_TIMEOUT / step)}")
    sent = 0
    with socket.create_connection(address(daemon), timeout=5.0) as conn:
        try:
            for sent in range(len(data)):
                conn.sendall(data[sent : sent + 1])
                time.sleep(step)
                if sent == 10:
                    with daemon.tcp() as client:
                        assert client.get("/healthz").status_code == 200
        except (BrokenPipeError, ConnectionResetError):
            pass
        else:
            raise AssertionError("the server took the whole slow head")
    print(f"cut after {sent} of {len(data)} bytes (header timer {HEADER_TIMEOUT} s)")
    assert sent < len(data) // 2
    with daemon.tcp() as client:
        assert client.get("/healthz").status_code == 200


def test_200_idle_connections_do_not_stop_the_api(daemon: DaemonProcess) -> None:
    """With 200 connections open (half of them mid-head), /healthz and /status still answer."""
    idle: list[socket.socket] = []
    try:
        for index in range(200):
            conn = socket.create_connection(address(daemon), timeout=5.0)
            idle.append(conn)
            if index % 2:
                conn.sendall(b"GET /status HTTP/1.1\r\nHost: sand")
        with httpx.Client(base_url=daemon.url, timeout=5.0) as client:
            assert client.get("/healthz").status_code == 200
            headers = {"x-internal-api-key": daemon.key}
            assert client.get("/status", headers=headers).status_code == 200
        with daemon.local() as local:
            assert local.get("/healthz").status_code == 200
    finally:
        for conn in idle:
            conn.close()
    with daemon.tcp() as client:
        assert client.get("/healthz").status_code == 200
