"""Small things shared by components: the clock, its RFC 3339 form, the event sink, the
names of the daemon's secrets in an environment, and the test for text UTF-8 can hold."""

from __future__ import annotations

import json
import time
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from gastown_sandboxd.events.types import DomainEvent

# The daemon's API key and the cloud's signing secret: never passed on to a program the daemon
# or its shims start (an agent, where a model could read them; a hook). None of them needs
# either: the local socket serves without the key.
SECRETS_OF_THE_DAEMON = ("INTERNAL_API_KEY", "NEXTAUTH_SECRET")

_TO_TEXT = json.JSONEncoder(ensure_ascii=False, check_circular=False)


def all_unicode(value: Any) -> bool:
    """Whether every string of `value`, keys too, is text UTF-8 can hold: none holds a lone
    surrogate, which a JSON escape (`"\\ud800"`) decodes to and no file, answer or log line
    can carry (one pass in C, ~5 us for a dashboard's body). A value that is not JSON at all
    counts as Unicode: the checks that read it say what is wrong."""
    try:
        _TO_TEXT.encode(value).encode("utf-8")
    except UnicodeEncodeError:
        return False
    except (TypeError, ValueError):
        return True
    return True


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
