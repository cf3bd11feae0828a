"""Which series a CSV in ``data/`` holds, and the flags that read it: no per-file table to keep.

Rules, from the first rows of each file: a header exists when a cell of the first row is neither
a number nor a time; a column of ISO 8601 times is the time column; a column named ``label``, or
holding only 0/1, is a label (skipped); a column of consecutive integers is a row counter
(skipped); every other numeric column is one univariate series.
"""

from __future__ import annotations

import csv
import itertools
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

SNIFF_ROWS = 200


@dataclass(frozen=True)
class SeriesSpec:
    """One series of the benchmark: a file, its value column and how to read the file."""

    path: Path
    column: str
    time_column: str | None
    header: bool
    rows: int

    @property
    def name(self) -> str:
        return f"{self.path.stem}:{self.column}"

    def read_flags(self) -> list[str]:
        """The flags that only say how to read the file (the same for train and evaluate)."""
        flags = ["--column", self.column]
        if self.time_column is not None:
            flags += ["--time-column", self.time_column]
        if not self.header:
            flags.append("--no-header")
        return flags


def _number(text: str) -> float | None:
    try:
        return float(text)
    except ValueError:
        return None


def _iso_time(text: str) -> bool:
    if _number(text) is not None:
        return False
    try:
        datetime.fromisoformat(text.strip().replace("Z", "+00:00"))
    except ValueError:
        return False
    return True


def discover_file(path: Path) -> list[SeriesSpec]:
    """The series of one CSV file, by the module's rules (empty when it has none)."""
    with path.open(newline="", encoding="utf-8-sig") as fh:
        table = [r for r in csv.reader(fh) if r and any(c.strip() for c in r)]
    if not table:
        return []
    first = [c.strip() for c in table[0]]
    header = any(_number(c) is None and not _iso_time(c) for c in first)
    names = first if header else [str(i) for i in range(len(first))]
    body = table[1:] if header else table
    sample = body[:SNIFF_ROWS]
    time_column: str | None = None
    values: list[str] = []
    for i, name in enumerate(names):
        cells = [r[i].strip() for r in sample if i < len(r) and r[i].strip()]
        if not cells:
            continue
        if all(_iso_time(c) for c in cells):
            time_column = time_column or name
            continue
        numbers = [_number(c) for c in cells]
        if any(v is None for v in numbers):
            continue
        nums = [float(v) for v in numbers if v is not None]
        if name.lower() == "label" or set(nums) <= {0.0, 1.0}:
            continue
        if all(b - a == 1 for a, b in itertools.pairwise(nums)):
            continue
        values.append(name)
    return [SeriesSpec(path, v, time_column, header, len(body)) for v in values]


def discover(data_dir: Path) -> list[SeriesSpec]:
    """Every series of every ``*.csv`` in ``data_dir``, files in name order."""
    out: list[SeriesSpec] = []
    for path in sorted(data_dir.glob("*.csv")):
        out.extend(discover_file(path))
    return out
