"""What crash safety costs a multi-file change: the intent journal and descriptor-relative writes.

In this process, on the same file system, the four settings files of a town (the town's and
three rigs') are changed again and again, alternating between two versions:
- baseline: four `write_atomic` calls by path, one after another (each atomic, the set not);
- `write_all` of the four files: descriptor walk from the town root, re-read of each file,
  the journal written and fsynced, four atomic writes, the journal removed;
- `write_all` of one file (no journal: one rename is atomic), against one `write_atomic`.

`python -m bench.journal_bench [--quick]`; `run(quick)` gives the rows to `python -m bench`.
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from tests.daemon.gt_samples import RIG_SETTINGS, TOWN_SETTINGS, build_town

from gastown_sandboxd.atomic import write_atomic
from gastown_sandboxd.gtsettings.batch import FileWrite, write_all

from ._stats import percentile
from ._table import Row, main_of

RIGS = ("backend", "docs", "frontend")
FILE = Path("settings") / "config.json"


def _versions(data: bytes) -> tuple[bytes, bytes]:
    return data, data.replace(b'"version": 1', b'"version": 1,\n  "bench": true', 1)


def _timed(step: Callable[[int], None], count: int) -> list[float]:
    latencies = []
    for n in range(count):
        began = time.perf_counter()
        step(n)
        latencies.append((time.perf_counter() - began) * 1000)
    return latencies


def run(quick: bool) -> list[Row]:
    count = 200 if quick else 1000
    town = _versions(TOWN_SETTINGS)
    rig = _versions(RIG_SETTINGS)
    with tempfile.TemporaryDirectory(prefix="journal-bench-") as tmp:
        root = build_town(Path(tmp) / "town", rigs=RIGS)
        paths = [root / FILE, *(root / name / FILE for name in RIGS)]

        def by_path(n: int) -> None:
            for path, versions in zip(paths, [town, rig, rig, rig], strict=True):
                write_atomic(path, versions[(n + 1) % 2])

        def journaled(n: int) -> None:
            old, new = n % 2, (n + 1) % 2
            writes = [FileWrite(None, town[new], town[old])]
            writes += [FileWrite(name, rig[new], rig[old]) for name in RIGS]
            write_all(root, writes)

        def one_by_path(n: int) -> None:
            write_atomic(paths[0], town[(n + 1) % 2])

        def one(n: int) -> None:
            write_all(root, [FileWrite(None, town[(n + 1) % 2], town[n % 2])])

        # An even count leaves every file at version 0, where the next run starts.
        baseline = _timed(by_path, count)
        four = _timed(journaled, count)
        single_baseline = _timed(one_by_path, count)
        single = _timed(one, count)
    b50, b99 = percentile(baseline, 50), percentile(baseline, 99)
    s50 = percentile(single_baseline, 50)
    return [
        Row("4 files by write_atomic p50 (baseline)", b50, "ms", note=f"{count} changes, fsync"),
        Row("4 files by write_atomic p99 (baseline)", b99, "ms"),
        Row("4 files by write_all p50", percentile(four, 50), "ms", b50,
            note="journal, descriptor walk, re-read"),
        Row("4 files by write_all p99", percentile(four, 99), "ms", b99),
        Row("1 file by write_atomic p50 (baseline)", s50, "ms"),
        Row("1 file by write_all p50", percentile(single, 50), "ms", s50, note="no journal"),
    ]  # fmt: skip


if __name__ == "__main__":
    quick = "200 changes each, not 1,000"
    raise SystemExit(main_of(run, name="journal_bench", doc=__doc__, quick=quick, title="journal"))
