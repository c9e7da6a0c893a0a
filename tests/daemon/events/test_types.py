"""The typed events: their wire names and fields are the contract's (CONTRACT §6)."""

from __future__ import annotations

import json

import pytest

from gastown_sandboxd.events.bus import EventBus
from gastown_sandboxd.events.types import (
    EVENT_CLASSES,
    EVENT_TYPES,
    ConfigChanged,
    ConfigSource,
    DomainEvent,
    TokenExpired,
    TokenOrigin,
    TokenRefreshed,
    TokenRefreshFailed,
    TownInactive,
)


def test_the_five_event_types_of_the_contract() -> None:
    """Each class names one contract type; together they are exactly the five."""
    assert {
        "token.refreshed",
        "token.refresh_failed",
        "token.expired",
        "town.inactive",
        "config.changed",
    } == EVENT_TYPES
    assert len({cls.TYPE for cls in EVENT_CLASSES}) == len(EVENT_CLASSES)


@pytest.mark.parametrize(
    ("event", "wire"),
    [
        (
            TokenRefreshed(exp=200, iat=100, source=TokenOrigin.PUSH),
            {"exp": 200, "iat": 100, "source": "push"},
        ),
        (
            TokenRefreshFailed(reason="outage", consecutive_failures=2),
            {"reason": "outage", "consecutive_failures": 2},
        ),
        (
            TokenRefreshFailed(
                reason="unacceptable_token",
                consecutive_failures=1,
                status=200,
                problems=("exp_passed",),
                exp=200,
                iat=100,
            ),
            {
                "reason": "unacceptable_token",
                "consecutive_failures": 1,
                "status": 200,
                "problems": ["exp_passed"],
                "exp": 200,
                "iat": 100,
            },
        ),
        (TokenExpired(exp=200, iat=100), {"exp": 200, "iat": 100}),
        (
            TownInactive(status=410, reason="town_destroyed"),
            {"status": 410, "reason": "town_destroyed"},
        ),
        (
            ConfigChanged(
                scope="town",
                rig=None,
                file="settings/config.json",
                keys=("agents",),
                revision="abc",
                source=ConfigSource.API,
            ),
            {
                "scope": "town",
                "rig": None,
                "file": "settings/config.json",
                "keys": ["agents"],
                "revision": "abc",
                "source": "api",
            },
        ),
        (
            ConfigChanged(
                scope="rig",
                rig="frontend",
                file="frontend/settings/config.json",
                keys=("agent",),
                revision="def",
                source=ConfigSource.CLOUD,
                generation=7,
            ),
            {
                "scope": "rig",
                "rig": "frontend",
                "file": "frontend/settings/config.json",
                "keys": ["agent"],
                "revision": "def",
                "source": "cloud",
                "generation": 7,
            },
        ),
    ],
)
def test_published_events_carry_exactly_their_fields(
    event: DomainEvent, wire: dict[str, object]
) -> None:
    """On the bus a typed event becomes `{"id", "type", "time", **fields}` as JSON."""
    bus = EventBus(now=lambda: 1_800_000_000.25)
    published = bus.publish(event)
    assert json.loads(published.data) == {
        "id": 1,
        "type": event.TYPE,
        "time": "2027-01-15T08:00:00.250Z",
        **wire,
    }


def test_events_are_frozen() -> None:
    """An event cannot be changed after it is built."""
    event = TokenExpired(exp=2, iat=1)
    with pytest.raises(AttributeError):
        event.exp = 3  # type: ignore[misc]
