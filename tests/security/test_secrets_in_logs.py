"""No secret reaches a log, an answer or a repr, in a real scenario with hostile answers.

Two daemons run: one against the real cloud (refresh at start, forced refreshes, pushes,
refused pushes, PATCHes carrying secrets, wrong keys), one against a hostile cloud whose
answers carry tokens of every kind (another town's, expired, alg none, too long, with a shell
payload, echoed in error bodies). Every token minted or sent anywhere, each signature
segment, the internal keys and the NEXTAUTH secret are then searched for in both daemons'
logs, the cloud's log, what pytest captured, every answer body, and the settings' repr.
"""

from __future__ import annotations

import http.server
import itertools
import json
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest

from gastown_sandboxd.options import load_options
from gastown_sandboxd.token.envfile import read_token
from tests.daemon.minting import forge, mint
from tests.fixtures.cloud import CloudServer
from tests.fixtures.daemon import DAEMON_KEY, DaemonFactory

from . import TOWN

WRONG_KEYS = [DAEMON_KEY[:-1] + "x", "not-the-key-but-long-enough-0123", DAEMON_KEY.upper()]
LITERAL_SECRET = "sk-ant-api03-literal-secret-value-0123456789"


@dataclass
class Secrets:
    """Every secret of the scenario; `add` files a token and its signature segment."""

    values: set[str] = field(default_factory=set)

    def add(self, *secrets: str | None) -> None:
        for secret in secrets:
            if not secret:
                continue
            self.values.add(secret)
            parts = secret.split(".")
            if len(parts) == 3 and len(parts[2]) >= 16:
                self.values.add(parts[2])

    def found_in(self, text: str) -> list[str]:
        return sorted(secret[:12] + "…" for secret in self.values if secret in text)


class HostileCloud(http.server.ThreadingHTTPServer):
    """A cloud whose refresh answers carry tokens that must never be written or logged."""

    def __init__(self, answers: list[tuple[int, str, dict[str, str]]]) -> None:
        self.answers = itertools.cycle(answers)
        self.bearers: list[str] = []
        self.lock = threading.Lock()
        super().__init__(("127.0.0.1", 0), _HostileHandler)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"


class _HostileHandler(http.server.BaseHTTPRequestHandler):
    server: HostileCloud

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers.get("content-length", "0")))
        bearer = self.headers.get("authorization", "")
        with self.server.lock:
            self.server.bearers.append(bearer)
            status, body, headers = next(self.server.answers)
        data = body.replace("{bearer}", bearer).encode()
        self.send_response(status)
        for name, value in {"content-type": "text/plain", **headers}.items():
            self.send_header(name, value)
        self.send_header("content-length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, format: str, *args: object) -> None:
        pass  # quiet: the test searches what is printed


@pytest.fixture
def secrets() -> Secrets:
    return Secrets()


@pytest.fixture
def hostile(secrets: Secrets) -> Iterator[HostileCloud]:
    now = time.time()
    other_town = mint(now, town_id="another-town", sub="hostile-1")
    expired = mint(now - 3 * 86400, town_id=TOWN, sub="hostile-2")
    alg_none = forge({"alg": "none"}, {"sub": "hostile-3", "town_id": TOWN}, "bm9uZXNpZ25hdHVyZQ")
    too_long = mint(now, town_id=TOWN, sub="h" * 9000)
    shell = mint(now, town_id=TOWN, sub="hostile-4") + "\n$(touch /tmp/pwned)"
    in_error = mint(now, town_id=TOWN, sub="hostile-5")
    secrets.add(other_town, expired, alg_none, too_long, shell, in_error)
    answers = [
        (200, other_town, {}),
        (200, json.dumps({"token": expired}), {"content-type": "application/json"}),
        (200, json.dumps({"result": {"data": {"json": alg_none}}}), {"content-type": "x/y"}),
        (200, too_long, {}),
        (200, shell, {}),
        (500, f"upstream said {{bearer}} and {in_error}", {}),
        (401, json.dumps({"error": "denied", "token": in_error}), {}),
        (429, f"slow down {in_error}", {"retry-after": "1"}),
        (200, f"{{bearer}}.{in_error}", {}),
    ]
    server = HostileCloud(answers)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()
    thread.join(5)


def test_no_secret_reaches_logs_answers_or_reprs(
    daemon_factory: DaemonFactory,
    cloud_factory: Callable[..., CloudServer],
    hostile: HostileCloud,
    secrets: Secrets,
    tmp_path: Path,
    capfd: pytest.CaptureFixture[str],
) -> None:
    """After a scenario of refreshes, pushes, refusals and hostile answers, none of the
    scenario's secrets appears in any log, answer body, captured output or repr."""
    # A first token from the cloud with no env file needs key-only refresh allowed.
    cloud = cloud_factory(flags=["--allow-unbound-refresh"])
    secrets.add(cloud.secret, cloud.internal_key, DAEMON_KEY, LITERAL_SECRET, *WRONG_KEYS)
    bodies: list[str] = []

    # 1. The real cloud: refresh at start (no env file), forced refreshes, pushes, PATCHes.
    town, initial = cloud.create_town(user_id="user-secrets", name="secrets")
    secrets.add(initial)
    real = daemon_factory(
        town_id=town["id"],
        cloud_url=cloud.url,
        extra_env={"INTERNAL_API_KEY": cloud.internal_key},
        name="real",
    )
    real.wait_for_log("token_refreshed")
    secrets.add(read_token(real.env_file))
    pushed = cloud.mint("user-secrets", town["id"], now=int(time.time()) - 60)
    refused = [
        cloud.mint("user-secrets", "another-town"),
        cloud.mint("user-secrets", town["id"], lifetime=5),
        mint(time.time(), town_id=town["id"], sub="user-secrets") + "!",
    ]
    secrets.add(pushed, *refused)
    agent = {"provider": "claude", "command": "claude"}
    secret_patches = [
        {"town": {"agents": {"a": {**agent, "env": {"ANTHROPIC_API_KEY": LITERAL_SECRET}}}}},
        {"town": {"agents": {"a": {**agent, "env": {"SOME_VAR": pushed}}}}},
        {"town": {"agents": {"a": {**agent, "env": {"KILO_JWT": initial}}}}},
    ]
    with real.tcp() as client:
        bodies.append(client.post("/token/refresh").text)
        secrets.add(read_token(real.env_file))
        answer = client.put("/token", json={"token": pushed})
        assert answer.status_code == 200
        bodies.append(answer.text)
        for token in refused:
            answer = client.put("/token", json={"token": token})
            assert answer.status_code == 422
            bodies.append(answer.text)
        for body in secret_patches:
            answer = client.patch("/config", json=body)
            assert answer.status_code == 422, answer.text
            bodies.append(answer.text)
        for endpoint in ("/status", "/config", "/metrics", "/readyz"):
            bodies.append(client.get(endpoint).text)
    for wrong in WRONG_KEYS:
        with httpx.Client(base_url=real.url, headers={"x-internal-api-key": wrong}) as client:
            answer = client.get("/status")
            assert answer.status_code == 401
            bodies.append(answer.text)
    with httpx.Client(base_url=real.url, headers={"authorization": f"Bearer {pushed}"}) as client:
        bodies.append(client.get("/status").text)
    with real.local() as local:
        bodies.append(local.get("/status").text)

    # 2. The hostile cloud: every answer refused, whatever it carries.
    hostile_token = mint(time.time() - 120, town_id=TOWN, sub="user-hostile")
    secrets.add(hostile_token)
    env_file = tmp_path / "hostile-home" / ".env.gateway"
    env_file.parent.mkdir()
    env_file.write_text(f"KILO_JWT={hostile_token}\n")
    victim = daemon_factory(town_id=TOWN, cloud_url=hostile.url, env_file=env_file, name="victim")
    with victim.tcp() as client:
        for _ in range(9):
            answer = client.post("/token/refresh")
            assert answer.status_code in (409, 502), answer.text
            bodies.append(answer.text)
        bodies.append(client.get("/status").text)
    assert env_file.read_text() == f"KILO_JWT={hostile_token}\n"
    assert f"Bearer {hostile_token}" in hostile.bearers

    # 3. Search everything.
    settings = load_options(
        env={
            "TOWN_ID": TOWN,
            "CLOUD_API_URL": cloud.url,
            "INTERNAL_API_KEY": DAEMON_KEY,
            "GT_TOWN_ROOT": str(tmp_path),
        }
    )
    captured = capfd.readouterr()
    places = {
        "real daemon log": real.log_text(),
        "hostile daemon log": victim.log_text(),
        "cloud log": cloud.log_text(),
        "captured output": captured.out + captured.err,
        "answer bodies": "\n".join(bodies),
        "settings repr": repr(settings) + str(settings),
    }
    # The search finds what it looks for: the env file holds the current token.
    assert secrets.found_in(real.env_file.read_text())
    for place, text in places.items():
        assert not secrets.found_in(text), f"secrets in the {place}: {secrets.found_in(text)}"
    # The search had something to search: the logs tell the whole story.
    events = {record.get("event") for record in real.logs() + victim.logs()}
    assert {"token_refreshed", "pushed_token_refused"} <= events
    assert any("refresh" in str(event) and "fail" in str(event) for event in events)
    print(f"{len(secrets.values)} secrets searched in {sum(map(len, places.values()))} chars")
