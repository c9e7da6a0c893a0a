"""The gateway on the real server: OpenAI answers, 401/403 in OpenAI's shape, usage records."""

from __future__ import annotations

import time
from typing import Any

import httpx
import jwt
import pytest

from gastown_cloud.tokens import mint_gastown_token
from tests.fixtures.cloud import CloudServer

CHAT = "/api/gateway/chat/completions"
REQUEST = {"model": "anthropic/claude-sonnet-4.5", "messages": [{"role": "user", "content": "hi"}]}


def _chat(anon: httpx.Client, token: str | None, body: Any = REQUEST) -> httpx.Response:
    headers = {} if token is None else {"authorization": f"Bearer {token}"}
    return anon.post(CHAT, json=body, headers=headers)


def _openai_error(answer: httpx.Response, status: int, type: str, code: str) -> None:
    assert answer.status_code == status, answer.text
    error = answer.json()["error"]
    assert error["type"] == type
    assert error["code"] == code
    assert error["message"]
    assert "param" in error


def test_gateway_answers_and_records_usage(shared_cloud: CloudServer, anon: httpx.Client) -> None:
    """A town's token buys an OpenAI-shaped answer; usage names user, org, town and model."""
    town, token = shared_cloud.create_town(user_id="payer", organization_id="org-pay")
    body = {
        "model": "m-1",
        "messages": [
            {"role": "system", "content": "be brief"},
            {"role": "user", "content": [{"type": "text", "text": "three word prompt"}]},
        ],
        "temperature": 0,
    }
    answer = _chat(anon, token, body)
    assert answer.status_code == 200, answer.text
    data = answer.json()
    assert data["object"] == "chat.completion"
    assert data["model"] == "m-1"
    assert data["choices"][0]["message"]["role"] == "assistant"
    assert "three word prompt" in data["choices"][0]["message"]["content"]
    assert data["usage"]["prompt_tokens"] == 5
    assert data["usage"]["total_tokens"] == 5 + data["usage"]["completion_tokens"]
    again = _chat(anon, token, body).json()
    assert again["choices"] == data["choices"]
    assert again["id"] == data["id"]
    usage = shared_cloud.usage(town["id"])
    assert len(usage) == 2
    assert usage[0] == {
        "userId": "payer",
        "organizationId": "org-pay",
        "townId": town["id"],
        "model": "m-1",
        "promptTokens": 5,
        "completionTokens": data["usage"]["completion_tokens"],
        "at": usage[0]["at"],
    }
    assert usage[0]["at"].endswith("Z")


def test_usage_is_charged_to_the_towns_organization_not_the_tokens(
    shared_cloud: CloudServer, anon: httpx.Client
) -> None:
    """A token well signed for the town and its owner but naming another organization (a
    minter's bug): the usage goes to the organization the cloud holds for the town (before:
    to the one the token named)."""
    town, _ = shared_cloud.create_town(user_id="owner-o", organization_id="org-real")
    other = shared_cloud.mint("owner-o", town["id"], "org-other")
    assert _chat(anon, other).status_code == 200
    assert [u["organizationId"] for u in shared_cloud.usage(town["id"])] == ["org-real"]


def test_refreshed_token_is_accepted(shared_cloud: CloudServer, anon: httpx.Client) -> None:
    """A token from the refresh route pays like the initial one, for the same user."""
    town, token = shared_cloud.create_town(user_id="refreshed")
    headers = {**shared_cloud.headers, "authorization": f"Bearer {token}"}
    refreshed = anon.post(
        "/api/gastown/refresh-token", json={"townId": town["id"]}, headers=headers
    ).text
    assert _chat(anon, refreshed).status_code == 200
    assert [u["userId"] for u in shared_cloud.usage(town["id"])] == ["refreshed"]


def _bad_tokens(shared_cloud: CloudServer, town: dict[str, Any]) -> dict[str, tuple[str, str]]:
    user, town_id = town["userId"], town["id"]
    claims = {"sub": user, "town_id": town_id, "organization_id": None, "iat": 0, "exp": 2**40}
    return {
        "expired": (
            shared_cloud.mint(user, town_id, lifetime=60, now=int(time.time()) - 120),
            "token_expired",
        ),
        "other secret": (mint_gastown_token(user, town_id, secret="q" * 40), "invalid_token"),
        "alg none": (
            jwt.encode({**claims, "type": "gastown_sandbox"}, None, algorithm="none"),
            "invalid_token",
        ),
        "wrong type": (
            jwt.encode({**claims, "type": "session"}, shared_cloud.secret, algorithm="HS256"),
            "wrong_token_type",
        ),
        "garbage": ("garbage", "invalid_token"),
    }


def test_bad_tokens_are_401(shared_cloud: CloudServer, anon: httpx.Client) -> None:
    """Expired, foreign, unsigned, wrong-type and garbage tokens get 401; no usage recorded."""
    town, _ = shared_cloud.create_town()
    for name, (token, code) in _bad_tokens(shared_cloud, town).items():
        before = shared_cloud.rows()
        answer = _chat(anon, token)
        _openai_error(answer, 401, "authentication_error", code)
        assert token not in answer.text, name
        assert shared_cloud.rows() == before


@pytest.mark.parametrize("authorization", [None, "Basic abc", "Bearer"])
def test_missing_token_is_401(
    shared_cloud: CloudServer, anon: httpx.Client, authorization: str | None
) -> None:
    """No Bearer token at all gets 401 `missing_token`."""
    headers = {} if authorization is None else {"authorization": authorization}
    answer = anon.post(CHAT, json=REQUEST, headers=headers)
    _openai_error(answer, 401, "authentication_error", "missing_token")


@pytest.mark.parametrize("action", ["stop", "destroy"])
def test_inactive_town_is_403(shared_cloud: CloudServer, anon: httpx.Client, action: str) -> None:
    """A genuine token of a stopped or destroyed town gets 403 and records nothing."""
    town, token = shared_cloud.create_town()
    shared_cloud.set_status(town["id"], action)  # type: ignore[arg-type]
    before = shared_cloud.rows()
    _openai_error(_chat(anon, token), 403, "permission_error", "town_not_active")
    assert shared_cloud.rows() == before


def test_token_of_unknown_town_or_other_owner_is_403(
    shared_cloud: CloudServer, anon: httpx.Client
) -> None:
    """A well-signed token for a town that does not exist, or not owned by `sub`, gets 403."""
    town, _ = shared_cloud.create_town(user_id="owner")
    for token in (shared_cloud.mint("owner", "ghost-town"), shared_cloud.mint("thief", town["id"])):
        _openai_error(_chat(anon, token), 403, "permission_error", "town_not_active")


@pytest.mark.parametrize(
    "body",
    [
        {},
        {"model": "m"},
        {"model": "m", "messages": []},
        {"model": 5, "messages": [{"role": "user", "content": "x"}]},
        {"model": "m", "messages": [{"content": "x"}]},
        {"model": "m", "messages": "hello"},
        [1],
        {"model": "m", "messages": [{"role": "user", "content": "x"}], "stream": True},
    ],
)
def test_bad_chat_body_is_400(shared_cloud: CloudServer, anon: httpx.Client, body: Any) -> None:
    """Bad requests get a 400 `invalid_request_error` and no usage."""
    _, token = shared_cloud.create_town()
    before = shared_cloud.rows()
    answer = _chat(anon, token, body)
    assert answer.status_code == 400, answer.text
    assert answer.json()["error"]["type"] == "invalid_request_error"
    assert shared_cloud.rows() == before


def test_malformed_and_huge_chat_bodies(shared_cloud: CloudServer, anon: httpx.Client) -> None:
    """Malformed JSON gets 400 and a 1 MB body 413, both in OpenAI's shape."""
    _, token = shared_cloud.create_town()
    headers = {"authorization": f"Bearer {token}"}
    answer = anon.post(CHAT, content=b"{nope", headers=headers)
    _openai_error(answer, 400, "invalid_request_error", "malformed_json")
    huge = {"model": "m", "messages": [{"role": "user", "content": "x" * 1_000_000}]}
    _openai_error(_chat(anon, token, huge), 413, "invalid_request_error", "body_too_large")


@pytest.mark.parametrize(
    "content",
    [
        b'{"model": "m", "messages": [{"role": "user", "content": "hi", "name": "\\ud800"}]}',
        b'{"model": "m", "messages": [{"role": "user", "content": "hi", "x": '
        + b"[" * 300
        + b"]" * 300
        + b"}]}",
    ],
    ids=["lone_surrogate", "300_deep"],
)
def test_chat_bodies_no_answer_could_carry_are_400(
    shared_cloud: CloudServer, anon: httpx.Client, content: bytes
) -> None:
    """A valid token with a body pydantic cannot serialise back: 400 in OpenAI's shape, no
    usage (before: a 500 after authentication)."""
    _, token = shared_cloud.create_town()
    before = shared_cloud.rows()
    answer = anon.post(CHAT, content=content, headers={"authorization": f"Bearer {token}"})
    _openai_error(answer, 400, "invalid_request_error", "malformed_json")
    assert shared_cloud.rows() == before


def test_usage_route_errors(api: httpx.Client) -> None:
    """The usage list needs townId (400) of a known town (404)."""
    assert api.get("/api/gastown/usage").status_code == 400
    assert api.get("/api/gastown/usage", params={"townId": ""}).status_code == 400
    assert api.get("/api/gastown/usage", params={"townId": "ghost"}).status_code == 404


def test_usage_of_new_town_is_empty(shared_cloud: CloudServer) -> None:
    """A town that never used the gateway lists no usage."""
    town, _ = shared_cloud.create_town()
    assert shared_cloud.usage(town["id"]) == []
