"""What the cloud's own work costs it: a change pushed to an https:// sandbox, a refresh.

A real `gastown-cloud serve` process (`_daemon.running_cloud`) trusts a test CA
through a bundle of certifi's CAs and that one (`SSL_CERT_FILE`: a whole bundle to read, as
a cloud with no such variable reads certifi's), and a stand-in sandbox in this process serves
`PATCH /config` over HTTPS with that CA's certificate (`tests/cloud/stand_in.py`).

- push: the cloud's CPU (utime+stime of its process) per `PATCH /api/gastown/towns/{id}/config`
  it pushes to the sandbox and records as applied. Baseline in the same run: making one
  httpx client with `verify=True` and the same bundle, in a fresh interpreter: what each
  push paid on top before the cloud made its TLS context once (`api_config._sandbox_trust`).
- refresh: the cloud's CPU per `POST /api/gastown/refresh-token` with the town's own token.

`python -m bench.cloud_bench [--quick]`; `run(quick)` gives the rows to `python -m bench`.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import anyio
import certifi
import httpx
from tests.cloud.stand_in import running_stand_in
from tests.fixtures.cloud import CloudServer
from tests.fixtures.net import make_local_ca, tls

from ._daemon import running_cloud
from ._stats import cpu_seconds
from ._table import Row, main_of

WARM_UP = 5
CLIENTS_MADE = 20
_MAKE_CLIENTS = f"""
import time, httpx
httpx.AsyncClient(verify=False)  # imports and first-use costs out of the figure
began = time.process_time()
for _ in range({CLIENTS_MADE}):
    httpx.AsyncClient(verify=True)
print((time.process_time() - began) / {CLIENTS_MADE})
"""


def _client_seconds(bundle: Path) -> float:
    """CPU seconds to make one `httpx.AsyncClient(verify=True)` trusting `bundle`."""
    env = {**os.environ, "SSL_CERT_FILE": str(bundle), "SSL_CERT_DIR": ""}
    done = subprocess.run(
        [sys.executable, "-c", _MAKE_CLIENTS], env=env, capture_output=True, text=True, check=True
    )
    return float(done.stdout)


async def _pushes(cloud: CloudServer, town_id: str, count: int) -> float:
    """The cloud's CPU seconds per push, over `count` pushes after `WARM_UP` more."""
    url = f"/api/gastown/towns/{town_id}/config"
    async with httpx.AsyncClient(
        base_url=cloud.url, headers=cloud.headers, timeout=30, verify=tls()
    ) as client:

        async def push(n: int) -> None:
            body = json.dumps({"town": {"default_agent": f"agent-{n}"}}).encode()
            answer = await client.patch(url, content=body)
            if answer.status_code != 200:
                raise RuntimeError(f"push answered {answer.status_code}: {answer.text[:200]}")

        for n in range(WARM_UP):
            await push(n)
        before = cpu_seconds(cloud.process.pid)
        for n in range(WARM_UP, WARM_UP + count):
            await push(n)
        return (cpu_seconds(cloud.process.pid) - before) / count


def _refreshes(cloud: CloudServer, town_id: str, token: str, count: int) -> float:
    """The cloud's CPU seconds per refresh with the town's token."""
    headers = {**cloud.headers, "authorization": f"Bearer {token}"}
    with httpx.Client(base_url=cloud.url, headers=headers, timeout=30, verify=tls()) as client:

        def refresh() -> None:
            answer = client.post("/api/gastown/refresh-token", json={"townId": town_id})
            if answer.status_code != 200:
                raise RuntimeError(f"refresh answered {answer.status_code}: {answer.text[:200]}")

        for _ in range(WARM_UP):
            refresh()
        before = cpu_seconds(cloud.process.pid)
        for _ in range(count):
            refresh()
        return (cpu_seconds(cloud.process.pid) - before) / count


def run(quick: bool) -> list[Row]:
    pushes, refreshes = (30, 100) if quick else (100, 500)
    with tempfile.TemporaryDirectory(prefix="cloud-bench-") as tmp:
        workdir = Path(tmp)
        ca = make_local_ca(workdir / "ca")
        bundle = workdir / "bundle.pem"
        bundle.write_bytes(Path(certifi.where()).read_bytes() + ca.ca_file.read_bytes())
        with running_cloud(workdir / "cloud", SSL_CERT_FILE=str(bundle), SSL_CERT_DIR="") as cloud:

            async def push_round() -> tuple[float, str, str]:
                # The stand-in's hypercorn would print its "Running on" line into the tables.
                logging.getLogger("hypercorn.error").disabled = True
                async with running_stand_in(tls=ca) as sandbox:
                    town, token = cloud.create_town(sandbox_url=sandbox.url)
                    return await _pushes(cloud, town["id"], pushes), town["id"], token

            push, town_id, token = anyio.run(push_round)
            refresh = _refreshes(cloud, town_id, token, refreshes)
        client = _client_seconds(bundle)
    return [
        Row("cloud CPU per push to an https:// sandbox", push * 1000, "ms", client * 1000,
            f"{pushes} pushes, each recorded applied; baseline: one httpx client made with "
            "verify=True and the same bundle, what each push paid before"),
        Row("cloud CPU per refresh", refresh * 1000, "ms",
            note=f"{refreshes} POST /api/gastown/refresh-token with the town's token"),
    ]  # fmt: skip


if __name__ == "__main__":
    quick = "30 pushes and 100 refreshes, not 100 and 500"
    title = "cloud_bench"
    raise SystemExit(main_of(run, name="cloud_bench", doc=__doc__, quick=quick, title=title))
