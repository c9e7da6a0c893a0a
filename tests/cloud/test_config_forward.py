"""PATCH /api/gastown/towns/{id}/config forwarded to a stand-in sandbox served in-process."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import anyio
import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route

from gastown_cloud.server import bind_socket, serve_app, socket_url
from tests.fixtures.cloud import CloudServer

PATCH = {"town": {"default_agent": "kilo-sonnet", "role_agents": {"mayor": "claude"}}}


@dataclass
class StandIn:
    """A fake sandbox: records each PATCH /config and answers what `reply` says."""

    url: str = ""
    received: list[tuple[dict[str, str], bytes]] = field(default_factory=list)
    reply: Response = field(
        default_factory=lambda: JSONResponse(
            {"changed": True, "revision": "r2", "files": ["settings/config.json"]},
            headers={"etag": '"r2"'},
        )
    )


@pytest.fixture
async def sandbox() -> AsyncIterator[StandIn]:
    """A Starlette stand-in for the daemon's PATCH /config on an ephemeral port."""
    stand_in = StandIn()

    async def patch_config(request: Request) -> Response:
        stand_in.received.append((dict(request.headers), await request.body()))
        return stand_in.reply

    app = Starlette(routes=[Route("/config", patch_config, methods=["PATCH"])])
    sock = bind_socket("127.0.0.1", 0)
    stand_in.url = socket_url(sock)
    stop = anyio.Event()
    async with anyio.create_task_group() as tg:
        tg.start_soon(lambda: serve_app(app, sock, shutdown_trigger=stop.wait))
        yield stand_in
        stop.set()


async def _patch(
    cloud: CloudServer, town_id: str, content: bytes, **headers: str
) -> httpx.Response:
    async with httpx.AsyncClient(base_url=cloud.url, headers=cloud.headers, timeout=20) as client:
        return await client.patch(
            f"/api/gastown/towns/{town_id}/config", content=content, headers=headers
        )


async def test_patch_is_forwarded_with_the_key(shared_cloud: CloudServer, sandbox: StandIn) -> None:
    """The body reaches the sandbox byte for byte with the key; its answer comes back."""
    town, _ = shared_cloud.create_town(sandbox_url=sandbox.url + "/")
    content = json.dumps(PATCH).encode()
    answer = await _patch(
        shared_cloud,
        town["id"],
        content,
        **{"content-type": "application/merge-patch+json", "if-match": '"r1"'},
    )
    assert answer.status_code == 200, answer.text
    assert answer.json() == {"changed": True, "revision": "r2", "files": ["settings/config.json"]}
    assert answer.headers["etag"] == '"r2"'
    [(headers, body)] = sandbox.received
    assert body == content
    assert headers["x-internal-api-key"] == shared_cloud.internal_key
    assert headers["content-type"] == "application/merge-patch+json"
    assert headers["if-match"] == '"r1"'


async def test_sandbox_error_status_is_passed_through(
    shared_cloud: CloudServer, sandbox: StandIn
) -> None:
    """A 422 of the sandbox reaches the dashboard with its status and JSON body."""
    details = [{"path": "/town/role_agents/majer", "message": "unknown role"}]
    problem: dict[str, Any] = {"error": "invalid_patch", "message": "bad", "details": details}
    sandbox.reply = JSONResponse(problem, status_code=422)
    town, _ = shared_cloud.create_town(sandbox_url=sandbox.url)
    answer = await _patch(shared_cloud, town["id"], b'{"town": {"role_agents": {"majer": "x"}}}')
    assert answer.status_code == 422
    assert answer.json() == problem


async def test_non_json_sandbox_answer_is_502(shared_cloud: CloudServer, sandbox: StandIn) -> None:
    """A sandbox that answers something other than JSON gets 502 `bad_sandbox_answer`."""
    sandbox.reply = PlainTextResponse("oops", status_code=500)
    town, _ = shared_cloud.create_town(sandbox_url=sandbox.url)
    answer = await _patch(shared_cloud, town["id"], b"{}")
    assert answer.status_code == 502
    assert answer.json()["error"] == "bad_sandbox_answer"


@pytest.mark.parametrize("status", [401, 403])
async def test_sandbox_refusing_the_key_is_502(
    shared_cloud: CloudServer, sandbox: StandIn, status: int
) -> None:
    """A sandbox that refuses the cloud's key gets 502, not a 401 blamed on the dashboard."""
    sandbox.reply = JSONResponse({"error": "unauthorized", "message": "no"}, status_code=status)
    town, _ = shared_cloud.create_town(sandbox_url=sandbox.url)
    answer = await _patch(shared_cloud, town["id"], b"{}")
    assert answer.status_code == 502
    assert answer.json()["error"] == "sandbox_refused_key"


async def test_unreachable_sandbox_is_502(shared_cloud: CloudServer) -> None:
    """A sandbox URL where nothing listens gets 502 `sandbox_unreachable`."""
    sock = bind_socket("127.0.0.1", 0)
    url = socket_url(sock)
    sock.close()
    town, _ = shared_cloud.create_town(sandbox_url=url)
    answer = await _patch(shared_cloud, town["id"], b"{}")
    assert answer.status_code == 502
    body = answer.json()
    assert body["error"] == "sandbox_unreachable"
    assert "could not be reached" in body["message"]


async def test_town_without_sandbox_url_is_502(shared_cloud: CloudServer) -> None:
    """A town that has no sandboxUrl gets 502 `no_sandbox_url`."""
    town, _ = shared_cloud.create_town()
    answer = await _patch(shared_cloud, town["id"], b"{}")
    assert answer.status_code == 502
    assert answer.json()["error"] == "no_sandbox_url"


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
