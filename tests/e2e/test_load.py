"""Load on the real daemon: PATCHes from 32 concurrent clients while 100 SSE subscribers
listen; nothing is lost, every subscriber gets every event once and in order.

The storm is bench/load_bench.py's; `python -m bench.load_bench` runs it with 1,000 PATCHes
and prints the figures. Here 500 keep the test near 12 s (1,000 take ~32 s on 2 cores, as
each PATCH re-reads every rig's growing file); `GASTOWN_LOAD_PATCHES` sets the number.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import httpx
from bench._daemon import uds_client
from bench.load_bench import (
    CLIENTS,
    SUBSCRIBERS,
    TOWN_ID,
    LoadResult,
    Target,
    agent_name,
    patch_body,
    patch_client,
    problems,
    rig_names,
    storm,
)

from tests.daemon.minting import mint
from tests.fixtures.daemon import DaemonFactory, DaemonProcess, make_town

LOAD_PATCHES = int(os.environ.get("GASTOWN_LOAD_PATCHES", "500"))  # the bench does 1,000
RSS_GROWTH_LIMIT_MIB = 200


def start_daemon(daemon_factory: DaemonFactory, tmp_path: Path, rigs: int) -> DaemonProcess:
    """A daemon with a fresh token, serving a town of `rigs` rigs named as the storm's."""
    town = make_town(tmp_path / "town", tuple(rig_names(rigs)))
    env_file = tmp_path / "home" / ".env.gateway"
    env_file.parent.mkdir()
    env_file.write_text(f"KILO_JWT={mint(time.time(), town_id=TOWN_ID)}\n")
    return daemon_factory(
        town_id=TOWN_ID,
        cloud_url="http://127.0.0.1:9",
        town_root=town,
        env_file=env_file,
        extra_env={"GASTOWN_SANDBOXD_LOG_LEVEL": "info"},
    )


async def test_patches_from_32_clients_with_100_subscribers_lose_nothing(
    daemon_factory: DaemonFactory, tmp_path: Path
) -> None:
    """Every PATCH's change is on disk at the end, every subscriber (socket and TCP) gets each
    config.changed once and in order, and the daemon's memory stays bounded."""
    daemon = start_daemon(daemon_factory, tmp_path, CLIENTS)
    town = daemon.town_root
    target = Target(daemon.url, daemon.key, daemon.socket, daemon.process.pid, town)
    result = await storm(target, patches=LOAD_PATCHES, clients=CLIENTS, subscribers=SUBSCRIBERS)
    growth = (result.rss_after_kib - result.rss_before_kib) / 1024
    print(
        f"{LOAD_PATCHES} PATCHes, {CLIENTS} clients, {SUBSCRIBERS} subscribers: "
        f"{result.wall:.1f} s, {result.throughput:.0f} PATCH/s, daemon CPU "
        f"{result.cpu_seconds:.1f} s, RSS {result.rss_before_kib / 1024:.1f} -> "
        f"{result.rss_after_kib / 1024:.1f} MiB, {result.resumed} readers came back after lagging"
    )
    assert problems(result, town) == []
    assert len(result.received) == SUBSCRIBERS
    assert sum(len(answers) for answers in result.answers.values()) == LOAD_PATCHES
    assert growth < RSS_GROWTH_LIMIT_MIB
    assert daemon.process.poll() is None


def test_the_judge_of_a_storm_sees_a_lost_patch_and_a_missed_event(tmp_path: Path) -> None:
    """`problems` (the check above) reports a change missing on disk, an event a subscriber
    missed, one it got twice, and a refused PATCH."""
    town = make_town(tmp_path / "town", ("r00", "r01"))
    result = LoadResult(patches=4, clients=2, subscribers=2)
    events = []
    for number, rig in enumerate(["r00", "r01", "r00", "r01"]):
        revision = f"rev{number}"
        result.answers.setdefault(rig, []).append({"changed": True, "revision": revision})
        events.append({"id": number + 1, "type": "config.changed", "revision": revision})
    for rig in ("r00", "r01"):
        folder = town / rig / "settings"
        folder.mkdir()
        agents: dict[str, object] = {agent_name(index): {} for index in range(2)}
        (folder / "config.json").write_text(json.dumps({"agents": agents}))
    result.received = [list(events), list(events)]
    assert problems(result, town) == []

    result.received[1] = events[:2] + events[3:]  # missed one
    assert any("subscriber 1" in problem for problem in problems(result, town))
    result.received[1] = [*events, events[-1]]  # got one twice
    assert any("subscriber 1" in problem for problem in problems(result, town))
    result.received[1] = list(events)
    (town / "r01" / "settings" / "config.json").write_text(json.dumps({"agents": {}}))
    assert any("r01" in problem for problem in problems(result, town))
    result.errors.append("r00 PATCH 1: 503")
    assert "r00 PATCH 1: 503" in problems(result, town)


async def test_each_patch_of_the_storm_goes_on_a_connection_of_its_own(
    daemon_factory: DaemonFactory, tmp_path: Path
) -> None:
    """The daemon closes a connection idle for its keep-alive time, and on a busy machine a
    storm's PATCH went into a kept connection just as it closed ("Server disconnected without
    sending a response"; a PATCH is not retried). The storm's PATCH client keeps none: each
    PATCH has a connection of its own, while a client with httpx's default limits reuses one."""
    daemon = start_daemon(daemon_factory, tmp_path, 1)
    timeout = httpx.Timeout(30.0)
    async with patch_client(daemon.socket, timeout=timeout) as patching:
        answers = [await patching.patch("/config", json=patch_body("r00", n)) for n in range(3)]
    assert [answer.status_code for answer in answers] == [200, 200, 200]
    streams = {id(answer.extensions["network_stream"]) for answer in answers}
    assert len(streams) == 3
    async with uds_client(daemon.socket, timeout=timeout) as kept:
        first, second = [await kept.get("/healthz") for _ in range(2)]
    assert first.extensions["network_stream"] is second.extensions["network_stream"]
