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
