"""The event bus: numbering, replay, fan-out, slow readers and shutdown."""

from __future__ import annotations

import json

import anyio
import pytest

from gastown_sandboxd._types import Emit, rfc3339
from gastown_sandboxd.errors import SubscriberLagged
from gastown_sandboxd.events.bus import Event, EventBus, Gap, Subscription, run_first_id
from gastown_sandboxd.events.types import EVENT_TYPES, TownInactive


async def _take(subscription: Subscription, count: int) -> list[int]:
    ids = []
    with anyio.fail_after(5):
        for _ in range(count):
            ids.append((await anext(subscription)).id)
    return ids


def test_emit_numbers_and_shapes_events() -> None:
    """Events get ids from 1, an RFC 3339 UTC time from the injected clock and their fields."""
    bus = EventBus(now=lambda: 1_700_000_000.25)
    first = bus.emit("token.refreshed", {"exp": 10, "iat": 5})
    second = bus.emit("config.changed", {"scope": "town", "keys": ["agents"]})
    assert (first.id, second.id, bus.last_id) == (1, 2, 2)
    assert first.time == "2023-11-14T22:13:20.250Z"
    assert first.as_json() == {
        "id": 1,
        "type": "token.refreshed",
        "time": "2023-11-14T22:13:20.250Z",
        "exp": 10,
        "iat": 5,
    }
    assert list(first.as_json())[:3] == ["id", "type", "time"]
    assert json.loads(second.data) == second.as_json()
    assert "\n" not in second.data
    assert second.fields == {"scope": "town", "keys": ["agents"]}


def test_an_event_is_kept_as_its_frame_alone() -> None:
    """The SSE frame is made once, at emit; everything else is read back from it."""
    bus = EventBus(now=lambda: 1_700_000_000.0)
    event = bus.emit("config.changed", {"file": "a\nb", "note": "data: ü"})
    assert event.frame == (f"id: 1\nevent: config.changed\ndata: {event.data}\n\n".encode())
    assert event.data == (
        '{"id":1,"type":"config.changed","time":"2023-11-14T22:13:20.000Z",'
        '"file":"a\\nb","note":"data: ü"}'
    )
    assert not hasattr(event, "__dict__")  # nothing cached beside the frame


def test_emit_detaches_fields_from_the_caller() -> None:
    """Changing the caller's dict after emit does not change the recorded event."""
    bus = EventBus()
    fields = {"keys": ["a"]}
    event = bus.emit("config.changed", fields)
    fields["keys"].append("b")
    assert event.fields == {"keys": ["a"]}
    with pytest.raises(TypeError):
        event.fields["keys"] = []  # type: ignore[index]


@pytest.mark.parametrize(
    ("type_", "fields", "error"),
    [
        ("token.renewed", {}, ValueError),
        ("config.changed", {"id": 3}, ValueError),
        ("config.changed", {"time": "now"}, ValueError),
        ("config.changed", {"when": object()}, TypeError),
        ("token.refreshed", {"exp": float("nan")}, ValueError),  # JSON.parse refuses NaN
    ],
)
def test_emit_rejects_misuse(type_: str, fields: dict[str, object], error: type[Exception]) -> None:
    """Unknown types, reserved field names and non-JSON values are refused and not numbered."""
    bus = EventBus()
    with pytest.raises(error):
        bus.emit(type_, fields)
    assert bus.last_id == 0


def test_bus_satisfies_the_emit_protocol() -> None:
    """`bus.publish` is what components take as their event sink."""
    bus = EventBus()
    sink: Emit = bus.publish
    sink(TownInactive(status=410, reason="town_destroyed"))
    assert bus.last_id == 1
    assert "town.inactive" in EVENT_TYPES


def test_bus_refuses_empty_sizes() -> None:
    """A ring or a buffer of zero events is a configuration mistake."""
    with pytest.raises(ValueError, match="at least 1"):
        EventBus(history=0)
    with pytest.raises(ValueError, match="at least 1"):
        EventBus(subscriber_buffer=0)


def test_rfc3339_is_utc_with_milliseconds() -> None:
    """Times are written in UTC with a Z suffix."""
    assert rfc3339(0) == "1970-01-01T00:00:00.000Z"


async def test_hundred_subscribers_each_get_every_event_once_in_order() -> None:
    """100 subscribers and 1,000 events: each subscriber receives ids 1..1000 exactly once."""
    bus = EventBus()
    received: list[list[int]] = [[] for _ in range(100)]

    async def reader(index: int, *, task_status: anyio.abc.TaskStatus[None]) -> None:
        async with bus.subscribe() as subscription:
            task_status.started()
            async for event in subscription:
                received[index].append(event.id)
                if event.id == 1000:
                    return

    with anyio.fail_after(30):
        async with anyio.create_task_group() as tg:
            for index in range(100):
                await tg.start(reader, index)
            assert bus.subscriber_count == 100
            for burst in range(20):
                for _ in range(50):
                    bus.emit("token.refreshed", {"exp": burst})
                # Readers keep up between bursts, as a live daemon's do.
                while min(len(ids) for ids in received) < bus.last_id:
                    await anyio.sleep(0)
    assert all(ids == list(range(1, 1001)) for ids in received)
    assert bus.dropped_subscribers == 0
    assert bus.subscriber_count == 0


async def test_replay_after_last_event_id_then_live() -> None:
    """A subscriber with Last-Event-ID 4 gets 5..10 from the ring, then live events."""
    bus = EventBus()
    for _ in range(10):
        bus.emit("token.refreshed", {})
    async with bus.subscribe(last_event_id=4) as subscription:
        assert subscription.gap is None
        bus.emit("token.expired", {})
        assert await _take(subscription, 7) == [5, 6, 7, 8, 9, 10, 11]


async def test_new_subscriber_gets_only_live_events() -> None:
    """Without Last-Event-ID nothing is replayed."""
    bus = EventBus()
    bus.emit("token.refreshed", {})
    async with bus.subscribe() as subscription:
        bus.emit("token.expired", {})
        assert await _take(subscription, 1) == [2]


async def test_up_to_date_subscriber_has_no_replay_and_no_gap() -> None:
    """Last-Event-ID equal to the newest id replays nothing; 0 on an empty bus neither."""
    bus = EventBus()
    async with bus.subscribe(last_event_id=0) as subscription:
        assert subscription.gap is None
        bus.emit("token.refreshed", {})
        assert await _take(subscription, 1) == [1]
    async with bus.subscribe(last_event_id=1) as subscription:
        assert subscription.gap is None
        bus.emit("token.refreshed", {})
        assert await _take(subscription, 1) == [2]


async def test_gap_when_the_ring_no_longer_holds_the_next_event() -> None:
    """An id older than the ring replays the whole ring and reports the gap."""
    bus = EventBus(history=5)
    for _ in range(10):
        bus.emit("token.refreshed", {})
    async with bus.subscribe(last_event_id=2) as subscription:
        assert subscription.gap == Gap(after_id=2, first_id=6)
        assert subscription.gap.as_json() == {"last_event_id": 2, "first_available_id": 6}
        assert await _take(subscription, 5) == [6, 7, 8, 9, 10]


async def test_gap_when_the_id_is_ahead_of_the_newest() -> None:
    """An id ahead of the newest event (a clock set back between runs, or ids that restart)
    replays everything and reports a gap."""
    bus = EventBus()
    bus.emit("token.refreshed", {})
    bus.emit("token.refreshed", {})
    async with bus.subscribe(last_event_id=500) as subscription:
        assert subscription.gap == Gap(after_id=500, first_id=1)
        assert await _take(subscription, 2) == [1, 2]
    async with EventBus().subscribe(last_event_id=7) as empty:
        assert empty.gap == Gap(after_id=7, first_id=1)


def test_a_run_numbers_its_events_from_its_microsecond_and_counts_them_apart() -> None:
    """`run_first_id` is the start's microsecond (1 at the epoch and before); ids count up
    from `first_id`, `last_id` is one less before any, and `published` counts events."""
    assert run_first_id(1_797_000_000.25) == 1_797_000_000_250_000
    assert run_first_id(0.0) == 1
    bus = EventBus(first_id=run_first_id(1_797_000_000.0))
    assert (bus.last_id, bus.published) == (1_796_999_999_999_999, 0)
    ids = [bus.emit("token.refreshed", {}).id for _ in range(3)]
    assert ids == [1_797_000_000_000_000, 1_797_000_000_000_001, 1_797_000_000_000_002]
    assert (bus.last_id, bus.published) == (ids[-1], 3)


async def test_a_client_of_an_earlier_run_gets_a_gap_even_when_this_run_passed_its_id() -> None:
    """The last id of a client of the run before is below this run's first, however many
    events this run has emitted: the whole ring and a gap, never a replay that skips this
    run's first events. With ids from 1 in each run, the same client was replayed only the
    events after its id."""
    before, after = EventBus(first_id=run_first_id(100.0)), EventBus(first_id=run_first_id(101.0))
    seen = [before.emit("token.refreshed", {}).id for _ in range(2)][-1]
    ids = [after.emit("config.changed", {}).id for _ in range(3)]
    async with after.subscribe(last_event_id=seen) as subscription:
        assert subscription.gap == Gap(after_id=seen, first_id=ids[0])
        assert await _take(subscription, 3) == ids
    restarting = EventBus()  # ids from 1, as each run had them
    for _ in range(3):
        restarting.emit("config.changed", {})
    async with restarting.subscribe(last_event_id=2) as skipped:
        assert (skipped.gap, await _take(skipped, 1)) == (None, [3])


async def test_zero_asks_for_every_event_of_this_run() -> None:
    """Last-Event-ID 0, with ids from a microsecond: every event of this run and no gap while
    the ring holds its first; once the first has left the ring, a gap."""
    bus = EventBus(first_id=1_000, history=2)
    bus.emit("token.refreshed", {})
    bus.emit("token.refreshed", {})
    async with bus.subscribe(last_event_id=0) as subscription:
        assert subscription.gap is None
        assert await _take(subscription, 2) == [1_000, 1_001]
    bus.emit("token.refreshed", {})
    async with bus.subscribe(last_event_id=0) as late:
        assert late.gap == Gap(after_id=0, first_id=1_001)
        assert await _take(late, 2) == [1_001, 1_002]


async def test_slow_subscriber_is_dropped_and_can_resume() -> None:
    """A reader that never reads is dropped with SubscriberLagged; emit and others go on."""
    bus = EventBus(subscriber_buffer=8)
    fast_ids: list[int] = []
    async with bus.subscribe() as slow, bus.subscribe() as fast:
        for _ in range(20):
            bus.emit("token.refreshed", {})
            fast_ids.extend(await _take(fast, 1))
        assert bus.subscriber_count == 1
        assert bus.dropped_subscribers == 1
        assert await _take(slow, 8) == list(range(1, 9))
        with pytest.raises(SubscriberLagged) as lagged:
            await anext(slow)
        assert lagged.value.last_event_id == 8
    assert fast_ids == list(range(1, 21))
    async with bus.subscribe(last_event_id=lagged.value.last_event_id) as resumed:
        assert await _take(resumed, 12) == list(range(9, 21))


async def test_dropped_subscriber_that_read_nothing_names_its_start() -> None:
    """A subscriber that joined after event 3 and got nothing lags at id 3."""
    bus = EventBus(subscriber_buffer=1)
    for _ in range(3):
        bus.emit("token.refreshed", {})
    async with bus.subscribe() as subscription:
        assert subscription.last_delivered_id == 3
        bus.emit("token.refreshed", {})
        bus.emit("token.refreshed", {})
        assert await _take(subscription, 1) == [4]
        with pytest.raises(SubscriberLagged, match="after event 4"):
            await anext(subscription)


async def test_close_ends_subscriptions_after_their_buffer() -> None:
    """close() lets readers drain what they hold, then their iteration stops."""
    bus = EventBus()
    async with bus.subscribe() as subscription:
        bus.emit("token.refreshed", {})
        bus.close()
        assert [event.id async for event in subscription] == [1]
    assert bus.subscriber_count == 0
    async with bus.subscribe(last_event_id=0) as late:
        assert [event.id async for event in late] == [1]


async def test_close_wakes_a_waiting_reader() -> None:
    """A reader blocked on an empty buffer ends when the bus closes."""
    bus = EventBus()
    ended = anyio.Event()

    async def reader() -> None:
        async with bus.subscribe() as subscription:
            async for _ in subscription:
                pass
        ended.set()

    async with anyio.create_task_group() as tg:
        tg.start_soon(reader)
        while bus.subscriber_count == 0:
            await anyio.sleep(0)
        bus.close()
        with anyio.fail_after(5):
            await ended.wait()


async def test_cancelled_wait_loses_no_event() -> None:
    """A read cancelled by a timeout leaves the next event for the following read."""
    bus = EventBus()
    async with bus.subscribe() as subscription:
        with anyio.move_on_after(0.01):
            await anext(subscription)
        bus.emit("token.refreshed", {})
        assert await _take(subscription, 1) == [1]


async def test_subscription_outside_its_context_is_refused() -> None:
    """Iterating a subscription that was never entered is a programming error."""
    with pytest.raises(RuntimeError, match="async with"):
        await anext(EventBus().subscribe())


async def test_wait_for_finds_a_matching_event() -> None:
    """wait_for returns the first matching event after `after`, from the ring or live."""
    bus = EventBus()
    bus.emit("token.refreshed", {"exp": 1})
    found = await bus.wait_for("token.refreshed")
    assert found.id == 1

    async def later() -> None:
        await anyio.sleep(0)
        bus.emit("config.changed", {"rig": "a"})
        bus.emit("config.changed", {"rig": "b"})

    async with anyio.create_task_group() as tg:
        tg.start_soon(later)
        with anyio.fail_after(5):
            event = await bus.wait_for(
                "config.changed", after=1, match=lambda e: e.fields["rig"] == "b"
            )
    assert isinstance(event, Event)
    assert event.id == 3


async def test_wait_for_ends_when_the_bus_closes() -> None:
    """wait_for on a closed bus with no match raises EndOfStream instead of hanging."""
    bus = EventBus()
    bus.close()
    with pytest.raises(anyio.EndOfStream):
        await bus.wait_for("token.refreshed")


async def _wait_until(
    subscription: Subscription, deadline: float, ended: dict[str, tuple[bool, float]], name: str
) -> None:
    ready = await subscription.wait(deadline)
    ended[name] = (ready, anyio.current_time())


async def test_waits_with_deadlines_end_together_at_the_earliest_on_one_timer() -> None:
    """Three subscriptions wait with different deadlines, the latest first: one timer, the
    earliest deadline's, ends all three (False) in one round, none before that deadline;
    later, an emit ends a wait with True."""
    bus = EventBus()
    ended: dict[str, tuple[bool, float]] = {}
    start = anyio.current_time()
    deadlines = {"late": start + 0.15, "early": start + 0.05, "middle": start + 0.1}
    async with (
        bus.subscribe() as late,
        bus.subscribe() as early,
        bus.subscribe() as middle,
        anyio.create_task_group() as tg,
    ):
        subscriptions = {"late": late, "early": early, "middle": middle}
        for name, subscription in subscriptions.items():  # the latest deadline waits first
            tg.start_soon(_wait_until, subscription, deadlines[name], ended, name)
            await anyio.sleep(0)
        with anyio.fail_after(5):
            while len(ended) < 3:
                await anyio.sleep(0.01)
        assert all(not ready for ready, _ in ended.values())
        assert all(at >= deadlines["early"] for _, at in ended.values())
        assert bus.deadline_rounds == 1
        tg.start_soon(_wait_until, early, anyio.current_time() + 60, ended, "news")
        await anyio.sleep(0)
        bus.emit("token.refreshed", {})
        with anyio.fail_after(5):
            while "news" not in ended:
                await anyio.sleep(0)
        assert ended["news"][0] is True
        assert bus.deadline_rounds == 1


async def test_the_timekeeper_leaving_hands_the_timing_to_the_others() -> None:
    """The wait keeping time for the others is cancelled (its client went away): the one
    still waiting ends at its own deadline all the same."""
    bus = EventBus()
    ended: dict[str, tuple[bool, float]] = {}
    start = anyio.current_time()
    async with (
        bus.subscribe() as leaving,
        bus.subscribe() as staying,
        anyio.create_task_group() as tg,
    ):
        async with anyio.create_task_group() as gone:
            # The earlier deadline waits first: it times, the later one only waits for news.
            gone.start_soon(_wait_until, leaving, start + 0.05, ended, "leaving")
            await anyio.sleep(0)
            tg.start_soon(_wait_until, staying, start + 0.1, ended, "staying")
            await anyio.sleep(0)
            gone.cancel_scope.cancel()
        with anyio.fail_after(5):
            while "staying" not in ended:
                await anyio.sleep(0.01)
    assert "leaving" not in ended
    assert ended["staying"][0] is False
    assert ended["staying"][1] >= start + 0.1  # its own deadline: a cancel ends no round
    assert bus.deadline_rounds == 1


async def test_a_deadline_already_passed_ends_the_wait_unless_something_waits() -> None:
    bus = EventBus()
    async with bus.subscribe() as subscription:
        assert await subscription.wait(anyio.current_time() - 1) is False
        bus.emit("token.refreshed", {})
        assert await subscription.wait(anyio.current_time() - 1) is True
        assert subscription.take_nowait() is not None
