"""Admission control of the refresh routes: at most `rate` refreshes in any one second.

The bucket holds `rate` tokens; an admitted refresh takes one, and it comes back one second
later (a sliding-window log of the last second's admissions). So no one-second window ever
holds more than `rate` admissions, and a burst of up to `rate` at once still passes. Any caller
is admitted while a token is left: capacity is never left idle while someone asks.

A refused caller is given a slot: the next free one after those already handed out, `1/rate`
apart, so the waiting sandboxes are spread over the time their backlog needs instead of all
being told "1 s" and coming back together. `Retry-After` is the whole seconds until the slot
(at least until a token comes back, at least 1). A caller refused again before its slot keeps
it; one refused at or after its slot is told to wait for the next token. A slot not used
within `hold` seconds is dropped (the caller got its token some other way, or gave up).

The daemon waits at least `Retry-After`, capped at 300 s, and never less than its own backoff,
which a `Retry-After` holds to 30 s: a refused sandbox comes back at its slot or up to 30 s
after it, never earlier.
"""

from __future__ import annotations

import math
from collections import deque

DEFAULT_HOLD = 900.0


class RefreshAdmission:
    """`admit(key, now)`: None when admitted, else the seconds to put in `Retry-After`.

    `key` names the caller (the town id), `now` is a clock in seconds; a clock that steps back
    is read as standing still. Memory: one float per admission of the last second and one
    entry per waiting caller.
    """

    def __init__(self, rate: int, *, hold: float = DEFAULT_HOLD) -> None:
        if rate < 1:
            raise ValueError("rate must be at least 1 refresh per second")
        self.rate = rate
        self.hold = hold
        self._admitted: deque[float] = deque()  # times of the admissions of the last second
        self._slots: dict[str, float] = {}  # caller -> the time it was told to come back
        self._handed: deque[tuple[float, str]] = deque()  # (slot, caller) in slot order
        self._booked_until = -math.inf  # the first slot not yet handed out
        self._last = -math.inf
        self.admitted_total = 0
        self.refused_total = 0

    @property
    def waiting(self) -> int:
        """Callers holding a slot."""
        return len(self._slots)

    def admit(self, key: str, now: float) -> int | None:
        """Admit now (None), or the whole seconds (at least 1) after which to come back."""
        now = self._last = max(now, self._last)
        self._forget(now)
        if len(self._admitted) < self.rate:
            self._admitted.append(now)
            self._slots.pop(key, None)
            self.admitted_total += 1
            return None
        token_back = self._admitted[0] + 1.0
        slot = self._slots.get(key)
        if slot is None:
            slot = max(self._booked_until, token_back)
            self._booked_until = slot + 1.0 / self.rate
            self._slots[key] = slot
            self._handed.append((slot, key))
        self.refused_total += 1
        # Rounded first: slots summed from 1/rate steps must not spill into the next second.
        return max(1, math.ceil(round(max(slot, token_back) - now, 6)))

    def _forget(self, now: float) -> None:
        while self._admitted and self._admitted[0] <= now - 1.0:
            self._admitted.popleft()
        while self._handed and self._handed[0][0] < now - self.hold:
            slot, key = self._handed.popleft()
            if self._slots.get(key) == slot:
                del self._slots[key]
