"""Waiting for an outcome under a deadline: the one way tests wait, sync or async.

Each polls its check until the check returns something truthy and returns that; past the
deadline it fails naming what it waited for. Nothing here sleeps for a fixed time and then
asserts: a wait ends as soon as the outcome is there.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from typing import TypeVar

import anyio

T = TypeVar("T")

DEADLINE = 10.0


async def eventually(
    check: Callable[[], T | None], what: str = "the condition", *, deadline: float = DEADLINE
) -> T:
    """Poll a synchronous `check` from async code; its first truthy result."""
    with _named(what, deadline), anyio.fail_after(deadline):
        while not (result := check()):
            await anyio.sleep(0.005)
    return result


async def eventually_async(
    check: Callable[[], Awaitable[T | None]],
    what: str = "the condition",
    *,
    deadline: float = DEADLINE,
) -> T:
    """Poll an async `check`; its first truthy result."""
    with _named(what, deadline), anyio.fail_after(deadline):
        while not (result := await check()):
            await anyio.sleep(0.02)
    return result


def wait_until(
    check: Callable[[], T | None], what: str = "the condition", *, deadline: float = DEADLINE
) -> T:
    """Poll a `check` from synchronous code; its first truthy result."""
    end = time.monotonic() + deadline
    while not (result := check()):
        assert time.monotonic() < end, f"timed out after {deadline} s waiting for {what}"
        time.sleep(0.02)
    return result


@contextmanager
def _named(what: str, deadline: float) -> Iterator[None]:
    try:
        yield
    except TimeoutError:
        raise AssertionError(f"timed out after {deadline} s waiting for {what}") from None
