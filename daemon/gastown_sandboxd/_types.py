"""Small protocols shared by components: the clock and the event sink."""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any, Protocol

import anyio


class Clock(Protocol):
    """Wall-clock time and sleeping; tests inject a simulated one."""

    def time(self) -> float:
        """Unix seconds, as the token claims count them."""
        ...

    async def sleep(self, seconds: float) -> None: ...


class SystemClock:
    """The real clock."""

    def time(self) -> float:
        return time.time()

    async def sleep(self, seconds: float) -> None:
        await anyio.sleep(seconds)


class Emit(Protocol):
    """Where a component reports an event: `emit("token.refreshed", {"exp": …})`."""

    def __call__(self, type: str, fields: Mapping[str, Any], /) -> object: ...
