"""Small things shared by components: the clock, its RFC 3339 form, the event sink, and the
names of the daemon's secrets in an environment."""

from __future__ import annotations

import time
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from gastown_sandboxd.events.types import DomainEvent

# The daemon's API key and the cloud's signing secret: never passed on to a program the daemon
# or its shims start (an agent, where a model could read them; a hook). None of them needs
# either: the local socket serves without the key.
SECRETS_OF_THE_DAEMON = ("INTERNAL_API_KEY", "NEXTAUTH_SECRET")


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
        # anyio is imported here, not with the module: `exec` and `token` (an agent's start,
        # 29 ms) read `SECRETS_OF_THE_DAEMON` from it and never sleep on a clock.
        import anyio

        await anyio.sleep(seconds)


def rfc3339(seconds: float) -> str:
    """Unix seconds as an RFC 3339 UTC time with milliseconds: `2025-01-02T03:04:05.678Z`."""
    moment = datetime.fromtimestamp(seconds, UTC)
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


class Emit(Protocol):
    """Where a component reports an event: `emit(TokenExpired(exp=…, iat=…))`."""

    def __call__(self, event: DomainEvent, /) -> object: ...
