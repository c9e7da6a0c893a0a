"""Shared fixtures: real servers on 127.0.0.1 with ephemeral ports, real files in tmp folders."""

from __future__ import annotations

import pytest

pytest_plugins = [
    "tests.fixtures.cloud",
    "tests.fixtures.daemon",
]


@pytest.fixture
def anyio_backend() -> str:
    """Every async test runs on asyncio, the backend hypercorn serves on."""
    return "asyncio"


# Suites that start real daemons, kill loops, chaos and packaging: `make check` leaves them out.
SLOW_SUITES = ("e2e", "faults", "packaging", "security")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Mark every test of a heavy suite `slow`, so `pytest -m "not slow"` is the fast lane."""
    for item in items:
        parts = item.path.relative_to(config.rootpath).parts
        if len(parts) > 1 and parts[0] == "tests" and parts[1] in SLOW_SUITES:
            item.add_marker(pytest.mark.slow)
