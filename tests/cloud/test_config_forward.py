"""PATCH /api/gastown/towns/{id}/config pushed by the real cloud server to a stand-in sandbox.

The sandbox's 200 and its refusals come back; when it is away or broken the change is kept
as pending (202) for its next sync (CONTRACT §10).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest
from starlette.responses import JSONResponse, PlainTextResponse

from gastown_cloud.app import create_app
from gastown_cloud.settings import CloudSettings
from gastown_cloud.store import Store
from tests.fixtures.cloud import CloudServer
from tests.fixtures.net import make_local_ca, tls

from .stand_in import APPLIED, StandIn, applied_reply, closed_url, running_stand_in, sandbox

__all__ = ["sandbox"]  # the fixture, used by name

KEY = "forward-key-0123456789"
PATCH = {"town": {"default_agent": "kilo-sonnet", "role_agents": {"mayor": "claude"}}}


async def _patch(
    cloud: CloudServer, town_id: str, content: bytes, **headers: str
) -> httpx.Response:
    async with httpx.AsyncClient(
        base_url=cloud.url, headers=cloud.headers, timeout=20, verify=tls()
    ) as client:
        return await client.patch(
            f"/api/gastown/towns/{town_id}/config", content=content, headers=headers
        )


async def _config(cloud: CloudServer, town_id: str) -> dict[str, Any]:
    async with httpx.AsyncClient(
        base_url=cloud.url, headers=cloud.headers, timeout=20, verify=tls()
    ) as client:
        answer = await client.get(f"/api/gastown/towns/{town_id}/config")
    assert answer.status_code == 200, answer.text
    config: dict[str, Any] = answer.json()
    return config


def _assert_pending(answer: httpx.Response, reason: str, generation: int = 1) -> None:
    assert answer.status_code == 202, answer.text
    body = answer.json()
    assert (body["generation"], body["state"], body["reason"]) == (generation, "pending", reason)
    assert body["message"].endswith(".")


async def test_patch_is_forwarded_with_the_key(shared_cloud: CloudServer, sandbox: StandIn) -> None:
    """The body reaches the sandbox byte for byte with the key and the generation; its answer
    comes back with the generation, and the cloud records it applied."""
    town, _ = shared_cloud.create_town(sandbox_url=sandbox.url + "/")
    content = json.dumps(PATCH).encode()
    answer = await _patch(
        shared_cloud,
        town["id"],
        content,
        **{"content-type": "application/merge-patch+json", "if-match": '"r1"'},
    )
    assert answer.status_code == 200, answer.text
    assert answer.json() == {**APPLIED, "generation": 1, "state": "applied"}
    assert answer.headers["etag"] == '"r2"'
    [(headers, body)] = sandbox.received
    assert body == content
    assert headers["x-internal-api-key"] == shared_cloud.internal_key
    assert headers["x-gastown-generation"] == "1"
    assert headers["content-type"] == "application/merge-patch+json"
    assert headers["if-match"] == '"r1"'
    config = await _config(shared_cloud, town["id"])
    assert (config["generation"], config["observedGeneration"]) == (1, 1)
    assert (config["state"], config["desired"], config["revision"]) == ("applied", PATCH, "r2")


async def test_sandbox_error_status_is_passed_through(
    shared_cloud: CloudServer, sandbox: StandIn
) -> None:
    """A 422 of the sandbox reaches the dashboard with its status and body; nothing is kept."""
    details = [{"path": "/town/role_agents/majer", "message": "unknown role"}]
    problem: dict[str, Any] = {"error": "invalid_patch", "message": "bad", "details": details}
    sandbox.reply = JSONResponse(problem, status_code=422)
    town, _ = shared_cloud.create_town(sandbox_url=sandbox.url)
    answer = await _patch(shared_cloud, town["id"], b'{"town": {"role_agents": {"majer": "x"}}}')
    assert answer.status_code == 422
    assert answer.json() == problem
    config = await _config(shared_cloud, town["id"])
    assert (config["generation"], config["desired"], config["state"]) == (0, {}, "applied")


async def test_non_json_sandbox_answer_is_kept_pending(
    shared_cloud: CloudServer, sandbox: StandIn
) -> None:
    """A sandbox that answers something other than JSON leaves the change pending (202)."""
    sandbox.reply = PlainTextResponse("oops", status_code=500)
    town, _ = shared_cloud.create_town(sandbox_url=sandbox.url)
    answer = await _patch(shared_cloud, town["id"], json.dumps(PATCH).encode())
    _assert_pending(answer, "bad_sandbox_answer")
    assert (await _config(shared_cloud, town["id"]))["desired"] == PATCH


@pytest.mark.parametrize("status", [401, 403])
async def test_sandbox_refusing_the_key_is_pending_not_401(
    shared_cloud: CloudServer, sandbox: StandIn, status: int
) -> None:
    """A sandbox that refuses the cloud's key: kept pending with that reason, not a 401."""
    sandbox.reply = JSONResponse({"error": "unauthorized", "message": "no"}, status_code=status)
    town, _ = shared_cloud.create_town(sandbox_url=sandbox.url)
    answer = await _patch(shared_cloud, town["id"], json.dumps(PATCH).encode())
    _assert_pending(answer, "sandbox_refused_key")
    assert "INTERNAL_API_KEY" in answer.json()["message"]


async def test_unreachable_sandbox_is_kept_pending(shared_cloud: CloudServer) -> None:
    """A sandbox URL where nothing listens: 202 pending, and the change is in `desired`."""
    town, _ = shared_cloud.create_town(sandbox_url=closed_url())
    answer = await _patch(shared_cloud, town["id"], json.dumps(PATCH).encode())
    _assert_pending(answer, "sandbox_unreachable")
    assert "could not be reached" in answer.json()["message"]
    config = await _config(shared_cloud, town["id"])
    assert (config["generation"], config["observedGeneration"]) == (1, 0)
    assert (config["state"], config["desired"]) == ("pending", PATCH)


async def test_a_change_with_if_match_the_sandbox_cannot_check_is_not_kept(
    shared_cloud: CloudServer,
) -> None:
    """Two dashboards on the same revision, the sandbox away: each PATCH with If-Match is 503
    precondition_unchecked and nothing is kept (both were 202 and the second silently
    overwrote the first); without If-Match the change is kept pending as before."""
    town, _ = shared_cloud.create_town(sandbox_url=closed_url())
    for agent in ("alice", "bob"):
        content = json.dumps({"town": {"default_agent": agent}}).encode()
        answer = await _patch(shared_cloud, town["id"], content, **{"if-match": '"r1"'})
        assert answer.status_code == 503, answer.text
        body = answer.json()
        assert body["error"] == "precondition_unchecked"
        assert body["details"] == [{"reason": "sandbox_unreachable"}]
    config = await _config(shared_cloud, town["id"])
    assert (config["generation"], config["desired"]) == (0, {})
    _assert_pending(
        await _patch(shared_cloud, town["id"], json.dumps(PATCH).encode()), "sandbox_unreachable"
    )


async def test_changes_reach_an_https_sandbox_the_cloud_trusts(
    cloud_factory: Callable[..., CloudServer], tmp_path: Path
) -> None:
    """A sandbox served over HTTPS by a CA the cloud trusts (SSL_CERT_DIR): each push lands
    and comes back applied; the second goes through the context the first one made."""
    ca = make_local_ca(tmp_path / "ca")
    cloud = cloud_factory(**ca.trusting_env())
    async with running_stand_in(tls=ca) as sandbox:
        assert sandbox.url.startswith("https://127.0.0.1:")
        town, _ = cloud.create_town(sandbox_url=sandbox.url)
        for generation, agent in ((1, "claude"), (2, "codex")):
            change = {"town": {"default_agent": agent}}
            answer = await _patch(cloud, town["id"], json.dumps(change).encode())
            assert answer.status_code == 200, answer.text
            assert (answer.json()["generation"], answer.json()["state"]) == (generation, "applied")
    assert [body["town"]["default_agent"] for body in sandbox.bodies()] == ["claude", "codex"]


async def test_an_https_sandbox_the_cloud_does_not_trust_is_kept_pending(
    cloud_factory: Callable[..., CloudServer], tmp_path: Path
) -> None:
    """A certificate from a CA the cloud does not trust: nothing is sent, the change is kept
    pending, as for a sandbox that cannot be reached."""
    cloud = cloud_factory(**make_local_ca(tmp_path / "trusted").trusting_env())
    async with running_stand_in(tls=make_local_ca(tmp_path / "other", name="other CA")) as sandbox:
        town, _ = cloud.create_town(sandbox_url=sandbox.url)
        answer = await _patch(cloud, town["id"], json.dumps(PATCH).encode())
    _assert_pending(answer, "sandbox_unreachable")
    assert sandbox.received == []


async def test_town_without_sandbox_url_is_kept_pending(shared_cloud: CloudServer) -> None:
    """A town that has no sandboxUrl keeps the change for its sandbox's sync (202)."""
    town, _ = shared_cloud.create_town()
    answer = await _patch(shared_cloud, town["id"], json.dumps(PATCH).encode())
    _assert_pending(answer, "no_sandbox_url")


@pytest.mark.parametrize("action", ["stop", "destroy"])
async def test_inactive_town_is_409(
    shared_cloud: CloudServer, sandbox: StandIn, action: str
) -> None:
    """A stopped or destroyed town gets 409 and the sandbox hears nothing."""
    town, _ = shared_cloud.create_town(sandbox_url=sandbox.url)
    shared_cloud.set_status(town["id"], action)  # type: ignore[arg-type]
    answer = await _patch(shared_cloud, town["id"], b"{}")
    assert answer.status_code == 409
    assert answer.json()["error"] == "town_not_active"
    assert sandbox.received == []


async def test_bad_bodies_are_not_forwarded(shared_cloud: CloudServer, sandbox: StandIn) -> None:
    """Malformed JSON (400), a non-object (400) and 1 MB (413) never reach the sandbox."""
    town, _ = shared_cloud.create_town(sandbox_url=sandbox.url)
    for content, status in [(b"{nope", 400), (b"[1]", 400), (b"{" + b" " * 1_000_000 + b"}", 413)]:
        answer = await _patch(shared_cloud, town["id"], content)
        assert answer.status_code == status
    assert sandbox.received == []


async def test_unknown_town_is_404(shared_cloud: CloudServer) -> None:
    """PATCHing the config of an unknown town gets 404."""
    answer = await _patch(shared_cloud, "ghost", b"{}")
    assert answer.status_code == 404
    assert answer.json()["error"] == "town_not_found"


async def test_a_push_the_sandbox_took_is_kept_though_its_request_was_cancelled(
    tmp_path: Path, sandbox: StandIn
) -> None:
    """The dashboard's request is cancelled (it went away, or the server's graceful time at a
    stop ran out) while the sandbox is still answering the push: the change the sandbox took
    is kept as applied generation 1, not lost (the sandbox ran it, the cloud kept nothing)."""
    settings = CloudSettings(nextauth_secret="s" * 40, internal_api_key=KEY, db=tmp_path / "c.db")
    sandbox.hold = anyio.Event()
    async with Store(settings.db) as store:
        transport = httpx.ASGITransport(app=create_app(settings, store))
        async with httpx.AsyncClient(
            transport=transport, base_url="http://cloud", headers={"x-internal-api-key": KEY}
        ) as client:
            body = {"userId": "u", "name": "t", "sandboxUrl": sandbox.url}
            town_id = (await client.post("/api/gastown/towns", json=body)).json()["town"]["id"]
            path = f"/api/gastown/towns/{town_id}/config"
            async with anyio.create_task_group() as tg:
                tg.start_soon(lambda: client.patch(path, json=PATCH))
                while not sandbox.received:
                    await anyio.sleep(0.01)
                tg.cancel_scope.cancel()
                sandbox.hold.set()
            config = (await client.get(path)).json()
    assert (config["generation"], config["state"], config["desired"]) == (1, "applied", PATCH)


async def test_a_sandbox_behind_the_kept_history_is_left_to_its_sync(
    shared_cloud: CloudServer, sandbox: StandIn
) -> None:
    """The sandbox reports generation 1 late, after 17 changes it never got (its history is
    pruned: rigs.x was deleted in generation 2). No difference from it can be pushed: the
    next change is kept pending `sandbox_behind` for the sandbox's sync and not pushed (a push
    taken from {} kept rigs.x on the sandbox and was recorded as applied)."""
    town, token = shared_cloud.create_town(sandbox_url=sandbox.url)
    sandbox.reply = JSONResponse({"error": "starting"}, status_code=503)
    changes = [{"rigs": {"x": {"agent": "old"}}}, {"rigs": {"x": None}}]
    changes += [{"town": {"role_agents": {f"k{n}": "claude"}}} for n in range(16)]
    for change in changes:
        assert (
            await _patch(shared_cloud, town["id"], json.dumps(change).encode())
        ).status_code == 202
    async with httpx.AsyncClient(base_url=shared_cloud.url, verify=tls()) as client:
        report = await client.post(
            f"/api/gastown/towns/{town['id']}/config/status",
            headers={**shared_cloud.headers, "authorization": f"Bearer {token}"},
            json={"observedGeneration": 1, "revision": "r1", "error": None},
        )
    assert report.status_code == 200, report.text
    sandbox.reply = applied_reply()
    pushed = len(sandbox.received)
    answer = await _patch(shared_cloud, town["id"], json.dumps(PATCH).encode())
    _assert_pending(answer, "sandbox_behind", generation=19)
    assert len(sandbox.received) == pushed
    config = await _config(shared_cloud, town["id"])
    assert (config["generation"], config["state"]) == (19, "pending")
    assert "x" not in config["desired"].get("rigs", {})
