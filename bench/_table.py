"""Plain-text output shared by the benches: a padded table, a proportional bar, and the
`python -m bench.NAME [--quick]` entry point of one bench."""

from __future__ import annotations

import argparse
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass


def table(headers: Sequence[str], rows: Iterable[Sequence[object]]) -> str:
    """Columns padded to their widest cell; numbers right-aligned, text left-aligned."""
    cells = [[str(h) for h in headers]] + [[_cell(v) for v in row] for row in rows]
    widths = [max(len(row[col]) for row in cells) for col in range(len(headers))]
    numeric = [all(_is_number(row[col]) for row in cells[1:]) for col in range(len(headers))]
    lines = []
    for index, row in enumerate(cells):
        padded = [
            cell.rjust(width) if numeric[col] else cell.ljust(width)
            for col, (cell, width) in enumerate(zip(row, widths, strict=True))
        ]
        lines.append("  ".join(padded).rstrip())
        if index == 0:
            lines.append("  ".join("-" * width for width in widths))
    return "\n".join(lines)


def bar(value: float, full: float, width: int = 50) -> str:
    """`value` as a run of '#' out of `width` for `full` (at least one mark when above 0)."""
    if full <= 0 or value <= 0:
        return ""
    return "#" * max(1, round(width * min(value, full) / full))


def _cell(value: object) -> str:
    if isinstance(value, float):
        return f"{value:,.2f}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def _is_number(text: str) -> bool:
    return text.replace(",", "").replace(".", "", 1).lstrip("-").isdigit()


@dataclass(frozen=True)
class Row:
    """One measured figure, with the baseline measured in the same run where there is one."""

    name: str
    value: float
    unit: str
    baseline: float | None = None
    note: str = ""


def print_table(rows: Sequence[Row], title: str | None = None) -> None:
    """Print `rows` as one table: figure, value, unit, baseline, ratio, note."""
    if title:
        print(f"\n== {title} ==")
    body = [
        (
            row.name,
            row.value,
            row.unit,
            "" if row.baseline is None else row.baseline,
            "" if not row.baseline else f"{row.value / row.baseline:.2f}x",
            row.note,
        )
        for row in rows
    ]
    print(table(("figure", "value", "unit", "baseline", "ratio", "note"), body), flush=True)


def main_of(
    run: Callable[[bool], Sequence[Row]], *, name: str, doc: str | None, quick: str, title: str
) -> int:
    """`python -m bench.{name} [--quick]`: parse the flag, print `run(quick)` as one table."""
    parser = argparse.ArgumentParser(prog=f"python -m bench.{name}", description=doc)
    parser.add_argument("--quick", action="store_true", help=quick)
    args = parser.parse_args()
    print_table(run(args.quick), title=title)
    return 0
