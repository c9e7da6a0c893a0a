"""Town routes of the real server: create, read, stop, start, destroy, and bad input."""

from __future__ import annotations

import time
from typing import Any

import httpx
import pytest

from gastown_cloud.tokens import verify_gastown_token
from tests.fixtures.cloud import CloudServer


def _create(api: httpx.Client, **body: Any) -> httpx.Response:
    return api.post("/api/gastown/towns", json={"userId": "u1", "name": "t", **body})


def _assert_error(answer: httpx.Response, status: int, code: str) -> dict[str, Any]:
    assert answer.status_code == status, answer.text
    assert answer.headers["content-type"] == "application/json"
    body: dict[str, Any] = answer.json()
    assert body["error"] == code
    assert isinstance(body["message"], str)
    assert body["message"].endswith(".")
    return body


def test_create_town_mints_initial_token(shared_cloud: CloudServer, api: httpx.Client) -> None:
    """createTown answers 201 with the town and a 24 h token naming user, org and town."""
    answer = _create(api, organizationId="org-1", sandboxUrl="http://10.0.0.2:8080")
    assert answer.status_code == 201
    town, token = answer.json()["town"], answer.json()["token"]
    assert town == {
        "id": town["id"],
        "userId": "u1",
        "organizationId": "org-1",
        "name": "t",
        "status": "active",
        "sandboxUrl": "http://10.0.0.2:8080",
    }
    claims = verify_gastown_token(token, secret=shared_cloud.secret)
    assert (claims.sub, claims.town_id, claims.organization_id) == ("u1", town["id"], "org-1")
    assert claims.exp - claims.iat == 86400
    assert abs(claims.iat - time.time()) < 60


def test_create_town_without_organization(shared_cloud: CloudServer) -> None:
    """A town created without organisation has null in the town and in the token."""
    town, token = shared_cloud.create_town(user_id="solo")
    assert town["organizationId"] is None
    assert verify_gastown_token(token, secret=shared_cloud.secret).organization_id is None


def test_get_town(shared_cloud: CloudServer, api: httpx.Client) -> None:
    """GET answers the town as created."""
    town, _ = shared_cloud.create_town(organization_id="o")
    answer = api.get(f"/api/gastown/towns/{town['id']}")
    assert answer.status_code == 200
    assert answer.json() == {"town": town}


def test_stop_start_destroy(shared_cloud: CloudServer, api: httpx.Client) -> None:
    """Stop, start and destroy move the status; repeats are harmless; destroyed is final."""
    town, _ = shared_cloud.create_town()
    path = f"/api/gastown/towns/{town['id']}"
    for method, suffix, status in [
        ("POST", "/stop", "stopped"),
        ("POST", "/stop", "stopped"),
        ("POST", "/start", "active"),
        ("POST", "/start", "active"),
        ("DELETE", "", "destroyed"),
        ("DELETE", "", "destroyed"),
    ]:
        answer = api.request(method, path + suffix)
        assert answer.status_code == 200, answer.text
        assert answer.json()["town"]["status"] == status
    for suffix in ("/stop", "/start"):
        _assert_error(api.post(path + suffix), 410, "town_destroyed")
    assert api.get(path).json()["town"]["status"] == "destroyed"


@pytest.mark.parametrize(
    ("method", "suffix"),
    [("GET", ""), ("DELETE", ""), ("POST", "/stop"), ("POST", "/start")],
)
def test_unknown_town_is_404(api: httpx.Client, method: str, suffix: str) -> None:
    """Every town route answers 404 for an unknown id."""
    _assert_error(api.request(method, f"/api/gastown/towns/nope{suffix}"), 404, "town_not_found")


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("POST", "/api/gastown/towns"),
        ("GET", "/api/gastown/towns/x"),
        ("POST", "/api/gastown/towns/x/stop"),
        ("POST", "/api/gastown/towns/x/start"),
        ("DELETE", "/api/gastown/towns/x"),
        ("PATCH", "/api/gastown/towns/x/config"),
        ("POST", "/api/gastown/refresh-token"),
        ("POST", "/api/trpc/gastown.refreshToken"),
        ("GET", "/api/gastown/usage?townId=x"),
    ],
)
@pytest.mark.parametrize("key", [None, "", "wrong-key-0123456789"])
def test_routes_need_the_internal_key(
    shared_cloud: CloudServer, anon: httpx.Client, method: str, path: str, key: str | None
) -> None:
    """Every route but the gateway answers 401 without the right key, and changes nothing."""
    before = shared_cloud.rows()
    headers = {} if key is None else {"x-internal-api-key": key}
    answer = anon.request(method, path, headers=headers, json={"userId": "u", "name": "t"})
    body = _assert_error(answer, 401, "unauthorized")
    assert "key" in body["message"]
    assert shared_cloud.rows() == before


@pytest.mark.parametrize(
    ("content", "path"),
    [
        (b"{not json", ""),
        (b"[1, 2]", ""),
        (b'"text"', ""),
        (b"\xff\xfe", ""),
        (b'{"name": "t"}', "/userId"),
        (b'{"userId": "u"}', "/name"),
        (b'{"userId": 5, "name": "t"}', "/userId"),
        (b'{"userId": "", "name": "t"}', "/userId"),
        (b'{"userId": "u", "name": ["t"]}', "/name"),
        (b'{"userId": "u", "name": "t", "organizationId": 3}', "/organizationId"),
        (b'{"userId": "u", "name": "t", "sandboxUrl": "ftp://x"}', "/sandboxUrl"),
        (b'{"userId": "u", "name": "t", "sandboxUrl": "not a url"}', "/sandboxUrl"),
        (b'{"userId": "u", "name": "t", "sandboxUrl": 8080}', "/sandboxUrl"),
    ],
)
def test_bad_create_body_is_400(
    shared_cloud: CloudServer, api: httpx.Client, content: bytes, path: str
) -> None:
    """Malformed JSON and missing or mistyped fields get 400 naming the field; nothing stored."""
    before = shared_cloud.rows()
    answer = api.post("/api/gastown/towns", content=content)
    if path:
        body = _assert_error(answer, 400, "invalid_request")
        assert body["details"][0]["path"] == path
        assert path in body["message"]
    else:
        _assert_error(answer, 400, "malformed_json")
    assert shared_cloud.rows() == before


def test_megabyte_body_is_413(shared_cloud: CloudServer, api: httpx.Client) -> None:
    """A 1 MB body is refused with 413 and nothing is stored."""
    before = shared_cloud.rows()
    body = {"userId": "u", "name": "x" * 1_000_000}
    _assert_error(api.post("/api/gastown/towns", json=body), 413, "body_too_large")
    assert shared_cloud.rows() == before


def test_streamed_body_over_limit_is_413(shared_cloud: CloudServer, api: httpx.Client) -> None:
    """A chunked body without Content-Length is counted as it arrives and refused past 64 KiB."""
    before = shared_cloud.rows()

    def chunks() -> Any:
        yield b'{"userId": "u", "name": "'
        for _ in range(20):
            yield b"x" * 8192
        yield b'"}'

    _assert_error(api.post("/api/gastown/towns", content=chunks()), 413, "body_too_large")
    assert shared_cloud.rows() == before


def test_body_at_limit_is_accepted(api: httpx.Client) -> None:
    """A body of exactly 64 KiB is read (and here refused only for its too-long name)."""
    prefix, suffix = b'{"userId": "u", "name": "', b'"}'
    filler = b"x" * (64 * 1024 - len(prefix) - len(suffix))
    answer = api.post("/api/gastown/towns", content=prefix + filler + suffix)
    assert _assert_error(answer, 400, "invalid_request")["details"][0]["path"] == "/name"


def test_unknown_route_and_method_are_json(api: httpx.Client) -> None:
    """Unknown paths get a JSON 404 and wrong methods a JSON 405 with Allow."""
    _assert_error(api.get("/api/nothing"), 404, "not_found")
    answer = api.put("/api/gastown/towns")
    _assert_error(answer, 405, "method_not_allowed")
    assert "POST" in answer.headers["allow"]
