"""Model configuration (CONTRACT §4 PATCH /config) end to end, through a daemon subprocess.

Every status code, error body and rule of the route is checked in-process
(tests/daemon/http/test_app.py); here one PATCH goes through each real listener, and a body
over the limit through hypercorn, with the files on disk, the event stream and the metrics as
the proof.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.daemon.gt_samples import (
    BACKEND_FILE,
    FRONTEND_FILE,
    RIG_SETTINGS,
    TOWN_FILE,
    TOWN_SETTINGS,
)
from tests.fixtures.daemon import DaemonFactory, DaemonProcess

from .gt_town import TOWN_ID, read_events, start_config_daemon

LIMIT = 64 * 1024


@pytest.fixture
def daemon(daemon_factory: DaemonFactory, tmp_path: Path) -> DaemonProcess:
    """A daemon serving the realistic town (town file, rig frontend with a file, rig backend)."""
    return start_config_daemon(daemon_factory, tmp_path)


def read(daemon: DaemonProcess, relative: str) -> bytes:
    return (daemon.town_root / relative).read_bytes()


def test_a_patch_through_each_listener_reaches_the_files_the_stream_and_the_metrics(
    daemon: DaemonProcess,
) -> None:
    """The daemon starts without rewriting gt's files; TCP refuses a PATCH without the key;
    a PATCH through the socket and one through TCP with the key are written, each file
    announced on the event stream, and counted by /metrics."""
    assert read(daemon, TOWN_FILE) == TOWN_SETTINGS
    assert read(daemon, FRONTEND_FILE) == RIG_SETTINGS
    assert not (daemon.town_root / BACKEND_FILE).exists()
    town = {"town": {"role_agents": {"mayor": "claude-haiku"}}}
    rigs = {"rigs": {"backend": {"agent": "codex"}}}
    with httpx.Client(base_url=daemon.url, timeout=10) as bare:
        refused = bare.patch("/config", json=town)
    assert refused.status_code == 401
    assert refused.json()["error"] == "unauthorized"
    assert read(daemon, TOWN_FILE) == TOWN_SETTINGS
    with daemon.local() as local, daemon.tcp() as tcp:
        start = local.get("/status").json()
        assert start["town_id"] == TOWN_ID
        assert start["config_revision"] == local.get("/config").json()["revision"]
        over_socket = local.patch("/config", json=town)
        over_tcp = tcp.patch("/config", json=rigs)
        assert tcp.get("/config").json() == local.get("/config").json()
        metrics = tcp.get("/metrics").text
    for answer in (over_socket, over_tcp):
        assert answer.status_code == 200, answer.text
        assert answer.headers["etag"] == f'"{answer.json()["revision"]}"'
    assert over_socket.json()["files"] == [TOWN_FILE]
    assert over_tcp.json()["files"] == [BACKEND_FILE]
    assert json.loads(read(daemon, TOWN_FILE))["role_agents"]["mayor"] == "claude-haiku"
    assert json.loads(read(daemon, BACKEND_FILE))["agent"] == "codex"
    events = read_events(daemon, after=0, count=2)
    assert [(e["type"], e["source"], e["file"]) for e in events] == [
        ("config.changed", "api", TOWN_FILE),
        ("config.changed", "api", BACKEND_FILE),
    ]
    assert events[1]["revision"] == over_tcp.json()["revision"]
    assert 'gastown_sandboxd_config_patches_total{status="200"} 2.0' in metrics.splitlines()


def test_a_body_over_the_limit_is_413_and_the_connection_is_closed(
    daemon: DaemonProcess,
) -> None:
    """64 KiB + 1 sent in chunks through hypercorn, on each listener: 413 with `Connection:
    close` (the rest of the body is unread), and the client's next request is served."""
    big = json.dumps({"town": {"crew_agents": {"a": "x" * LIMIT}}}).encode()[: LIMIT + 1]

    def chunks() -> Iterator[bytes]:
        for start in range(0, len(big), 4096):
            yield big[start : start + 4096]

    headers = {"content-type": "application/json"}
    with daemon.local() as local, daemon.tcp() as tcp:
        for client in (local, tcp):
            answer = client.patch("/config", content=chunks(), headers=headers)
            assert answer.request.headers["transfer-encoding"] == "chunked"
            assert answer.status_code == 413, answer.text
            assert answer.json()["error"] == "body_too_large"
            assert answer.headers["connection"] == "close"
            assert client.get("/config").status_code == 200
    assert read(daemon, TOWN_FILE) == TOWN_SETTINGS
