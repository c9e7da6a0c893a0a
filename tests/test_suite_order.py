"""The suite's own scheduling: the longest tests first, each beside a short one."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any, cast

import pytest

from tests.conftest import LONGEST_FIRST, longest_first


def fake(nodeid: str) -> pytest.Item:
    return cast(pytest.Item, SimpleNamespace(nodeid=nodeid))


def test_long_tests_lead_in_their_order_each_followed_by_one_short_one() -> None:
    short = [fake(f"tests/daemon/test_x.py::test_{n}") for n in range(5)]
    second = fake(LONGEST_FIRST[1] + "_and_more")
    first = fake(LONGEST_FIRST[0] + "[param]")
    ordered = longest_first([short[0], second, short[1], first, *short[2:]])
    names: list[Any] = [item.nodeid for item in ordered]
    assert names == [
        first.nodeid,
        short[0].nodeid,
        second.nodeid,
        short[1].nodeid,
        *(item.nodeid for item in short[2:]),
    ]


def test_every_listed_test_exists() -> None:
    """A renamed long test would silently lose its place: each prefix names a test function
    defined in its file."""
    root = Path(__file__).parent.parent
    for prefix in LONGEST_FIRST:
        path, _, name = prefix.partition("::")
        text = (root / path).read_text()
        assert f"def {name}" in text, prefix
