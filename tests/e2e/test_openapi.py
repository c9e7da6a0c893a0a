"""The OpenAPI document: the committed files, the routes it describes, and a schemathesis run.

The schemathesis run generates requests for every operation but `GET /events` (an endless
Server-Sent Events stream: a request never completes, so there is no response to check;
tests/e2e/test_config_api.py and the SSE tests read it instead) and sends them to a real
daemon subprocess over TCP with the key. `POST /token/refresh` reaches a real cloud.
"""

from __future__ import annotations

import json
import re
import time
from collections import Counter
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from prometheus_client import CollectorRegistry
from schemathesis.config import SchemathesisConfig
from starlette.applications import Starlette
from starlette.routing import Route

from gastown_sandboxd._types import SystemClock
from gastown_sandboxd.events.bus import EventBus
from gastown_sandboxd.gtsettings.store import SettingsStore
from gastown_sandboxd.http.app import ApiContext, KeyRequired, create_app
from gastown_sandboxd.http.openapi import (
    GENERATED,
    config_patch_schema,
    openapi_document,
    render_document,
)
from gastown_sandboxd.token.refresher import TokenRefresher
from tests.daemon.gt_samples import contract_patch, make_config_town
from tests.fixtures.cloud import CloudServer, launch_cloud
from tests.fixtures.daemon import DaemonFactory, DaemonProcess

from .gt_town import TOWN_ID, start_config_daemon

CONFIG_FOLDER = Path(__file__).resolve().parents[2] / "config"
KEY = "openapi-test-key-0123456789abcdef"
METHODS = frozenset({"get", "put", "post", "delete", "patch", "options", "head", "trace"})
EXAMPLES_PER_MODE = 60  # PATCH /config alone then makes several hundred requests
MIN_REQUESTS = 500

CHECKS = {
    # Schema-valid bodies may still be refused by rules a schema cannot state: an agent
    # name that resolves to nothing or a rig folder that does not exist (422), an If-Match
    # that is not the current revision (412), a token that is not acceptable (422), a
    # cloud that gives no token (502).
    "positive_data_acceptance": {"expected-statuses": ["2xx", "401", "409", "412", "422", "502"]},
    # RFC 9110 §13.2.1 evaluates If-Match before the content: 412 is a refusal too.
    "negative_data_rejection": {
        "expected-statuses": ["400", "401", "409", "412", "413", "415", "422"]
    },
}
SCHEMA = schemathesis.openapi.from_dict(
    openapi_document(),
    config=SchemathesisConfig.from_dict({"seed": 20261128, "checks": CHECKS}),
).exclude(path="/events")
# Generated If-Match values almost never equal the revision, so nearly every PATCH would
# stop at 412; this run matches any revision ("*") so the bodies reach validation and disk.
BODIES = schemathesis.openapi.from_dict(
    openapi_document(),
    config=SchemathesisConfig.from_dict(
        {"seed": 20261128, "checks": CHECKS, "parameters": {"header.If-Match": "*"}}
    ),
).include(method="PATCH", path="/config")
HYPOTHESIS = settings(
    max_examples=EXAMPLES_PER_MODE,
    deadline=None,
    derandomize=True,
    database=None,
    # One live daemon serves every input of an operation on purpose: it is the server under test.
    suppress_health_check=[
        HealthCheck.function_scoped_fixture,
        HealthCheck.too_slow,
        HealthCheck.filter_too_much,
    ],
)


def operations(document: dict[str, Any]) -> set[tuple[str, str]]:
    """(METHOD, path) of every operation the document describes."""
    return {
        (method.upper(), path)
        for path, item in document["paths"].items()
        for method in item
        if method in METHODS
    }


class NoCloud:
    """A token source for the in-process app; the route tests never refresh."""

    async def refresh(self, current_token: str | None) -> str:
        raise AssertionError("no refresh expected")


def context(tmp_path: Path) -> ApiContext:
    """A real ApiContext over a town in `tmp_path`, for the app built in-process."""
    bus = EventBus()
    town_root = make_config_town(tmp_path / "town")
    refresher = TokenRefresher(
        town_id=TOWN_ID, env_file=tmp_path / ".env.gateway", client=NoCloud(), emit=bus.publish
    )
    return ApiContext(
        town_id=TOWN_ID,
        town_root=town_root,
        refresher=refresher,
        store=SettingsStore(town_root=town_root, emit=bus.publish),
        bus=bus,
        registry=CollectorRegistry(),
        clock=SystemClock(),
        watcher_status=dict,
    )


# (a) the generated files


@pytest.mark.parametrize("name", sorted(GENERATED))
def test_generated_file_is_current(name: str) -> None:
    """config/<name> is exactly what `python -m gastown_sandboxd.http.openapi` writes today."""
    path = CONFIG_FOLDER / name
    expected = GENERATED[name]()
    hint = f"regenerate with `python -m gastown_sandboxd.http.openapi` ({name})"
    assert json.loads(path.read_text(encoding="utf-8")) == expected, hint
    assert path.read_text(encoding="utf-8") == render_document(expected), hint


def test_openapi_module_writes_the_files(tmp_path: Path) -> None:
    """The generator's entry point writes every file into the folder it is given."""
    from gastown_sandboxd.http.openapi import main

    assert main([str(tmp_path)]) == 0
    for name, build in GENERATED.items():
        assert json.loads((tmp_path / name).read_text(encoding="utf-8")) == build()
    assert json.loads((tmp_path / "openapi.json").read_text())["openapi"] == "3.1.0"


def test_patch_schema_accepts_the_contract_example_and_refuses_unknown_keys() -> None:
    """The PATCH body schema takes the contract's example and refuses a bad role or key."""
    jsonschema_rs: Any = pytest.importorskip("jsonschema_rs")
    validator = jsonschema_rs.validator_for(config_patch_schema())
    example = contract_patch()
    assert validator.is_valid(example)
    bad: Any
    for bad in (
        {"town": {"role_agents": {"majer": "claude"}}},
        {"town": {"role_effort": {"mayor": "extreme"}}},
        {"town": {"agents": {"a": {"tmux": {}}}}},
        {"town": {"agents": {"a": {"env": {"lower": "x"}}}}},
        {"rigs": {"frontend": {"default_agent": "claude"}}},
        {"extra": {}},
        [],
    ):
        assert not validator.is_valid(bad), bad


# (b) the document and the app agree


def test_every_route_is_documented_and_every_operation_is_routed(tmp_path: Path) -> None:
    """The routes of both listeners' apps and the document's operations are the same set."""
    documented = operations(openapi_document())
    socket_app = create_app(context(tmp_path), key=None)
    tcp_app = create_app(context(tmp_path / "tcp"), key=KEY)
    assert isinstance(socket_app, Starlette)
    assert isinstance(tcp_app, KeyRequired)
    assert isinstance(tcp_app.app, Starlette)
    assert routed(socket_app) == documented
    assert routed(tcp_app.app) == documented


def routed(app: Starlette) -> set[tuple[str, str]]:
    """(METHOD, path) of every route; HEAD is left out (Starlette adds it to every GET)."""
    return {
        (method, route.path)
        for route in app.routes
        if isinstance(route, Route)
        for method in route.methods or ()
        if method != "HEAD"
    }


async def test_open_operations_are_exactly_those_without_the_key(tmp_path: Path) -> None:
    """Without the key every operation is 401 except those the document marks `security: []`."""
    document = openapi_document()
    transport = httpx.ASGITransport(app=create_app(context(tmp_path), key=KEY))
    async with httpx.AsyncClient(transport=transport, base_url="http://sandboxd") as client:
        for method, path in sorted(operations(document)):
            declared_open = document["paths"][path][method.lower()].get("security") == []
            answer = await client.request(method, path)
            if declared_open:
                assert answer.status_code in (200, 503), (method, path)  # /readyz: no token
            else:
                assert answer.status_code == 401, (method, path)
                assert answer.json()["error"] == "unauthorized"
        served = await client.get("/openapi.json", headers={"x-internal-api-key": KEY})
    assert served.json() == document


async def test_method_not_allowed_lists_every_method_of_the_path(tmp_path: Path) -> None:
    """A 405 carries `Allow` with the methods of every route on that path (RFC 9110)."""
    transport = httpx.ASGITransport(app=create_app(context(tmp_path), key=None))
    async with httpx.AsyncClient(transport=transport, base_url="http://sandboxd") as client:
        config = await client.request("TRACE", "/config")
        token = await client.delete("/token")
    assert config.status_code == 405
    assert config.json()["error"] == "method_not_allowed"
    assert config.headers["allow"] == "GET, HEAD, PATCH"
    assert token.headers["allow"] == "PUT"


# (c) schemathesis against a real daemon


@pytest.fixture(scope="module")
def module_cloud(tmp_path_factory: pytest.TempPathFactory) -> Iterator[CloudServer]:
    """One real cloud for the whole run (only POST /token/refresh reaches it)."""
    server = launch_cloud(tmp_path_factory.mktemp("openapi-cloud"))
    yield server
    server.stop()


@pytest.fixture(scope="module")
def requests_made() -> Iterator[Counter[str]]:
    """Requests sent per operation; once every operation ran, at least MIN_REQUESTS in all."""
    counts: Counter[str] = Counter()
    yield counts
    every = {f"{method} {path}" for method, path in operations(openapi_document())} - {
        "GET /events"
    }
    if set(counts) == every:
        assert counts.total() >= MIN_REQUESTS, counts


@pytest.fixture
def live(module_cloud: CloudServer, daemon_factory: DaemonFactory, tmp_path: Path) -> DaemonProcess:
    """A daemon with its own fresh town, trusting the module's cloud."""
    town, token = module_cloud.create_town(name=f"openapi-{time.monotonic_ns()}")
    return start_config_daemon(
        daemon_factory,
        tmp_path,
        town_id=town["id"],
        token=token,
        cloud_url=module_cloud.url,
        extra_env={"INTERNAL_API_KEY": module_cloud.internal_key},
    )


@SCHEMA.parametrize()
@HYPOTHESIS
def test_api_conforms_to_its_document(
    case: Any, live: DaemonProcess, requests_made: Counter[str]
) -> None:
    """Generated requests get no 5xx and no answer outside the document (status, type, body)."""
    call_and_validate(case, live, requests_made)


@BODIES.parametrize()
@HYPOTHESIS
def test_patch_bodies_that_reach_the_files_conform(
    case: Any, live: DaemonProcess, requests_made: Counter[str]
) -> None:
    """PATCH bodies past the If-Match check are applied (200) or refused in the document's terms."""
    call_and_validate(case, live, requests_made)
    assert json.loads((live.town_root / "settings" / "config.json").read_bytes())["type"] == (
        "town-settings"
    )


def call_and_validate(case: Any, live: DaemonProcess, requests_made: Counter[str]) -> None:
    """Send the case to the daemon over TCP with the key and run schemathesis' checks."""
    requests_made[case.operation.label] += 1
    key = {"x-internal-api-key": live.key}
    if not valid_http_headers(case.headers or {}):
        # Negative cases may hold header bytes HTTP forbids; the HTTP layer (h11 in hypercorn)
        # refuses those with a bare 400 before the API sees them, as it should.
        answer = case.call(base_url=live.url, headers=key)
        assert answer.status_code == 400, answer.text
        return
    try:
        case.call_and_validate(base_url=live.url, headers=key)
    except Exception as exc:
        if live.process.poll() is not None:  # say why the connection went away
            code = live.process.returncode
            raise AssertionError(f"the daemon exited ({code}): {live.log_text()[-3000:]}") from exc
        raise


_TOKEN = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_FIELD_VALUE = re.compile(r"[\t\x20-\x7e\x80-\xff]*")


def valid_http_headers(headers: Mapping[str, Any]) -> bool:
    """Whether every header is an RFC 9110 field (token name, value without controls)."""
    return all(
        _TOKEN.fullmatch(name) and isinstance(value, str) and _FIELD_VALUE.fullmatch(value)
        for name, value in headers.items()
    )
