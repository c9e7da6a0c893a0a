"""Events end to end: the real daemon and cloud, SSE clients on both listeners, files edited
by other processes."""

from __future__ import annotations

import hashlib
import json
import os
import queue
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import anyio
import anyio.abc
import httpx
import pytest
from anyio.streams.memory import MemoryObjectReceiveStream
from httpx_sse import aconnect_sse, connect_sse

from tests.fixtures.cloud import CloudServer
from tests.fixtures.daemon import DaemonFactory, DaemonProcess, client_limits, make_town
from tests.waiting import eventually_async

USER = "user-events"
RIG = "frontend"
TOWN_FILE = "settings/config.json"
RIG_FILE = f"{RIG}/settings/config.json"
EVENT_WAIT = 10.0

# Another process writing like gt does: a temporary file in the same folder, then rename.
ATOMIC_WRITE = """
import os, sys
path, data = sys.argv[1], sys.argv[2]
os.makedirs(os.path.dirname(path), exist_ok=True)
tmp = os.path.join(os.path.dirname(path), "." + os.path.basename(path) + ".gt42.tmp")
with open(tmp, "w") as f:
    f.write(data)
    f.flush()
    os.fsync(f.fileno())
os.replace(tmp, path)
"""


@dataclass
class Town:
    """A town created in the real cloud, served by a real daemon."""

    cloud: CloudServer
    town_id: str
    daemon: DaemonProcess

    @property
    def root(self) -> Path:
        return self.daemon.town_root

    def mint(self, *, lifetime: int | None = None, iat: int | None = None) -> str:
        """A token for this town signed with the cloud's secret, issued at `iat` (now)."""
        return self.cloud.mint(USER, self.town_id, lifetime=lifetime, now=iat)

    def uds(self, **limits: int) -> httpx.AsyncClient:
        """An async client of the daemon's Unix socket (no key needed there)."""
        return httpx.AsyncClient(
            transport=httpx.AsyncHTTPTransport(
                uds=str(self.daemon.socket), limits=client_limits(**limits)
            ),
            base_url="http://sandboxd",
            timeout=httpx.Timeout(30.0),
        )

    def tcp(self, **limits: int) -> httpx.AsyncClient:
        """An async client of the daemon's TCP listener with the internal key."""
        return httpx.AsyncClient(
            base_url=self.daemon.url,
            headers={"x-internal-api-key": self.daemon.key},
            limits=client_limits(**limits),
            timeout=httpx.Timeout(30.0),
        )


def gt_file(kind: str, **values: Any) -> str:
    """A settings file as gt writes it: type and version first, two-space indent."""
    return json.dumps({"type": kind, "version": 1, **values}, indent=2) + "\n"


def write_by_other_process(path: Path, text: str, *, in_place: bool = False) -> None:
    """Write `path` from a separate process: atomic rename (python) or in place (bash)."""
    if in_place:
        argv = ["bash", "-c", 'printf "%s" "$2" > "$1"', "bash", str(path), text]
    else:
        argv = [sys.executable, "-c", ATOMIC_WRITE, str(path), text]
    subprocess.run(argv, check=True, timeout=10)


@pytest.fixture
def town(cloud: CloudServer, daemon_factory: DaemonFactory, tmp_path: Path) -> Town:
    """A daemon for a fresh town with one rig that already has settings, and its token."""
    return start_town(cloud, daemon_factory, tmp_path)


def start_town(
    cloud: CloudServer, daemon_factory: DaemonFactory, tmp_path: Path, wrapper: Sequence[str] = ()
) -> Town:
    """The `town` fixture's town, its daemon run through `wrapper` (see `daemon_factory`)."""
    town_json, token = cloud.create_town(user_id=USER, name="events")
    root = make_town(tmp_path / "town", rigs=(RIG,))
    (root / "settings" / "config.json").write_text(gt_file("town-settings", theme="dark"))
    (root / RIG / "settings").mkdir()
    (root / RIG / "settings" / "config.json").write_text(gt_file("rig-settings", merge="squash"))
    env_file = tmp_path / "home" / ".env.gateway"
    env_file.parent.mkdir()
    env_file.write_text(f"# gateway for agents\nKILO_BASE=https://api.kilo.ai\nKILO_JWT={token}\n")
    daemon = daemon_factory(
        town_id=town_json["id"],
        cloud_url=cloud.url,
        town_root=root,
        env_file=env_file,
        extra_env={"INTERNAL_API_KEY": cloud.internal_key},
        wrapper=wrapper,
    )
    return Town(cloud=cloud, town_id=town_json["id"], daemon=daemon)


async def get_json(client: httpx.AsyncClient, path: str) -> dict[str, Any]:
    answer = await client.get(path)
    assert answer.status_code == 200, answer.text
    body: dict[str, Any] = answer.json()
    return body


async def patch(client: httpx.AsyncClient, body: dict[str, Any]) -> dict[str, Any]:
    answer = await client.patch("/config", json=body)
    assert answer.status_code == 200, answer.text
    result: dict[str, Any] = answer.json()
    return result


@asynccontextmanager
async def event_stream(
    client: httpx.AsyncClient,
) -> AsyncIterator[MemoryObjectReceiveStream[dict[str, Any]]]:
    """An SSE subscription read in the background; yields once the daemon has registered it."""
    send, receive = anyio.create_memory_object_stream[dict[str, Any]](10_000)

    async def read(*, task_status: anyio.abc.TaskStatus[None]) -> None:
        async with send, aconnect_sse(client, "GET", "/events") as source:
            # The daemon sends its headers with the first frame, after registering us.
            task_status.started()
            async for sse in source.aiter_sse():
                if not sse.data:
                    continue  # httpx-sse turns a heartbeat after an id into an empty event
                event = json.loads(sse.data)
                assert (sse.id, sse.event) == (str(event["id"]), event["type"])
                await send.send(event)

    async with anyio.create_task_group() as tg, receive:
        await tg.start(read)
        yield receive
        tg.cancel_scope.cancel()


async def next_event(stream: MemoryObjectReceiveStream[dict[str, Any]]) -> dict[str, Any]:
    with anyio.fail_after(EVENT_WAIT):
        return await stream.receive()


# --- 100 subscribers, 1,000 events ---------------------------------------------------------

SUBSCRIBERS = 100
TCP_SUBSCRIBERS = 30
SENDERS = 4
PATCHES = 452  # each changes the town file and the rig file: two events
PUSHES = 96  # each a new token: one event
EVENTS = 2 * PATCHES + PUSHES
LEAVERS = (0, SUBSCRIBERS - 1)  # one on the socket, one on TCP
LEAVE_AT = 300  # events after the first
AWAY_JOBS = 50  # PATCHes and pushes answered while a leaver is away


@dataclass
class Subscriber:
    """One SSE client that reads until `until_id`, optionally leaving and coming back."""

    client: httpx.AsyncClient
    until_id: int
    leave_at: int | None = None
    events: list[dict[str, Any]] = field(default_factory=list)
    frames: list[str] = field(default_factory=list)
    resumed_at: list[tuple[int, int]] = field(default_factory=list)

    @property
    def last_id(self) -> int | None:
        return self.events[-1]["id"] if self.events else None

    async def read(
        self, *, last_event_id: int | None, task_status: anyio.abc.TaskStatus[None]
    ) -> None:
        headers = {} if last_event_id is None else {"Last-Event-ID": str(last_event_id)}
        async with aconnect_sse(self.client, "GET", "/events", headers=headers) as source:
            task_status.started()
            async for sse in source.aiter_sse():
                if not sse.data:
                    continue  # httpx-sse turns a heartbeat after an id into an empty event
                self.frames.append(sse.event)
                assert sse.event != "gap", f"events lost: {sse.data}"
                if sse.event == "lagged":
                    return  # a reader the daemon dropped for being slow resumes from its last id
                event = json.loads(sse.data)
                assert sse.id == str(event["id"])
                assert sse.event == event["type"]
                self.events.append(event)
                if event["id"] >= self.until_id or event["id"] == self.leave_at:
                    return


async def run_subscriber(
    sub: Subscriber, started: Callable[[], None], sent: Callable[[], int]
) -> None:
    async with anyio.create_task_group() as tg:
        await tg.start(partial(sub.read, last_event_id=None))
        started()
    while (last := sub.last_id) is None or last < sub.until_id:
        if last is not None and last == sub.leave_at:
            # Stay away while more is sent, so that coming back must replay what was missed.
            at_leave = sent()
            while sent() < at_leave + AWAY_JOBS:
                await anyio.sleep(0.01)
            sub.resumed_at.append((last, sent() - at_leave))
        async with anyio.create_task_group() as tg:
            await tg.start(partial(sub.read, last_event_id=last))


async def test_hundred_subscribers_get_every_event_once_in_order(town: Town) -> None:
    """100 SSE clients on the socket and TCP each get 1,000 real events exactly once, in order,
    a client that leaves and comes back with Last-Event-ID loses nothing, and /status counts
    the open streams."""
    uds = town.uds(max_connections=SUBSCRIBERS + 10, max_keepalive_connections=SUBSCRIBERS)
    tcp = town.tcp(max_connections=SUBSCRIBERS + 10, max_keepalive_connections=SUBSCRIBERS)
    async with uds, tcp, town.uds() as api:
        base = (await get_json(api, "/status"))["last_event_id"]
        last = base + EVENTS
        subs = [
            Subscriber(
                tcp if index >= SUBSCRIBERS - TCP_SUBSCRIBERS else uds,
                until_id=last,
                leave_at=base + LEAVE_AT if index in LEAVERS else None,
            )
            for index in range(SUBSCRIBERS)
        ]
        now = int(time.time())
        # Distinct issue times make distinct tokens: every push is a change.
        tokens = [town.mint(iat=now - age) for age in range(1, PUSHES + 1)]
        done = 0
        connected = 0

        def on_started() -> None:
            nonlocal connected
            connected += 1

        async def sender(index: int) -> None:
            """Its own crew and worker names flip between two agents: every PATCH changes them."""
            nonlocal done
            pushes = tokens[index::SENDERS]
            for n in range(PATCHES // SENDERS):
                agent = ("claude", "codex")[n % 2]
                body = {
                    "town": {"crew_agents": {f"crew{index}": agent}},
                    "rigs": {RIG: {"worker_agents": {f"worker{index}": agent}}},
                }
                result = await patch(api, body)
                assert result["files"] == [TOWN_FILE, RIG_FILE]
                if n % 4 == 3 and pushes:
                    answer = await api.put("/token", json={"token": pushes.pop()})
                    assert answer.status_code == 200, answer.text
                    done += 1
                done += 1
            assert not pushes

        started = time.perf_counter()
        async with anyio.create_task_group() as tg:
            for sub in subs:
                tg.start_soon(run_subscriber, sub, on_started, lambda: done)
            with anyio.fail_after(20):
                while connected < SUBSCRIBERS:
                    await anyio.sleep(0.01)
            status = await eventually_async(
                lambda: _status_with(api, lambda s: s["subscribers"] == SUBSCRIBERS)
            )
            assert status["subscribers"] == SUBSCRIBERS
            connect_time = time.perf_counter() - started
            started = time.perf_counter()
            async with anyio.create_task_group() as senders:
                for index in range(SENDERS):
                    senders.start_soon(sender, index)
            sent_time = time.perf_counter() - started
        delivered_time = time.perf_counter() - started

        expected = list(range(base + 1, last + 1))
        reference = subs[1].events
        for index, sub in enumerate(subs):
            assert [event["id"] for event in sub.events] == expected, index
            assert sub.events == reference, index
            assert "gap" not in sub.frames, index
        for index in LEAVERS:
            ((left_at, missed),) = subs[index].resumed_at
            assert left_at == base + LEAVE_AT
            assert missed >= AWAY_JOBS
        kinds = [(event["type"], event.get("source")) for event in reference]
        assert kinds.count(("config.changed", "api")) == 2 * PATCHES
        assert kinds.count(("token.refreshed", "push")) == PUSHES
        # Streams that ended are no longer counted.
        await eventually_async(lambda: _status_with(api, lambda s: s["subscribers"] == 0))
        lagged = sum(sub.frames.count("lagged") for sub in subs)
        print(
            f"\n{SUBSCRIBERS} subscribers connected in {connect_time:.2f} s; {EVENTS} events "
            f"sent in {sent_time:.2f} s ({EVENTS / sent_time:.0f}/s), all delivered after "
            f"{delivered_time:.2f} s; streams dropped as lagging and resumed: {lagged}"
        )


async def _status_with(
    client: httpx.AsyncClient, check: Callable[[dict[str, Any]], bool]
) -> dict[str, Any] | None:
    status = await get_json(client, "/status")
    return status if check(status) else None


# --- external edits ------------------------------------------------------------------------


def config_fields(event: dict[str, Any]) -> dict[str, Any]:
    """A config.changed event without what varies from run to run (id, time, revision)."""
    return {k: v for k, v in event.items() if k not in ("id", "time", "revision")}


def external(rig: str | None, keys: list[str]) -> dict[str, Any]:
    return {
        "type": "config.changed",
        "scope": "town" if rig is None else "rig",
        "rig": rig,
        "file": TOWN_FILE if rig is None else f"{rig}/settings/config.json",
        "keys": keys,
        "source": "external",
    }


async def settings_changes_seen(api: httpx.AsyncClient) -> int:
    status = await get_json(api, "/status")
    seen: int = status["watcher"]["settings_changes"]
    return seen


async def test_edits_by_other_processes_are_one_external_event_each(town: Town) -> None:
    """A rename by python and an in-place write by bash of a rig's settings each give exactly
    one external config.changed naming the rig, the file and the keys that differ."""
    rig_file = town.root / RIG / "settings" / "config.json"
    async with town.uds() as api, event_stream(api) as events:
        write_by_other_process(
            rig_file, gt_file("rig-settings", merge="rebase", role_agents={"polecat": "codex"})
        )
        event = await next_event(events)
        assert config_fields(event) == external(RIG, ["merge", "role_agents"])
        view = await api.get("/config")
        assert view.json()["revision"] == event["revision"]
        assert view.json()["rigs"][RIG]["role_agents"] == {"polecat": "codex"}

        # The next edit is also the fence: had the first given two events, this would not be next.
        write_by_other_process(
            rig_file,
            gt_file("rig-settings", merge="squash", role_agents={"polecat": "codex"}),
            in_place=True,
        )
        assert config_fields(await next_event(events)) == external(RIG, ["merge"])

        write_by_other_process(town.root / "settings" / "config.json", gt_file("town-settings"))
        assert config_fields(await next_event(events)) == external(None, ["theme"])


async def test_api_write_is_one_api_event_and_never_echoes(town: Town) -> None:
    """A PATCH gives one api event per file written; the watcher sees the daemon's own writes
    but reports nothing, so a later external edit is the very next event."""
    rig_file = town.root / RIG / "settings" / "config.json"
    async with town.uds() as api, event_stream(api) as events:
        for body, files in (
            ({"rigs": {RIG: {"role_agents": {"polecat": "claude"}}}}, [RIG_FILE]),
            ({"town": {"role_effort": {"mayor": "high"}}}, [TOWN_FILE]),
        ):
            seen = await settings_changes_seen(api)
            result = await patch(api, body)
            assert result["changed"]
            assert result["files"] == files
            event = await next_event(events)
            scope = "rig" if "rigs" in body else "town"
            keys = ["role_agents"] if scope == "rig" else ["role_effort"]
            assert config_fields(event) == {
                **external(RIG if scope == "rig" else None, keys),
                "source": "api",
            }
            assert event["revision"] == result["revision"]
            # The watcher has seen the daemon's own write...
            await eventually_async(partial(_more, api, seen))
            # ...and reported nothing: the next event is this fence.
            write_by_other_process(rig_file, gt_file("rig-settings", fence=scope))
            fence = await next_event(events)
            assert fence["id"] == event["id"] + 1
            assert fence["source"] == "external"
            assert fence["file"] == RIG_FILE


async def _more(api: httpx.AsyncClient, than: int) -> bool:
    return await settings_changes_seen(api) > than


async def test_writes_to_other_files_of_the_town_and_the_home_folder_are_not_looked_at(
    town: Town,
) -> None:
    """gt appends every event of the town to `.events.jsonl` in the town root; beside the env
    file, in the home folder, a shell keeps its history and Claude Code replaces its state
    file (a lock file, a temporary file renamed over it). bash doing all three, 50 times each,
    is nothing the daemon's watcher looks at: each edit of a settings file is one change seen
    before these writes and one after, so the writes in between added none."""
    town_file = town.root / "settings" / "config.json"
    home = town.daemon.env_file.parent
    (town.root / ".events.jsonl").touch()  # before the first edit: an entry coming is seen
    writes = """
    for i in $(seq 50); do
        echo "{}" >> "$1/.events.jsonl"
        echo "ls" >> "$2/.bash_history"
        touch "$2/.claude.json.lock"
        echo "{}" > "$2/.claude.json.tmp.$i"
        mv "$2/.claude.json.tmp.$i" "$2/.claude.json"
        rm "$2/.claude.json.lock"
    done
    """
    async with town.uds() as api, event_stream(api) as events:
        seen = []
        for n in range(3):
            if n == 2:
                subprocess.run(["bash", "-c", writes, "bash", town.root, home], check=True)
            write_by_other_process(
                town_file, gt_file("town-settings", theme=f"t{n}"), in_place=True
            )
            assert config_fields(await next_event(events)) == external(None, ["theme"])
            status = await get_json(api, "/status")
            seen.append(status["watcher"]["changes_seen"])
        assert seen[2] - seen[1] == seen[1] - seen[0]
        assert status["watcher"]["restarts"] == 0


# Runs a command in a user namespace of its own whose inotify instances are 0: inotify_init1
# fails with EMFILE, as when the user's 128 are used up by other programs of the sandbox, and
# nothing outside the namespace is touched (the limit is the namespace's own).
WITHOUT_INOTIFY = (
    *("unshare", "--user", "--map-root-user", "sh", "-c"),
    *('echo 0 > /proc/sys/user/max_inotify_instances && exec "$@"', "sh"),
)


async def test_with_inotify_used_up_a_daemon_still_sees_every_edit(
    cloud: CloudServer, daemon_factory: DaemonFactory, tmp_path: Path
) -> None:
    """A real daemon with no inotify instance to be had: it says so once, `/status` shows
    the watcher polling by stat, and edits by others are events as before, two in the same
    second included (watchfiles' own polling compares whole seconds and misses the second)."""
    probe = subprocess.run([*WITHOUT_INOTIFY, "true"], capture_output=True, check=False)
    if probe.returncode != 0:
        pytest.skip(f"no user namespace with its own inotify limit here: {probe.stderr!r}")
    town = start_town(cloud, daemon_factory, tmp_path, wrapper=WITHOUT_INOTIFY)
    town_file = town.root / "settings" / "config.json"
    async with town.uds() as api, event_stream(api) as events:
        assert (await get_json(api, "/status"))["watcher"]["mode"] == "stat"
        for theme in ("one", "two"):
            write_by_other_process(town_file, gt_file("town-settings", theme=theme), in_place=True)
            assert config_fields(await next_event(events)) == external(None, ["theme"])
    told = [record["event"] for record in town.daemon.logs()]
    assert told.count("watcher_inotify_used_up") == 1
    assert "watcher_failed" not in told


async def test_rig_created_after_start_is_watched(town: Town) -> None:
    """A rig folder made after start-up whose settings another process writes is watched: an
    external event for the new file, a PATCH to that rig works, and later edits are seen."""
    async with town.uds() as api, event_stream(api) as events:
        # One rig made in two steps (folder, then its settings), one by a single other process.
        (town.root / "backend").mkdir()
        write_by_other_process(
            town.root / "backend" / "settings" / "config.json",
            gt_file("rig-settings", agent="claude"),
        )
        event = await next_event(events)
        assert config_fields(event) == external("backend", ["type", "version", "agent"])
        subprocess.run(
            [
                "bash",
                "-c",
                'mkdir -p "$1/settings" && printf "%s" "$2" > "$1/settings/config.json"',
                "bash",
                str(town.root / "docs"),
                gt_file("rig-settings", agent="codex"),
            ],
            check=True,
            timeout=10,
        )
        event = await next_event(events)
        assert config_fields(event) == external("docs", ["type", "version", "agent"])

        result = await patch(api, {"rigs": {"backend": {"role_agents": {"witness": "codex"}}}})
        assert result["files"] == ["backend/settings/config.json"]
        event = await next_event(events)
        assert config_fields(event) == {**external("backend", ["role_agents"]), "source": "api"}
        assert set(result["rigs"]) == {RIG, "backend", "docs"}

        write_by_other_process(
            town.root / "backend" / "settings" / "config.json",
            gt_file("rig-settings", agent="gemini", role_agents={"witness": "codex"}),
            in_place=True,
        )
        assert config_fields(await next_event(events)) == external("backend", ["agent"])


async def test_env_file_edited_by_another_process_is_reread(town: Town) -> None:
    """Another process renames a new acceptable token into the env file: the daemon adopts it
    (event, fingerprint, an earlier refresh plan) and does not write the file itself."""
    env_file = town.daemon.env_file
    async with town.uds() as api, event_stream(api) as events:
        before = await get_json(api, "/status")
        # A 2 h token is planned for refresh within the hour, long before the 24 h one.
        token = town.mint(lifetime=7200, iat=int(time.time()) - 10)
        text = env_file.read_text().replace(
            f"KILO_JWT={_file_token(env_file)}", f"KILO_JWT={token}"
        )
        write_by_other_process(env_file, text)
        written = env_file.stat()
        event = await next_event(events)
        assert event["type"] == "token.refreshed"
        assert event["source"] == "file"
        claims = {"iat": event["iat"], "exp": event["exp"]}
        assert claims["exp"] - claims["iat"] == 7200

        after = await get_json(api, "/status")
        assert after["token"]["fingerprint"] == hashlib.sha256(token.encode()).hexdigest()[-8:]
        assert after["token"]["fingerprint"] != before["token"]["fingerprint"]
        assert (after["token"]["iat"], after["token"]["exp"]) == (claims["iat"], claims["exp"])
        assert _instant(after["next_refresh_at"]) < claims["iat"] + 3600 + 1
        # Rescheduled: a plan for the new token (the old token's plan may fall either side).
        assert after["next_refresh_at"] != before["next_refresh_at"]

        # Fence: once this later edit is reported, the watcher has handled the env file edit.
        write_by_other_process(
            town.root / "settings" / "config.json", gt_file("town-settings", fence=1)
        )
        assert (await next_event(events))["type"] == "config.changed"
        now = env_file.stat()
        assert env_file.read_text() == text
        assert (now.st_ino, now.st_mtime_ns) == (written.st_ino, written.st_mtime_ns)


def _file_token(env_file: Path) -> str:
    for line in env_file.read_text().splitlines():
        if line.startswith("KILO_JWT="):
            return line.removeprefix("KILO_JWT=")
    raise AssertionError(f"no KILO_JWT in {env_file}")


def _instant(rfc3339: str) -> float:
    from datetime import datetime

    return datetime.fromisoformat(rfc3339).timestamp()


# --- the events command --------------------------------------------------------------------


def _cli(town: Town, *args: str) -> subprocess.Popen[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("GASTOWN_")}
    env["GASTOWN_SANDBOXD_SOCKET"] = str(town.daemon.socket)
    argv = [sys.executable, "-m", "gastown_sandboxd", "events", *args]
    return subprocess.Popen(
        argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


def test_events_command_prints_json_lines_and_filters(town: Town) -> None:
    """`events --count N` prints N live events as JSON lines; `--type` keeps only that type."""
    api = town.daemon.local()
    first_id = api.get("/status").json()["last_event_id"] + 1
    with _cli(town, "--count", "3") as live:
        deadline = time.monotonic() + EVENT_WAIT
        while api.get("/status").json()["subscribers"] < 1:
            assert live.poll() is None, "events exited before connecting"
            assert time.monotonic() < deadline, "events never connected"
            time.sleep(0.02)
        answers = []
        for agent in ("claude", "codex", "claude"):
            answer = api.patch("/config", json={"town": {"crew_agents": {"cli": agent}}})
            answers.append(answer.json())
        answer = api.put("/token", json={"token": town.mint(iat=int(time.time()) - 5)})
        assert answer.status_code == 200
        out, err = live.communicate(timeout=EVENT_WAIT)
    assert live.returncode == 0, err
    printed = [json.loads(line) for line in out.splitlines()]
    assert [event["id"] for event in printed] == [first_id, first_id + 1, first_id + 2]
    assert [event["revision"] for event in printed] == [a["revision"] for a in answers]
    assert all(event["type"] == "config.changed" for event in printed)

    with _cli(
        town, "--last-event-id", str(first_id - 1), "--type", "token.refreshed", "--count", "1"
    ) as replay:
        out, err = replay.communicate(timeout=EVENT_WAIT)
    assert replay.returncode == 0, err
    (only,) = [json.loads(line) for line in out.splitlines()]
    assert only["id"] == first_id + 3
    assert only["type"] == "token.refreshed"


# --- event ids across runs -----------------------------------------------------------------


def _start_again(town: Town, daemon_factory: DaemonFactory) -> DaemonProcess:
    """The town's daemon started again after a stop: same town, files and socket (`d0`)."""
    return daemon_factory(
        town_id=town.town_id,
        cloud_url=town.cloud.url,
        town_root=town.daemon.town_root,
        env_file=town.daemon.env_file,
        extra_env={"INTERNAL_API_KEY": town.cloud.internal_key},
        name="d0",
    )


def test_a_client_back_after_a_restart_is_told_of_the_gap_and_misses_no_new_event(
    cloud: CloudServer, daemon_factory: DaemonFactory, tmp_path: Path
) -> None:
    """A client whose last id came from the daemon's previous run comes back after a
    restart that has already emitted more events than that run did: it is told of the gap,
    then gets every event of the new run, all with ids above its own. (With ids restarting
    at 1, the new run had passed its id and replayed only what followed: it never saw the
    new run's first events.) /metrics still counts the run's events."""
    town = start_town(cloud, daemon_factory, tmp_path)
    with town.daemon.local() as api:
        for agent in ("claude", "codex"):
            assert api.patch("/config", json={"town": {"crew_agents": {"r": agent}}}).is_success
        seen = api.get("/status").json()["last_event_id"]
    assert town.daemon.stop() == 0
    again = _start_again(town, daemon_factory)
    assert again.socket == town.daemon.socket
    with again.local() as api:
        revisions = []
        for agent in ("claude", "codex", "claude", "codex"):
            answer = api.patch("/config", json={"town": {"crew_agents": {"r": agent}}})
            revisions.append(answer.json()["revision"])
        status = api.get("/status").json()
        frames: list[tuple[str, dict[str, Any]]] = []
        headers = {"Last-Event-ID": str(seen)}
        with connect_sse(api, "GET", "/events", headers=headers) as source:
            for sse in source.iter_sse():
                if sse.data:
                    frames.append((sse.event, json.loads(sse.data)))
                if sum(1 for _, event in frames if event.get("revision") in revisions) == 4:
                    break
        events_total = [
            line for line in api.get("/metrics").text.splitlines()
            if line.startswith("gastown_sandboxd_events_total ")
        ]  # fmt: skip
    (kind, gap), *events = frames
    assert (kind, gap["last_event_id"]) == ("gap", seen)
    assert gap["first_available_id"] > seen
    assert all(event["id"] > seen for _, event in events)
    assert [event["revision"] for _, event in events if "revision" in event][-4:] == revisions
    assert [event["id"] for _, event in events] == list(
        range(gap["first_available_id"], status["last_event_id"] + 1)
    )
    assert events_total == [f"gastown_sandboxd_events_total {float(len(events))}"]


def test_the_events_command_follows_the_daemon_across_a_restart(
    cloud: CloudServer, daemon_factory: DaemonFactory, tmp_path: Path
) -> None:
    """`gastown-sandboxd events` keeps printing across a stop and a start of the daemon on
    the same socket: the new run's events follow the old run's, none twice and none missed
    (those the new run emitted before the command was back are replayed), and stderr says
    the stream was lost and is back. With `--no-follow` the same stop ends it with exit 0."""
    town = start_town(cloud, daemon_factory, tmp_path)
    api = town.daemon.local()
    following, ending = _cli(town), _cli(town, "--no-follow")
    lines: queue.Queue[str] = queue.Queue()

    def read() -> None:
        for line in following.stdout or ():
            lines.put(line)

    reader = threading.Thread(target=read)
    reader.start()
    try:
        deadline = time.monotonic() + EVENT_WAIT
        while api.get("/status").json()["subscribers"] < 2:
            assert following.poll() is None, "events exited early"
            assert ending.poll() is None, "events --no-follow exited early"
            assert time.monotonic() < deadline, "events never connected"
            time.sleep(0.02)
        before = api.patch("/config", json={"town": {"crew_agents": {"f": "codex"}}}).json()
        printed = [json.loads(lines.get(timeout=EVENT_WAIT))]
        assert town.daemon.stop() == 0
        assert ending.wait(timeout=EVENT_WAIT) == 0
        again = _start_again(town, daemon_factory)
        with again.local() as new_api:
            after = [
                new_api.patch("/config", json={"town": {"crew_agents": {"f": agent}}}).json()
                for agent in ("claude", "codex")
            ]
            newest = new_api.get("/status").json()["last_event_id"]
        while printed[-1]["id"] < newest:
            printed.append(json.loads(lines.get(timeout=EVENT_WAIT)))
    finally:
        following.terminate()
        ending.terminate()
        _, err = following.communicate(timeout=EVENT_WAIT)
        ending.communicate(timeout=EVENT_WAIT)
        reader.join(EVENT_WAIT)
    revisions = [event["revision"] for event in printed if event["type"] == "config.changed"]
    assert revisions[0] == before["revision"]
    assert revisions[-2:] == [answer["revision"] for answer in after]
    ids = [event["id"] for event in printed]
    assert ids == sorted(set(ids))
    assert printed[1]["id"] > printed[0]["id"] + 1  # the new run numbers from its start
    lost, *_, back = [line for line in err.splitlines() if "event stream" in line]
    assert lost == (
        "gastown-sandboxd: the event stream ended (the daemon ended it); resuming after event "
        f"{printed[0]['id']}"
    )
    assert back == "gastown-sandboxd: the event stream is back"
