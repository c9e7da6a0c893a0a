"""`python -m gastown_sandboxd` and the `gastown-sandboxd` command.

Before anything else is imported, the entry hides modules the daemon never uses but its
libraries load whenever they happen to be installed: httpx imports its own command line
(click, rich, pygments) and structlog its rich tracebacks. Hidden, each import falls back as
the library intends (httpx without its CLI, structlog with plain tracebacks). Measured on a
2-core machine with all three installed: `import gastown_sandboxd.cli` 228 → 141 ms of CPU,
the daemon's whole import 422 → 350 ms, on every start of the daemon and of each command.
The daemon's entry also hides `bz2` and `lzma`, which `shutil` loads for archives (Starlette
imports `tempfile`, which imports `shutil`); nothing here makes an archive. A daemon's RSS
once ready, two sets of four starts: 37.46-37.61 → 37.14-37.34 MiB. The cloud's package has
imported `shutil` before its entry runs, so its entry hides only the first three.
Only this entry does it: a program that imports the package keeps its own modules. The
entry, and `run` for the daemon's modules, import with the garbage collector paused
(`_lazy.imports_without_gc`).

`exec` and `token` (what a legacy `exec_wrapper`, a script or a person runs) go straight to the
agents' light entry (`agents/exec.py`): the same grammar and code, without the daemon's imports.
Measured on 2 cores, CPU per `gastown-sandboxd exec -- true` (6 interleaved rounds of 25):
185 ms through the command line, 59 ms through the light entry.
"""

from __future__ import annotations

import importlib
import sys

from gastown_sandboxd._lazy import exit_without_teardown, imports_without_gc

NEVER_USED = ("rich", "click", "pygments")
DAEMON_NEVER_USED = (*NEVER_USED, "bz2", "lzma")
AGENT_COMMANDS = ("exec", "token")


def hide_never_used(names: tuple[str, ...] = NEVER_USED) -> None:
    """Make `names` unimportable in this process (unless already imported)."""
    for name in names:
        if name not in sys.modules:
            sys.modules[name] = None  # type: ignore[assignment]  # Python's "not importable"


def run_entry(cli: str, hidden: tuple[str, ...] = NEVER_USED) -> int:
    """What a process entry does: hide `hidden`, import the command line module `cli`
    with the collector paused, and return what its `main()` returns. The cloud's entry
    (`gastown_cloud.__main__`) runs its own command line through it."""
    hide_never_used(hidden)
    with imports_without_gc():
        module = importlib.import_module(cli)
    code: int = module.main()
    return code


def main() -> int:
    if sys.argv[1:2] and sys.argv[1] in AGENT_COMMANDS:
        from gastown_sandboxd.agents.exec import main as run_agent_command

        exit_without_teardown(run_agent_command())
    return run_entry("gastown_sandboxd.cli", DAEMON_NEVER_USED)


if __name__ == "__main__":
    raise SystemExit(main())
