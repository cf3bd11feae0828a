"""CSV time series: parsing, gap splitting and scoring, shared by training and evaluation.

The same loader feeds ``train`` and ``evaluate`` so that both see the same rows, the same stream
names and the same segment boundaries. A missing value ends a segment: the daemon would see no
reading there, and a stream's state is reset at the start of every segment.
"""

from __future__ import annotations

import csv
import hashlib
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import numpy as np

from forecaster.errors import DataError

MISSING = frozenset({"", "na", "nan", "null", "none", "n/a", "-"})


@dataclass
class Series:
    """One stream: its readings in time order, split into segments at missing values.

    ``values`` holds every row of the stream (NaN where missing); ``rows`` the CSV data-row
    index (0-based, header excluded) of each; ``times`` epoch seconds or None; ``labels`` the 0/1
    event label of each reading (NaN where missing) when a label column was read, else None.
    """

    name: str
    values: np.ndarray
    rows: np.ndarray
    times: np.ndarray | None
    labels: np.ndarray | None = None

    def head(self, end: int) -> Series:
        """The first ``end`` readings."""
        return Series(
            self.name,
            self.values[:end],
            self.rows[:end],
            None if self.times is None else self.times[:end],
            None if self.labels is None else self.labels[:end],
        )

    def segments(self) -> list[tuple[int, int]]:
        """Half-open index ranges of consecutive finite values, in order."""
        finite = np.isfinite(self.values)
        out: list[tuple[int, int]] = []
        start: int | None = None
        for i, ok in enumerate(finite):
            if ok and start is None:
                start = i
            elif not ok and start is not None:
                out.append((start, i))
                start = None
        if start is not None:
            out.append((start, len(finite)))
        return out

    def __len__(self) -> int:
        return len(self.values)


@dataclass
class Dataset:
    """Every series read from one CSV, with what identifies the file."""

    source: str
    sha256: str
    series: list[Series]
    columns: list[str]
    time_column: str | None
    stream_column: str | None
    rows: int = field(default=0)
    label_column: str | None = None


# Plain numbers are read as epoch seconds only where no other reading is plausible: from
# 2001-09-09 (1e9) up to 1e11 (beyond that it is milliseconds or nanoseconds). Below, 19580329
# is a YYYYMMDD date and 1700 a year as much as they are seconds after 1970, so guessing would
# silently put the data in January 1970; --time-format says what they are.
EPOCH_MIN = 1e9
EPOCH_MAX = 1e11
TIME_FORMAT_HELP = (
    "time format: a strptime pattern (e.g. %Y%m%d, %m/%d/%Y, '%Y-%m-%d %H:%M'; naive = UTC), "
    "'epoch' (seconds since 1970) or 'iso' (ISO 8601); default: ISO 8601 or epoch seconds "
    "from 2001 on, anything else is refused"
)


class TimeFormatError(ValueError):
    """A time cell that cannot be read, or could be read in more than one way."""


def parse_time(text: str, fmt: str | None = None) -> float:
    """Epoch seconds from one time cell.

    ``fmt`` None detects: ISO 8601 (offsets and ``Z`` honoured, naive = UTC) or a number of
    epoch seconds in [1e9, 1e11); any other number is refused as ambiguous rather than guessed.
    ``"epoch"`` reads any finite number as seconds, ``"iso"`` only ISO 8601, and anything else
    is a :func:`datetime.strptime` pattern (naive results are UTC; ``%z`` is honoured).
    """
    text = text.strip()
    if fmt is None or fmt == "epoch":
        try:
            value = float(text)
        except ValueError:
            if fmt == "epoch":
                raise TimeFormatError(f"{text!r} is not a number of epoch seconds") from None
        else:
            if not math.isfinite(value):
                raise TimeFormatError(f"{text!r} is not a finite time")
            if fmt is None and not EPOCH_MIN <= abs(value) < EPOCH_MAX:
                raise TimeFormatError(
                    f"{text!r} is ambiguous (a date like YYYYMMDD? a year? epoch seconds?): "
                    "say which with --time-format (e.g. %Y%m%d, %Y or epoch)"
                )
            return value
    if fmt is None or fmt == "iso":
        try:
            stamp = datetime.fromisoformat(
                text.replace("Z", "+00:00") if text.endswith("Z") else text
            )
        except ValueError:
            raise TimeFormatError(
                f"{text!r} is not ISO 8601 or epoch seconds: say how to read it with "
                "--time-format (e.g. %m/%d/%Y)"
            ) from None
    else:
        try:
            stamp = datetime.strptime(text, fmt)
        except ValueError:
            raise TimeFormatError(f"{text!r} does not match --time-format {fmt!r}") from None
    if stamp.tzinfo is None:
        stamp = stamp.replace(tzinfo=UTC)
    return stamp.timestamp()


def _cell_value(text: str, row: int, column: str) -> float:
    if text.strip().lower() in MISSING:
        return math.nan
    try:
        value = float(text)
    except ValueError:
        raise DataError(f"row {row} column {column!r}: {text!r} is not a number") from None
    return value if math.isfinite(value) else math.nan


def _resolve(header: Sequence[str], name: str, what: str) -> int:
    if name in header:
        return header.index(name)
    raise DataError(f"{what} {name!r} not found; the file has columns {', '.join(header)}")


def load_csv(
    path: str | Path,
    columns: Sequence[str] | None = None,
    time_column: str | None = None,
    stream_column: str | None = None,
    header: bool = True,
    label_column: str | None = None,
    time_format: str | None = None,
) -> Dataset:
    """Read a CSV into series.

    Wide format: each value column is one series (a global model learns them all). Long format
    (``stream_column``): one value column, one series per distinct stream id, in file order.
    Without a header, columns are named by their 0-based position (``"0"``, ``"1"``, …).
    ``label_column`` holds a 0/1 event label per row (blank = unknown), kept beside the values.
    ``time_format`` says how to read the time column (see :func:`parse_time`).
    """
    path = Path(path)
    try:
        blob = path.read_bytes()
    except FileNotFoundError:
        raise DataError(f"{path}: no such file") from None
    except OSError as exc:
        raise DataError(f"{path}: cannot read ({exc.strerror})") from None
    try:
        text = blob.decode("utf-8-sig")
    except UnicodeDecodeError:
        raise DataError(f"{path}: not UTF-8 text") from None
    table = [r for r in csv.reader(text.splitlines()) if r and any(c.strip() for c in r)]
    if not table:
        raise DataError(f"{path}: no rows")
    if header:
        names = [c.strip() for c in table[0]]
        body = table[1:]
    else:
        names = [str(i) for i in range(len(table[0]))]
        body = table
    if not body:
        raise DataError(f"{path}: no data rows")
    t_idx = _resolve(names, time_column, "time column") if time_column else None
    s_idx = _resolve(names, stream_column, "stream column") if stream_column else None
    l_idx = _resolve(names, label_column, "label column") if label_column else None
    if columns:
        value_names = list(columns)
    else:
        candidates = [n for i, n in enumerate(names) if i not in (t_idx, s_idx, l_idx)]
        if len(candidates) != 1:
            raise DataError(
                f"{path}: say which value column to use with --column (candidates: "
                f"{', '.join(candidates)})"
            )
        value_names = candidates
    if stream_column and len(value_names) != 1:
        raise DataError("long format (--stream-column) takes exactly one --column")
    v_idx = [_resolve(names, n, "column") for n in value_names]
    width = len(names)
    for i, r in enumerate(body):
        if len(r) < width:
            raise DataError(f"{path}: row {i} has {len(r)} fields, the header has {width}")

    times: np.ndarray | None = None
    if t_idx is not None:
        stamps = []
        for i, r in enumerate(body):
            try:
                stamps.append(parse_time(r[t_idx], time_format))
            except ValueError as exc:
                raise DataError(f"{path}: row {i} time column {time_column!r}: {exc}") from None
        times = np.array(stamps, dtype=np.float64)
    row_ids = np.arange(len(body))
    labels: np.ndarray | None = None
    if l_idx is not None and label_column is not None:
        labels = np.array([_cell_label(r[l_idx], i, label_column) for i, r in enumerate(body)])

    series: list[Series] = []
    if s_idx is None:
        for name, idx in zip(value_names, v_idx, strict=True):
            vals = np.array([_cell_value(r[idx], i, name) for i, r in enumerate(body)])
            series.append(Series(name, vals, row_ids, times, labels))
    else:
        groups: dict[str, list[int]] = {}
        for i, r in enumerate(body):
            groups.setdefault(r[s_idx].strip(), []).append(i)
        for name, members in groups.items():
            rows = np.array(members)
            vals = np.array([_cell_value(body[i][v_idx[0]], i, value_names[0]) for i in members])
            series.append(
                Series(
                    name,
                    vals,
                    rows,
                    None if times is None else times[rows],
                    None if labels is None else labels[rows],
                )
            )
    if times is not None:
        series = [_time_ordered(s) for s in series]
    return Dataset(
        source=path.name,
        sha256=hashlib.sha256(blob).hexdigest(),
        series=series,
        columns=value_names,
        time_column=time_column,
        stream_column=stream_column,
        rows=len(body),
        label_column=label_column,
    )


def _cell_label(text: str, row: int, column: str) -> float:
    value = _cell_value(text, row, column)
    if value == value and value not in (0.0, 1.0):
        raise DataError(f"row {row} label column {column!r}: {text!r} is not 0 or 1")
    return value


def _time_ordered(s: Series) -> Series:
    """Sort by time and drop repeated timestamps, as the daemon drops duplicates."""
    if s.times is None:
        return s
    order = np.argsort(s.times, kind="stable")
    times = s.times[order]
    keep = np.ones(len(order), dtype=bool)
    keep[1:] = np.diff(times) > 0
    order = order[keep]
    labels = None if s.labels is None else s.labels[order]
    return Series(s.name, s.values[order], s.rows[order], s.times[order], labels)


def cut_index(s: Series, point: str | None) -> int:
    """Index into ``s`` of the first reading at or after ``point`` (a row index or a time)."""
    if point is None:
        return len(s)
    text = point.strip()
    if text.lstrip("-").isdigit():
        return int(np.searchsorted(s.rows, int(text), side="left"))
    if s.times is None:
        raise DataError(f"{point!r} is not a row index and the data has no --time-column")
    try:
        when = parse_time(text)
    except ValueError:
        raise DataError(
            f"{point!r} is neither a row index nor a time (ISO 8601 or epoch seconds)"
        ) from None
    return int(np.searchsorted(s.times, when, side="left"))


@dataclass(frozen=True)
class Score:
    """One-step accuracy of a model next to persistence over the same targets."""

    rmse: float
    mae: float
    mase: float
    naive_rmse: float
    naive_mae: float
    n: int

    def as_dict(self) -> dict[str, float | int]:
        return {
            "rmse": self.rmse,
            "mae": self.mae,
            "mase": self.mase,
            "naive_rmse": self.naive_rmse,
            "naive_mae": self.naive_mae,
            "skill": 1.0 - self.rmse / self.naive_rmse if self.naive_rmse > 0 else 0.0,
            "n": self.n,
        }


def score(
    actual: np.ndarray, predicted: np.ndarray, naive: np.ndarray, scale_diffs: Iterable[float]
) -> Score:
    """RMSE, MAE and MASE of ``predicted`` and of ``naive`` against ``actual``.

    MASE divides the MAE by the mean absolute one-step change in ``scale_diffs`` (the in-sample
    history before the scored part, per Hyndman & Koehler), so 1.0 means "as good as persistence
    was in sample".
    """
    if len(actual) == 0:
        raise DataError("nothing to score: no prediction falls after the warm-up and start point")
    err = predicted - actual
    nerr = naive - actual
    diffs = np.asarray(list(scale_diffs), dtype=np.float64)
    scale = float(np.mean(np.abs(diffs))) if diffs.size else float(np.mean(np.abs(nerr)))
    mae = float(np.mean(np.abs(err)))
    return Score(
        rmse=float(np.sqrt(np.mean(err**2))),
        mae=mae,
        mase=mae / scale if scale > 0 else math.inf,
        naive_rmse=float(np.sqrt(np.mean(nerr**2))),
        naive_mae=float(np.mean(np.abs(nerr))),
        n=len(actual),
    )
