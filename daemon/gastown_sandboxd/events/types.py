"""The events the daemon publishes (CONTRACT §6): one frozen class per type.

Components build these and hand them to `EventBus.publish`, so an event's name and fields are
written once, here. Each class's `TYPE` is its wire name; `fields()` is its JSON object less
`id`, `type` and `time`, which the bus adds. Optional fields that are None are left out of
`token.refresh_failed` (the cloud may give no status, the daemon may hold no token), while
`config.changed` always carries `rig` (null for the town file).
"""

from __future__ import annotations

import enum
from dataclasses import asdict, dataclass, field
from typing import Any, ClassVar


class ConfigSource(enum.StrEnum):
    """Who changed a settings file: the API, someone else on the sandbox, or the cloud's sync."""

    API = "api"
    EXTERNAL = "external"
    CLOUD = "cloud"


class TokenOrigin(enum.StrEnum):
    """Where a new token came from: the refresh call, a push (PUT /token), or the env file."""

    CLOUD = "cloud"
    PUSH = "push"
    FILE = "file"


@dataclass(frozen=True, kw_only=True, slots=True)
class TokenRefreshed:
    TYPE: ClassVar[str] = "token.refreshed"
    exp: int
    iat: int
    source: TokenOrigin

    def fields(self) -> dict[str, Any]:
        return {"exp": self.exp, "iat": self.iat, "source": str(self.source)}


@dataclass(frozen=True, kw_only=True, slots=True)
class TokenRefreshFailed:
    TYPE: ClassVar[str] = "token.refresh_failed"
    reason: str
    consecutive_failures: int
    status: int | None = None
    problems: tuple[str, ...] | None = None
    exp: int | None = None
    iat: int | None = None

    def fields(self) -> dict[str, Any]:
        found = {key: value for key, value in asdict(self).items() if value is not None}
        if self.problems is not None:
            found["problems"] = list(self.problems)
        return found


@dataclass(frozen=True, kw_only=True, slots=True)
class TokenExpired:
    TYPE: ClassVar[str] = "token.expired"
    exp: int
    iat: int

    def fields(self) -> dict[str, Any]:
        return {"exp": self.exp, "iat": self.iat}


@dataclass(frozen=True, kw_only=True, slots=True)
class TownInactive:
    TYPE: ClassVar[str] = "town.inactive"
    status: int | None
    reason: str

    def fields(self) -> dict[str, Any]:
        return {"status": self.status, "reason": self.reason}


@dataclass(frozen=True, kw_only=True, slots=True)
class ConfigChanged:
    TYPE: ClassVar[str] = "config.changed"
    scope: str
    rig: str | None
    file: str
    keys: tuple[str, ...]
    revision: str
    source: ConfigSource
    generation: int | None = field(default=None)

    def fields(self) -> dict[str, Any]:
        found: dict[str, Any] = {
            "scope": self.scope,
            "rig": self.rig,
            "file": self.file,
            "keys": list(self.keys),
            "revision": self.revision,
            "source": str(self.source),
        }
        if self.generation is not None:
            found["generation"] = self.generation
        return found


DomainEvent = TokenRefreshed | TokenRefreshFailed | TokenExpired | TownInactive | ConfigChanged

EVENT_CLASSES: tuple[type[DomainEvent], ...] = (
    TokenRefreshed,
    TokenRefreshFailed,
    TokenExpired,
    TownInactive,
    ConfigChanged,
)
EVENT_TYPES = frozenset(cls.TYPE for cls in EVENT_CLASSES)
