"""The README's cloud section cannot drift from the cloud: commands, options and routes."""

from __future__ import annotations

import argparse
from pathlib import Path

from gastown_cloud.cli import build_parser
from gastown_cloud.openapi import openapi_document

README = (Path(__file__).resolve().parents[2] / "README.md").read_text()


def _subcommands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


def test_every_cloud_command_and_option_is_in_the_readme() -> None:
    """`gastown-cloud serve`, each `towns` action, and each of their options appear."""
    commands = _subcommands(build_parser())
    assert set(commands) == {"serve", "towns"}
    parsers = {"serve": commands["serve"]}
    parsers |= {f"towns {name}": sub for name, sub in _subcommands(commands["towns"]).items()}
    assert len(parsers) == 6
    for name, parser in parsers.items():
        assert f"gastown-cloud {name.split()[0]}" in README, name
        if name.startswith("towns "):
            assert name.split()[1] in README
        for action in parser._actions:
            for option in action.option_strings:
                if option not in {"-h", "--help"}:
                    assert option in README, (name, option)


def test_every_cloud_route_is_in_the_readme() -> None:
    """Each operation of the cloud's OpenAPI document appears as `METHOD /path`."""
    for path, operations in openapi_document()["paths"].items():
        for method in operations:
            assert f"`{method.upper()} {path}`" in README, (method, path)
