"""The socket client's event stream against a real Unix socket serving the daemon's SSE frames."""

from __future__ import annotations

import socket
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from gastown_sandboxd.client import DaemonClient, DaemonUnavailable, running_daemon_env_file
from gastown_sandboxd.events.bus import EventBus, Gap
from gastown_sandboxd.events.sse import CONNECTED, HEARTBEAT, control_frame, event_frame
from tests.fixtures.net import count_ca_loads


def _chunk(data: bytes) -> bytes:
    return f"{len(data):x}\r\n".encode() + data + b"\r\n"


@pytest.fixture
def sse_socket(short_tmp: Path) -> Iterator[tuple[Path, list[bytes]]]:
    """A Unix socket that answers the first request with the frames the test puts in the list."""
    path = short_tmp / "sse.sock"
    frames: list[bytes] = []
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(str(path))
    server.listen(1)

    def answer() -> None:
        while True:  # the client probes the socket before it sends its request
            peer = server.accept()[0]
            if peer.recv(65536):
                break
            peer.close()
        with peer:
            head = b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n"
            peer.sendall(head + b"transfer-encoding: chunked\r\n\r\n")
            for frame in frames:
                peer.sendall(_chunk(frame))
            peer.sendall(b"0\r\n\r\n")

    thread = threading.Thread(target=answer, daemon=True)
    thread.start()
    yield path, frames
    thread.join(5)
    server.close()


def test_events_skip_heartbeats_after_an_event(sse_socket: tuple[Path, list[bytes]]) -> None:
    """A heartbeat after an event is not an event: the client yields only the real ones."""
    path, frames = sse_socket
    bus = EventBus()
    first = bus.emit("token.expired", {"exp": 2, "iat": 1})
    second = bus.emit("town.inactive", {"status": 410, "reason": "destroyed"})
    frames += [CONNECTED, event_frame(first), HEARTBEAT, HEARTBEAT, event_frame(second), HEARTBEAT]
    with DaemonClient(path) as client:
        events = list(client.events())
    assert events == [first.as_json(), second.as_json()]


def test_a_gap_is_reported_on_stderr_not_yielded(
    sse_socket: tuple[Path, list[bytes]], capsys: pytest.CaptureFixture[str]
) -> None:
    """A gap frame (events lost before a replay) is a warning, never an event line."""
    path, frames = sse_socket
    bus = EventBus()
    event = bus.emit("token.expired", {"exp": 2, "iat": 1})
    frames += [CONNECTED, control_frame("gap", Gap(after_id=5, first_id=9).as_json())]
    frames += [event_frame(event)]
    with DaemonClient(path) as client:
        events = list(client.events(last_event_id=5))
    assert events == [event.as_json()]
    assert "events after 5 are gone; the stream resumes at 9" in capsys.readouterr().err


def test_the_socket_client_never_loads_the_ca_bundle(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A Unix socket never speaks TLS: each command's client skips the CA bundle."""
    calls = count_ca_loads(monkeypatch)
    with DaemonClient(tmp_path / "none.sock") as client, pytest.raises(DaemonUnavailable):
        client.get("/status")
    assert calls == []


def test_no_daemon_on_the_socket_names_no_env_file(short_tmp: Path) -> None:
    """Nothing at the socket, or a socket nobody serves: no env file is named (None), and
    the caller falls back to its own; never an error of the client's own making."""
    assert running_daemon_env_file(short_tmp / "none.sock") is None
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as stale:
        stale.bind(str(short_tmp / "stale.sock"))
        assert running_daemon_env_file(short_tmp / "stale.sock") is None
