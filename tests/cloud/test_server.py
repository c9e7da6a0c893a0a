"""The server in-process with an injected clock: fresh tokens follow the clock; clean stop.
The real server process releases a connection as soon as its client has closed it."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import anyio
import httpx
import pytest

from gastown_cloud.server import Server
from gastown_cloud.settings import CloudSettings
from gastown_cloud.tokens import verify_gastown_token
from tests.fixtures.cloud import CloudServer
from tests.fixtures.net import make_local_ca, seconds_to_release, tls

SECRET = "c" * 40
KEY = "k" * 20


async def test_refresh_follows_the_clock_and_stop_is_clean(tmp_path: Path) -> None:
    """A refresh an hour later gives a new token issued then; `stop()` ends `run` cleanly."""
    now = [1_700_000_000.0]
    settings = CloudSettings(
        nextauth_secret=SECRET, internal_api_key=KEY, db=tmp_path / "c.db", port=0,
        token_lifetime=30,
    )  # fmt: skip
    server = Server(settings, clock=lambda: now[0])
    async with anyio.create_task_group() as tg:
        await tg.start(server.run)
        assert server.url is not None
        headers = {"x-internal-api-key": KEY}
        async with httpx.AsyncClient(base_url=server.url, headers=headers, timeout=10) as client:
            created = await client.post("/api/gastown/towns", json={"userId": "u", "name": "t"})
            first = created.json()["token"]
            now[0] += 3600
            bearer = {"authorization": f"Bearer {first}"}
            town_id = created.json()["town"]["id"]
            refreshed = await client.post(
                "/api/gastown/refresh-token", json={"townId": town_id}, headers=bearer
            )
        server.stop()
    assert refreshed.status_code == 200, refreshed.text
    assert refreshed.text != first
    old = verify_gastown_token(first, secret=SECRET, verify_exp=False)
    new = verify_gastown_token(refreshed.text, secret=SECRET, now=int(now[0]))
    assert (old.iat, old.exp) == (1_700_000_000, 1_700_000_030)
    assert (new.iat, new.exp) == (1_700_003_600, 1_700_003_630)
    assert (tmp_path / "c.db").exists()


def test_a_connection_its_sandbox_closed_is_released_at_once(cloud: CloudServer) -> None:
    """`gastown-cloud serve` closes a connection once its client has, not 5 s later (hypercorn's
    keep-alive time; `gastown_sandboxd._hypercorn`): after a fleet's outage, each of its
    thousands of refreshes a second would otherwise hold a descriptor for 5 s more."""
    host, port = cloud.url.removeprefix("http://").rsplit(":", 1)
    request = b"GET /openapi.json HTTP/1.1\r\nHost: cloud\r\nX-Internal-Api-Key: %s\r\n\r\n"
    keyed = request % cloud.internal_key.encode()
    waits = [
        seconds_to_release((host, int(port)), keyed, 2.5, before_the_answer=first)
        for _ in range(3)
        for first in (False, True)
    ]
    print("released after (ms):", [round(wait * 1000, 1) for wait in waits])


def test_serve_with_a_certificate_speaks_https_only(
    cloud_factory: Callable[..., CloudServer], tmp_path: Path
) -> None:
    """`serve --tls-cert --tls-key`: an https:// URL, verified against the certificate's CA;
    a client that trusts only public CAs is refused, and plain HTTP gets no answer."""
    ca = make_local_ca(tmp_path / "ca")
    cloud = cloud_factory(tls=ca)
    assert cloud.url.startswith("https://127.0.0.1:")
    town, token = cloud.create_town()
    assert verify_gastown_token(token, secret=cloud.secret).town_id == town["id"]
    with pytest.raises(httpx.ConnectError, match="CERTIFICATE_VERIFY_FAILED"):
        httpx.get(f"{cloud.url}/healthz", verify=tls(), timeout=10)
    with pytest.raises(httpx.TransportError):
        httpx.get(cloud.url.replace("https://", "http://") + "/healthz", timeout=10)
