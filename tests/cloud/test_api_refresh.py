"""Token refresh on the real server: answers, Bearer binding, town states and bad input.

Every refresh here carries the town's token as Bearer (the binding is on by default), except
where the test is about its absence.
"""

from __future__ import annotations

import json
import re
import subprocess
import time
from collections.abc import Callable
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


def _refresh(
    api: httpx.Client, town_id: Any, bearer: str | None = None, **kwargs: Any
) -> httpx.Response:
    if bearer is not None:
        kwargs["headers"] = {"authorization": f"Bearer {bearer}", **kwargs.get("headers", {})}
    return api.post(PLAIN, json={"townId": town_id}, **kwargs)


def _seed_cron(cloud: CloudServer, town_id: str) -> subprocess.CompletedProcess[str]:
    """The seed's cron line: `curl -s -X POST … -d '{"townId": …}'` with the key only."""
    command = [
        "curl", "-s", "-X", "POST", f"{cloud.url}{PLAIN}",
        "-H", f"x-internal-api-key: {cloud.internal_key}",
        "-d", f'{{"townId": "{town_id}"}}',
    ]  # fmt: skip
    return subprocess.run(command, capture_output=True, text=True, timeout=30, check=True)


def _error(answer: httpx.Response, status: int, code: str) -> None:
    assert answer.status_code == status, answer.text
    body = answer.json()
    assert body["error"] == code
    assert body["message"]


def test_refresh_answers_bare_jwt(shared_cloud: CloudServer, api: httpx.Client) -> None:
    """By default the answer is the JWT as text/plain, for the town's owner and organisation."""
    town, token = shared_cloud.create_town(user_id="u-plain", organization_id="org-9")
    answer = _refresh(api, town["id"], token)
    assert answer.status_code == 200
    assert answer.headers["content-type"].startswith("text/plain")
    assert answer.headers["cache-control"] == "no-store"
    assert JWT.match(answer.text)
    claims = verify_gastown_token(answer.text, secret=shared_cloud.secret)
    assert (claims.sub, claims.town_id, claims.organization_id) == ("u-plain", town["id"], "org-9")
    assert claims.exp - claims.iat == 86400
    assert abs(claims.iat - time.time()) < 60


def test_seed_cron_command_gets_bare_token_when_unbound_is_allowed(
    cloud_factory: Callable[..., CloudServer],
) -> None:
    """With --allow-unbound-refresh the seed's key-only cron line (form content type, real
    curl) gets the bare JWT, and the server warned at start that the binding is off."""
    cloud = cloud_factory(flags=["--allow-unbound-refresh"])
    town, _ = cloud.create_town()
    done = _seed_cron(cloud, town["id"])
    assert JWT.match(done.stdout)
    assert verify_gastown_token(done.stdout, secret=cloud.secret).town_id == town["id"]
    assert cloud.stop() == 0
    warnings = [line for line in cloud.log_text().splitlines() if "refresh_binding_off" in line]
    assert len(warnings) == 1
    assert '"level": "warning"' in warnings[0]


def test_seed_cron_command_is_refused_by_default(shared_cloud: CloudServer) -> None:
    """By default the key alone refreshes no town: the seed's cron line gets a 401 JSON error."""
    town, _ = shared_cloud.create_town()
    before = shared_cloud.rows()
    done = _seed_cron(shared_cloud, town["id"])
    assert json.loads(done.stdout)["error"] == "token_required"
    assert shared_cloud.rows() == before
    assert "refresh_binding_off" not in shared_cloud.log_text()


@pytest.mark.parametrize("route", [PLAIN, TRPC])
def test_key_alone_is_401_on_both_routes(
    shared_cloud: CloudServer, api: httpx.Client, route: str
) -> None:
    """Without a Bearer token both refresh routes answer 401 `token_required` and mint nothing."""
    town, _ = shared_cloud.create_town()
    answer = api.post(route, json={"townId": town["id"]})
    _error(answer, 401, "token_required")
    assert "Bearer" in answer.json()["message"]


def test_unbound_mode_still_checks_a_bearer_that_is_sent(
    cloud_factory: Callable[..., CloudServer],
) -> None:
    """--allow-unbound-refresh lets the key alone through, never a foreign or forged Bearer."""
    cloud = cloud_factory(flags=["--allow-unbound-refresh"])
    town, token = cloud.create_town(user_id="owner-u")
    with httpx.Client(base_url=cloud.url, headers=cloud.headers, timeout=10) as api:
        assert _refresh(api, town["id"]).status_code == 200
        assert _refresh(api, town["id"], token).status_code == 200
        for name, bearer in _forged(cloud, town).items():
            answer = _refresh(api, town["id"], bearer)
            assert answer.status_code == 403, name
            assert answer.json()["error"] == "token_binding"


def test_accept_json_gets_token_and_expiry(shared_cloud: CloudServer, api: httpx.Client) -> None:
    """`Accept: application/json` gets `{"token", "expiresAt"}` with expiresAt in RFC 3339."""
    town, token = shared_cloud.create_town()
    answer = _refresh(api, town["id"], token, headers={"accept": "application/json"})
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
    town, token = shared_cloud.create_town()
    body = {"json": {"townId": town["id"]}} if wrapped else {"townId": town["id"]}
    answer = api.post(route, json=body, headers={"authorization": f"Bearer {token}"})
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
def test_non_bearer_authorization_is_401(
    shared_cloud: CloudServer, api: httpx.Client, value: str
) -> None:
    """An Authorization header that holds no Bearer token is no Bearer: 401 `token_required`."""
    town, _ = shared_cloud.create_town()
    _error(_refresh(api, town["id"], headers={"authorization": value}), 401, "token_required")


def test_town_states(shared_cloud: CloudServer, api: httpx.Client) -> None:
    """Stopped towns get 409, started again 200, destroyed 410, unknown 404."""
    town, token = shared_cloud.create_town()
    bearer = {"authorization": f"Bearer {token}"}
    shared_cloud.set_status(town["id"], "stop")
    _error(_refresh(api, town["id"], token), 409, "town_stopped")
    trpc_body = {"json": {"townId": town["id"]}}
    _error(api.post(TRPC, json=trpc_body, headers=bearer), 409, "town_stopped")
    shared_cloud.set_status(town["id"], "start")
    assert _refresh(api, town["id"], token).status_code == 200
    shared_cloud.set_status(town["id"], "destroy")
    _error(_refresh(api, town["id"], token), 410, "town_destroyed")
    # A Bearer of another town is refused before the town is looked up (nothing is told of
    # it); one signed for the unknown id gets 404.
    _error(_refresh(api, "no-such-town", token), 403, "token_binding")
    ghost = {"authorization": f"Bearer {shared_cloud.mint('user-1', 'no-such-town')}"}
    _error(_refresh(api, "no-such-town", headers=ghost), 404, "town_not_found")
    _error(_refresh(api, "no-such-town"), 401, "token_required")


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
