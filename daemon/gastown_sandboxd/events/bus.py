"""The event bus: numbered events, a replay ring, and bounded per-subscriber buffers.

`emit` is synchronous and never waits: it numbers the event (`first_id`, then one more
each time), keeps it in a ring of the last `history` events and appends it to every
subscriber's buffer. Call it from the event loop's thread. A subscriber whose buffer already
holds `subscriber_buffer` undelivered events is dropped at once, so a slow reader never holds
back `emit` or the other readers.

A subscription first replays the ring's events after `last_event_id`, then delivers live ones,
each exactly once and in order. Its iterator ends in one of three ways:

- dropped: it delivers what its buffer holds, then raises `SubscriberLagged(last_event_id)`
  naming the last event delivered; resubscribing with that id loses nothing while the ring
  still holds the rest;
- the bus closed (`EventBus.close()`, at shutdown): `StopAsyncIteration` after the buffer;
- never otherwise.

Ids across runs: the daemon numbers each run from the microsecond it started
(`run_first_id`), so an id is never given twice and a later run's ids are higher. A client
that comes back after a restart with its last id is then always told apart: its id is below
this run's first. With ids restarting at 1 in each run, a new run that had passed the old
id replayed only what followed it, and the client never saw the new run's first events.

Gap: when the events right after `last_event_id` have already left the ring, or the id is
from an earlier run (below `first_id`) or ahead of the newest event (a clock set back
between runs), the subscription replays the whole ring and reports what was lost in
`Subscription.gap`. `last_event_id` 0 asks for every event of this run: no gap while the
ring still holds the first.
"""

from __future__ import annotations

import json
import time
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from itertools import islice
from types import MappingProxyType, TracebackType
from typing import Any

import anyio
import anyio.lowlevel

from gastown_sandboxd._types import rfc3339
from gastown_sandboxd.errors import SubscriberLagged
from gastown_sandboxd.events.types import EVENT_TYPES, DomainEvent

_RESERVED_FIELDS = frozenset({"id", "type", "time"})


@dataclass(frozen=True, slots=True)
class Event:
    """One event, kept in its wire form alone: `frame`, the SSE frame encoded once by `emit`
    and shared by the ring and every subscriber's stream. `data` (what hooks receive),
    `time`, `fields` and `as_json()` are read back from it; no hot path decodes it.

    A ring of 1,000 `config.changed` holds 0.43 MiB this way (tracemalloc), and an emit and
    its frame take 7.8 us. Kept as a frozen copy of the fields beside the JSON text and the
    frame made from it, the same ring held 2.1 MiB and took 16 us an event: the JSON was
    made twice and parsed once."""

    id: int
    type: str
    frame: bytes

    @property
    def data(self) -> str:
        """The event as one line of JSON, `{"id", "type", "time", **fields}`."""
        return self.frame[self.frame.index(b"\ndata: ") + 7 : -2].decode()

    def as_json(self) -> dict[str, Any]:
        """The wire form: `{"id", "type", "time", **fields}`."""
        found: dict[str, Any] = json.loads(self.data)
        return found

    @property
    def time(self) -> str:
        return str(self.as_json()["time"])

    @property
    def fields(self) -> Mapping[str, Any]:
        """The type-specific keys (`exp`, `iat`, `scope`, …), read-only."""
        found = self.as_json()
        return MappingProxyType({k: v for k, v in found.items() if k not in _RESERVED_FIELDS})


@dataclass(frozen=True, slots=True)
class Gap:
    """Events `after_id + 1 … first_id - 1` could not be replayed; `first_id` is the oldest kept."""

    after_id: int
    first_id: int

    def as_json(self) -> dict[str, int]:
        return {"last_event_id": self.after_id, "first_available_id": self.first_id}


class _Subscriber:
    """A subscriber's mailbox, written by `emit` and read by its `Subscription`."""

    __slots__ = ("buffer", "closed", "lagged")

    def __init__(self) -> None:
        self.buffer: deque[Event] = deque()
        self.lagged = False
        self.closed = False


def run_first_id(now: float) -> int:
    """The first event id of a run started at `now` (Unix seconds): its microsecond. A run
    emits fewer than one event a microsecond, so the next run's ids are higher, and they stay
    below JavaScript's 2**53 (its largest exact integer) until the year 2255."""
    return max(1, int(now * 1_000_000))


class EventBus:
    """Numbers, keeps and fans out events; satisfies the `Emit` protocol through `emit`."""

    def __init__(
        self,
        *,
        history: int = 1000,
        subscriber_buffer: int = 256,
        now: Callable[[], float] = time.time,
        first_id: int = 1,
    ) -> None:
        if history < 1 or subscriber_buffer < 1:
            raise ValueError("history and subscriber_buffer must be at least 1")
        self._ring: deque[Event] = deque(maxlen=history)
        self._buffer_size = subscriber_buffer
        self._now = now
        self._first_id = first_id
        self._last_id = first_id - 1
        self._subscribers: set[_Subscriber] = set()
        self._closed = False
        # One wake-up for every waiting subscriber, made by the first to wait and set (then
        # dropped) by the next emit or close: not one anyio.Event per subscriber per event.
        self._news: anyio.Event | None = None
        # The deadline the waiter keeping time for all the others waits for (`_next_news`).
        self._timed: float | None = None
        self.deadline_rounds = 0
        self.dropped_subscribers = 0

    @property
    def last_id(self) -> int:
        """The id of the newest event; one less than `first_id` before the first."""
        return self._last_id

    @property
    def published(self) -> int:
        """How many events were emitted: ids are consecutive from `first_id`."""
        return self._last_id - self._first_id + 1

    @property
    def subscriber_count(self) -> int:
        return len(self._subscribers)

    def emit(self, type: str, fields: Mapping[str, Any]) -> Event:
        """Record and fan out one event in its wire form; never waits.

        Raises ValueError/TypeError on misuse. Components publish typed events (`publish`).
        """
        if type not in EVENT_TYPES:
            raise ValueError(f"unknown event type {type!r}")
        clash = _RESERVED_FIELDS.intersection(fields)
        if clash:
            raise ValueError(f"event fields may not set {sorted(clash)}")
        # Made into text at once: checked (JSON, no NaN) and detached from the caller's objects.
        number = self._last_id + 1
        wire = {"id": number, "type": type, "time": rfc3339(self._now()), **fields}
        data = json.dumps(wire, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
        event = Event(number, type, f"id: {number}\nevent: {type}\ndata: {data}\n\n".encode())
        self._last_id = number
        self._ring.append(event)
        for subscriber in tuple(self._subscribers):
            if len(subscriber.buffer) >= self._buffer_size:
                subscriber.lagged = True
                self._subscribers.discard(subscriber)
                self.dropped_subscribers += 1
            else:
                subscriber.buffer.append(event)
        self._announce()
        return event

    def publish(self, event: DomainEvent) -> Event:
        """Record and fan out one of the daemon's typed events (the `Publish` of components)."""
        return self.emit(event.TYPE, event.fields())

    def subscribe(self, *, last_event_id: int | None = None) -> Subscription:
        """Async context manager and iterator of the events after `last_event_id` (None: new)."""
        return Subscription(self, last_event_id)

    def close(self) -> None:
        """End every subscription (after its buffer) and refuse live delivery from now on."""
        self._closed = True
        for subscriber in self._subscribers:
            subscriber.closed = True
        self._subscribers.clear()
        self._announce()

    def _announce(self) -> None:
        news, self._news = self._news, None
        if news is not None:
            news.set()

    async def _next_news(self, deadline: float | None = None) -> None:
        """Return at the next emit or close (a checkpoint: it always waits), or at the end of
        a deadline round (`deadline_rounds` moves on).

        One timer for all the waiters, not one each: a waiter whose deadline is earlier than
        the one being timed keeps time for everyone. When its timer fires, a deadline round
        ends: `deadline_rounds` moves on and every waiter wakes, and `Subscription.wait`
        ends every wait that has a deadline, due or not. So idle SSE streams send their
        heartbeats together and stay in step: per round one timer and one wake-up per
        stream, as with a timer each, and no timer at all per event. (Ending only the waits
        that were due woke every stream once per distinct deadline: with 100 idle streams
        the daemon used 0.95 % of a core instead of 0.15 %.) A timekeeper that is cancelled
        (its client went) ends no round: it wakes the others to choose the next. With 100
        SSE streams, a timer armed and cancelled per stream and event (`move_on_after`) cost
        the daemon ~17 us per stream and event.
        """
        if self._news is None:
            self._news = anyio.Event()
        news = self._news
        if deadline is None or (self._timed is not None and self._timed <= deadline):
            await news.wait()
            return
        self._timed = deadline
        with anyio.CancelScope(deadline=deadline) as timer:
            try:
                await news.wait()
            finally:
                if self._timed == deadline:
                    self._timed = None
                    if news is self._news:  # timed out or cancelled: the others go on
                        if timer.cancel_called:
                            self.deadline_rounds += 1
                        self._announce()

    async def wait_for(
        self,
        type: str,
        *,
        after: int = 0,
        match: Callable[[Event], bool] | None = None,
    ) -> Event:
        """The first event of `type` with an id above `after` that `match` accepts (for tests)."""
        async with self.subscribe(last_event_id=after) as subscription:
            async for event in subscription:
                if event.type == type and (match is None or match(event)):
                    return event
        raise anyio.EndOfStream

    def _attach(self, last_event_id: int | None) -> tuple[_Subscriber, list[Event], Gap | None]:
        # Replay snapshot and registration happen without a checkpoint: nothing slips between.
        replay, gap = self._replay_after(last_event_id)
        subscriber = _Subscriber()
        if self._closed:
            subscriber.closed = True
        else:
            self._subscribers.add(subscriber)
        return subscriber, replay, gap

    def _detach(self, subscriber: _Subscriber) -> None:
        self._subscribers.discard(subscriber)

    def _replay_after(self, last_event_id: int | None) -> tuple[list[Event], Gap | None]:
        if last_event_id is None:
            return [], None
        last_event_id = max(0, last_event_id)
        first_id = self._ring[0].id if self._ring else self._last_id + 1
        if last_event_id == 0 and first_id == self._first_id:
            return list(self._ring), None  # every event of this run, none dropped yet
        if last_event_id > self._last_id or last_event_id + 1 < first_id:
            return list(self._ring), Gap(last_event_id, first_id)
        return list(islice(self._ring, last_event_id + 1 - first_id, None)), None


class Subscription:
    """One reader of the bus; use as `async with bus.subscribe(...) as sub: async for e in sub`."""

    def __init__(self, bus: EventBus, last_event_id: int | None) -> None:
        self._bus = bus
        self._requested = last_event_id
        self._subscriber: _Subscriber | None = None
        self._replay: deque[Event] = deque()
        self.gap: Gap | None = None
        self.last_delivered_id = 0

    async def __aenter__(self) -> Subscription:
        subscriber, replay, gap = self._bus._attach(self._requested)
        self._subscriber = subscriber
        self._replay = deque(replay)
        self.gap = gap
        if gap is not None:
            self.last_delivered_id = gap.first_id - 1
        elif self._requested is not None:
            self.last_delivered_id = self._requested
        else:
            self.last_delivered_id = self._bus.last_id
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._subscriber is not None:
            self._bus._detach(self._subscriber)

    def __aiter__(self) -> Subscription:
        return self

    async def __anext__(self) -> Event:
        subscriber = self._subscriber
        if subscriber is None:
            raise RuntimeError("use the subscription inside `async with`")
        # Cancel-safe: a cancellation lands here or in wait(), never after an event is taken.
        await anyio.lowlevel.checkpoint()
        while True:
            event = self.take_nowait()
            if event is not None:
                return event
            await self._bus._next_news()

    async def wait(self, deadline: float | None = None) -> bool:
        """True once `take_nowait` has something to give (an event, or the end); False when,
        before that, the loop clock (`anyio.current_time`) reaches `deadline` or a deadline
        round ends: the earliest deadline of all the waiting subscriptions passed. So a wait
        with a deadline ends at that deadline at the latest, and with every other wait that
        has one, in step (`EventBus._next_news`).

        Takes nothing, so a cancellation loses nothing; unlike `__anext__` it does not yield
        to the loop first when something is already there.
        """
        subscriber = self._subscriber
        if subscriber is None:
            raise RuntimeError("use the subscription inside `async with`")
        bus = self._bus
        # A deadline already passed ends the first wait at once (its timer, or an earlier
        # one, is due). The clock is read only after a wake-up that brought nothing.
        if self._ready(subscriber):
            return True
        while True:
            rounds = bus.deadline_rounds
            await bus._next_news(deadline)
            if self._ready(subscriber):
                return True
            if deadline is not None and (
                bus.deadline_rounds != rounds or anyio.current_time() >= deadline
            ):
                return False

    def _ready(self, subscriber: _Subscriber) -> bool:
        return bool(self._replay or subscriber.buffer or subscriber.lagged or subscriber.closed)

    def take_nowait(self) -> Event | None:
        """The next event if one is waiting, else None; raises as `__anext__` does at the end.

        Lets a reader take what is already there without arming a timer for each event.
        """
        subscriber = self._subscriber
        if subscriber is None:
            raise RuntimeError("use the subscription inside `async with`")
        if self._replay:
            return self._deliver(self._replay.popleft())
        if subscriber.buffer:
            return self._deliver(subscriber.buffer.popleft())
        if subscriber.lagged:
            raise SubscriberLagged(self.last_delivered_id)
        if subscriber.closed:
            raise StopAsyncIteration
        return None

    def _deliver(self, event: Event) -> Event:
        self.last_delivered_id = event.id
        return event
