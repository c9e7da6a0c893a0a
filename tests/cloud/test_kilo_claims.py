"""Gateway-compatible claims: `--token-claims kilo`, Kilo's payload rule, and Node's jsonwebtoken.

Kilo's gateway takes a token only when its payload has `kiloUserId` (a non-empty string) and
`version === 3`. Node's `jsonwebtoken` (installed pinned into .cache/npm by the Makefile)
verifies the tokens a real `serve --token-claims kilo` mints, and applies that rule, in `node`.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import jwt
import pytest

from gastown_cloud.tokens import TokenClaims, kilo_rule_met, mint_gastown_token
from tests.fixtures.cloud import CloudServer, launch_cloud

ROOT = Path(__file__).resolve().parents[2]
NODE_MODULES = ROOT / ".cache" / "npm" / "node_modules"
SECRET = "k" * 40
NOW = 1_700_000_000
SEED_CLAIMS = {"sub", "type", "town_id", "organization_id", "iat", "exp"}
CHAT = "/api/gateway/chat/completions"
REQUEST = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}

# Verifies HS256 with the secret, then applies Kilo's payload rule; one JSON line out.
NODE_CHECK = r"""
const jwt = require("jsonwebtoken");
const token = require("fs").readFileSync(0, "utf8").trim();
let payload;
try {
  payload = jwt.verify(token, process.env.CHECK_SECRET, { algorithms: ["HS256"] });
} catch (error) {
  console.log(JSON.stringify({ verified: false, kilo: false, error: error.name }));
  process.exit(0);
}
const kilo = typeof payload.kiloUserId === "string" && payload.kiloUserId.length > 0
  && payload.version === 3;
console.log(JSON.stringify({ verified: true, kilo, sub: payload.sub }));
"""


def _payload(token: str) -> dict[str, Any]:
    decoded: dict[str, Any] = jwt.decode(token, options={"verify_signature": False})
    return decoded


def test_seed_mints_exactly_the_six_claims() -> None:
    """The default mints the seed's six claims and nothing else."""
    token = mint_gastown_token("u", "t", "o", secret=SECRET, now=NOW)
    assert set(_payload(token)) == SEED_CLAIMS


def test_kilo_adds_kilo_user_id_and_version() -> None:
    """`TokenClaims.KILO` adds exactly `kiloUserId` (= sub) and `version: 3`."""
    token = mint_gastown_token("u-7", "t", None, secret=SECRET, now=NOW, claims=TokenClaims.KILO)
    payload = _payload(token)
    assert set(payload) == SEED_CLAIMS | {"kiloUserId", "version"}
    assert payload["kiloUserId"] == payload["sub"] == "u-7"
    assert payload["version"] == 3


@pytest.mark.parametrize(
    ("extra", "met"),
    [
        ({"kiloUserId": "u", "version": 3}, True),
        ({"kiloUserId": "u", "version": 3.0}, True),  # JSON 3.0 is the number 3 in JavaScript
        ({"kiloUserId": "u"}, False),
        ({"version": 3}, False),
        ({"kiloUserId": "", "version": 3}, False),
        ({"kiloUserId": 7, "version": 3}, False),
        ({"kiloUserId": "u", "version": "3"}, False),
        ({"kiloUserId": "u", "version": 2}, False),
        ({"kiloUserId": "u", "version": True}, False),
        ({"kiloUserId": None, "version": None}, False),
    ],
)
def test_kilo_rule(extra: dict[str, Any], met: bool) -> None:
    """Kilo's rule: `kiloUserId` a non-empty string and `version === 3`, nothing looser."""
    assert kilo_rule_met({"sub": "u", **extra}) is met


@pytest.fixture(scope="module")
def kilo_cloud(tmp_path_factory: pytest.TempPathFactory) -> Iterator[CloudServer]:
    """A real `serve --token-claims kilo`."""
    server = launch_cloud(tmp_path_factory.mktemp("kilo-cloud"), flags=["--token-claims", "kilo"])
    yield server
    server.stop()


def _refresh(cloud: CloudServer, town_id: str, token: str) -> str:
    answer = httpx.post(
        f"{cloud.url}/api/gastown/refresh-token",
        json={"townId": town_id},
        headers={**cloud.headers, "authorization": f"Bearer {token}"},
        timeout=10,
    )
    assert answer.status_code == 200, answer.text
    return answer.text


def _chat(cloud: CloudServer, token: str) -> httpx.Response:
    headers = {"authorization": f"Bearer {token}"}
    return httpx.post(f"{cloud.url}{CHAT}", json=REQUEST, headers=headers, timeout=10)


def test_kilo_server_mints_kilo_claims_on_create_and_refresh(kilo_cloud: CloudServer) -> None:
    """createTown's token and a refreshed one both carry kiloUserId = sub and version 3."""
    town, token = kilo_cloud.create_town(user_id="kilo-user", organization_id="org-k")
    refreshed = _refresh(kilo_cloud, town["id"], token)
    for minted in (token, refreshed):
        payload = jwt.decode(minted, kilo_cloud.secret, algorithms=["HS256"])
        assert set(payload) == SEED_CLAIMS | {"kiloUserId", "version"}
        assert (payload["kiloUserId"], payload["version"]) == ("kilo-user", 3)
        assert kilo_rule_met(payload)


def test_kilo_gateway_applies_the_rule(kilo_cloud: CloudServer) -> None:
    """In kilo mode the gateway takes kilo tokens and refuses a well-signed seed token (401)."""
    town, token = kilo_cloud.create_town(user_id="payer-k")
    assert _chat(kilo_cloud, token).status_code == 200
    seed = kilo_cloud.mint("payer-k", town["id"])  # the server's secret, the seed's claims
    answer = _chat(kilo_cloud, seed)
    assert answer.status_code == 401
    error = answer.json()["error"]
    assert (error["type"], error["code"]) == ("authentication_error", "invalid_token")
    assert "kiloUserId" in error["message"]
    assert "param" in error
    assert seed not in answer.text
    assert [u["userId"] for u in kilo_cloud.usage(town["id"])] == ["payer-k"]


def test_seed_server_mints_six_claims_and_takes_them(
    cloud_factory: Callable[..., CloudServer],
) -> None:
    """The default server (`seed`) mints the six claims, and its gateway takes them."""
    cloud = cloud_factory()
    town, token = cloud.create_town()
    refreshed = _refresh(cloud, town["id"], token)
    for minted in (token, refreshed):
        assert set(jwt.decode(minted, cloud.secret, algorithms=["HS256"])) == SEED_CLAIMS
    assert _chat(cloud, refreshed).status_code == 200


def _node_check(token: str, secret: str) -> dict[str, Any]:
    node = shutil.which("node")
    assert node is not None, "node is missing: `make pytest` installs nodejs and npm"
    assert (NODE_MODULES / "jsonwebtoken").is_dir(), (
        "jsonwebtoken is missing from .cache/npm: `make pytest` installs it"
    )
    env = {**os.environ, "NODE_PATH": str(NODE_MODULES), "CHECK_SECRET": secret}
    done = subprocess.run(
        [node, "-e", NODE_CHECK], input=token, env=env, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    result: dict[str, Any] = json.loads(done.stdout)
    return result


def test_node_jsonwebtoken_accepts_kilo_tokens_and_the_rule_refuses_seed_ones(
    kilo_cloud: CloudServer, cloud_factory: Callable[..., CloudServer]
) -> None:
    """Node's jsonwebtoken verifies the kilo server's tokens (created and refreshed) and Kilo's
    rule accepts them; a seed server's token verifies but fails the rule; another secret fails."""
    town, token = kilo_cloud.create_town(user_id="node-user")
    refreshed = _refresh(kilo_cloud, town["id"], token)
    for minted in (token, refreshed):
        assert _node_check(minted, kilo_cloud.secret) == {
            "verified": True,
            "kilo": True,
            "sub": "node-user",
        }
    seed_cloud = cloud_factory()
    _, seed_token = seed_cloud.create_town(user_id="seed-user")
    assert _node_check(seed_token, seed_cloud.secret) == {
        "verified": True,
        "kilo": False,
        "sub": "seed-user",
    }
    forged = _node_check(token, "another-secret-of-at-least-32-bytes!!")
    assert forged == {"verified": False, "kilo": False, "error": "JsonWebTokenError"}
