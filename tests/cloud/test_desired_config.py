"""The desired-configuration routes (CONTRACT §10): PATCH, GET with ETag, the sandbox's report.

Route logic runs in-process (httpx.ASGITransport) against a real store file and a stand-in
sandbox listening on 127.0.0.1; the last test runs the same loop through the real server.
"""

from __future__ import annotations

import json
import secrets
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from gastown_cloud.app import create_app
from gastown_cloud.openapi import openapi_document
from gastown_cloud.settings import CloudSettings
from gastown_cloud.store import Store
from gastown_cloud.tokens import mint_gastown_token
from tests.fixtures.cloud import CloudServer

from .stand_in import APPLIED, StandIn, closed_url, sandbox

__all__ = ["sandbox"]  # the fixture, used by name

NOW = 1_700_000_000.0
ROLE = {"town": {"role_agents": {"mayor": "claude"}}}
AGENT = {"town": {"default_agent": "kilo-sonnet"}}
INVALID = {
    "error": "invalid_patch",
    "message": "Field /town/role_agents/majer: unknown role.",
    "details": [{"path": "/town/role_agents/majer", "message": "unknown role"}],
}


@dataclass
class Cloud:
    """The app in-process: its client (with the key), settings, and a clock the test moves."""

    client: httpx.AsyncClient
    settings: CloudSettings
    now: list[float]

    async def town(self, sandbox_url: str | None = None, user: str = "user-1") -> str:
        body: dict[str, Any] = {"userId": user, "name": "t"}
        if sandbox_url is not None:
            body["sandboxUrl"] = sandbox_url
        answer = await self.client.post("/api/gastown/towns", json=body)
        assert answer.status_code == 201, answer.text
        town_id: str = answer.json()["town"]["id"]
        return town_id

    def token(self, town_id: str, user: str = "user-1", **kwargs: Any) -> str:
        kwargs.setdefault("now", int(self.now[0]))
        return mint_gastown_token(user, town_id, secret=self.settings.nextauth_secret, **kwargs)

    async def patch(self, town_id: str, body: Any, **headers: str) -> httpx.Response:
        content = body if isinstance(body, bytes) else json.dumps(body).encode()
        return await self.client.patch(
            f"/api/gastown/towns/{town_id}/config", content=content, headers=headers
        )

    async def config(self, town_id: str, **headers: str) -> httpx.Response:
        return await self.client.get(f"/api/gastown/towns/{town_id}/config", headers=headers)

    async def state(self, town_id: str) -> dict[str, Any]:
        answer = await self.config(town_id)
        assert answer.status_code == 200, answer.text
        body: dict[str, Any] = answer.json()
        return body

    async def report(
        self, town_id: str, body: Any, *, token: str | None = None, key: bool = True
    ) -> httpx.Response:
        headers = {} if key else {"x-internal-api-key": ""}
        if token is not None:
            headers["authorization"] = f"Bearer {token}"
        return await self.client.post(
            f"/api/gastown/towns/{town_id}/config/status", json=body, headers=headers
        )


@asynccontextmanager
async def serve_cloud(db: Path, *, sandbox_timeout: float) -> AsyncIterator[Cloud]:
    """The cloud app in-process on the store file `db`, with a settable clock."""
    settings = CloudSettings(
        nextauth_secret=secrets.token_urlsafe(48),
        internal_api_key=secrets.token_urlsafe(24),
        db=db,
        sandbox_timeout=sandbox_timeout,
    )
    now = [NOW]
    async with Store(settings.db) as store:
        app = create_app(settings, store, clock=lambda: now[0])
        transport = httpx.ASGITransport(app=app)
        headers = {"x-internal-api-key": settings.internal_api_key}
        async with httpx.AsyncClient(
            transport=transport, base_url="http://cloud", headers=headers, timeout=30
        ) as client:
            yield Cloud(client, settings, now)


@pytest.fixture
async def cloud(tmp_path: Path) -> AsyncIterator[Cloud]:
    """The cloud in-process on a fresh store, with the default 10 s push timeout."""
    async with serve_cloud(tmp_path / "cloud.db", sandbox_timeout=10.0) as served:
        yield served


def _reply(status: int, body: dict[str, Any]) -> Response:
    return JSONResponse(body, status_code=status)


async def test_applied_change_is_recorded(cloud: Cloud, sandbox: StandIn) -> None:
    """Sandbox 200: the answer is the sandbox's plus the generation; GET says applied, with the
    time and the sandbox's revision."""
    town = await cloud.town(sandbox.url)
    answer = await cloud.patch(town, ROLE)
    assert answer.status_code == 200, answer.text
    assert answer.json() == {**APPLIED, "generation": 1, "state": "applied"}
    [(headers, body)] = sandbox.received
    assert (headers["x-gastown-generation"], json.loads(body)) == ("1", ROLE)
    assert await cloud.state(town) == {
        "generation": 1,
        "desired": ROLE,
        "observedGeneration": 1,
        "state": "applied",
        "lastError": None,
        "appliedAt": "2023-11-14T22:13:20Z",
        "revision": "r2",
    }


async def test_refused_change_is_not_kept(cloud: Cloud, sandbox: StandIn) -> None:
    """Sandbox 422: the cloud answers 422 with the sandbox's details; generation and desired
    stay as they were (here after one applied change)."""
    town = await cloud.town(sandbox.url)
    assert (await cloud.patch(town, ROLE)).status_code == 200
    before = await cloud.state(town)
    sandbox.reply = _reply(422, INVALID)
    answer = await cloud.patch(town, {"town": {"role_agents": {"majer": "x"}}})
    assert answer.status_code == 422
    assert answer.json() == INVALID
    assert await cloud.state(town) == before
    assert before["generation"] == 1


@pytest.mark.parametrize("status", [409, 412])
async def test_other_refusals_are_passed_on_and_not_kept(
    cloud: Cloud, sandbox: StandIn, status: int
) -> None:
    """The sandbox's 409 (unreadable file) and 412 (stale If-Match) are its refusals too."""
    sandbox.reply = _reply(status, {"error": "no", "message": "No."})
    town = await cloud.town(sandbox.url)
    answer = await cloud.patch(town, ROLE, **{"if-match": '"r0"'})
    assert answer.status_code == status
    assert sandbox.received[0][0]["if-match"] == '"r0"'
    assert (await cloud.state(town))["generation"] == 0


@pytest.mark.parametrize("status", [500, 502, 503, 504])
async def test_sandbox_5xx_keeps_the_change_pending(
    cloud: Cloud, sandbox: StandIn, status: int
) -> None:
    """Sandbox 5xx: kept, 202 pending; GET shows the new generation not yet observed."""
    sandbox.reply = _reply(status, {"error": "busy", "message": "Busy."})
    town = await cloud.town(sandbox.url)
    answer = await cloud.patch(town, ROLE)
    assert answer.status_code == 202, answer.text
    assert answer.json() == {
        "generation": 1,
        "state": "pending",
        "reason": "sandbox_error",
        "message": f"The sandbox answered {status}.",
    }
    config = await cloud.state(town)
    assert (config["generation"], config["observedGeneration"]) == (1, 0)
    assert (config["state"], config["desired"], config["appliedAt"]) == ("pending", ROLE, None)


async def test_unreachable_and_hung_sandboxes_keep_the_change_pending(
    tmp_path: Path, sandbox: StandIn
) -> None:
    """Nothing listening, or no answer within the push timeout (0.3 s here): kept, 202."""
    async with serve_cloud(tmp_path / "cloud.db", sandbox_timeout=0.3) as cloud:
        gone = await cloud.town(closed_url())
        answer = await cloud.patch(gone, ROLE)
        assert answer.status_code == 202
        assert answer.json()["reason"] == "sandbox_unreachable"
        sandbox.hold = anyio.Event()  # released at teardown
        hung = await cloud.town(sandbox.url)
        answer = await cloud.patch(hung, ROLE)
        assert answer.status_code == 202
        assert answer.json()["reason"] == "sandbox_timeout"
        for town in (gone, hung):
            assert (await cloud.state(town))["desired"] == ROLE


@pytest.mark.parametrize("action", ["stop", "destroy"])
async def test_inactive_town_is_409_and_keeps_nothing(
    cloud: Cloud, sandbox: StandIn, action: str
) -> None:
    """A stopped or destroyed town: 409, nothing kept, nothing pushed."""
    town = await cloud.town(sandbox.url)
    path = f"/api/gastown/towns/{town}"
    changed = await (
        cloud.client.delete(path) if action == "destroy" else cloud.client.post(path + "/stop")
    )
    assert changed.status_code == 200
    answer = await cloud.patch(town, ROLE)
    assert answer.status_code == 409
    assert answer.json()["error"] == "town_not_active"
    assert (await cloud.state(town))["generation"] == 0
    assert sandbox.received == []


async def test_bad_bodies_are_refused_before_anything_is_kept(
    cloud: Cloud, sandbox: StandIn
) -> None:
    """Not JSON or not an object 400, a wrong content type 415, too large 413, a wrong shape
    422 with one detail per problem; nothing kept, nothing pushed."""
    town = await cloud.town(sandbox.url)
    for content, status in [(b"{nope", 400), (b"[1]", 400), (b"{" + b" " * 70_000 + b"}", 413)]:
        assert (await cloud.patch(town, content)).status_code == status
    text = await cloud.patch(town, ROLE, **{"content-type": "text/plain"})
    assert text.status_code == 415
    assert text.json()["error"] == "unsupported_media_type"
    shaped = await cloud.patch(town, {"town": {"cost_tier": "x", "role_agents": []}, "rig": {}})
    assert shaped.status_code == 422
    body = shaped.json()
    assert body["error"] == "invalid_config"
    assert [d["path"] for d in body["details"]] == ["/town/cost_tier", "/town/role_agents", "/rig"]
    assert (await cloud.state(town))["generation"] == 0
    assert sandbox.received == []


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b'{"town": {"agents": {"a": {"x": NaN}}}}', "not valid JSON"),
        (b'{"town": {"default_agent": Infinity}}', "not valid JSON"),
        (b'{"town": {"default_agent": "\\ud800"}}', "lone surrogate"),
        (b'{"town": {"agents": {"a": {"x": ' + b"[" * 600 + b"]" * 600 + b"}}}}", "deeper"),
    ],
    ids=["nan", "infinity", "lone_surrogate", "600_deep"],
)
async def test_bodies_no_answer_could_carry_are_400_and_the_config_stays_readable(
    cloud: Cloud, sandbox: StandIn, content: bytes, message: str
) -> None:
    """NaN or Infinity (no JSON answer can carry them), a lone surrogate (no UTF-8 can), or
    nesting past 64 levels: 400, nothing kept or pushed, GET still answers. Before, the first
    two were kept and every later GET answered 500; the others answered 500 at once."""
    town = await cloud.town(sandbox.url)
    answer = await cloud.patch(town, content)
    assert answer.status_code == 400, answer.text
    assert answer.json()["error"] == "malformed_json"
    assert message in answer.json()["message"]
    assert (await cloud.state(town))["generation"] == 0
    assert sandbox.received == []


@pytest.mark.parametrize(
    "report",
    [
        b'{"observedGeneration": 0, "error": {"message": "m", "details": [{"x": Infinity}]}}',
        b'{"observedGeneration": 0, "error": {"message": "m", "details": [{"x": "\\ud800"}]}}',
    ],
    ids=["infinity", "lone_surrogate"],
)
async def test_reports_no_answer_could_carry_are_400(cloud: Cloud, report: bytes) -> None:
    """The same for a sandbox's status report: 400, and the town's config stays readable."""
    town = await cloud.town()
    answer = await cloud.client.post(
        f"/api/gastown/towns/{town}/config/status",
        content=report,
        headers={"authorization": f"Bearer {cloud.token(town)}"},
    )
    assert answer.status_code == 400, answer.text
    assert (await cloud.config(town)).status_code == 200


@pytest.mark.parametrize("where", ["rig name", "role name"])
async def test_a_token_as_a_key_is_refused_and_not_echoed(
    cloud: Cloud, sandbox: StandIn, where: str
) -> None:
    """A JWT used as a key would be served back like a value: 422, named without it."""
    town = await cloud.town(sandbox.url)
    token = cloud.token(town)
    body = (
        {"rigs": {token: {"agent": "claude"}}}
        if where == "rig name"
        else {"town": {"role_agents": {token: "claude"}}}
    )
    answer = await cloud.patch(town, body)
    assert answer.status_code == 422, answer.text
    assert token not in answer.text
    assert "[jwt:" in answer.json()["details"][0]["path"]
    assert sandbox.received == []
    assert token.encode() not in cloud.settings.db.read_bytes()


async def test_secrets_are_never_kept(cloud: Cloud, sandbox: StandIn) -> None:
    """A token in the body is refused (422) before it is kept or pushed, and not echoed."""
    town = await cloud.town(sandbox.url)
    token = cloud.token(town)
    agent = {"command": "claude", "env": {"ANTHROPIC_AUTH_TOKEN": token}}
    answer = await cloud.patch(town, {"town": {"agents": {"k": agent}}})
    assert answer.status_code == 422
    assert [d["path"] for d in answer.json()["details"]] == [
        "/town/agents/k/env/ANTHROPIC_AUTH_TOKEN"
    ]
    assert token not in answer.text
    assert sandbox.received == []
    assert token.encode() not in cloud.settings.db.read_bytes()
    assert (await cloud.state(town))["generation"] == 0


async def test_desired_too_large_for_a_sandbox_is_refused(cloud: Cloud, sandbox: StandIn) -> None:
    """Changes that together exceed what a sandbox takes in one PATCH are refused (422)."""
    sandbox.reply = _reply(503, {"error": "away", "message": "Away."})
    town = await cloud.town(sandbox.url)
    statuses = []
    for n in range(3):  # each body about 26 KiB: the third brings desired past 64 KiB
        names = {f"crew{n}-{i}": "x" * 200 for i in range(120)}
        answer = await cloud.patch(town, {"town": {"crew_agents": names}})
        statuses.append(answer.status_code)
    assert statuses == [202, 202, 422]
    assert answer.json()["error"] == "desired_too_large"
    assert (await cloud.state(town))["generation"] == 2


async def test_key_and_town_are_required(cloud: Cloud) -> None:
    """Without the key every route is 401; an unknown town is 404."""
    town = await cloud.town()
    no_key = {"x-internal-api-key": "wrong-key-wrong-key"}
    assert (await cloud.patch(town, ROLE, **no_key)).status_code == 401
    assert (await cloud.config(town, **no_key)).status_code == 401
    token = cloud.token(town)
    report = {"observedGeneration": 0}
    assert (await cloud.report(town, report, token=token, key=False)).status_code == 401
    assert (await cloud.patch("ghost", ROLE)).status_code == 404
    assert (await cloud.config("ghost")).status_code == 404
    assert (await cloud.report("ghost", report, token=token)).status_code == 404


async def test_get_has_an_etag_and_answers_304(cloud: Cloud, sandbox: StandIn) -> None:
    """A matching If-None-Match gives 304 without a body; a change gives a new ETag."""
    town = await cloud.town(sandbox.url)
    first = await cloud.config(town)
    tag = first.headers["etag"]
    same = await cloud.config(town, **{"if-none-match": tag})
    assert same.status_code == 304
    assert same.content == b""
    assert same.headers["etag"] == tag
    assert (await cloud.config(town, **{"if-none-match": f'"x", W/{tag}'})).status_code == 304
    assert (await cloud.patch(town, ROLE)).status_code == 200
    changed = await cloud.config(town, **{"if-none-match": tag})
    assert changed.status_code == 200
    assert changed.headers["etag"] != tag
    assert changed.json()["generation"] == 1


async def test_get_checks_a_bearer_when_one_is_sent(cloud: Cloud) -> None:
    """The key is enough; a Bearer, when sent, must be well signed for this town and owner
    (expired is fine, as for refresh binding), else 403."""
    town = await cloud.town()
    other = await cloud.town(user="user-2")
    assert (await cloud.config(town)).status_code == 200
    good = cloud.token(town)
    expired = cloud.token(town, lifetime=60, now=int(NOW) - 3600)
    for token in (good, expired):
        answer = await cloud.config(town, authorization=f"Bearer {token}")
        assert answer.status_code == 200, answer.text
    forged = mint_gastown_token("user-1", town, secret="another-secret-" * 3, now=int(NOW))
    for authorization in (
        f"Bearer {cloud.token(other, user='user-2')}",
        f"Bearer {cloud.token(town, user='user-2')}",
        f"Bearer {forged}",
        "Bearer not-a-jwt",
        f"Basic {good}",
    ):
        answer = await cloud.config(town, authorization=authorization)
        assert answer.status_code == 403, authorization
        assert answer.json()["error"] == "token_binding"
        assert good not in answer.text


async def test_report_needs_the_towns_bearer(cloud: Cloud) -> None:
    """POST …/config/status: no Bearer 401, another town's 403, a destroyed town 410."""
    town = await cloud.town()
    other = await cloud.town(user="user-2")
    report = {"observedGeneration": 0, "revision": "r1", "error": None}
    missing = await cloud.report(town, report)
    assert missing.status_code == 401
    assert missing.json()["error"] == "bearer_required"
    wrong = await cloud.report(town, report, token=cloud.token(other, user="user-2"))
    assert wrong.status_code == 403
    assert (await cloud.report(town, report, token=cloud.token(town))).status_code == 200
    assert (await cloud.client.delete(f"/api/gastown/towns/{town}")).status_code == 200
    gone = await cloud.report(town, report, token=cloud.token(town))
    assert gone.status_code == 410


async def test_reports_drive_the_state(cloud: Cloud) -> None:
    """pending → failed (with the error) → pending again on a new generation → applied; a report
    ahead of the cloud is 409; a late report on an older generation changes nothing."""
    town = await cloud.town(closed_url())
    token = cloud.token(town)
    assert (await cloud.patch(town, ROLE)).status_code == 202
    assert (await cloud.state(town))["state"] == "pending"
    error = {
        "message": "Rig api does not exist.",
        "details": [{"path": "/rigs/api", "message": "x"}],
    }
    cloud.now[0] = NOW + 10
    failed = await cloud.report(
        town, {"observedGeneration": 1, "revision": "r1", "error": error}, token=token
    )
    assert failed.status_code == 200, failed.text
    assert failed.json()["state"] == "failed"
    config = await cloud.state(town)
    assert (config["state"], config["observedGeneration"], config["appliedAt"]) == (
        "failed",
        1,
        None,
    )
    assert config["lastError"] == {**error, "generation": 1, "at": "2023-11-14T22:13:30Z"}
    assert (await cloud.patch(town, AGENT)).status_code == 202
    pending = await cloud.state(town)
    assert (pending["state"], pending["generation"]) == ("pending", 2)
    assert pending["lastError"]["generation"] == 1  # kept: it explains the older generation
    ahead = await cloud.report(town, {"observedGeneration": 3, "error": None}, token=token)
    assert ahead.status_code == 409
    assert ahead.json()["error"] == "generation_ahead"
    cloud.now[0] = NOW + 20
    applied = await cloud.report(town, {"observedGeneration": 2, "revision": "r3"}, token=token)
    assert applied.status_code == 200
    late = await cloud.report(town, {"observedGeneration": 1, "revision": "r1"}, token=token)
    assert late.status_code == 200
    config = await cloud.state(town)
    assert (config["state"], config["observedGeneration"], config["revision"]) == (
        "applied",
        2,
        "r3",
    )
    assert (config["lastError"], config["appliedAt"]) == (None, "2023-11-14T22:13:40Z")


@pytest.mark.parametrize(
    "body",
    [
        {},
        {"observedGeneration": "1"},
        {"observedGeneration": True},
        {"observedGeneration": -1},
        {"observedGeneration": 0, "error": {"details": []}},
        {"observedGeneration": 0, "error": "bad"},
        {"observedGeneration": 0, "revision": 5},
    ],
)
async def test_bad_reports_are_400(cloud: Cloud, body: dict[str, Any]) -> None:
    """A report missing observedGeneration, or with a field of the wrong type, is 400."""
    town = await cloud.town()
    answer = await cloud.report(town, body, token=cloud.token(town))
    assert answer.status_code == 400, answer.text
    assert answer.json()["details"]


async def test_sandbox_back_after_an_outage_gets_everything_it_missed(
    cloud: Cloud, sandbox: StandIn
) -> None:
    """Changes kept while the sandbox was away reach it with the next push: the pushed patch
    takes it from the generation it last applied to the newest, deletions included."""
    sandbox.reply = applied_or_away
    town = await cloud.town(sandbox.url)
    both = {"town": {"default_agent": "a", "role_agents": {"mayor": "claude"}}}
    assert (await cloud.patch(town, both)).status_code == 200  # 1: applied
    drop = {"town": {"default_agent": None}}
    assert (await cloud.patch(town, drop)).status_code == 202  # 2: sandbox away
    crew = {"town": {"crew_agents": {"alice": "codex"}}}
    assert (await cloud.patch(town, crew)).status_code == 202  # 3: sandbox away
    last = {"town": {"role_effort": {"mayor": "high"}}}
    answer = await cloud.patch(town, last)  # 4: sandbox back
    assert answer.status_code == 200, answer.text
    assert answer.json()["generation"] == 4
    pushed = sandbox.bodies()[-1]
    assert pushed == {
        "town": {
            "default_agent": None,
            "crew_agents": {"alice": "codex"},
            "role_effort": {"mayor": "high"},
        }
    }
    assert sandbox.received[-1][0]["x-gastown-generation"] == "4"
    config = await cloud.state(town)
    assert (config["state"], config["observedGeneration"]) == ("applied", 4)
    assert config["desired"] == {
        "town": {
            "role_agents": {"mayor": "claude"},
            "crew_agents": {"alice": "codex"},
            "role_effort": {"mayor": "high"},
        }
    }


def applied_or_away(count: int) -> Response:
    """The first and fourth pushes are applied; the sandbox is away (503) in between."""
    if count in (1, 4):
        return JSONResponse(APPLIED)
    return _reply(503, {"error": "away", "message": "Away."})


async def test_concurrent_patches_are_serialised(cloud: Cloud, sandbox: StandIn) -> None:
    """Ten PATCHes at once on one town: all kept (generations 1..10, no lost update), and the
    sandbox never sees two pushes of the town at the same time."""
    sandbox.delay = 0.02
    town = await cloud.town(sandbox.url)
    answers: list[httpx.Response] = []

    async def change(n: int) -> None:
        answers.append(await cloud.patch(town, {"town": {"crew_agents": {f"c{n}": "codex"}}}))

    async with anyio.create_task_group() as tg:
        for n in range(10):
            tg.start_soon(change, n)
    assert [a.status_code for a in answers] == [200] * 10
    assert sorted(a.json()["generation"] for a in answers) == list(range(1, 11))
    config = await cloud.state(town)
    assert config["generation"] == 10
    assert config["desired"]["town"]["crew_agents"] == {f"c{n}": "codex" for n in range(10)}
    # Pushed one after another: each push carries the generation after the one before.
    assert [int(h["x-gastown-generation"]) for h, _ in sandbox.received] == list(range(1, 11))
    assert sandbox.most_in_flight == 1


async def test_two_concurrent_patches_while_the_sandbox_is_away(cloud: Cloud) -> None:
    """Two PATCHes at once on an unreachable sandbox are both kept: generation +2."""
    town = await cloud.town(closed_url())
    answers: list[httpx.Response] = []

    async def change(body: dict[str, Any]) -> None:
        answers.append(await cloud.patch(town, body))

    async with anyio.create_task_group() as tg:
        tg.start_soon(change, ROLE)
        tg.start_soon(change, AGENT)
    assert sorted(a.json()["generation"] for a in answers) == [1, 2]
    config = await cloud.state(town)
    both = {"town": {"role_agents": {"mayor": "claude"}, "default_agent": "kilo-sonnet"}}
    assert config["desired"] == both
    assert (config["generation"], config["state"]) == (2, "pending")


async def test_real_server_keeps_a_change_until_the_sandbox_reports(
    shared_cloud: CloudServer,
) -> None:
    """Through the real server: a change for an away sandbox is kept (202); the sandbox reads
    it with its Bearer and an ETag, reports it applied, and the dashboard sees applied."""
    town, token = shared_cloud.create_town(sandbox_url=closed_url())
    path = f"/api/gastown/towns/{town['id']}/config"
    bearer = {"authorization": f"Bearer {token}"}
    async with httpx.AsyncClient(
        base_url=shared_cloud.url, headers=shared_cloud.headers, timeout=20
    ) as client:
        kept = await client.patch(path, json=ROLE)
        assert kept.status_code == 202, kept.text
        read = await client.get(path, headers=bearer)
        assert read.status_code == 200
        assert (read.json()["generation"], read.json()["state"]) == (1, "pending")
        assert read.json()["desired"] == ROLE
        tag = read.headers["etag"]
        assert (await client.get(path, headers={**bearer, "if-none-match": tag})).status_code == 304
        report = {"observedGeneration": 1, "revision": "r9", "error": None}
        reported = await client.post(path + "/status", json=report, headers=bearer)
        assert reported.status_code == 200, reported.text
        seen = await client.get(path, headers={"if-none-match": tag})
    assert seen.status_code == 200
    assert (seen.json()["state"], seen.json()["revision"]) == ("applied", "r9")
    assert seen.json()["appliedAt"] is not None


def test_openapi_paths_describe_exactly_these_routes(tmp_path: Path) -> None:
    """The cloud's OpenAPI document names every config route and no other, and documents
    every status the tests above make these routes answer."""
    town_path = "/api/gastown/towns/{town_id}"
    paths = {
        path: item
        for path, item in openapi_document()["paths"].items()
        if path.startswith(town_path + "/config")
    }
    documented = {(m.upper(), path) for path, item in paths.items() for m in item}
    settings = CloudSettings(nextauth_secret="s" * 40, internal_api_key="k" * 20, db=tmp_path / "x")
    app = create_app(settings, Store(settings.db))
    routed = {
        (method, route.path)
        for route in app.routes
        if isinstance(route, Route) and route.path.startswith(town_path + "/config")
        for method in route.methods or ()
        if method != "HEAD"
    }
    assert routed == documented
    statuses = {
        ("PATCH", "/config"): {200, 202, 400, 401, 404, 409, 412, 413, 415, 422},
        ("GET", "/config"): {200, 304, 401, 403, 404},
        ("POST", "/config/status"): {200, 400, 401, 403, 404, 409, 410},
    }
    for (method, suffix), seen in statuses.items():
        assert seen <= {
            int(code) for code in paths[town_path + suffix][method.lower()]["responses"]
        }
