"""A simulated clock for the refresher: time moves only when something sleeps or a test says so.

The model is a real machine's: `sleep` counts on a monotonic clock, `time()` is that clock plus
an offset, and a wall-clock jump (a resumed laptop, an NTP step) changes only the offset.

With `autojump=True` a sleep returns at once, having moved time to its end (after a checkpoint
so other tasks run): a simulated week takes a fraction of a second. With `autojump=False`
sleepers wait until the test calls `advance`.
"""

from __future__ import annotations

from collections.abc import Callable

import anyio
import anyio.lowlevel

Observer = Callable[[float, float], None]


class SimulatedClock:
    """Wall time `time()`; `sleep` advances (autojump) or waits for `advance`."""

    def __init__(self, start: float = 1_800_000_000.0, *, autojump: bool = True) -> None:
        self.autojump = autojump
        self._mono = 0.0
        self._offset = start
        self._changed = anyio.Event()
        self._jumps: list[tuple[float, float]] = []
        self._alarms: list[tuple[float, anyio.Event]] = []
        self.observers: list[Observer] = []
        self.sleeps = 0

    @property
    def monotonic(self) -> float:
        return self._mono

    def time(self) -> float:
        return self._mono + self._offset

    async def sleep(self, seconds: float) -> None:
        self.sleeps += 1
        deadline = self._mono + max(0.0, seconds)
        if self.autojump:
            self._advance_to(deadline)
            await anyio.lowlevel.checkpoint()
            return
        while self._mono < deadline:
            await self._changed.wait()

    def advance(self, seconds: float) -> None:
        """Let `seconds` of monotonic (and wall) time pass, waking due sleepers."""
        self._advance_to(self._mono + seconds)

    def jump(self, seconds: float) -> None:
        """Step the wall clock by `seconds` without any time passing for sleepers."""
        before = self.time()
        self._offset += seconds
        self._notify(before)

    def jump_at(self, monotonic: float, seconds: float) -> None:
        """Step the wall clock by `seconds` once monotonic time reaches `monotonic`."""
        self._jumps.append((monotonic, seconds))
        self._jumps.sort()

    def alarm(self, wall: float) -> anyio.Event:
        """An event set once wall time reaches `wall`."""
        event = anyio.Event()
        if self.time() >= wall:
            event.set()
        else:
            self._alarms.append((wall, event))
        return event

    def _advance_to(self, target: float) -> None:
        while self._jumps and self._jumps[0][0] <= target:
            at, seconds = self._jumps.pop(0)
            self._step_mono(max(self._mono, at))
            self.jump(seconds)
        self._step_mono(max(self._mono, target))

    def _step_mono(self, target: float) -> None:
        before = self.time()
        self._mono = target
        self._notify(before)

    def _notify(self, before: float) -> None:
        now = self.time()
        for observer in self.observers:
            observer(before, now)
        due = [event for wall, event in self._alarms if wall <= now]
        self._alarms = [(wall, event) for wall, event in self._alarms if wall > now]
        for event in due:
            event.set()
        self._changed.set()
        self._changed = anyio.Event()
