"""The socket client's event stream against a real Unix socket serving the daemon's SSE frames."""

from __future__ import annotations

import json
import socket
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from gastown_sandboxd.client import (
    RECONNECT_CAP_S,
    RECONNECT_FIRST_S,
    DaemonClient,
    DaemonUnavailable,
    running_daemon_env_file,
)
from gastown_sandboxd.events.bus import EventBus, Gap
from gastown_sandboxd.events.sse import CONNECTED, HEARTBEAT, control_frame, event_frame
from tests.fixtures.net import count_ca_loads


def _chunk(data: bytes) -> bytes:
    return f"{len(data):x}\r\n".encode() + data + b"\r\n"


def _sse_answer(*frames: bytes) -> bytes:
    head = b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n"
    head += b"transfer-encoding: chunked\r\n\r\n"
    return head + b"".join(_chunk(frame) for frame in frames) + b"0\r\n\r\n"


def _json_answer(status: int, body: object) -> bytes:
    data = json.dumps(body).encode()
    head = f"HTTP/1.1 {status} X\r\ncontent-type: application/json\r\n"
    return head.encode() + b"content-length: %d\r\nconnection: close\r\n\r\n" % len(data) + data


class ScriptedDaemon:
    """A Unix socket that answers each request with the next of `answers`, then closes the
    connection; `requests` holds what each request sent. `stop()` removes the socket (the
    daemon is gone), `start()` binds it again. Connections that send nothing (the client's
    probe of the socket) are closed unanswered."""

    def __init__(self, path: Path, answers: list[bytes]) -> None:
        self.path, self.answers, self.requests = path, answers, list[bytes]()
        self._server: socket.socket | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        server.bind(str(self.path))
        server.listen(8)
        self._server = server
        self._thread = threading.Thread(target=self._serve, args=(server,), daemon=True)
        self._thread.start()

    def stop(self) -> None:
        assert self._server is not None
        assert self._thread is not None
        self.path.unlink()
        self._server.shutdown(socket.SHUT_RDWR)
        self._server.close()
        self._thread.join(5)
        self._server = None

    @property
    def running(self) -> bool:
        return self._server is not None

    def _serve(self, server: socket.socket) -> None:
        while True:
            try:
                peer = server.accept()[0]
            except OSError:
                return
            with peer:
                request = peer.recv(65536)
                if request and self.answers:
                    self.requests.append(request)
                    peer.sendall(self.answers.pop(0))


Scripted = Callable[[list[bytes]], ScriptedDaemon]


@pytest.fixture
def scripted(short_tmp: Path) -> Iterator[Scripted]:
    """Start a `ScriptedDaemon` with the given answers (at `d.sock`); stopped at the end."""
    made: list[ScriptedDaemon] = []

    def start(answers: list[bytes]) -> ScriptedDaemon:
        daemon = ScriptedDaemon(short_tmp / "d.sock", answers)
        daemon.start()
        made.append(daemon)
        return daemon

    yield start
    for daemon in made:
        if daemon.running:
            daemon.stop()


def _last_event_ids(requests: list[bytes]) -> list[str | None]:
    ids: list[str | None] = []
    for request in requests:
        if not request.startswith(b"GET /events "):
            continue
        lines = request.decode().lower().split("\r\n")
        found = [
            line.split(":", 1)[1].strip() for line in lines if line.startswith("last-event-id:")
        ]
        ids.append(found[0] if found else None)
    return ids


def test_events_skip_heartbeats_after_an_event(scripted: Scripted) -> None:
    """A heartbeat after an event is not an event: the client yields only the real ones."""
    bus = EventBus()
    first = bus.emit("token.expired", {"exp": 2, "iat": 1})
    second = bus.emit("town.inactive", {"status": 410, "reason": "destroyed"})
    frames = [CONNECTED, event_frame(first), HEARTBEAT, HEARTBEAT, event_frame(second), HEARTBEAT]
    daemon = scripted([_sse_answer(*frames)])
    with DaemonClient(daemon.path) as client:
        events = list(client.events())
    assert events == [first.as_json(), second.as_json()]


def test_a_gap_is_reported_on_stderr_not_yielded(
    scripted: Scripted, capsys: pytest.CaptureFixture[str]
) -> None:
    """A gap frame (events lost before a replay) is a warning, never an event line."""
    bus = EventBus()
    event = bus.emit("token.expired", {"exp": 2, "iat": 1})
    gap = control_frame("gap", Gap(after_id=5, first_id=9).as_json())
    daemon = scripted([_sse_answer(CONNECTED, gap, event_frame(event))])
    with DaemonClient(daemon.path) as client:
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


def test_a_daemon_that_never_answers_is_one_clear_error(short_tmp: Path) -> None:
    """A socket that takes the connection and never answers (a daemon stopped, its loop held):
    DaemonUnavailable naming the socket and the wait, which the CLI prints as one line
    (before: httpx's ReadTimeout and ~80 lines of traceback)."""
    path = short_tmp / "silent.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as silent:
        silent.bind(str(path))
        silent.listen(1)
        with DaemonClient(path, timeout=0.2) as client, pytest.raises(DaemonUnavailable) as caught:
            client.get("/status")
    assert str(caught.value) == f"the daemon at {path} did not answer GET /status within 0.2 s"


# --- following the stream across the daemon's stops -----------------------------------------


def test_follow_resumes_after_the_last_event_once_the_daemon_is_back(
    scripted: Scripted, capsys: pytest.CaptureFixture[str]
) -> None:
    """The daemon ends the stream (a stop), is gone for three tries, then serves again (a
    restart): the client waits 0.25, 0.5, 1 s, resumes after the last event it yielded,
    gets the new run's events after its gap notice, and says once that the stream was lost
    and once that it is back."""
    bus = EventBus()
    first, second = (
        bus.emit("token.expired", {"exp": 2, "iat": 1}),
        bus.emit("town.inactive", {"status": 410, "reason": "destroyed"}),
    )
    restarted = EventBus(first_id=second.id + 100)
    third = restarted.emit("token.expired", {"exp": 3, "iat": 2})
    gap = control_frame("gap", Gap(after_id=second.id, first_id=third.id).as_json())
    daemon = scripted(
        [
            _json_answer(200, {"last_event_id": first.id - 1}),
            _sse_answer(CONNECTED, event_frame(first), event_frame(second)),
            _sse_answer(CONNECTED, gap, event_frame(third)),
        ]
    )
    waits: list[float] = []

    def sleep(seconds: float) -> None:
        waits.append(seconds)
        if len(waits) == 1:
            daemon.stop()
        elif len(waits) == 4:
            daemon.start()

    with DaemonClient(daemon.path) as client:
        stream = client.events(follow=True, sleep=sleep)
        events = [next(stream) for _ in range(3)]
    assert events == [first.as_json(), second.as_json(), third.as_json()]
    assert waits == [0.25, 0.5, 1.0, 2.0]
    assert waits[0] == RECONNECT_FIRST_S
    assert _last_event_ids(daemon.requests) == [str(first.id - 1), str(second.id)]
    err = capsys.readouterr().err.splitlines()
    assert err == [
        "gastown-sandboxd: the event stream ended (the daemon ended it); resuming after event "
        f"{second.id}",
        "gastown-sandboxd: the event stream is back",
        f"gastown-sandboxd: events after {second.id} are gone; the stream resumes at {third.id}",
    ]


def test_follow_waits_at_most_the_cap_between_tries(scripted: Scripted) -> None:
    """A daemon gone for long is asked again every RECONNECT_CAP_S, not ever more rarely."""
    bus = EventBus()
    event = bus.emit("token.expired", {"exp": 2, "iat": 1})
    daemon = scripted([_sse_answer(CONNECTED, event_frame(event))])
    waits: list[float] = []

    class Enough(Exception):
        pass

    def sleep(seconds: float) -> None:
        waits.append(seconds)
        if len(waits) == 1:
            daemon.stop()
        if len(waits) == 9:
            raise Enough

    with DaemonClient(daemon.path) as client, pytest.raises(Enough):
        for _ in client.events(last_event_id=0, follow=True, sleep=sleep):
            pass
    assert waits == [0.25, 0.5, 1.0, 2.0, 4.0, 4.0, 4.0, 4.0, 4.0]
    assert max(waits) == RECONNECT_CAP_S


def test_follow_with_no_daemon_at_the_start_fails_at_once(short_tmp: Path) -> None:
    """Nothing answers when the command starts: the same clear error as without follow, and
    no waiting (a typo in --socket is not waited out)."""
    waits: list[float] = []
    with (
        DaemonClient(short_tmp / "none.sock") as client,
        pytest.raises(DaemonUnavailable, match="cannot reach the daemon"),
    ):
        next(client.events(last_event_id=3, follow=True, sleep=waits.append))
    assert waits == []


def test_falling_behind_is_resumed_when_following(
    scripted: Scripted, capsys: pytest.CaptureFixture[str]
) -> None:
    """A `lagged` notice ends the stream with an error without follow; with follow the
    client connects again at once after the last event it got, and loses nothing the ring
    still holds."""
    bus = EventBus()
    first, second = (
        bus.emit("token.expired", {"exp": 2, "iat": 1}),
        bus.emit("town.inactive", {"status": 410, "reason": "destroyed"}),
    )
    lagged = control_frame("lagged", {"last_event_id": first.id})
    answers = [
        _sse_answer(CONNECTED, event_frame(first), lagged),
        _sse_answer(CONNECTED, event_frame(second)),
    ]
    daemon = scripted(list(answers))
    with DaemonClient(daemon.path) as client, pytest.raises(DaemonUnavailable, match="fell behind"):
        list(client.events(last_event_id=0))
    daemon.answers[:] = answers  # the one the error left unasked is dropped
    waits: list[float] = []
    with DaemonClient(daemon.path) as client:
        stream = client.events(last_event_id=0, follow=True, sleep=waits.append)
        events = [next(stream), next(stream)]
    assert events == [first.as_json(), second.as_json()]
    assert waits == [RECONNECT_FIRST_S]
    assert _last_event_ids(daemon.requests)[-2:] == ["0", str(first.id)]
    assert "fell behind the event stream" in capsys.readouterr().err


def test_an_answer_that_is_no_event_stream_is_a_clear_error(scripted: Scripted) -> None:
    """A 503 (a daemon stopping) or any answer that is not an event stream: the command's
    error names it; never a traceback from the SSE parser."""
    daemon = scripted(
        [
            _json_answer(503, {"error": "stopping", "message": "the daemon is stopping"}),
            b"HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\ncontent-length: 2\r\n\r\nhi",
        ]
    )
    with DaemonClient(daemon.path) as client:
        with pytest.raises(DaemonUnavailable, match="answered 503 to GET /events"):
            list(client.events())
        with pytest.raises(DaemonUnavailable, match="answered no event stream"):
            list(client.events())
