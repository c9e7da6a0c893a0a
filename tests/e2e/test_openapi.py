"""A schemathesis run of the OpenAPI document against a real daemon subprocess.

The run generates requests for every operation but `GET /events` (an endless Server-Sent
Events stream: a request never completes, so there is no response to check; the SSE tests
read it instead) and sends them over TCP with the key. `POST /token/refresh` reaches a real
cloud. The committed files and the routes the document describes are checked in
tests/daemon/http/test_openapi.py.
"""

from __future__ import annotations

import json
import re
import time
from collections import Counter
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis.config import SchemathesisConfig

from gastown_sandboxd.http.openapi import openapi_document
from tests.daemon.http.test_openapi import operations
from tests.fixtures.cloud import CloudServer
from tests.fixtures.daemon import DaemonFactory, DaemonProcess

from .gt_town import start_config_daemon

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


# (c) schemathesis against a real daemon


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
_DIGITS = re.compile(r"[0-9]+")


def valid_http_headers(headers: Mapping[str, Any]) -> bool:
    """Whether every header is an RFC 9110 field (token name, value without controls), and a
    Content-Length is digits (§8.6: h11 refuses any other with a bare 400, as it should)."""
    return all(
        _TOKEN.fullmatch(name)
        and isinstance(value, str)
        and _FIELD_VALUE.fullmatch(value)
        and (name.lower() != "content-length" or _DIGITS.fullmatch(value.strip(" \t")))
        for name, value in headers.items()
    )
