"""A cloud served over HTTPS (`gastown-cloud serve --tls-cert --tls-key`), real daemons,
real OpenSSL on both sides: the daemon trusts the CAs it is told to, and only those."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

from gastown_sandboxd.token.claims import decode_unverified, fingerprint
from tests.e2e._town import create_town, source_token, start_daemon, wait_for_status, write_env
from tests.fixtures.cloud import CloudServer
from tests.fixtures.daemon import DaemonFactory
from tests.fixtures.net import make_local_ca
from tests.waiting import wait_until


def test_a_daemon_syncs_and_refreshes_with_an_https_cloud_whose_ca_it_trusts(
    cloud_factory: Callable[..., CloudServer], daemon_factory: DaemonFactory, tmp_path: Path
) -> None:
    ca = make_local_ca(tmp_path / "ca")
    cloud = cloud_factory(tls=ca)
    assert cloud.url.startswith("https://127.0.0.1:")
    town = create_town(cloud)
    env_file = write_env(tmp_path / "home" / ".env.gateway", town.token)
    daemon = start_daemon(daemon_factory, town, env_file, extra_env=ca.trusting_env())
    # The sync at start read the desired configuration over TLS.
    wait_for_status(daemon, lambda status: status["config_sync"]["state"] == "applied")
    # The cloud mints by the second: a new second, a new token.
    iat = decode_unverified(town.token).iat
    wait_until(lambda: time.time() >= iat + 1, deadline=5, what="the next second")
    with daemon.local() as local:
        answer = local.post("/token/refresh")
    assert answer.status_code == 200, answer.text
    new = answer.json()["token"]["fingerprint"]
    assert new != fingerprint(town.token)
    assert fingerprint(source_token(env_file)) == new


def test_a_daemon_refuses_an_https_cloud_whose_ca_it_does_not_trust(
    cloud_factory: Callable[..., CloudServer], daemon_factory: DaemonFactory, tmp_path: Path
) -> None:
    """Another CA's folder: no exchange at all, the reason names TLS, the token is kept."""
    cloud = cloud_factory(tls=make_local_ca(tmp_path / "ca"))
    other = make_local_ca(tmp_path / "other", name="another CA")
    town = create_town(cloud)
    env_file = write_env(tmp_path / "home" / ".env.gateway", town.token)
    daemon = start_daemon(daemon_factory, town, env_file, extra_env=other.trusting_env())
    wait_for_status(daemon, lambda status: status["config_sync"]["state"] == "unreachable")
    held = env_file.read_bytes()
    with daemon.local() as local:
        answer = local.post("/token/refresh")
        status = local.get("/status").json()
    assert answer.status_code == 502, answer.text
    assert answer.json()["details"][0]["reason"] == "tls_error"
    assert (status["last_error"]["reason"], status["last_error"]["detail"]) == (
        "outage",
        "tls_error",
    )
    assert env_file.read_bytes() == held
