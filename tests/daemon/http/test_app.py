"""The internal API's routes in-process: the real app over httpx's ASGI transport.

Every component behind the routes is the real one (the settings store on a town in a tmp
folder, the token refresher with a simulated clock, the event bus); only the cloud is a
script. Each status code and error body is checked here; tests/e2e keeps one request per
feature through a real daemon process, over the Unix socket and over TCP.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from collections import deque
from collections.abc import AsyncIterator, Iterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest
import structlog.testing
from starlette.types import Message, Scope

from gastown_sandboxd.errors import AtomicWriteError, DesiredConfigUnavailable, RefreshError
from gastown_sandboxd.events.bus import EventBus
from gastown_sandboxd.events.notify import Notifier
from gastown_sandboxd.events.types import DomainEvent
from gastown_sandboxd.gtsettings.desired import DesiredConfig
from gastown_sandboxd.gtsettings.patch import RIG_KEYS, TOWN_KEYS
from gastown_sandboxd.gtsettings.store import SettingsStore
from gastown_sandboxd.gtsettings.sync import ConfigSync
from gastown_sandboxd.http.app import ApiContext, create_app
from gastown_sandboxd.http.errors import error_response
from gastown_sandboxd.http.openapi import openapi_document
from gastown_sandboxd.ops.metrics import DaemonMetrics, MetricsRegistry
from gastown_sandboxd.token import envfile
from gastown_sandboxd.token.claims import fingerprint
from gastown_sandboxd.token.refresher import TokenRefresher
from gastown_sandboxd.watcher import SettingsWatcher
from tests.daemon.gt_samples import (
    BACKEND_FILE,
    FRONTEND_FILE,
    RIG_SETTINGS,
    TOWN_FILE,
    TOWN_SETTINGS,
    WRAPPER,
    make_config_town,
    members,
    pairs,
    tree,
    unmanaged,
)
from tests.daemon.http.test_openapi import operations
from tests.daemon.minting import forge, mint
from tests.daemon.simclock import SimulatedClock

pytestmark = pytest.mark.anyio

TOWN_ID = "town-app"
KEY = "app-test-key-0123456789abcdef"
CLOUD_URL = "https://cloud.test"
T0 = 1_800_000_000.0
LIMIT = 64 * 1024
AGENT = {
    "provider": "claude",
    "command": "claude",
    "args": ["--model", "anthropic/claude-sonnet-4.5"],
    "env": {"ANTHROPIC_BASE_URL": "https://api.kilo.ai/api/gateway"},
}
JSON = {"content-type": "application/json"}


class ScriptedCloud:
    """The refresh call as the refresher sees it: scripted answers, then fresh 24 h tokens."""

    def __init__(self, clock: SimulatedClock) -> None:
        self.clock = clock
        self.script: deque[str | Exception] = deque()
        self.calls = 0

    async def refresh(self, current_token: str | None) -> str:
        self.calls += 1
        action = self.script.popleft() if self.script else None
        if isinstance(action, Exception):
            raise action
        return action or mint(self.clock.time(), town_id=TOWN_ID)


class UnreachableDesired:
    """The cloud's desired configuration, out of reach: `fetch` raises `failure`."""

    def __init__(self, failure: DesiredConfigUnavailable) -> None:
        self.failure = failure

    async def fetch(self, bearer: str | None) -> DesiredConfig:
        raise self.failure

    async def report(
        self,
        bearer: str | None,
        *,
        observed_generation: int,
        revision: str,
        error: dict[str, Any] | None,
    ) -> None:
        raise AssertionError("nothing to report: the fetch failed")


@dataclass
class Town:
    """The API's real components on a town in a tmp folder, and clients of its two apps."""

    root: Path
    env_file: Path
    clock: SimulatedClock
    cloud: ScriptedCloud
    bus: EventBus
    registry: MetricsRegistry
    metrics: DaemonMetrics
    watcher: SettingsWatcher
    refresher: TokenRefresher
    store: SettingsStore
    events: list[DomainEvent] = field(default_factory=list)
    config_sync: ConfigSync | None = None

    def context(self) -> ApiContext:
        return ApiContext(
            town_id=TOWN_ID,
            town_root=self.root,
            refresher=self.refresher,
            store=self.store,
            bus=self.bus,
            registry=self.registry,
            clock=self.clock,
            watcher_status=self.watcher.status,
            count_patch=self.metrics.count_patch,
            sse_clients=self.metrics.sse_clients,
            config_sync=self.config_sync,
            cloud_url=CLOUD_URL,
            env_file=self.env_file,
        )

    def local(self) -> httpx.AsyncClient:
        """A client of the app the Unix socket serves (no key check)."""
        return self._client(create_app(self.context(), key=None), {})

    def tcp(self, key: str | None = KEY) -> httpx.AsyncClient:
        """A client of the app the TCP listener serves, sending `key` (None: no header)."""
        headers = {} if key is None else {"x-internal-api-key": key}
        return self._client(create_app(self.context(), key=KEY), headers)

    def read(self, relative: str) -> bytes:
        return (self.root / relative).read_bytes()

    def stamp(self, relative: str) -> tuple[bytes, int]:
        path = self.root / relative
        return path.read_bytes(), path.stat().st_mtime_ns

    def changes(self) -> list[dict[str, Any]]:
        """The config.changed events so far, as their JSON fields."""
        return [e.fields() for e in self.events if e.TYPE == "config.changed"]

    def patches(self, status: int) -> float:
        """The PATCH counter's value for `status`."""
        labels = {"status": str(status)}
        value = self.registry.get_sample_value("gastown_sandboxd_config_patches_total", labels)
        return 0.0 if value is None else value

    @staticmethod
    def _client(app: Any, headers: dict[str, str]) -> httpx.AsyncClient:
        transport = httpx.ASGITransport(app=app)
        return httpx.AsyncClient(transport=transport, base_url="http://sandboxd", headers=headers)


@pytest.fixture
async def town(tmp_path: Path) -> AsyncIterator[Town]:
    """The realistic town (town file, rig frontend with a file, rig backend without), loaded,
    with an acceptable token on disk and the refresher running on a clock that stands still."""
    async with running_town(tmp_path, token=mint(T0, town_id=TOWN_ID)) as town:
        yield town


@asynccontextmanager
async def running_town(
    tmp_path: Path, *, token: str | None, script: Sequence[str | Exception] = ()
) -> AsyncIterator[Town]:
    """The town with `token` in its env file (None: no token line); the cloud answers the
    refreshes with `script` first. Returns once the refresher's first moves are done."""
    root = make_config_town(tmp_path / "town")
    env_file = tmp_path / "env" / ".env.gateway"
    env_file.parent.mkdir()
    env_file.write_text("# gateway\n" + ("" if token is None else f"KILO_JWT={token}\n"))
    clock = SimulatedClock(T0, autojump=False)
    cloud = ScriptedCloud(clock)
    cloud.script.extend(script)
    bus = EventBus()
    events: list[DomainEvent] = []

    def emit(event: DomainEvent) -> None:
        events.append(event)
        bus.publish(event)

    refresher = TokenRefresher(
        town_id=TOWN_ID, env_file=env_file, client=cloud, emit=emit, clock=clock
    )
    store = SettingsStore(town_root=root, emit=emit)
    await store.load()
    # Built as daemon.py builds it, never started: /status and /metrics read it.
    watcher = SettingsWatcher(
        town_root=root,
        env_file=env_file,
        folders=store.watched_folders,
        on_settings_change=store.reconcile_external,
        on_env_change=refresher.reload_env_file,
    )
    registry = MetricsRegistry()
    notifier = Notifier(bus=bus, hooks=(), signals=())
    town = Town(
        root=root,
        env_file=env_file,
        clock=clock,
        cloud=cloud,
        bus=bus,
        registry=registry,
        metrics=DaemonMetrics(registry, bus=bus, notifier=notifier, watcher=watcher),
        watcher=watcher,
        refresher=refresher,
        store=store,
        events=events,
    )
    async with anyio.create_task_group() as tg:
        await tg.start(refresher.run)
        await anyio.wait_all_tasks_blocked()
        yield town
        tg.cancel_scope.cancel()


def error_of(answer: httpx.Response, status: int, code: str) -> dict[str, Any]:
    """The JSON error body after checking status, code and the contract's error shape."""
    assert answer.status_code == status, answer.text
    assert answer.headers["content-type"] == "application/json"
    body: dict[str, Any] = answer.json()
    assert list(body) == ["error", "message", "details"]
    assert body["error"] == code
    assert isinstance(body["message"], str)
    assert body["message"]
    assert isinstance(body["details"], list)
    return body


# GET /config, and the two listeners


async def test_get_config_answers_the_managed_view_with_revision_and_etag(town: Town) -> None:
    """GET /config lists the town and each rig with a file, managed keys only, and an ETag."""
    async with town.local() as client:
        answer = await client.get("/config")
    assert answer.status_code == 200
    body = answer.json()
    assert answer.headers["etag"] == f'"{body["revision"]}"'
    assert body["revision"] == town.store.revision
    assert list(body["town"]) == ["default_agent", "agents", "role_agents", "role_effort"]
    assert body["town"]["agents"]["codex-default"]["args"] is None
    assert body["town"]["agents"]["opencode-bare"]["args"] == []
    assert "session" in body["town"]["agents"]["claude-haiku"]
    assert body["rigs"] == {"frontend": {"agent": "claude", "role_agents": {"polecat": "codex"}}}
    assert "cost_tier" not in body["town"]


async def test_tcp_needs_the_key_and_the_socket_does_not(town: Town) -> None:
    """On TCP a missing or wrong key is 401 without detail, a body or not (and the connection
    is closed when a body was left unread); the key, or the socket's app, is let in."""
    body = {"town": {"role_agents": {"mayor": "claude-haiku"}}}
    for key in (None, "", "wrong-key-wrong-key-wrong", KEY[:-1], KEY + "x"):
        async with town.tcp(key) as bare:
            got = await bare.get("/config")
            patched = await bare.patch("/config", json=body)
            assert (await bare.get("/healthz")).status_code == 200
            assert (await bare.get("/readyz")).status_code == 200
        for answer in (got, patched):
            error = error_of(answer, 401, "unauthorized")
            assert error["details"] == []
            assert KEY not in answer.text
        assert "connection" not in got.headers
        assert patched.headers["connection"] == "close"
    assert town.read(TOWN_FILE) == TOWN_SETTINGS
    async with town.tcp() as tcp, town.local() as local:
        answer = await tcp.patch("/config", json=body)
        assert answer.status_code == 200, answer.text
        assert answer.json()["town"]["role_agents"]["mayor"] == "claude-haiku"
        assert (await tcp.get("/config")).json() == (await local.get("/config")).json()


async def test_open_operations_are_exactly_those_the_document_marks_open(town: Town) -> None:
    """Without the key every operation is 401 except those the document marks `security: []`;
    with it, /openapi.json serves the document."""
    document = openapi_document()
    async with town.tcp(key=None) as client:
        for method, path in sorted(operations(document)):
            declared_open = document["paths"][path][method.lower()].get("security") == []
            answer = await client.request(method, path)
            if declared_open:
                assert answer.status_code == 200, (method, path)
            else:
                assert error_of(answer, 401, "unauthorized"), (method, path)
    async with town.tcp() as client:
        served = await client.get("/openapi.json")
    assert served.json() == document


async def test_unknown_routes_are_404_and_other_methods_405_with_allow(town: Town) -> None:
    """An unknown path is 404 naming it; a known path with another method is 405 with `Allow`
    listing the methods of every route on that path."""
    async with town.local() as client:
        missing = await client.get("/no-such-route")
        config = await client.request("TRACE", "/config")
        token = await client.delete("/token")
        sync = await client.get("/config/sync")
    assert error_of(missing, 404, "not_found")["message"] == "no route /no-such-route"
    assert error_of(config, 405, "method_not_allowed")["message"] == "TRACE is not allowed here"
    assert config.headers["allow"] == "GET, HEAD, PATCH"
    assert error_of(token, 405, "method_not_allowed")
    assert token.headers["allow"] == "PUT"
    assert error_of(sync, 405, "method_not_allowed")
    assert sync.headers["allow"] == "POST"


# 200


async def test_patch_changes_files_and_answers_the_new_view(town: Town) -> None:
    """A PATCH of town and rigs answers changed, the files written, the view and its ETag."""
    body = {
        "town": {
            "default_agent": "kilo-sonnet",
            "agents": {"kilo-sonnet": AGENT},
            "role_agents": {"mayor": "kilo-sonnet", "polecat": None},
            "role_effort": {"mayor": "max"},
            "crew_agents": {"alice": "codex"},
        },
        "rigs": {
            "frontend": {"role_agents": {"polecat": "kilo-sonnet"}},
            "backend": {"agent": "kilo-sonnet", "role_effort": {"witness": "low"}},
        },
    }
    async with town.local() as client:
        before = (await client.get("/config")).json()["revision"]
        answer = await client.patch("/config", json=body)
        after = await client.get("/config")
    assert answer.status_code == 200, answer.text
    result = answer.json()
    assert result["changed"] is True
    assert result["files"] == [TOWN_FILE, FRONTEND_FILE, BACKEND_FILE]
    assert result["revision"] != before
    assert answer.headers["etag"] == f'"{result["revision"]}"' == after.headers["etag"]
    assert {k: result[k] for k in ("town", "rigs", "revision")} == after.json()
    assert result["town"]["role_agents"] == {"mayor": "kilo-sonnet", "witness": "claude-haiku"}
    assert result["town"]["crew_agents"] == {"alice": "codex"}
    written = json.loads(town.read(TOWN_FILE))
    assert written["default_agent"] == "kilo-sonnet"
    assert written["agents"]["kilo-sonnet"] == AGENT  # no default exec_wrapper: shims wrap
    backend = pairs(town.read(BACKEND_FILE))
    assert backend[:2] == [("type", "rig-settings"), ("version", 1)]
    assert json.loads(town.read(FRONTEND_FILE))["role_agents"] == {"polecat": "kilo-sonnet"}
    assert town.patches(200) == 1


async def test_patch_keeps_every_unmanaged_key_and_the_format(town: Town) -> None:
    """After a PATCH gt's own keys keep value, order and bytes; output stays two-space JSON."""
    body = {
        "town": {
            "agents": {"kilo-sonnet": AGENT, "codex-default": {"args": ["--full-auto"]}},
            "role_agents": {"polecat": "kilo-sonnet"},
        },
        "rigs": {"frontend": {"role_agents": {"polecat": "kilo-sonnet", "witness": "codex"}}},
    }
    async with town.local() as client:
        assert (await client.patch("/config", json=body)).status_code == 200
    written, rig = town.read(TOWN_FILE), town.read(FRONTEND_FILE)
    assert unmanaged(written, TOWN_KEYS) == unmanaged(TOWN_SETTINGS, TOWN_KEYS)
    assert unmanaged(rig, RIG_KEYS) == unmanaged(RIG_SETTINGS, RIG_KEYS)
    assert [key for key, _ in pairs(written)] == [key for key, _ in pairs(TOWN_SETTINGS)]
    old_members, new_members = members(TOWN_SETTINGS), members(written)
    for key in ("_comment", "cost_tier", "scheduler", "_comment_scheduler"):
        assert new_members[key] == old_members[key]  # byte for byte, 1e-7 and 2.50 included
    for key in ("merge_queue", "namepool", "theme"):
        assert members(rig)[key] == members(RIG_SETTINGS)[key]
    for text in (written, rig):
        assert text.startswith(b'{\n  "type": ')
        assert text.endswith(b"}\n")
        assert b"\t" not in text
    agents = json.loads(written)["agents"]
    assert "exec_wrapper" not in agents["kilo-sonnet"]
    assert agents["claude-haiku"]["session"]["session_id_env"] == "CLAUDE_SESSION_ID"
    assert agents["codex-default"] == {
        "provider": "codex",
        "command": "codex",
        "args": ["--full-auto"],
        "prompt_mode": "none",
    }  # an existing agent gets no exec_wrapper it did not have


async def test_existing_exec_wrapper_is_kept_and_a_set_one_wins(town: Town) -> None:
    """Changing an agent keeps its exec_wrapper; a body's exec_wrapper replaces it."""
    body: dict[str, Any] = {"town": {"agents": {"claude-haiku": {"args": ["--model", "opus"]}}}}
    async with town.local() as client:
        assert (await client.patch("/config", json=body)).status_code == 200
        haiku = json.loads(town.read(TOWN_FILE))["agents"]["claude-haiku"]
        assert haiku["exec_wrapper"] == WRAPPER
        assert haiku["args"] == ["--model", "opus"]
        own = ["/usr/local/bin/wrap", "--"]
        new = {"town": {"agents": {"mine": {**AGENT, "exec_wrapper": own}}}}
        assert (await client.patch("/config", json=new)).status_code == 200
    assert json.loads(town.read(TOWN_FILE))["agents"]["mine"]["exec_wrapper"] == own


async def test_patch_that_changes_nothing_writes_and_emits_nothing(town: Town) -> None:
    """A no-op PATCH answers changed false with no files, touches no file, emits no event."""
    before_town, before_rig = town.stamp(TOWN_FILE), town.stamp(FRONTEND_FILE)
    same = {
        "town": {"role_agents": {"mayor": "claude", "dog": None}, "role_effort": {"mayor": "high"}},
        "rigs": {"frontend": {"agent": "claude", "role_agents": {"polecat": "codex"}}},
    }
    async with town.local() as client:
        revision = (await client.get("/config")).json()["revision"]
        answer = await client.patch("/config", json=same)
    assert answer.status_code == 200
    assert answer.json()["changed"] is False
    assert answer.json()["files"] == []
    assert answer.json()["revision"] == revision
    assert answer.headers["etag"] == f'"{revision}"'
    assert town.stamp(TOWN_FILE) == before_town
    assert town.stamp(FRONTEND_FILE) == before_rig
    assert not (town.root / BACKEND_FILE).exists()
    assert town.changes() == []
    assert town.patches(200) == 1


async def test_each_written_file_gets_one_api_event(town: Town) -> None:
    """A PATCH of two files emits one config.changed per file, source api, with its keys."""
    body = {
        "town": {"role_effort": {"deacon": "low"}},
        "rigs": {"backend": {"worker_agents": {"toast": "codex"}}},
    }
    async with town.local() as client:
        result = (await client.patch("/config", json=body)).json()
    events = town.changes()
    assert [(e["source"], e["file"]) for e in events] == [
        ("api", TOWN_FILE),
        ("api", BACKEND_FILE),
    ]
    assert (events[0]["scope"], events[0]["rig"], events[0]["keys"]) == (
        "town",
        None,
        ["role_effort"],
    )
    assert (events[1]["scope"], events[1]["rig"]) == ("rig", "backend")
    assert events[1]["keys"] == ["type", "version", "worker_agents"]
    assert {e["revision"] for e in events} == {result["revision"]}


# 400, 408, 413, 415


@pytest.mark.parametrize(
    ("content", "why"),
    [
        (b"{not json", "not JSON"),
        (b"\xff\xfe{}", "not UTF-8"),
        (b"", "empty"),
        (b'["town"]', "an array"),
        (b'"town"', "a string"),
        (b"null", "null"),
        (b"[" * 60_000, "nested too deeply for the parser (under the 64 KiB limit)"),
        (b'{"town": {"role_effort": {"mayor": NaN}}}', "NaN, which Python's json reads"),
        (b'{"town": {"agents": {"a": {"args": [-Infinity]}}}}', "-Infinity"),
    ],
)
async def test_body_that_is_not_a_json_object_is_400(town: Town, content: bytes, why: str) -> None:
    """Bodies that are not JSON or not an object get 400 invalid_json and change nothing."""
    async with town.local() as client:
        answer = await client.patch("/config", content=content, headers=JSON)
    error = error_of(answer, 400, "invalid_json")
    if content.startswith((b"[[", b"\xff")) or not content.startswith((b"[", b'"', b"n")):
        assert error["message"] == "the body is not JSON"
        assert error["details"][0]["path"] == ""
        assert error["details"][0]["message"].startswith("not JSON")
    else:
        assert error["message"] == "the body must be a JSON object"
        assert error["details"] == []
    assert town.read(TOWN_FILE) == TOWN_SETTINGS, why
    assert town.patches(400) == 1


async def test_body_over_64_kib_is_413_with_or_without_content_length(town: Town) -> None:
    """64 KiB + 1 is refused as 413 whether its length is declared or it arrives in chunks,
    and the connection is closed; the limit itself is allowed."""
    filler = "x" * LIMIT
    big = json.dumps({"town": {"crew_agents": {"a": filler}}}).encode()[: LIMIT + 1]
    assert len(big) == LIMIT + 1

    async def chunks() -> AsyncIterator[bytes]:
        for start in range(0, len(big), 4096):
            yield big[start : start + 4096]

    async with town.local() as client, town.tcp() as tcp:
        declared = await client.patch("/config", content=big, headers=JSON)
        streamed = await client.patch("/config", content=chunks(), headers=JSON)
        over_tcp = await tcp.patch("/config", content=chunks(), headers=JSON)
        exactly = await client.patch("/config", content=b" " * (LIMIT - 2) + b"{}", headers=JSON)
    assert "content-length" in declared.request.headers
    assert "content-length" not in streamed.request.headers
    for answer in (declared, streamed, over_tcp):
        error = error_of(answer, 413, "body_too_large")
        assert error["message"] == "the body is larger than 65536 bytes"
        assert answer.headers["connection"] == "close"
    assert exactly.status_code == 200  # the limit itself is allowed
    assert exactly.json()["changed"] is False
    assert "connection" not in exactly.headers
    assert town.read(TOWN_FILE) == TOWN_SETTINGS
    assert (town.patches(413), town.patches(200)) == (3, 1)


async def test_token_body_over_16_kib_is_413(town: Town) -> None:
    """PUT /token takes at most 16 KiB."""
    async with town.local() as client:
        answer = await client.put("/token", content=b" " * (16 * 1024 + 1), headers=JSON)
    assert error_of(answer, 413, "body_too_large")["message"] == (
        "the body is larger than 16384 bytes"
    )


async def test_content_type_must_be_json_or_merge_patch(town: Town) -> None:
    """text/plain and a missing content type get 415 (counted); merge-patch+json with a
    charset is applied."""
    body = json.dumps({"town": {"role_effort": {"boot": "low"}}}).encode()
    async with town.local() as client:
        plain = await client.patch("/config", content=body, headers={"content-type": "text/plain"})
        missing = await client.patch("/config", content=body)
        assert "content-type" not in missing.request.headers
        for answer in (plain, missing):
            error = error_of(answer, 415, "unsupported_media_type")
            assert error["message"] == "send application/json or application/merge-patch+json"
            assert answer.headers["connection"] == "close"  # the body was left unread
        assert town.read(TOWN_FILE) == TOWN_SETTINGS
        merge = "application/merge-patch+json; charset=utf-8"
        answer = await client.patch("/config", content=body, headers={"content-type": merge})
    assert answer.status_code == 200
    assert answer.json()["town"]["role_effort"]["boot"] == "low"
    assert (town.patches(415), town.patches(200)) == (2, 1)


@pytest.mark.parametrize("generation", ["x1", "-1", "1.5", "1e3", "9" * 19, ""])
async def test_a_generation_that_is_not_a_whole_number_is_400(town: Town, generation: str) -> None:
    """X-Gastown-Generation must be ASCII digits (at most 18): else 400, nothing applied."""
    body = {"town": {"role_effort": {"mayor": "low"}}}
    async with town.local() as client:
        answer = await client.patch(
            "/config", json=body, headers={"x-gastown-generation": generation}
        )
    error_of(answer, 400, "invalid_generation")
    assert town.read(TOWN_FILE) == TOWN_SETTINGS


async def test_a_body_that_stops_coming_is_408_and_one_cut_short_is_400(
    town: Town, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A body that does not arrive within BODY_TIMEOUT is 408; a peer that leaves mid-body is
    400 incomplete_body; neither applies anything."""
    from gastown_sandboxd.http import app as api

    monkeypatch.setattr(api, "BODY_TIMEOUT", 0.05)
    app = create_app(town.context(), key=None)
    headers = [(b"content-type", b"application/json"), (b"content-length", b"10")]
    scope: Scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "PATCH",
        "scheme": "http",
        "path": "/config",
        "raw_path": b"/config",
        "query_string": b"",
        "root_path": "",
        "headers": headers,
        "client": ("127.0.0.1", 1),
        "server": ("sandboxd", 80),
    }

    async def answer_to(*messages: Message) -> tuple[int, dict[str, Any]]:
        incoming = list(messages)
        sent: list[Message] = []

        async def receive() -> Message:
            if incoming:
                return incoming.pop(0)
            await anyio.sleep_forever()
            raise AssertionError("unreachable")

        async def send(message: Message) -> None:
            sent.append(message)

        await app(scope, receive, send)
        body = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
        return sent[0]["status"], json.loads(body)

    part: Message = {"type": "http.request", "body": b'{"to', "more_body": True}
    status, body = await answer_to(part)
    assert (status, body["error"]) == (408, "body_timeout")
    assert body["message"] == "the body did not arrive within 0 s"
    status, body = await answer_to(part, {"type": "http.disconnect"})
    assert (status, body["error"]) == (400, "incomplete_body")
    assert town.read(TOWN_FILE) == TOWN_SETTINGS
    assert (town.patches(408), town.patches(400)) == (1, 1)


# 412


async def test_if_match_takes_the_revision_quoted_or_bare_and_refuses_a_stale_one(
    town: Town,
) -> None:
    """If-Match equal to the revision (quoted or bare) applies; a stale one is 412, unwritten."""
    async with town.local() as client:
        etag = (await client.get("/config")).headers["etag"]
        first = {"town": {"role_agents": {"dog": "codex"}}}
        quoted = await client.patch("/config", json=first, headers={"if-match": etag})
        assert quoted.status_code == 200, quoted.text
        bare_tag = quoted.json()["revision"]
        second = {"town": {"role_agents": {"boot": "codex"}}}
        bare = await client.patch("/config", json=second, headers={"if-match": bare_tag})
        assert bare.status_code == 200, bare.text
        written = town.read(TOWN_FILE)
        stale_body = {"town": {"role_agents": {"deacon": "codex"}}}
        for stale in (etag, bare_tag, '"0000"', 'W/"' + bare.json()["revision"] + '"'):
            answer = await client.patch("/config", json=stale_body, headers={"if-match": stale})
            error = error_of(answer, 412, "precondition_failed")
            assert bare.json()["revision"] in error["message"]
        assert town.read(TOWN_FILE) == written
        assert "deacon" not in (await client.get("/config")).json()["town"]["role_agents"]
    assert (town.patches(200), town.patches(412)) == (2, 4)


# 409


async def test_unreadable_town_file_is_409_and_left_untouched(town: Town) -> None:
    """A town file that is not JSON makes GET and every PATCH 409; its bytes stay as they are."""
    broken = b'{"type": "town-settings", "version": 1, "agents": {'
    (town.root / TOWN_FILE).write_bytes(broken)
    async with town.local() as client:
        got = await client.get("/config")
        patched = await client.patch("/config", json={"town": {"role_effort": {"mayor": "low"}}})
        via_rig = await client.patch("/config", json={"rigs": {"frontend": {"agent": "codex"}}})
    for answer in (got, patched, via_rig):
        error = error_of(answer, 409, "settings_file_unreadable")
        assert error["details"][0]["path"] == "/town"
        assert TOWN_FILE in error["message"]
    assert town.read(TOWN_FILE) == broken
    assert town.read(FRONTEND_FILE) == RIG_SETTINGS
    assert town.patches(409) == 2


async def test_newer_rig_file_is_409_and_other_rigs_still_work(town: Town) -> None:
    """A `version: 2` rig file is never overwritten (409); a PATCH not reading it applies."""
    newer = RIG_SETTINGS.replace(b'"version": 1', b'"version": 2')
    (town.root / FRONTEND_FILE).write_bytes(newer)
    async with town.local() as client:
        answer = await client.patch("/config", json={"rigs": {"frontend": {"agent": "codex"}}})
        error = error_of(answer, 409, "settings_file_unreadable")
        assert error["details"][0]["path"] == "/rigs/frontend"
        assert "version" in error["details"][0]["message"]
        assert town.read(FRONTEND_FILE) == newer
        other = await client.patch("/config", json={"rigs": {"backend": {"agent": "codex"}}})
    assert other.status_code == 200, other.text
    assert other.json()["files"] == [BACKEND_FILE]
    assert town.read(FRONTEND_FILE) == newer


# 422


async def test_invalid_patch_is_422_with_every_problem_at_its_pointer(town: Town) -> None:
    """One 422 lists each problem with a JSON pointer, and nothing is written."""
    body = {
        "town": {
            "role_agents": {"majer": "claude"},
            "role_effort": {"mayor": "extreme"},
            "crew_agents": {"bob": "no-such-agent"},
            "agents": {"bad": {"command": "x", "tmux": {"a": 1}, "env": {"lower": "v"}}},
            "cost_tier": "premium",
        },
        "rigs": {"frontend": {"role_agents": {"polecat": "ghost"}, "merge_queue": {}}},
        "extra": True,
    }
    async with town.local() as client:
        answer = await client.patch("/config", json=body)
    error = error_of(answer, 422, "invalid_patch")
    paths = {detail["path"] for detail in error["details"]}
    assert {
        "/town/role_agents/majer",
        "/town/role_effort/mayor",
        "/town/crew_agents/bob",
        "/town/agents/bad/tmux",
        "/town/agents/bad/env/lower",
        "/town/cost_tier",
        "/rigs/frontend/role_agents/polecat",
        "/rigs/frontend/merge_queue",
        "/extra",
    } <= paths
    assert all(list(detail) == ["path", "message"] for detail in error["details"])
    assert all(detail["message"] for detail in error["details"])
    assert town.read(TOWN_FILE) == TOWN_SETTINGS
    assert town.read(FRONTEND_FILE) == RIG_SETTINGS
    assert town.patches(422) == 1


async def test_a_lone_surrogate_is_422_at_its_pointer_and_writes_nothing(town: Town) -> None:
    """`"\\ud800"` is JSON that decodes to no Unicode text: it could never be written as
    UTF-8 (a 500 before), so the PATCH is refused with where it stands, in a value or a key,
    and the answer names the key with the escape rather than the bad character."""
    raw = (
        b'{"town": {"agents": {"odd": {"command": "claude", "initial_prompt": "a\\ud800b"}}},'
        b' "rigs": {"frontend": {"role_agents": {"\\udfff": "claude"}}}}'
    )
    async with town.local() as client:
        answer = await client.patch(
            "/config", content=raw, headers={"content-type": "application/json"}
        )
    error = error_of(answer, 422, "invalid_patch")
    said = {(detail["path"], detail["message"].split(":")[0]) for detail in error["details"]}
    assert ("/town/agents/odd/initial_prompt", "is not Unicode") in said
    assert ("/rigs/frontend/role_agents/\\udfff", "this key is not Unicode") in said
    assert town.read(TOWN_FILE) == TOWN_SETTINGS
    assert town.read(FRONTEND_FILE) == RIG_SETTINGS


async def test_secrets_in_agent_env_are_refused_without_echoing_them(town: Town) -> None:
    """A JWT value or a literal ANTHROPIC_API_KEY in env is 422; neither the answer nor a log
    event carries it."""
    jwt_value = mint(T0, town_id=TOWN_ID)
    literal = "sk-ant-api03-" + "a" * 40
    env = {"GATEWAY_TOKEN": jwt_value, "ANTHROPIC_API_KEY": literal, "OK_NAME": "fine"}
    body = {"town": {"agents": {"leaky": {**AGENT, "env": env}}}}
    with structlog.testing.capture_logs() as logs:
        async with town.tcp() as tcp:
            answer = await tcp.patch("/config", json=body)
    error = error_of(answer, 422, "invalid_patch")
    paths = {detail["path"] for detail in error["details"]}
    assert paths == {
        "/town/agents/leaky/env/GATEWAY_TOKEN",
        "/town/agents/leaky/env/ANTHROPIC_API_KEY",
    }
    for secret in (jwt_value, literal):
        assert secret not in answer.text
        assert secret not in repr(logs)
    assert town.read(TOWN_FILE) == TOWN_SETTINGS


async def test_a_token_sent_as_a_name_is_not_echoed_in_the_answer(town: Town) -> None:
    """A token sent where a name goes (a crew member, a role, an env variable, a rig) is
    refused as that name; the answer shows it by its fingerprint, never whole."""
    token = mint(T0, town_id=TOWN_ID)
    bodies = [
        {"town": {"crew_agents": {token: "claude"}}},
        {"town": {"role_agents": {token: "claude"}}},
        {"town": {"agents": {"a": {**AGENT, "env": {token: "x"}}}}},
        {"rigs": {token: {"agent": "claude"}}},
    ]
    async with town.local() as client:
        answers = [await client.patch("/config", json=body) for body in bodies]
    for answer in answers:
        error_of(answer, 422, "invalid_patch")
        assert token not in answer.text
        assert f"[jwt:{fingerprint(token)}]" in answer.text
    assert town.read(TOWN_FILE) == TOWN_SETTINGS


@pytest.mark.parametrize("rig", ["..", "%2e%2e", "../outside", "hq", "HQ", "outlink", ".hidden"])
async def test_rigs_that_escape_or_are_not_rigs_are_422_and_write_nothing(
    town: Town, tmp_path: Path, rig: str
) -> None:
    """Traversal names, the reserved hq and a symlink out of the town root are 422; no writes."""
    outside = tmp_path / "outside"
    (outside / "settings").mkdir(parents=True)
    (outside / "settings" / "config.json").write_bytes(RIG_SETTINGS)
    (town.root / "outlink").symlink_to(outside, target_is_directory=True)
    (town.root / ".hidden").mkdir()
    before_town, before_out = tree(town.root), tree(outside)
    async with town.local() as client:
        answer = await client.patch("/config", json={"rigs": {rig: {"agent": "codex"}}})
        listed = (await client.get("/config")).json()["rigs"]
    error = error_of(answer, 422, "invalid_patch")
    assert [detail["path"] for detail in error["details"]] == ["/rigs/" + rig.replace("/", "~1")]
    assert tree(town.root) == before_town
    assert tree(outside) == before_out
    assert not (tmp_path / "settings").exists()
    assert set(listed) == {"frontend"}


# 503


@pytest.fixture
def immutable() -> Iterator[list[Path]]:
    """Folders made immutable with chattr +i (which binds root too), made mutable at teardown."""
    folders: list[Path] = []
    yield folders
    for folder in folders:
        subprocess.run(["chattr", "-i", str(folder)], check=False, capture_output=True)


async def test_disk_refusal_is_503_and_every_file_stays_as_it_was(
    town: Town, immutable: list[Path]
) -> None:
    """The rig folder refuses the write after the town file was written: 503, both restored;
    once it takes writes again the same PATCH applies, one event per file."""
    folder = town.root / "frontend" / "settings"
    if shutil.which("chattr") is None:
        pytest.skip("chattr is not installed")
    done = subprocess.run(["chattr", "+i", str(folder)], check=False, capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"chattr +i is not supported here: {done.stderr.decode().strip()}")
    immutable.append(folder)
    probe = folder / "probe"
    try:
        probe.write_bytes(b"")
    except PermissionError:
        pass
    else:
        probe.unlink()
        pytest.skip("an immutable folder still takes new files here")
    before_town, before_rig = town.stamp(TOWN_FILE), town.stamp(FRONTEND_FILE)
    body = {
        "town": {"role_effort": {"mayor": "low"}},
        "rigs": {"frontend": {"agent": "codex"}},
    }
    async with town.local() as client:
        answer = await client.patch("/config", json=body)
        error = error_of(answer, 503, "storage_unavailable")
        assert FRONTEND_FILE in error["message"]
        assert "EPERM" in error["message"]
        assert "left as it was" in error["message"]
        assert town.read(TOWN_FILE) == before_town[0]
        assert town.read(FRONTEND_FILE) == before_rig[0]
        assert sorted(os.listdir(town.root / "settings")) == ["config.json"]
        assert (await client.get("/config")).json()["town"]["role_effort"]["mayor"] == "high"
        assert town.changes() == []
        subprocess.run(["chattr", "-i", str(folder)], check=True)
        again = await client.patch("/config", json=body)
    assert again.status_code == 200, again.text
    events = town.changes()
    assert [event["file"] for event in events] == [TOWN_FILE, FRONTEND_FILE]
    assert {event["revision"] for event in events} == {again.json()["revision"]}
    assert (town.patches(503), town.patches(200)) == (1, 1)


# Concurrency


async def test_hundred_concurrent_patches_all_land(town: Town) -> None:
    """100 PATCHes from 10 concurrent clients, each naming its own crew or worker, all land."""
    statuses: list[int] = []

    async def worker(index: int) -> None:
        async with town.local() as client:
            for n in range(10):
                name = f"c{index}x{n}"
                if n % 2:
                    body: dict[str, Any] = {"town": {"crew_agents": {name: "codex"}}}
                else:
                    body = {"rigs": {"frontend": {"worker_agents": {name: "claude"}}}}
                answer = await client.patch("/config", json=body)
                statuses.append(answer.status_code)

    async with anyio.create_task_group() as tg:
        for index in range(10):
            tg.start_soon(worker, index)
    assert statuses == [200] * 100
    written = json.loads(town.read(TOWN_FILE))
    rig = json.loads(town.read(FRONTEND_FILE))
    assert set(written["crew_agents"]) == {f"c{i}x{n}" for i in range(10) for n in (1, 3, 5, 7, 9)}
    assert set(rig["worker_agents"]) == {f"c{i}x{n}" for i in range(10) for n in (0, 2, 4, 6, 8)}
    assert unmanaged(town.read(TOWN_FILE), TOWN_KEYS) == unmanaged(TOWN_SETTINGS, TOWN_KEYS)
    assert town.patches(200) == 100


async def test_concurrent_writers_with_if_match_one_wins(town: Town) -> None:
    """Ten writers holding the same ETag: one 200, nine 412, and only the winner's change."""
    answers: dict[str, int] = {}
    async with town.local() as reader:
        etag = (await reader.get("/config")).headers["etag"]

    async def writer(index: int) -> None:
        async with town.local() as client:
            body = {"town": {"crew_agents": {f"w{index}": "codex"}}}
            answer = await client.patch("/config", json=body, headers={"if-match": etag})
            answers[f"w{index}"] = answer.status_code

    async with anyio.create_task_group() as tg:
        for index in range(10):
            tg.start_soon(writer, index)
    winners = [name for name, status in answers.items() if status == 200]
    assert len(winners) == 1
    assert sorted(answers.values()) == [200] + [412] * 9
    assert json.loads(town.read(TOWN_FILE))["crew_agents"] == {winners[0]: "codex"}
    assert (town.patches(200), town.patches(412)) == (1, 9)


# The token routes


async def test_a_pushed_token_is_written_and_shown_never_echoed(town: Town) -> None:
    """PUT /token with an acceptable token writes it to the env file and answers its metadata."""
    token = mint(T0 + 10, town_id=TOWN_ID)
    async with town.local() as client:
        answer = await client.put("/token", json={"token": token})
    assert answer.status_code == 200, answer.text
    shown = answer.json()["token"]
    assert shown["fingerprint"] == fingerprint(token)
    assert (shown["iat"], shown["exp"], shown["expires_in"]) == (
        int(T0) + 10,
        int(T0) + 10 + 86400,
        86410,
    )
    assert token not in answer.text
    assert envfile.read_token(town.env_file) == token
    assert town.env_file.read_text().startswith("# gateway\n")


@pytest.mark.parametrize(
    "body", [{}, {"token": 1}, {"token": None}, {"token": "x", "more": 1}, {"jwt": "x"}]
)
async def test_a_push_that_is_not_one_token_string_is_422(town: Town, body: Any) -> None:
    """Anything but `{"token": "<string>"}` is 422 invalid_body, with /token as its pointer."""
    before = town.env_file.read_bytes()
    async with town.local() as client:
        answer = await client.put("/token", json=body)
    error = error_of(answer, 422, "invalid_body")
    assert error["details"] == [{"path": "/token", "message": "must be a string"}]
    assert town.env_file.read_bytes() == before


async def test_hostile_pushes_are_refused_and_change_nothing(town: Town, tmp_path: Path) -> None:
    """Other towns' tokens, expired ones, alg none, shell code, huge and broken bodies: each a
    4xx that echoes no token, with the env file and the event stream untouched; a good push
    afterwards is the only event."""
    valid = mint(T0 - 30, town_id=TOWN_ID)
    expired = mint(T0 - 100, lifetime=20, town_id=TOWN_ID)
    marker = tmp_path / "pwned"
    claims = {
        "sub": "user-1",
        "type": "gastown_sandbox",
        "town_id": TOWN_ID,
        "organization_id": "org-1",
        "iat": int(T0) - 30,
        "exp": int(T0) - 30 + 86400,
    }

    async def undeclared() -> AsyncIterator[bytes]:
        yield b'{"token": "' + b"a" * 1_000_000 + b'"}'

    cases: list[tuple[str, dict[str, Any], int, str]] = [
        ("another town", {"json": {"token": mint(T0, town_id="town-other")}}, 422, "wrong_town"),
        ("expired", {"json": {"token": expired}}, 422, "expired"),
        ("alg none", {"json": {"token": forge({"alg": "none"}, claims)}}, 422, "bad_alg"),
        ("no signature", {"json": {"token": forge({"alg": "none"}, claims, "")}}, 422, "malformed"),
        ("substitution", {"json": {"token": f"{valid}$(touch {marker})"}}, 422, "malformed"),
        ("new line", {"json": {"token": f"{valid}\ntouch {marker}"}}, 422, "malformed"),
        ("semicolon", {"json": {"token": f"{valid}; touch {marker}"}}, 422, "malformed"),
        ("backquotes", {"json": {"token": f"`touch {marker}`"}}, 422, "malformed"),
        ("lone surrogate", {"content": b'{"token": "\\ud800"}'}, 422, "malformed"),
        ("lone low surrogate", {"content": b'{"token": "abc\\udc00"}'}, 422, "malformed"),
        ("1 MB", {"json": {"token": "a" * 1_000_000}}, 413, "body_too_large"),
        ("1 MB undeclared", {"content": undeclared()}, 413, "body_too_large"),
        ("not JSON", {"content": f"KILO_JWT={valid}"}, 400, "invalid_json"),
        ("a JSON list", {"json": [valid]}, 400, "invalid_json"),
        ("nested too deeply", {"content": "[" * 10_000}, 400, "invalid_json"),
    ]
    before = town.env_file.read_bytes()
    async with town.tcp() as tcp:
        for name, request, status, code in cases:
            answer = await tcp.put("/token", **request)
            body = error_of(answer, status, answer.json()["error"])
            assert body["error"] == code or code in {d["message"] for d in body["details"]}, name
            for secret in (valid, valid.rsplit(".", 1)[1]):
                assert secret not in answer.text, name
            assert town.env_file.read_bytes() == before, name
        assert (await tcp.get("/status")).json()["token"]["fingerprint"] == fingerprint(
            mint(T0, town_id=TOWN_ID)
        )
        assert town.events == []
        assert (await tcp.put("/token", json={"token": valid})).status_code == 200
    assert [event.TYPE for event in town.events] == ["token.refreshed"]
    assert not marker.exists()


async def test_an_unacceptable_pushed_token_is_422_with_every_reason(town: Town) -> None:
    """A token of another town and already expired: 422 with one detail per reason, kept out
    of the env file and out of the answer."""
    token = mint(T0 - 2 * 86400, town_id="other-town")
    before = town.env_file.read_bytes()
    async with town.local() as client:
        answer = await client.put("/token", json={"token": token})
    error = error_of(answer, 422, "token_not_acceptable")
    assert error["message"] == "the token is not acceptable"
    reasons = [detail["message"] for detail in error["details"]]
    assert {"wrong_town", "expired"} <= set(reasons)
    assert {detail["path"] for detail in error["details"]} == {"/token"}
    assert token not in answer.text
    assert town.env_file.read_bytes() == before


async def test_refresh_answers_the_new_token_or_why_there_is_none(town: Town) -> None:
    """POST /token/refresh: 200 with the new token's metadata; 409 town_inactive or 502
    refresh_failed naming the cloud and the kind of failure, the old token kept."""
    old = town.env_file.read_bytes()
    new = mint(T0 + 5, town_id=TOWN_ID)
    town.cloud.script.append(new)
    async with town.local() as client:
        fresh = await client.post("/token/refresh")
        written = town.env_file.read_bytes()
        town.cloud.script.append(RefreshError("inactive", "town_not_found", status=404))
        town.clock.advance(2)  # each call to the cloud 2 s after the last (CONTRACT §3)
        inactive = await client.post("/token/refresh")
        town.cloud.script.append(RefreshError("outage", "connect_error"))
        town.clock.advance(2)
        outage = await client.post("/token/refresh")
    assert fresh.status_code == 200, fresh.text
    assert fresh.json()["token"]["fingerprint"] == fingerprint(new)
    assert written != old
    assert envfile.read_token(town.env_file) == new
    error = error_of(inactive, 409, "town_inactive")
    assert error["message"] == (
        f"the cloud at {CLOUD_URL} gave no new token (inactive: town_not_found)"
    )
    assert error["details"] == [{"kind": "inactive", "reason": "town_not_found", "status": 404}]
    error = error_of(outage, 502, "refresh_failed")
    assert error["message"] == (
        f"the cloud at {CLOUD_URL} gave no new token (outage: connect_error)"
    )
    assert error["details"] == [{"kind": "outage", "reason": "connect_error", "status": None}]
    assert town.env_file.read_bytes() == written
    assert town.cloud.calls == 3


async def test_an_env_file_that_cannot_be_written_is_503_and_the_old_token_kept(
    town: Town, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The disk refuses the env file, for a push and for a refresh: 503 storage_unavailable
    naming the errno; the file keeps the old token."""

    def full(*args: Any, **kwargs: Any) -> bool:
        raise AtomicWriteError(28, "No space left on device")

    before = town.env_file.read_bytes()
    monkeypatch.setattr(envfile, "write_atomic", full)
    async with town.local() as client:
        pushed = await client.put("/token", json={"token": mint(T0 + 20, town_id=TOWN_ID)})
        town.cloud.script.append(mint(T0 + 30, town_id=TOWN_ID))
        refreshed = await client.post("/token/refresh")
    for answer in (pushed, refreshed):
        error = error_of(answer, 503, "storage_unavailable")
        assert error["message"] == (
            "the env file could not be written (ENOSPC); the old token is kept"
        )
    assert town.env_file.read_bytes() == before


# /status, /readyz, /config/sync, /metrics


async def test_status_says_why_refreshes_fail_and_a_success_clears_it(town: Town) -> None:
    """After a failed refresh /status carries `last_error` (reason, time, detail) and the
    state; a pushed token clears it."""
    town.cloud.script.append(RefreshError("outage", "connect_error"))
    async with town.local() as client:
        before = (await client.get("/status")).json()
        assert (await client.post("/token/refresh")).status_code == 502
        failed = (await client.get("/status")).json()
        token = mint(T0 + 30, town_id=TOWN_ID)
        assert (await client.put("/token", json={"token": token})).status_code == 200
        after = (await client.get("/status")).json()
    assert before["town_id"] == TOWN_ID
    assert (before["state"], before["last_error"]) == ("fresh", None)
    assert before["config_revision"] == town.store.revision
    assert before["env_file"] == str(town.env_file)
    assert before["watcher"] == town.watcher.status()
    assert before["subscribers"] == 0
    assert failed["state"] == "degraded"
    assert failed["consecutive_failures"] == 1
    assert failed["last_error"] == {
        "reason": "outage",
        "at": "2027-01-15T08:00:00.000Z",
        "detail": "connect_error",
    }
    assert after["state"] == "fresh"
    assert after["last_error"] is None
    assert after["token"]["fingerprint"] == fingerprint(token)


async def test_readyz_needs_a_usable_token_and_a_writable_town_root(town: Town) -> None:
    """/readyz is 200 with a fresh token and the town root in place; 503 naming the root once
    it is gone."""
    moved = town.root.with_name("moved")
    async with town.local() as client:
        ready = await client.get("/readyz")
        town.root.rename(moved)
        try:
            gone = await client.get("/readyz")
        finally:
            moved.rename(town.root)
    assert (ready.status_code, ready.json()) == (200, {"ready": True, "reasons": []})
    assert gone.status_code == 503
    assert gone.json() == {"ready": False, "reasons": ["town root is not a writable folder"]}


@pytest.mark.parametrize("held", ["expired", "missing"])
async def test_readyz_is_503_naming_the_token_while_healthz_stays_200(
    tmp_path: Path, held: str
) -> None:
    """An expired or missing token and a cloud that gives none: /readyz 503 with the reason in
    words an operator can act on, /healthz 200, /status the state."""
    token = mint(T0 - 100, lifetime=20, town_id=TOWN_ID) if held == "expired" else None
    outage = RefreshError("outage", "connect_error")
    async with running_town(tmp_path, token=token, script=[outage]) as town:
        async with town.tcp(key=None) as client:
            ready = await client.get("/readyz")
            health = await client.get("/healthz")
        async with town.local() as client:
            status = (await client.get("/status")).json()
    assert ready.status_code == 503
    body = ready.json()
    assert body["ready"] is False
    if held == "expired":
        assert body["reasons"] == ["no unexpired acceptable token on disk (state expired)"]
    else:
        (reason,) = body["reasons"]
        assert reason.startswith("no token on disk: the cloud refreshes a town only for a Bearer")
        assert reason.endswith("or PUT /token")
    assert (health.status_code, health.json()) == (200, {"status": "ok"})
    assert status["state"] == held
    assert status["last_error"]["reason"] == "outage"
    assert town.cloud.calls == 1


async def test_sync_without_a_cloud_is_503_and_an_unreachable_cloud_its_status(
    town: Town,
) -> None:
    """POST /config/sync with no sync configured: 503 sync_unavailable; with the cloud out of
    reach, the sync's status (504 here) and cloud_unavailable, nothing written."""
    async with town.local() as client:
        none = await client.post("/config/sync")
    error_of(none, 503, "sync_unavailable")
    timeout = DesiredConfigUnavailable(504, "timeout", "the cloud did not answer within 10 s")
    town.config_sync = ConfigSync(
        store=town.store, source=UnreachableDesired(timeout), bearer=lambda: None, clock=town.clock
    )
    async with town.local() as client:
        answer = await client.post("/config/sync")
    error = error_of(answer, 504, "cloud_unavailable")
    assert error["message"] == "the cloud did not answer within 10 s; nothing was written"
    assert error["details"] == [{"reason": "timeout"}]
    assert town.read(TOWN_FILE) == TOWN_SETTINGS


async def test_metrics_count_patches_by_status(town: Town) -> None:
    """/metrics shows the PATCH counter by status, error answers included."""
    async with town.local() as client:
        await client.patch("/config", json={"town": {"role_effort": {"mayor": "low"}}})
        await client.patch("/config", json={"extra": 1})
        await client.patch("/config", content=b"[]", headers=JSON)
        await client.patch("/config", content=b"{}", headers={"content-type": "text/plain"})
        answer = await client.get("/metrics")
    assert answer.status_code == 200
    assert answer.headers["content-type"].startswith("text/plain")
    lines = set(answer.text.splitlines())
    for status in (200, 422, 400, 415):
        assert f'gastown_sandboxd_config_patches_total{{status="{status}"}} 1.0' in lines


def test_an_error_answer_hides_tokens_and_shows_host_names() -> None:
    """A token in an error answer is shown by its fingerprint; a host name of three long
    labels, which the log's wider JWT shape would take, stays as it is."""
    token = mint(T0, town_id=TOWN_ID)
    url = "https://gastown-cloud.internal.kilocode.example"
    answer = error_response(502, "refresh_failed", f"the cloud at {url} gave {token}")
    body = json.loads(bytes(answer.body))
    assert body["message"] == f"the cloud at {url} gave [jwt:{fingerprint(token)}]"
