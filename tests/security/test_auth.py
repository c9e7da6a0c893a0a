"""The key check of the TCP listener: every route, every near miss, one answer.

The routes are walked from the app itself (`create_app`) and checked against the OpenAPI
document, so a route added later is covered without editing this file.
"""

from __future__ import annotations

import ast
import hmac
import inspect
import socket
import textwrap
from collections.abc import Iterator
from typing import Any, cast
from urllib.parse import urlsplit

import httpx
import pytest
from starlette.applications import Starlette
from starlette.routing import Route

from gastown_sandboxd.http import app as api
from gastown_sandboxd.http.app import ApiContext, create_app
from gastown_sandboxd.http.openapi import openapi_document
from tests.fixtures.daemon import DAEMON_KEY, DaemonProcess

from . import shared_daemon

OPEN = {"/healthz", "/readyz"}
KEY = DAEMON_KEY
BODIES = {"PATCH": {"town": {}}, "PUT": {"token": "x"}, "POST": None}


def app_routes() -> list[tuple[str, str]]:
    """Every (method, path) the app serves, from its Starlette routes."""
    # create_app only binds the route methods to the context: none is read here.
    app = create_app(cast(ApiContext, None), key=None)
    assert isinstance(app, Starlette)
    routes = []
    for route in app.routes:
        assert isinstance(route, Route)
        for method in sorted(route.methods or ()):
            if method != "HEAD":
                routes.append((method, route.path))
    return sorted(routes)


ROUTES = app_routes()
GUARDED = [(method, path) for method, path in ROUTES if path not in OPEN]

# Header values that are not the key (None: no header at all).
NEAR_MISSES: dict[str, bytes | None] = {
    "missing": None,
    "empty": b"",
    "wrong": b"k" * len(KEY),
    "first character off": bytes([ord(KEY[0]) ^ 1]) + KEY[1:].encode(),
    "last character off": KEY[:-1].encode() + bytes([ord(KEY[-1]) ^ 1]),
    "prefix": KEY[:-1].encode(),
    "first half": KEY[: len(KEY) // 2].encode(),
    "one more character": KEY.encode() + b"x",
    "then whitespace and more": KEY.encode() + b" x",
    "whitespace inside": KEY[:8].encode() + b" " + KEY[8:].encode(),
    "then a no-break space": KEY.encode() + b"\xa0",
    "upper case": KEY.upper().encode(),
    "swapped case": KEY.swapcase().encode(),
    "doubled": KEY.encode() * 2,
}


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DaemonProcess]:
    with shared_daemon(tmp_path_factory.mktemp("auth"), rigs=("r1",)) as process:
        yield process


def send(
    client: httpx.Client, method: str, path: str, key: bytes | None, **extra: Any
) -> httpx.Response:
    headers: dict[bytes, bytes] = {} if key is None else {b"x-internal-api-key": key}
    body = BODIES.get(method)
    if path == "/events" and key == KEY.encode():
        # A stream that would stay open: its status is all this needs.
        with client.stream(method, path, headers=headers, **extra) as stream:
            return httpx.Response(stream.status_code, headers=stream.headers)
    return client.request(method, path, headers=headers, json=body, **extra)


def test_the_app_routes_are_the_documented_routes() -> None:
    """Walking the app finds exactly the routes of the OpenAPI document, so none is missed."""
    documented = sorted(
        (method.upper(), path)
        for path, item in openapi_document()["paths"].items()
        for method in item
        if method in {"get", "put", "post", "patch", "delete"}
    )
    assert documented == ROUTES
    assert len(GUARDED) >= 8


def test_every_guarded_route_refuses_every_near_miss_with_one_answer(
    daemon: DaemonProcess,
) -> None:
    """Missing, empty, wrong and near-miss keys on every guarded route (and on an unknown
    path) get 401 and the same JSON body, so no answer tells which part was wrong."""
    answers = {}
    with httpx.Client(base_url=daemon.url, timeout=10) as client:
        for method, path in [*GUARDED, ("GET", "/no-such-route"), ("DELETE", "/config")]:
            for name, key in NEAR_MISSES.items():
                answer = send(client, method, path, key)
                assert answer.status_code == 401, (method, path, name, answer.text)
                answers[(method, path, name)] = (
                    answer.content,
                    answer.headers["content-type"],
                    answer.headers.get("www-authenticate"),
                )
    assert len(set(answers.values())) == 1, set(answers.values())
    body = httpx.Response(401, content=next(iter(answers.values()))[0]).json()
    assert body["error"] == "unauthorized"
    assert body["details"] == []
    print(f"{len(answers)} refused requests, one answer: {body}")


@pytest.mark.parametrize("where", ["authorization header", "query string", "cookie"])
def test_the_key_anywhere_but_its_header_is_refused(daemon: DaemonProcess, where: str) -> None:
    """The right key sent as a Bearer token, a query parameter or a cookie is not the key."""
    with httpx.Client(base_url=daemon.url, timeout=10) as client:
        if where == "authorization header":
            answer = client.get("/status", headers={"authorization": f"Bearer {KEY}"})
        elif where == "query string":
            answer = client.get("/status", params={"x-internal-api-key": KEY})
        else:
            answer = client.get("/status", headers={"cookie": f"x-internal-api-key={KEY}"})
    assert answer.status_code == 401


def test_the_right_key_opens_every_route(daemon: DaemonProcess) -> None:
    """With the key, no route answers 401 (the refusals above are about the key alone)."""
    with httpx.Client(base_url=daemon.url, timeout=10) as client:
        for method, path in ROUTES:
            answer = send(client, method, path, KEY.encode())
            assert answer.status_code != 401, (method, path)
            # The two routes that call the cloud (none here) answer 502/503/504 for it.
            cloud_bound = path in ("/token/refresh", "/config/sync")
            assert answer.status_code < 500 or cloud_bound, (method, path)


def raw_status(daemon: DaemonProcess, key_line: bytes) -> int:
    """The status of GET /status sent over a raw socket with `key_line` as the key header."""
    parts = urlsplit(daemon.url)
    assert parts.hostname is not None
    assert parts.port is not None
    with socket.create_connection((parts.hostname, parts.port), timeout=10) as conn:
        conn.sendall(b"GET /status HTTP/1.1\r\nHost: x\r\n" + key_line + b"\r\n\r\n")
        return int(conn.recv(4096).split(b" ", 2)[1])


def test_whitespace_around_the_key_is_not_part_of_it(daemon: DaemonProcess) -> None:
    """HTTP strips whitespace around a field value (RFC 9110 5.5), so `key + " "` arrives as
    the key; whitespace the parser keeps (inside, or before more text) is refused."""
    key = KEY.encode()
    assert raw_status(daemon, b"x-internal-api-key: " + key + b" \t") == 200
    assert raw_status(daemon, b"x-internal-api-key:\t  " + key) == 200
    assert raw_status(daemon, b"x-internal-api-key: " + key + b" \t.") == 401
    assert raw_status(daemon, b"x-internal-api-key: " + key[:5] + b"\t" + key[5:]) == 401


@pytest.mark.parametrize("path", sorted(OPEN))
def test_health_probes_need_no_key(daemon: DaemonProcess, path: str) -> None:
    """/healthz and /readyz answer without a key, and with a wrong one."""
    with httpx.Client(base_url=daemon.url, timeout=10) as client:
        assert client.get(path).status_code == 200
        assert client.get(path, headers={"x-internal-api-key": "wrong"}).status_code == 200


def test_the_socket_serves_every_route_without_a_key(daemon: DaemonProcess) -> None:
    """The local socket is authorised by its file mode: no route asks for the key."""
    transport = httpx.HTTPTransport(uds=str(daemon.socket))
    with httpx.Client(transport=transport, base_url="http://sandboxd", timeout=10) as client:
        for method, path in ROUTES:
            if path == "/events":
                with client.stream(method, path) as stream:
                    assert stream.status_code == 200
                continue
            answer = send(client, method, path, None)
            assert answer.status_code != 401, (method, path, answer.text)


def _key_check_tree() -> ast.Module:
    return ast.parse(textwrap.dedent(inspect.getsource(api.KeyRequired)))


def test_the_key_is_compared_with_hmac_compare_digest() -> None:
    """KeyRequired compares with hmac.compare_digest and never with == or != on the key."""
    tree = _key_check_tree()
    calls = [
        node.func
        for node in ast.walk(tree)
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
    ]
    assert any(
        isinstance(func.value, ast.Name)
        and func.value.id == "hmac"
        and func.attr == "compare_digest"
        for func in calls
    )
    assert vars(api)["hmac"] is hmac  # the module's `hmac` is the standard library's
    for node in ast.walk(tree):
        if isinstance(node, ast.Compare):
            names = {
                sub.attr if isinstance(sub, ast.Attribute) else getattr(sub, "id", None)
                for side in [node.left, *node.comparators]
                for sub in ast.walk(side)
            }
            assert not names & {"_key", "given", "key"}, ast.unparse(node)
