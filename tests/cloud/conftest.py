"""One real cloud server shared by the cloud tests (each test makes its own towns)."""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import pytest

from tests.fixtures.cloud import CloudServer, launch_cloud
from tests.fixtures.net import tls


@pytest.fixture(scope="session")
def shared_cloud(tmp_path_factory: pytest.TempPathFactory) -> Iterator[CloudServer]:
    """A real `gastown-cloud serve` with 24 h tokens, started once for the cloud tests."""
    server = launch_cloud(tmp_path_factory.mktemp("shared-cloud"))
    yield server
    server.stop()


# A fresh connection per request: a keep-alive connection the server closes after its idle
# timer (5 s) races the next request on a loaded machine ("Server disconnected").
FRESH = httpx.Limits(max_keepalive_connections=0)


@pytest.fixture
def api(shared_cloud: CloudServer) -> Iterator[httpx.Client]:
    """A client of the shared server that sends the internal key."""
    with httpx.Client(
        base_url=shared_cloud.url, headers=shared_cloud.headers, timeout=10, limits=FRESH,
        verify=tls(),
    ) as client:  # fmt: skip
        yield client


@pytest.fixture
def anon(shared_cloud: CloudServer) -> Iterator[httpx.Client]:
    """A client of the shared server that sends no key."""
    with httpx.Client(base_url=shared_cloud.url, timeout=10, limits=FRESH, verify=tls()) as client:
        yield client
