"""`python -m gastown_cloud serve …` and the `gastown-cloud` command.

Like the daemon's entry (`gastown_sandboxd.__main__`), it hides rich, click and pygments before
importing: httpx would load its own command line with them whenever they are installed.
Measured on 2 cores with all three installed: `import gastown_cloud.cli` 270 → 197 ms of CPU,
on every `gastown-cloud` command and server start. It imports with the garbage collector
paused: both entries run through `gastown_sandboxd.__main__.run_entry`.
"""

from __future__ import annotations

from gastown_sandboxd.__main__ import run_entry


def main() -> int:
    return run_entry("gastown_cloud.cli")


if __name__ == "__main__":
    raise SystemExit(main())
