"""The whole path from a terminal, as the README shows it, with real processes: `serve`, then
`towns create`, its token written into the env file (provisioning), then the daemon, whose
refreshes the cloud binds to that token."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import httpx

from gastown_cloud.tokens import verify_gastown_token
from gastown_sandboxd.token.envfile import read_token
from tests.fixtures.cloud import CloudServer
from tests.fixtures.daemon import DaemonFactory


def test_create_provision_run_refresh(
    cloud_factory: Callable[..., CloudServer], daemon_factory: DaemonFactory, tmp_path: Path
) -> None:
    """A town made with `gastown-cloud towns create`, its token in the env file, a daemon on
    it: the daemon starts fresh, a forced refresh passes the binding, and the key alone is
    refused."""
    cloud = cloud_factory()
    env = {**os.environ, "NEXTAUTH_SECRET": cloud.secret}
    argv = [sys.executable, "-m", "gastown_cloud", "towns", "create", "--db", str(cloud.db)]
    argv += ["--user-id", "user-ada", "--organization-id", "org-kilo", "--name", "my town"]
    done = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=60, check=True)
    created = json.loads(done.stdout)
    town_id, first = created["town"]["id"], created["token"]

    env_file = tmp_path / "home" / ".env.gateway"
    env_file.parent.mkdir()
    env_file.write_text(f"KILO_JWT={first}\n")
    env_file.chmod(0o600)
    daemon = daemon_factory(
        town_id=town_id,
        cloud_url=cloud.url,
        env_file=env_file,
        extra_env={"INTERNAL_API_KEY": cloud.internal_key},
    )
    assert daemon.wait_for_log("daemon_ready")["state"] == "fresh"
    with daemon.local() as local:
        answer = local.post("/token/refresh")
    assert answer.status_code == 200, answer.text
    refreshed = read_token(env_file)
    assert refreshed is not None
    claims = verify_gastown_token(refreshed, secret=cloud.secret)
    assert (claims.sub, claims.town_id, claims.organization_id) == ("user-ada", town_id, "org-kilo")

    key_only = httpx.post(
        f"{cloud.url}/api/gastown/refresh-token",
        json={"townId": town_id},
        headers=cloud.headers,
        timeout=10,
    )
    assert key_only.status_code == 401
    minted = [
        json.loads(line)
        for line in cloud.log_text().splitlines()
        if '"token_refreshed"' in line and town_id in line
    ]
    # One token minted by a refresh (the bound one), none for the key alone; within the
    # same second it may equal the first token, so the cloud's log is the witness.
    assert len(minted) == 1
