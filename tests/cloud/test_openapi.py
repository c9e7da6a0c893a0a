"""The cloud's OpenAPI document: the routes it describes, and a schemathesis run against a real
`gastown-cloud serve` (no 5xx, no answer outside the document)."""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis.config import SchemathesisConfig

from gastown_cloud.app import create_app
from gastown_cloud.openapi import openapi_document
from gastown_cloud.settings import CloudSettings
from gastown_cloud.store import Store
from tests.daemon.http.test_openapi import operations, routed
from tests.e2e.test_openapi import valid_http_headers
from tests.fixtures.cloud import CloudServer

KEY = "cloud-openapi-key-0123456789"
EXAMPLES_PER_MODE = 12
MIN_REQUESTS = 200
CHECKS = {
    # Schema-valid requests still meet rules a schema cannot state: an id that names no town
    # (404), a refresh without the town's Bearer (401) or with a Bearer of another town than
    # the generated id (403), a key the generator did not send.
    "positive_data_acceptance": {"expected-statuses": ["2xx", "401", "403", "404"]},
    "negative_data_rejection": {"expected-statuses": ["400", "401", "404", "413"]},
}
SCHEMA = schemathesis.openapi.from_dict(
    openapi_document(),
    config=SchemathesisConfig.from_dict({"seed": 20261206, "checks": CHECKS}),
)
HYPOTHESIS = settings(
    max_examples=EXAMPLES_PER_MODE,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[
        HealthCheck.function_scoped_fixture,
        HealthCheck.too_slow,
        HealthCheck.filter_too_much,
    ],
)


async def test_every_route_is_documented_and_every_operation_is_routed(tmp_path: Path) -> None:
    """The app's routes and the document's operations are the same set."""
    settings_ = CloudSettings(nextauth_secret="s" * 40, internal_api_key=KEY, db=tmp_path / "c.db")
    async with Store(settings_.db) as store:
        app = create_app(settings_, store)
        assert routed(app) == operations(openapi_document())
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://cloud") as client:
            served = await client.get("/openapi.json", headers={"x-internal-api-key": KEY})
            anonymous = await client.get("/openapi.json")
    assert served.status_code == 200
    assert served.json() == openapi_document()
    assert anonymous.status_code == 401


def test_security_matches_the_routes() -> None:
    """The gateway alone is keyless (Bearer only); refreshes and config reports need both."""
    document = openapi_document()
    security = {
        (method.upper(), path): operation["security"]
        for path, item in document["paths"].items()
        for method, operation in item.items()
    }
    assert security.pop(("POST", "/api/gateway/chat/completions")) == [{"townToken": []}]
    for route in (
        "/api/gastown/refresh-token",
        "/api/trpc/gastown.refreshToken",
        "/api/gastown/towns/{town_id}/config/status",
    ):
        assert security.pop(("POST", route)) == [{"internalKey": [], "townToken": []}]
    assert all(value == [{"internalKey": []}] for value in security.values())


@pytest.fixture(scope="module")
def requests_made() -> Iterator[Counter[str]]:
    """Requests sent per operation; once every operation ran, at least MIN_REQUESTS in all."""
    counts: Counter[str] = Counter()
    began = time.monotonic()
    yield counts
    every = {f"{method} {path}" for method, path in operations(openapi_document())}
    if set(counts) == every:
        assert counts.total() >= MIN_REQUESTS, counts
        assert time.monotonic() - began < 120, "keep the run small (about 450 requests, 15 s)"


@SCHEMA.parametrize()
@HYPOTHESIS
def test_cloud_conforms_to_its_document(
    case: Any, module_cloud: CloudServer, requests_made: Counter[str]
) -> None:
    """Generated requests get no 5xx and no answer outside the document (status, type, body)."""
    requests_made[case.operation.label] += 1
    key = {"x-internal-api-key": module_cloud.internal_key}
    if not valid_http_headers(case.headers or {}):
        # Header bytes HTTP forbids are refused by h11 with a bare 400 before the app.
        answer = case.call(base_url=module_cloud.url, headers=key)
        assert answer.status_code == 400, answer.text
        return
    try:
        case.call_and_validate(base_url=module_cloud.url, headers=key)
    except Exception as exc:
        if module_cloud.process.poll() is not None:
            log = module_cloud.log_text()[-3000:]
            raise AssertionError(f"the cloud exited: {log}") from exc
        raise
