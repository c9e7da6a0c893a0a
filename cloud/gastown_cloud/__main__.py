"""`python -m gastown_cloud serve …` and the `gastown-cloud` command.

Like the daemon's entry (`gastown_sandboxd.__main__`), it hides rich, click and pygments before
importing: httpx would load its own command line with them whenever they are installed.
Measured on 2 cores with all three installed: `import gastown_cloud.cli` 270 → 197 ms of CPU,
on every `gastown-cloud` command and server start. It imports with the garbage collector
paused, as the daemon's entry does (`gastown_sandboxd._lazy.imports_without_gc`).
"""

from __future__ import annotations

from gastown_sandboxd.__main__ import hide_never_used
from gastown_sandboxd._lazy import imports_without_gc


def main() -> int:
    hide_never_used()
    with imports_without_gc():
        from gastown_cloud.cli import main as cli_main

    return cli_main()


if __name__ == "__main__":
    raise SystemExit(main())
