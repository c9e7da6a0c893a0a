"""Small things shared by components: the clock, its RFC 3339 form, and the event sink."""

from __future__ import annotations

import time
from datetime import UTC, datetime
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


def rfc3339(seconds: float) -> str:
    """Unix seconds as an RFC 3339 UTC time with milliseconds: `2025-01-02T03:04:05.678Z`."""
    moment = datetime.fromtimestamp(seconds, UTC)
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


class Emit(Protocol):
    """Where a component reports an event: `emit(TokenExpired(exp=…, iat=…))`."""

    def __call__(self, event: DomainEvent, /) -> object: ...
