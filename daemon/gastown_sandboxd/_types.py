"""Small protocols shared by components: the clock and the event sink."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Protocol

import anyio

if TYPE_CHECKING:
    from gastown_sandboxd.events.types import DomainEvent


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
    """Where a component reports an event: `emit(TokenExpired(exp=…, iat=…))`."""

    def __call__(self, event: DomainEvent, /) -> object: ...
