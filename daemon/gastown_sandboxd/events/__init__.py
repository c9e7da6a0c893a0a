"""The events (CONTRACT §6) and who hears them.

`types.py` holds one frozen class per event type; `bus.py` numbers them, keeps a replay ring
and feeds bounded subscribers; `sse.py` turns a subscription into Server-Sent Events; and
`notify.py` runs the configured hooks and sends the configured signals.
"""

from gastown_sandboxd.events.bus import Event, EventBus
from gastown_sandboxd.events.notify import HookSpec, Notifier, SignalSpec
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
    "sse_stream",
]
