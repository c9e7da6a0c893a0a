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
# Modules elsewhere that run real processes at length or simulate the 100,000-sandbox fleet.
SLOW_MODULES = frozenset(
    {
        "tests/cloud/test_openapi.py",
        "tests/cloud/test_towns_cli.py",
        "tests/cloud/test_terminal_path.py",
        "tests/cloud/test_kilo_claims.py",
        "tests/cloud/test_config_forward.py",
        "tests/daemon/token/test_fleet.py",
    }
)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Mark every test of a heavy suite `slow`, so `pytest -m "not slow"` is the fast lane."""
    for item in items:
        relative = item.path.relative_to(config.rootpath)
        parts = relative.parts
        in_suite = len(parts) > 1 and parts[0] == "tests" and parts[1] in SLOW_SUITES
        if in_suite or relative.as_posix() in SLOW_MODULES:
            item.add_marker(pytest.mark.slow)
