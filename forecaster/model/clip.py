"""A reading far from its prediction enters the model clipped, so that one spike does not echo.

Why: the linear path's lags and the recurrent state carry every reading forward. A spike (a
sensor glitch, a labelled anomaly) is predicted badly once, which nothing can avoid, but it then
sits in the lags for as long as the line looks back, and every prediction it touches is off by a
share of it. On yahoo's held-out part one spike of ~4,000 among readings of a few hundred, and
its echoes, decided the score. The robust Holt-Winters of Gelper, Fried and Croux (2010) cleans
each reading before it updates the smoother: a reading farther than ``k`` scales from its
one-step forecast is replaced by the forecast plus (or minus) ``k`` scales. Here the scale is
the stream's spread (:mod:`forecaster.model.spread`, floored as an interval is), and ``k`` is the
manifest's ``clip``: chosen by training on the validation part, absent when clipping does not
help there (then nothing here runs).

Only what the model sees is clipped. The reading itself is what the prediction is scored
against, what the spread follows and what the daemon keeps as the stream's last value.

A level shift is not a spike: clipping every reading of a new level would hold the forecast back
for as long as the shift lasts. So **a reading right after a clipped one is never clipped**: a
shift costs one clipped reading, a one-reading spike is removed, a two-reading one halved.

The daemon's waves apply :func:`inputs` to one reading per stream. Where a model steps several
readings of a stream in one call (the daemon's sequence path, ``evaluate``, training's
validation), each row's first reading is clipped before the call and :func:`settle` clips the
later ones: the predictions after a clipped reading depend on it, so the row is run again from
there. :func:`segment` drives one stream's whole series through the same two steps.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from forecaster.model import spread

#: Steps the rows of a padded batch: ``x`` ``[R, T, 1]`` float64 (what the model sees: each
#: row's readings, then padding), ``lens`` ``[R]`` (each >= 1) and the states before them
#: (arrays ``[L, R, H]``) -> the predictions made after each reading (``[R, T]`` float64) and
#: the states after each row's last reading.
Rows = Callable[[np.ndarray, np.ndarray, list[np.ndarray]], tuple[np.ndarray, list[np.ndarray]]]

#: Readings per call of :func:`segment`. Each clip runs the rest of its chunk again, so this
#: bounds the extra work per clip.
CHUNK = 256


def limits(previous_spread: np.ndarray | float, start: float, k: float) -> np.ndarray:
    """How far a reading may lie from its prediction before it is clipped: ``k`` spreads, the
    spread taken when the prediction was made and floored as an interval's is."""
    return k * spread.unit(previous_spread, start)


def inputs(
    values: np.ndarray,
    predicted: np.ndarray,
    limit: np.ndarray,
    after_clip: np.ndarray | bool,
) -> tuple[np.ndarray, np.ndarray]:
    """What the model sees of each reading (many streams, one reading each), and which were
    clipped. ``predicted``: the stream's prediction for this reading (NaN: none, a new stream);
    ``after_clip``: whether its previous reading was clipped (then this one is not)."""
    v = np.asarray(values, dtype=np.float64)
    p = np.asarray(predicted, dtype=np.float64)
    can = np.isfinite(p) & ~np.asarray(after_clip, dtype=bool)
    with np.errstate(invalid="ignore"):
        seen = np.where(can, np.clip(v, p - limit, p + limit), v)
    return seen, seen != v


def settle(
    grid: np.ndarray,
    seen: np.ndarray,
    y: np.ndarray,
    new: list[np.ndarray],
    init: list[np.ndarray],
    lens: np.ndarray,
    clipped0: np.ndarray,
    limit: np.ndarray,
    run: Rows,
) -> tuple[np.ndarray, list[np.ndarray], np.ndarray, int]:
    """A padded batch's predictions and end states with every reading after each row's first
    clipped as one-at-a-time stepping would clip it.

    ``grid`` holds the readings ``[R, T]``, ``seen`` what the first call was given (each row's
    first reading already clipped where ``clipped0``), ``y``/``new`` that call's outputs from
    the states ``init``, ``limit[r, t]`` the limit for reading ``t + 1``. A row's predictions
    are exact up to the first reading that lies too far from its prediction; after it they
    assumed it unclipped. So, for every such row at once: run the readings before it again from
    the row's state to reach the state there, clip it, and run the rest of the row from it;
    repeat until no row has one (two calls a round; rounds: the most clips in one row).
    Returns ``y``, the end states, whether each row's last reading was clipped, and how many
    readings were clipped here."""
    n_rows, width = grid.shape
    y = np.array(y, dtype=np.float64)
    new = [np.array(s) for s in new]
    seen = np.array(seen, dtype=np.float64)
    state = [np.array(s) for s in init]  # each row's state before reading ``at``
    at = np.zeros(n_rows, dtype=np.intp)  # the readings before it are final
    after = np.array(clipped0, dtype=bool)  # reading ``at`` was clipped: ``at + 1`` may not be
    last = after & (lens == 1)
    count = 0
    t = np.arange(1, width)
    while True:
        with np.errstate(invalid="ignore"):
            far = np.abs(grid[:, 1:] - y[:, :-1]) > limit[:, :-1]
        far &= (t > at[:, None]) & (t < lens[:, None])
        far &= ~((t == at[:, None] + 1) & after[:, None])
        rows = np.flatnonzero(far.any(axis=1))
        if not rows.size:
            return y, new, last, count
        first = np.argmax(far[rows], axis=1) + 1  # the reading to clip, per row
        begin = at[rows]
        _, reached = run(
            _shifted(seen[rows], begin, first - begin), first - begin, [s[:, rows] for s in state]
        )
        seen[rows, first], _ = inputs(
            grid[rows, first], y[rows, first - 1], limit[rows, first - 1], False
        )
        count += int(rows.size)
        for s, got in zip(state, reached, strict=True):
            s[:, rows] = got
        at[rows], after[rows] = first, True
        last[rows] = first == lens[rows] - 1
        left = lens[rows] - first
        y_rest, ended = run(_shifted(seen[rows], first, left), left, [s[:, rows] for s in state])
        for k, (r, f) in enumerate(zip(rows.tolist(), first.tolist(), strict=True)):
            y[r, f : lens[r]] = y_rest[k, : lens[r] - f]
        for s, got in zip(new, ended, strict=True):
            s[:, rows] = got


def _shifted(values: np.ndarray, start: np.ndarray, count: np.ndarray) -> np.ndarray:
    """``[R, max(count), 1]``: row ``r``'s ``values[r, start[r] : start[r] + count[r]]``
    left-aligned, padded with its last one."""
    width = int(count.max())
    cols = start[:, None] + np.minimum(np.arange(width), count[:, None] - 1)
    return np.take_along_axis(values, cols, axis=1)[:, :, None]


def segment(
    values: np.ndarray,
    run: Rows,
    state: list[np.ndarray],
    start: float,
    weight: float,
    k: float,
) -> np.ndarray:
    """One stream's predictions over a segment from ``state``, its readings clipped as the
    daemon clips them (``out[t]`` is the prediction made after reading ``t``): the segment in
    chunks of :data:`CHUNK`, each chunk's first reading clipped before its call and the rest by
    :func:`settle`."""
    v = np.asarray(values, dtype=np.float64)
    out = np.empty(len(v), dtype=np.float64)
    ahead = limits(spread.along(v, start, weight), start, k)  # for reading t + 1
    prev, after = np.nan, False
    for lo in range(0, len(v), CHUNK):
        grid = v[None, lo : lo + CHUNK]
        seen = grid.copy()
        first_limit = ahead[lo - 1 : lo] if lo else np.array([np.nan])
        seen[:, 0], clipped0 = inputs(grid[:, 0], np.array([prev]), first_limit, after)
        lens = np.array([grid.shape[1]])
        y, new = run(seen[:, :, None], lens, state)
        y, state, last, _ = settle(
            grid, seen, y, new, state, lens, clipped0, ahead[None, lo : lo + CHUNK], run
        )
        out[lo : lo + grid.shape[1]] = y[0]
        prev, after = float(y[0, -1]), bool(last[0])
    return out
