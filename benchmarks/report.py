"""Benchmark output: a terminal table, and JSON / CSV files whose every row names its GPU, its
torch / triton versions and its date (the Environment fields), so a number never travels alone.

In a CPU smoke run the table's title and its time columns say "CPU smoke", and the JSON file's
`environment.mode` is "cpu-smoke": such numbers are never GPU figures.
"""
from __future__ import annotations

import csv
import json
import math
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from .environment import Environment


@dataclass(frozen=True)
class Column:
    key: str
    header: str
    fmt: Callable[[object], str] = str


def number(digits: int = 3) -> Callable[[object], str]:
    """A float with `digits` significant digits; '-' for a missing value."""
    def fmt(value) -> str:
        if value is None or (isinstance(value, float) and math.isnan(value)):
            return "-"
        return f"{value:.{digits}g}"
    return fmt


def percent(value) -> str:
    return "-" if value is None else f"{100 * value:.1f}%"


def times(value) -> str:
    return "-" if value is None else f"{value:.2f}x"


def text(value) -> str:
    """Free text, clipped for the terminal (the JSON and CSV files keep it whole)."""
    value = "" if value is None else str(value)
    return value if len(value) <= 100 else value[:97] + "..."


def format_table(rows: list[dict], columns: list[Column]) -> str:
    cells = [[c.header for c in columns]] + [[c.fmt(row.get(c.key)) for c in columns] for row in rows]
    widths = [max(len(line[i]) for line in cells) for i in range(len(columns))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(line, widths)).rstrip() for line in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def print_report(title: str, env: Environment, rows: list[dict], columns: list[Column], notes: list[str] = (),
                 file=None):
    file = file or sys.stdout
    print(f"\n{title}\n{env.banner()}", file=file)
    for note in notes:
        print(f"  {note}", file=file)
    print(format_table(rows, columns), file=file)
    if env.mode == "cpu-smoke":
        print("(CPU smoke timings: they check that every path runs; they are not GPU figures)", file=file)


def _finite(value):
    """JSON has no NaN/inf: a missing or non-finite number is written as null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def write_json(path: str | Path, benchmark: str, env: Environment, rows: list[dict], extra: dict | None = None):
    document = {"benchmark": benchmark, "environment": env.fields(), **(extra or {}),
                "rows": [{k: _finite(v) for k, v in row.items()} for row in rows]}
    # Written aside and renamed: a run killed mid-write (gpu_check's time caps) leaves the last whole file.
    staging = Path(f"{path}.partial")
    staging.write_text(json.dumps(document, indent=1, allow_nan=False) + "\n")
    os.replace(staging, path)


def write_csv(path: str | Path, rows: list[dict]):
    keys: list[str] = []
    for row in rows:
        keys += [k for k in row if k not in keys]
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=keys)
        writer.writeheader()
        writer.writerows({k: _finite(v) for k, v in row.items()} for row in rows)
