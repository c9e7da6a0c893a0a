"""What the options configure of hooks and signals (`[[hooks]]`, `[[signals]]`): each entry
checked as it is built, its durations and signal names read from text.

Apart from `notify.py`, which runs them, so that reading the options (every command does)
imports none of the daemon's machinery: structlog, anyio, the bus.
"""

from __future__ import annotations

import math
import re
import signal as signals_module
from dataclasses import dataclass
from pathlib import Path

from gastown_sandboxd.events.types import EVENT_TYPES

_DURATION = re.compile(r"\s*([0-9]+(?:\.[0-9]+)?)\s*(ms|s|m|h)?\s*")
_UNIT_SECONDS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, None: 1.0}


def parse_duration(value: str | float) -> float:
    """Seconds from `"30s"`, `"500ms"`, `"2m"`, `"1h"`, `"1.5"` or a number; else ValueError."""
    if isinstance(value, bool):
        raise ValueError(f"not a duration: {value!r}")
    if isinstance(value, int | float):
        seconds = float(value)
    else:
        match = _DURATION.fullmatch(value)
        if match is None:
            raise ValueError(f"not a duration: {value!r} (use e.g. 30s, 500ms, 2m)")
        seconds = float(match.group(1)) * _UNIT_SECONDS[match.group(2)]
    if not math.isfinite(seconds) or seconds < 0:
        raise ValueError(f"not a duration: {value!r}")
    return seconds


def parse_signal(value: str | int) -> signals_module.Signals:
    """A signal from `"SIGHUP"`, `"hup"` or a number; ValueError for an unknown one."""
    if isinstance(value, int) and not isinstance(value, bool):
        try:
            return signals_module.Signals(value)
        except ValueError:
            raise ValueError(f"unknown signal number {value}") from None
    if not isinstance(value, str):
        raise ValueError(f"not a signal: {value!r}")
    name = value.strip().upper()
    if not name.startswith("SIG"):
        name = "SIG" + name
    try:
        return signals_module.Signals[name]
    except KeyError:
        raise ValueError(f"unknown signal {value!r} (use e.g. SIGHUP)") from None


def _check_events(events: frozenset[str]) -> None:
    if not events:
        raise ValueError("events must name at least one event type")
    unknown = sorted(events - EVENT_TYPES)
    if unknown:
        raise ValueError(f"unknown event types {unknown}; known: {sorted(EVENT_TYPES)}")


@dataclass(frozen=True)
class HookSpec:
    """A command run on each of `events`, killed after `timeout` seconds."""

    events: frozenset[str]
    command: tuple[str, ...]
    timeout: float = 30.0

    def __post_init__(self) -> None:
        _check_events(self.events)
        if not self.command or not all(isinstance(a, str) and a for a in self.command):
            raise ValueError("command must be a non-empty list of non-empty strings")
        if not (math.isfinite(self.timeout) and self.timeout > 0):
            raise ValueError("timeout must be a positive duration")


@dataclass(frozen=True)
class SignalSpec:
    """`signal` sent on each of `events` to the process named in `pid_file`."""

    pid_file: Path
    signal: signals_module.Signals
    events: frozenset[str]

    def __post_init__(self) -> None:
        _check_events(self.events)
