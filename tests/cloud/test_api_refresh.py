"""Token refresh on the real server: answers, Bearer binding, town states and bad input."""

from __future__ import annotations

import re
import subprocess
import time
from typing import Any

import httpx
import jwt
import pytest

from gastown_cloud._time import rfc3339
from gastown_cloud.api_refresh import wants_json
from gastown_cloud.tokens import mint_gastown_token, verify_gastown_token
from tests.fixtures.cloud import CloudServer

JWT = re.compile(r"^[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+$")
PLAIN = "/api/gastown/refresh-token"
TRPC = "/api/trpc/gastown.refreshToken"


def _refresh(api: httpx.Client, town_id: Any, **kwargs: Any) -> httpx.Response:
    return api.post(PLAIN, json={"townId": town_id}, **kwargs)


def _error(answer: httpx.Response, status: int, code: str) -> None:
    assert answer.status_code == status, answer.text
    body = answer.json()
    assert body["error"] == code
    assert body["message"]


def test_refresh_answers_bare_jwt(shared_cloud: CloudServer, api: httpx.Client) -> None:
    """By default the answer is the JWT as text/plain, for the town's owner and organisation."""
    town, _ = shared_cloud.create_town(user_id="u-plain", organization_id="org-9")
    answer = _refresh(api, town["id"])
    assert answer.status_code == 200
    assert answer.headers["content-type"].startswith("text/plain")
    assert answer.headers["cache-control"] == "no-store"
    assert JWT.match(answer.text)
    claims = verify_gastown_token(answer.text, secret=shared_cloud.secret)
    assert (claims.sub, claims.town_id, claims.organization_id) == ("u-plain", town["id"], "org-9")
    assert claims.exp - claims.iat == 86400
    assert abs(claims.iat - time.time()) < 60


def test_seed_cron_command_gets_bare_token(shared_cloud: CloudServer) -> None:
    """The seed's cron `curl -s -X POST … -d '{"townId": …}'` (form content type) gets the JWT."""
    town, _ = shared_cloud.create_town()
    command = [
        "curl", "-s", "-X", "POST", f"{shared_cloud.url}{PLAIN}",
        "-H", f"x-internal-api-key: {shared_cloud.internal_key}",
        "-d", f'{{"townId": "{town["id"]}"}}',
    ]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, timeout=30, check=True)
    assert JWT.match(done.stdout)
    assert verify_gastown_token(done.stdout, secret=shared_cloud.secret).town_id == town["id"]


def test_accept_json_gets_token_and_expiry(shared_cloud: CloudServer, api: httpx.Client) -> None:
    """`Accept: application/json` gets `{"token", "expiresAt"}` with expiresAt in RFC 3339."""
    town, _ = shared_cloud.create_town()
    answer = _refresh(api, town["id"], headers={"accept": "application/json"})
    assert answer.status_code == 200
    body = answer.json()
    assert set(body) == {"token", "expiresAt"}
    claims = verify_gastown_token(body["token"], secret=shared_cloud.secret)
    assert body["expiresAt"] == rfc3339(claims.exp)


@pytest.mark.parametrize("route", [PLAIN, TRPC])
@pytest.mark.parametrize("wrapped", [False, True])
def test_trpc_envelope_and_wrapped_input(
    shared_cloud: CloudServer, api: httpx.Client, route: str, wrapped: bool
) -> None:
    """Both routes take `{"townId"}` or `{"json": {"townId"}}`; tRPC answers `result.data`."""
    town, _ = shared_cloud.create_town()
    body = {"json": {"townId": town["id"]}} if wrapped else {"townId": town["id"]}
    answer = api.post(route, json=body)
    assert answer.status_code == 200, answer.text
    token = answer.json()["result"]["data"] if route == TRPC else answer.text
    assert verify_gastown_token(token, secret=shared_cloud.secret).town_id == town["id"]


def test_bearer_of_the_town_is_accepted(shared_cloud: CloudServer, api: httpx.Client) -> None:
    """The town's own token, fresh or long expired, binds the refresh to the town."""
    town, token = shared_cloud.create_town(user_id="owner")
    expired = shared_cloud.mint("owner", town["id"], lifetime=60, now=int(time.time()) - 7200)
    for bearer in (token, expired):
        answer = _refresh(api, town["id"], headers={"authorization": f"Bearer {bearer}"})
        assert answer.status_code == 200, answer.text
        assert verify_gastown_token(answer.text, secret=shared_cloud.secret).sub == "owner"


def _forged(shared_cloud: CloudServer, town: dict[str, Any]) -> dict[str, str]:
    _, other_token = shared_cloud.create_town(user_id=town["userId"])
    claims = jwt.decode(other_token, options={"verify_signature": False})
    claims["town_id"] = town["id"]
    return {
        "another town's token": other_token,
        "another user's token": shared_cloud.mint("intruder", town["id"]),
        "another secret": mint_gastown_token(
            town["userId"], town["id"], secret="z" * 48, lifetime=3600
        ),
        "alg none": jwt.encode(claims, None, algorithm="none"),
        "garbage": "not-a-jwt",
    }


def test_foreign_bearer_is_403(shared_cloud: CloudServer, api: httpx.Client) -> None:
    """A Bearer of another town, user or secret, unsigned or garbage, is refused with 403."""
    town, _ = shared_cloud.create_town(user_id="owner-2")
    for name, bearer in _forged(shared_cloud, town).items():
        before = shared_cloud.rows()
        answer = _refresh(api, town["id"], headers={"authorization": f"Bearer {bearer}"})
        assert answer.status_code == 403, name
        assert answer.json()["error"] == "token_binding"
        assert bearer not in answer.text
        assert shared_cloud.rows() == before


@pytest.mark.parametrize("value", ["Basic dXNlcjpwYXNz", "Bearer", "Negotiate abc", "token"])
def test_non_bearer_authorization_is_403(
    shared_cloud: CloudServer, api: httpx.Client, value: str
) -> None:
    """An Authorization header that is not a Bearer token cannot bind anything: 403."""
    town, _ = shared_cloud.create_town()
    _error(_refresh(api, town["id"], headers={"authorization": value}), 403, "token_binding")


def test_town_states(shared_cloud: CloudServer, api: httpx.Client) -> None:
    """Stopped towns get 409, started again 200, destroyed 410, unknown 404."""
    town, token = shared_cloud.create_town()
    shared_cloud.set_status(town["id"], "stop")
    _error(_refresh(api, town["id"]), 409, "town_stopped")
    _error(api.post(TRPC, json={"json": {"townId": town["id"]}}), 409, "town_stopped")
    shared_cloud.set_status(town["id"], "start")
    assert _refresh(api, town["id"]).status_code == 200
    shared_cloud.set_status(town["id"], "destroy")
    _error(_refresh(api, town["id"]), 410, "town_destroyed")
    bearer = {"authorization": f"Bearer {token}"}
    _error(_refresh(api, town["id"], headers=bearer), 410, "town_destroyed")
    _error(_refresh(api, "no-such-town"), 404, "town_not_found")


def test_foreign_bearer_on_stopped_town_is_403(
    shared_cloud: CloudServer, api: httpx.Client
) -> None:
    """The binding is checked before the status, so a foreign token learns nothing of it."""
    town, _ = shared_cloud.create_town()
    shared_cloud.set_status(town["id"], "stop")
    intruder = {"authorization": f"Bearer {shared_cloud.mint('intruder', town['id'])}"}
    _error(_refresh(api, town["id"], headers=intruder), 403, "token_binding")


@pytest.mark.parametrize("route", [PLAIN, TRPC])
@pytest.mark.parametrize(
    ("content", "code"),
    [
        (b"{bad json", "malformed_json"),
        (b"", "malformed_json"),
        (b"[]", "malformed_json"),
        (b"{}", "invalid_request"),
        (b'{"townid": "t"}', "invalid_request"),
        (b'{"townId": 5}', "invalid_request"),
        (b'{"townId": ""}', "invalid_request"),
        (b'{"townId": null}', "invalid_request"),
        (b'{"json": {"townId": 5}}', "invalid_request"),
        (b'{"json": "t"}', "invalid_request"),
    ],
)
def test_bad_refresh_input_is_400(
    shared_cloud: CloudServer, api: httpx.Client, route: str, content: bytes, code: str
) -> None:
    """Malformed JSON, a missing, empty or mistyped townId get 400; nothing changes."""
    before = shared_cloud.rows()
    _error(api.post(route, content=content), 400, code)
    assert shared_cloud.rows() == before


def test_megabyte_refresh_body_is_413(shared_cloud: CloudServer, api: httpx.Client) -> None:
    """A 1 MB refresh body gets 413."""
    before = shared_cloud.rows()
    _error(_refresh(api, "t" * 1_000_000), 413, "body_too_large")
    assert shared_cloud.rows() == before


@pytest.mark.parametrize(
    ("accept", "expected"),
    [
        ("", False),
        ("*/*", False),
        ("text/plain", False),
        ("application/json", True),
        ("Application/JSON; charset=utf-8", True),
        ("application/json, text/plain, */*", True),
        ("text/plain, application/json;q=0.5", False),
        ("application/json;q=0", False),
        ("application/json;q=bad", False),
        ("text/*;q=0.2, application/json;q=0.9", True),
    ],
)
def test_wants_json(accept: str, expected: bool) -> None:
    """JSON is answered only when Accept names application/json at least as high as text."""
    assert wants_json(accept) is expected
