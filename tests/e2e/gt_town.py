"""A realistic gt town for the end-to-end config suites, and readers of what the daemon did."""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import httpx
from httpx_sse import connect_sse

from tests.daemon.gt_samples import make_config_town
from tests.daemon.minting import mint
from tests.fixtures.daemon import DaemonFactory, DaemonProcess

TOWN_ID = "town-e2e"
# Nothing listens on the discard port: the daemon under test never needs the cloud here.
NO_CLOUD = "http://127.0.0.1:9"


def start_config_daemon(
    daemon_factory: DaemonFactory,
    tmp_path: Path,
    *,
    town_id: str = TOWN_ID,
    token: str | None = None,
    cloud_url: str = NO_CLOUD,
    extra_env: Mapping[str, str] | None = None,
) -> DaemonProcess:
    """A daemon on a fresh realistic town, holding an acceptable token (no refresh at start)."""
    root = make_config_town(tmp_path / "town")
    env_file = tmp_path / "env" / ".env.gateway"
    env_file.parent.mkdir()
    env_file.write_text(f"# gateway\nKILO_JWT={token or mint(time.time(), town_id=town_id)}\n")
    return daemon_factory(
        town_id=town_id,
        cloud_url=cloud_url,
        town_root=root,
        env_file=env_file,
        extra_env=extra_env,
    )


def read_events(
    daemon: DaemonProcess, *, after: int, count: int, timeout: float = 10.0
) -> list[dict[str, Any]]:
    """The first `count` events after id `after`, from GET /events on the local socket."""
    found: list[dict[str, Any]] = []
    deadline = time.monotonic() + timeout
    headers = {"Last-Event-ID": str(after)}
    with contextlib.suppress(httpx.ReadTimeout):  # reported below with what did arrive
        _collect(daemon, headers, found, count, timeout, deadline)
    if len(found) < count:
        raise AssertionError(f"only {len(found)} of {count} events after {after}: {found}")
    return found


def _collect(
    daemon: DaemonProcess,
    headers: dict[str, str],
    found: list[dict[str, Any]],
    count: int,
    timeout: float,
    deadline: float,
) -> None:
    with (
        httpx.Client(
            transport=httpx.HTTPTransport(uds=str(daemon.socket)),
            base_url="http://sandboxd",
            timeout=httpx.Timeout(timeout, read=timeout),
        ) as client,
        connect_sse(client, "GET", "/events", headers=headers) as source,
    ):
        for sse in source.iter_sse():
            if sse.id:
                found.append({"id": int(sse.id), "type": sse.event, **json.loads(sse.data)})
            if len(found) >= count or time.monotonic() > deadline:
                return
