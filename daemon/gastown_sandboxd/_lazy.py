"""What importing costs: faces that load their modules on first use (PEP 562's module
`__getattr__`), imports without the cyclic garbage collector, and an exit without the
interpreter's tear-down of what was imported.

A room whose names are reached from light entries (an agent start, a `status` command) uses
a lazy face, so that importing the room costs nothing until a name is used.
"""

from __future__ import annotations

import contextlib
import gc
import importlib
import os
import sys
from collections.abc import Callable, Iterator, Mapping
from typing import Any, NoReturn


def lazy_names(package: str, where: Mapping[str, str]) -> Callable[[str], Any]:
    """A module `__getattr__` for `package`: name → the attribute of `package.where[name]`."""

    def getattr_(name: str) -> Any:
        module = where.get(name)
        if module is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        return getattr(importlib.import_module(f"{package}.{module}"), name)

    return getattr_


@contextlib.contextmanager
def imports_without_gc() -> Iterator[None]:
    """Import with the cyclic garbage collector paused, then freeze what is alive.

    Importing the daemon makes ~72,000 objects that live as long as the process (modules,
    classes, functions), and the automatic collections it triggers on the way (97 young and 8
    middle ones) walk them for almost nothing: 638 objects found. Measured on 2 cores, median
    of 16 interleaved starts: the daemon's imports took 263 ms of CPU with the collector, 248
    without. `gc.freeze()` then moves everything alive to the permanent generation, so no
    later full collection walks it either. The cost: the ~680 objects of garbage cycles the
    imports left are frozen with the rest and never freed. For process entries only; the
    collector is left as it was found (a disabled one stays disabled).
    """
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        gc.freeze()
        if enabled:
            gc.enable()


def exit_without_teardown(code: int) -> NoReturn:
    """Flush logging and the standard streams, then leave at once (`os._exit`).

    For process entries whose work is done, their files written and closed. The interpreter's
    tear-down of every module is what it skips: ~110 ms after the daemon's ~300 modules (and
    several times that on a loaded host, bench/ops_bench.py), 9.5 ms of a helper call's
    69.5 ms of CPU after the light entry's (A/B on 2 cores). A supervisor, a shim or Claude
    Code waits for the process, not for that. A stream that cannot be flushed is passed over.
    """
    logging = sys.modules.get("logging")
    if logging is not None:
        logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(OSError, ValueError):
            stream.flush()
    os._exit(code)
