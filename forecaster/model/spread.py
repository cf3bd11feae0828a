"""A stream's spread: the smoothed size of its recent one-step changes (numpy only).

Why: a constant prediction interval ``[y + lower, y + upper]``, calibrated on the validation
part, under-covers wherever a stream is more volatile than that part was (held out, a 90 %
interval covered 0.51-0.54 of the readings of three quarterly macro series whose last years were
rougher) and is needlessly wide where it is calmer. Dividing each validation residual by the
stream's spread when the prediction was made, calibrating those, and multiplying back gives an
interval that widens and narrows with the stream (0.83-0.90 on those three series; the
measurements are in ``benchmarks/README.md``, "Intervals that follow each stream's spread").

The spread is an exponentially weighted mean of the absolute one-step change::

    s_t = (1 - w) s_{t-1} + w |x_t - x_{t-1}|

with ``w`` = :data:`WEIGHT` (about the last eight changes). A stream starts at ``start``, the
training part's typical change, so a new stream (or one just reset) starts with the constant
interval; a reading with no previous one leaves the spread where it was. Training, ``evaluate``
and the daemon all compute it with the functions here, so their bounds agree.
"""

from __future__ import annotations

import math

import numpy as np

#: Weight of the newest change: 2 / (8 + 1), an exponential mean "over about 8" changes.
WEIGHT = 2.0 / 9.0
#: The smallest spread an interval is scaled by, as a fraction of the starting spread.
FLOOR = 0.1


def advance(
    spread: np.ndarray | float,
    previous: np.ndarray | float,
    value: np.ndarray | float,
    weight: float,
) -> np.ndarray:
    """One step for many streams: the spread after ``value``, whose stream's previous reading
    was ``previous`` (NaN: none, the spread stays)."""
    change = np.abs(np.asarray(value, dtype=np.float64) - previous)
    return np.where(np.isfinite(change), (1.0 - weight) * spread + weight * change, spread)


def along(values: np.ndarray, start: float, weight: float, previous: float = np.nan) -> np.ndarray:
    """The spread after each reading of one stream (``out[k]`` after ``values[k]``: what an
    interval made after reading ``k`` is scaled by), from spread ``start`` with ``previous``
    the reading before them (NaN: none, a stream's start). Plain floats, one reading at a
    time: the same arithmetic as :func:`advance`, in the same order, so the results are equal
    bit for bit (tested), and faster than numpy on one stream."""
    out = np.empty(len(values))
    s = float(start)
    keep = 1.0 - weight
    for k, x in enumerate(np.asarray(values, dtype=np.float64).tolist()):
        change = abs(x - previous)
        if math.isfinite(change):
            s = keep * s + weight * change
        out[k] = s
        previous = x
    return out


def rows(grid: np.ndarray, previous: np.ndarray, spread: np.ndarray, weight: float) -> np.ndarray:
    """:func:`along` for a padded batch: ``grid`` ``[R, T]`` (row ``r``'s readings, then
    padding), each row's reading before them (``previous``, NaN: none) and its spread then →
    ``[R, T]`` (at padded steps meaningless). One vector step per column."""
    if grid.shape[0] == 1:  # one busy stream: its readings in plain floats
        return along(grid[0], float(spread[0]), weight, float(previous[0]))[None, :]
    out = np.empty(grid.shape, dtype=np.float64)
    s = np.asarray(spread, dtype=np.float64)
    prev = np.asarray(previous, dtype=np.float64)
    for t in range(grid.shape[1]):
        col = grid[:, t]
        s = advance(s, prev, col, weight)
        out[:, t] = s
        prev = col
    return out


def resumed(stored: np.ndarray, start: float) -> np.ndarray:
    """The spreads a state store holds (NaN: none yet, a new or reset stream), with ``start``
    where there is none."""
    return np.where(np.isnan(stored), start, stored)


def unit(spread: np.ndarray | float, start: float) -> np.ndarray:
    """What an interval's offsets are multiplied by: the spread, but at least :data:`FLOOR` of
    ``start``, so a stream that sat still for a while (spread near 0) does not get an interval
    of zero width, nor a validation residual divided by almost nothing."""
    return np.maximum(spread, FLOOR * start)


def typical(segments: list[np.ndarray]) -> float:
    """The median absolute one-step change inside the segments (where a new stream's spread
    starts); 1.0 when there is no change to measure, a floor when every change is zero."""
    changes = [np.abs(np.diff(np.asarray(s, dtype=np.float64))) for s in segments if len(s) > 1]
    c = np.concatenate(changes) if changes else np.array([])
    c = c[np.isfinite(c)]
    if not c.size:
        return 1.0
    med = float(np.median(c))
    if med > 0:
        return med
    mean = float(np.mean(c))
    return mean if mean > 0 else 1.0
