"""A rig folder swapped for a symlink out of the town, in a tight loop, while PATCHes run.

The real daemon writes every file relative to folder descriptors opened with `O_NOFOLLOW`
from the town root, so whichever moment the swap lands at (before the check, between the
check and the write, during the write) no byte reaches the sentinel folder outside the town.
Each PATCH is applied into the real rig folder (200) or refused (422: no such rig at check
time; 409: the folder or file changed under the write); nothing else.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import socket
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

from tests.fixtures.daemon import DaemonFactory

from . import local_daemon
from .test_paths import make_outside, snapshot

PATCHES = 160
CLIENTS = 2


class UnixConnection(http.client.HTTPConnection):
    """http.client over the daemon's local socket."""

    def __init__(self, path: Path) -> None:
        super().__init__("sandboxd", timeout=15)
        self._path = str(path)

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        sock.connect(self._path)
        self.sock = sock


def swap_until(stop: threading.Event, rig: Path, aside: Path, outside: Path) -> int:
    """Swap `rig` for a symlink to `outside` and back until `stop`; how many swaps."""
    swaps = 0
    while not stop.is_set():
        os.rename(rig, aside)
        os.symlink(outside, rig)
        os.unlink(rig)
        os.rename(aside, rig)
        swaps += 1
        # Real most of the time, so that PATCHes pass the check and meet the swap later on.
        time.sleep(0.002)
    return swaps


def test_a_rig_swapped_for_a_symlink_mid_patch_never_redirects_a_write(
    daemon_factory: DaemonFactory, tmp_path: Path
) -> None:
    """PATCHes of the town and the swapped rig, two clients at once, against a thread that
    swaps the rig folder for a symlink out of the town: the sentinel stays byte-identical."""
    daemon = local_daemon(daemon_factory, tmp_path, rigs=("victim", "steady"))
    outside = make_outside(tmp_path / "outside")
    sentinel = snapshot(outside)
    rig = daemon.town_root / "victim"
    statuses: Counter[int] = Counter()
    unexpected: list[tuple[int, Any]] = []
    lock = threading.Lock()

    def patch_loop(client: int) -> None:
        conn = UnixConnection(daemon.socket)
        try:
            for number in range(PATCHES // CLIENTS):
                agent = {"provider": "claude", "command": "claude", "args": [f"{client}-{number}"]}
                body = {
                    "town": {"agents": {"t": agent}},
                    "rigs": {"victim": {"agents": {"v": agent}}, "steady": {"agent": "codex"}},
                }
                conn.request(
                    "PATCH", "/config", json.dumps(body), {"content-type": "application/json"}
                )
                answer = conn.getresponse()
                data = json.loads(answer.read())
                with lock:
                    statuses[answer.status] += 1
                    if answer.status not in (200, 409, 422):
                        unexpected.append((answer.status, data))
        finally:
            conn.close()

    stop = threading.Event()
    swaps: list[int] = []
    swapper = threading.Thread(
        target=lambda: swaps.append(swap_until(stop, rig, tmp_path / "victim-aside", outside))
    )
    swapper.start()
    try:
        clients = [threading.Thread(target=patch_loop, args=(n,)) for n in range(CLIENTS)]
        for thread in clients:
            thread.start()
        for thread in clients:
            thread.join(120)
    finally:
        stop.set()
        swapper.join(10)
    assert unexpected == []
    assert snapshot(outside) == sentinel
    assert sum(statuses.values()) == PATCHES
    assert statuses[200] > 0, statuses  # writes did happen while the folder moved
    assert statuses[409] + statuses[422] > 0, statuses  # and the swaps did meet them
    assert swaps[0] > PATCHES // 4
    written = json.loads((rig / "settings" / "config.json").read_bytes())
    assert written["type"] == "rig-settings"
    with contextlib.suppress(FileNotFoundError):
        assert not any(p.name.endswith(".tmp") for p in (rig / "settings").iterdir())
    print(f"PATCH answers while swapping: {dict(statuses)}; swaps: {swaps[0]}")
