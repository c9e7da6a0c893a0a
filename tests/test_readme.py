"""The README's references cannot drift from the code: routes, commands, events, metrics."""

from __future__ import annotations

import argparse
import re
import tomllib
from pathlib import Path

from gastown_sandboxd.cli import build_parser
from gastown_sandboxd.events.types import EVENT_TYPES
from gastown_sandboxd.http.openapi import openapi_document
from gastown_sandboxd.ops.metrics import DaemonMetrics, MetricsRegistry
from gastown_sandboxd.token.refresher import token_metrics
from tests.daemon.ops.test_metrics import components

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def _subcommands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    raise AssertionError("no subcommands")


def test_every_route_is_in_the_api_reference() -> None:
    """Each method and path of the OpenAPI document appears as `METHOD /path`."""
    for path, operations in openapi_document()["paths"].items():
        for method in operations:
            assert f"`{method.upper()} {path}`" in README, (method, path)


def test_every_command_and_option_is_in_the_command_reference() -> None:
    """Each subcommand and each of its options appears in the README."""
    for name, sub in _subcommands(build_parser()).items():
        assert f"gastown-sandboxd {name}" in README, name
        for action in sub._actions:
            for option in action.option_strings:
                if option in {"-h", "--help"}:
                    continue
                assert option in README, (name, option)


def test_every_event_type_is_described() -> None:
    """Each event type appears in the events reference."""
    for event_type in EVENT_TYPES:
        assert f"`{event_type}`" in README, event_type


def test_every_example_toml_key_is_in_the_settings_reference() -> None:
    """Each table and key of the example TOML file appears in the settings reference."""
    text = (ROOT / "config" / "gastown-sandboxd.example.toml").read_text()
    example = tomllib.loads(text)
    for table, keys in example.items():
        if isinstance(keys, dict):
            for key in keys:
                assert f"{table}.{key}" in README, (table, key)
    for commented in re.findall(r"^# (\w+) = ", text, flags=re.MULTILINE):
        assert f"`{commented}`" in README, commented


def test_every_metric_is_listed(tmp_path: Path) -> None:
    """Each metric family the daemon exports appears under Operations."""
    registry = MetricsRegistry()
    bus, notifier, watcher = components(tmp_path)
    token_metrics(registry)
    DaemonMetrics(registry, bus=bus, notifier=notifier, watcher=watcher)
    names = set()
    for family in registry.collect():
        suffix = "_total" if family.type == "counter" else ""
        names.add(family.name + suffix)
    assert names
    for name in names:
        assert name in README, name
