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


# The longest tests, longest first (seconds measured in full runs on 2 cores: 86, 81, 50, 36,
# 32, 26, 23, 16). They run first, each beside short ones, so that no worker ends the run alone
# with one of them: with `--maxschedchunk 1` (make test) xdist hands out tests in this order, a
# worker at a time, which is longest-processing-time-first scheduling.
LONGEST_FIRST = (
    "tests/faults/test_kill_loops.py::test_kills_during_four_file_patches_and_syncs",
    "tests/faults/test_kill_loops.py::test_kills_during_refreshes_and_token_pushes",
    "tests/e2e/test_events_e2e.py::test_hundred_subscribers_get_every_event_once_in_order",
    "tests/e2e/test_load.py::test_patches_from_32_clients_with_100_subscribers_lose_nothing",
    "tests/e2e/test_demo.py::test_demo_runs_to_the_end_and_cleans_up",
    "tests/e2e/test_token_lifecycle.py::test_sigkill_during_200_refreshes_and_pushes",
    "tests/e2e/test_token_lifecycle.py::test_three_scheduled_refreshes_reach_bash_exec",
    "tests/e2e/test_operations.py::test_pipes_closed_by_head_end_quietly_every_time",
)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Mark every test of a heavy suite `slow`, so `pytest -m "not slow"` is the fast lane;
    then put the `LONGEST_FIRST` tests first, each followed by one short test (xdist gives a
    worker two tests to start with: one long one each)."""
    for item in items:
        relative = item.path.relative_to(config.rootpath)
        parts = relative.parts
        in_suite = len(parts) > 1 and parts[0] == "tests" and parts[1] in SLOW_SUITES
        if in_suite or relative.as_posix() in SLOW_MODULES:
            item.add_marker(pytest.mark.slow)
    items[:] = longest_first(items)


def longest_first(items: list[pytest.Item]) -> list[pytest.Item]:
    """`items` with those of `LONGEST_FIRST` first, in its order, each followed by one other;
    every other test keeps its place relative to the rest."""
    rank = {prefix: number for number, prefix in enumerate(LONGEST_FIRST)}

    def rank_of(item: pytest.Item) -> int | None:
        for prefix, number in rank.items():
            if item.nodeid.startswith(prefix):
                return number
        return None

    long = sorted(
        (item for item in items if rank_of(item) is not None),
        key=lambda item: rank_of(item) or 0,
    )
    rest = [item for item in items if rank_of(item) is None]
    ordered: list[pytest.Item] = []
    for number, item in enumerate(long):
        ordered.append(item)
        ordered.extend(rest[number : number + 1])
    ordered.extend(rest[len(long) :])
    return ordered
