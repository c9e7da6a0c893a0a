"""The events (CONTRACT §6) and who hears them.

`types.py` holds one frozen class per event type; `bus.py` numbers them, keeps a replay ring
and feeds bounded subscribers; `sse.py` turns a subscription into Server-Sent Events;
`specs.py` reads the configured hooks and signals, and `notify.py` runs them.

The face loads its modules on first use: the options import `types.py` and `specs.py` for
every command, and must not pay for the bus and the notifier (structlog, anyio).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from gastown_sandboxd._lazy import lazy_names

if TYPE_CHECKING:
    from gastown_sandboxd.events.bus import Event, EventBus, run_first_id
    from gastown_sandboxd.events.notify import Notifier
    from gastown_sandboxd.events.specs import HookSpec, SignalSpec
    from gastown_sandboxd.events.sse import parse_last_event_id, sse_stream
    from gastown_sandboxd.events.types import (
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

__all__ = [
    "EVENT_TYPES",
    "ConfigChanged",
    "ConfigSource",
    "DomainEvent",
    "Event",
    "EventBus",
    "HookSpec",
    "Notifier",
    "SignalSpec",
    "TokenExpired",
    "TokenOrigin",
    "TokenRefreshFailed",
    "TokenRefreshed",
    "TownInactive",
    "parse_last_event_id",
    "run_first_id",
    "sse_stream",
]

_WHERE = {
    "Event": "bus",
    "EventBus": "bus",
    "run_first_id": "bus",
    "Notifier": "notify",
    "HookSpec": "specs",
    "SignalSpec": "specs",
    "parse_last_event_id": "sse",
    "sse_stream": "sse",
    **dict.fromkeys(
        (
            "EVENT_TYPES",
            "ConfigChanged",
            "ConfigSource",
            "DomainEvent",
            "TokenExpired",
            "TokenOrigin",
            "TokenRefreshed",
            "TokenRefreshFailed",
            "TownInactive",
        ),
        "types",
    ),
}

__getattr__ = lazy_names(__name__, _WHERE)
