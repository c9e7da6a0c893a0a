"""The OpenAPI document: the committed files, the PATCH schema, and the routes it describes.

schemathesis sends generated requests to a real daemon in tests/e2e/test_openapi.py; the
key check of every documented operation is in test_app.py.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, cast

import pytest
from starlette.applications import Starlette
from starlette.routing import Route

from gastown_sandboxd.http.app import ApiContext, KeyRequired, create_app
from gastown_sandboxd.http.openapi import (
    GENERATED,
    config_patch_schema,
    openapi_document,
    render_document,
)
from tests.daemon.gt_samples import contract_patch

CONFIG_FOLDER = Path(__file__).resolve().parents[3] / "config"
METHODS = frozenset({"get", "put", "post", "delete", "patch", "options", "head", "trace"})


def operations(document: dict[str, Any]) -> set[tuple[str, str]]:
    """(METHOD, path) of every operation the document describes."""
    return {
        (method.upper(), path)
        for path, item in document["paths"].items()
        for method in item
        if method in METHODS
    }


# The generated files


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


# The document and the app agree


def test_every_route_is_documented_and_every_operation_is_routed() -> None:
    """The routes of both listeners' apps and the document's operations are the same set."""
    documented = operations(openapi_document())
    # create_app only binds the route methods to the context: none is read here.
    socket_app = create_app(cast(ApiContext, None), key=None)
    tcp_app = create_app(cast(ApiContext, None), key="key")
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
