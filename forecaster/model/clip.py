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

The daemon applies :func:`inputs` one reading per stream at a time; ``evaluate`` and training
run a whole segment through :func:`segment`, which gives the same predictions from any function
that steps a model over a run of readings (ONNX Runtime or PyTorch).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from forecaster.model import spread

#: Steps the model over readings ``x`` ``[T]`` (float64, what it should see) from a state:
#: the predictions made after each (``[T]`` float64) and the state after the last.
Run = Callable[[np.ndarray, Any], tuple[np.ndarray, Any]]

#: Readings per call of :func:`segment` when nothing was clipped lately; after a clip it starts
#: again from :data:`FIRST_CHUNK` and doubles, so dense clipping does not rerun long chunks.
CHUNK = 4096
FIRST_CHUNK = 64


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


def segment(
    values: np.ndarray, run: Run, state: Any, start: float, weight: float, k: float
) -> np.ndarray:
    """One stream's predictions over a segment from ``state``, its readings clipped as the
    daemon clips them (``out[t]`` is the prediction made after reading ``t``).

    Runs the model over a chunk of the readings as they are; at the chunk's first reading that
    lies too far from its prediction, the readings before it are run again to reach the state
    there, that reading is clipped and stepped alone, and the next chunk starts after it."""
    v = np.asarray(values, dtype=np.float64)
    n = len(v)
    seen = v.copy()
    out = np.empty(n, dtype=np.float64)
    limit = np.full(n, np.nan)
    limit[1:] = limits(spread.along(v, start, weight)[:-1], start, k)
    pos, prev, after_clip, chunk = 0, np.nan, False, CHUNK
    while pos < n:
        end = min(n, pos + chunk)
        y, after = run(seen[pos:end], state)
        predicted = np.concatenate(([prev], y[:-1]))
        with np.errstate(invalid="ignore"):
            far = np.abs(v[pos:end] - predicted) > limit[pos:end]
        far[0] &= not after_clip
        hits = np.flatnonzero(far)
        if not hits.size:
            out[pos:end], state, prev = y, after, float(y[-1])
            after_clip, chunk, pos = False, min(CHUNK, 2 * chunk), end
            continue
        t = pos + int(hits[0])
        if t > pos:
            head, state = run(seen[pos:t], state)
            out[pos:t], prev = head, float(head[-1])
        seen[t : t + 1] = inputs(v[t : t + 1], np.array([prev]), limit[t : t + 1], False)[0]
        y1, state = run(seen[t : t + 1], state)
        out[t], prev = y1[0], float(y1[0])
        after_clip, chunk, pos = True, FIRST_CHUNK, t + 1
    return out
