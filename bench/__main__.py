"""`make bench`: every benchmark of the project, then one table of all their figures.

`python -m bench [--quick] [NAME ...]`; NAME is a module of this folder (idle_bench,
watcher_bench, daemon_bench, agents_bench, patch_bench, events_bench, load_bench,
short_token_bench, fleet, journal_bench, ops_bench, cloud_bench). Figures are printed, never
asserted.
"""

from __future__ import annotations

import argparse
import importlib
import os
import platform
import time

from ._table import Row, print_table

BENCHES = (
    "idle_bench",
    "watcher_bench",
    "daemon_bench",
    "agents_bench",
    "patch_bench",
    "events_bench",
    "load_bench",
    "short_token_bench",
    "fleet",
    "journal_bench",
    "ops_bench",
    "cloud_bench",
)


def machine() -> str:
    return (
        f"{platform.system()} {platform.machine()}, {os.cpu_count()} CPUs ({_cpu_model()}), "
        f"Python {platform.python_version()}"
    )


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as info:
            for line in info:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="shorter runs (CPU windows 10 s)")
    parser.add_argument("names", nargs="*", metavar="NAME", help=", ".join(BENCHES))
    args = parser.parse_args()
    names = args.names or list(BENCHES)
    unknown = sorted(set(names) - set(BENCHES))
    if unknown:
        parser.error(f"unknown bench {unknown[0]!r}; choose from {', '.join(BENCHES)}")
    everything: list[Row] = []
    started = time.monotonic()
    for name in names:
        module = importlib.import_module(f"bench.{name}")
        print(f"\n### {name}", flush=True)
        rows: list[Row] = list(module.run(quick=args.quick))
        print_table(rows, title=name)
        everything.extend(
            Row(f"{name}: {r.name}", r.value, r.unit, r.baseline, r.note) for r in rows
        )
    print(f"\n# All figures — {machine()}; {time.monotonic() - started:.0f} s in all")
    print_table(everything)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
