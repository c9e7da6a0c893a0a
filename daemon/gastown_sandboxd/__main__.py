"""`python -m gastown_sandboxd` and the `gastown-sandboxd` command.

Before anything else is imported, the entry hides three packages the daemon never uses but its
libraries load whenever they happen to be installed: httpx imports its own command line
(click, rich, pygments) and structlog its rich tracebacks. Hidden, each import falls back as
the library intends (httpx without its CLI, structlog with plain tracebacks). Measured on a
2-core machine with all three installed: `import gastown_sandboxd.cli` 228 → 141 ms of CPU,
the daemon's whole import 422 → 350 ms, on every start of the daemon and of each command.
Only this entry does it: a program that imports the package keeps its own modules. The
entry, and `run` for the daemon's modules, import with the garbage collector paused
(`_lazy.imports_without_gc`).
"""

from __future__ import annotations

import importlib
import sys

from gastown_sandboxd._lazy import imports_without_gc

NEVER_USED = ("rich", "click", "pygments")


def hide_never_used() -> None:
    """Make `NEVER_USED` unimportable in this process (unless already imported)."""
    for name in NEVER_USED:
        if name not in sys.modules:
            sys.modules[name] = None  # type: ignore[assignment]  # Python's "not importable"


def run_entry(cli: str) -> int:
    """What a process entry does: hide `NEVER_USED`, import the command line module `cli`
    with the collector paused, and return what its `main()` returns. The cloud's entry
    (`gastown_cloud.__main__`) runs its own command line through it."""
    hide_never_used()
    with imports_without_gc():
        module = importlib.import_module(cli)
    code: int = module.main()
    return code


def main() -> int:
    return run_entry("gastown_sandboxd.cli")


if __name__ == "__main__":
    raise SystemExit(main())
