"""Gross glitches in the training part, set aside before the linear path is fitted (numpy only).

Sensor exports carry readings no process produced: a 65,535 from a register read mid-update, a 0
from a dropped frame, a 1e6 from a unit mix-up. One of them among a few hundred training readings
decides a least-squares fit: as a target it is a huge residual (which the Huber loss bounds), but
as a *lag* it is a huge feature value in every row that looks back at it, and a feature that far
out either sets the coefficients (squared loss) or, once the features are standardised, shrinks
every ordinary change to nothing next to it, so the ridge penalty pulls the whole line to
persistence. Measured with ``python -m benchmarks.accuracy.proxy`` on white noise around 10 with
one reading of 1e6 in training: held-out skill +0.04, and +0.31 with the glitch set aside; on
water-flow with one 65,535: 0.00 (persistence shipped), and +0.05.

A reading is a glitch when it is far from the median of its neighbourhood (``HALF`` readings on
each side) by *both* many typical steps (the series' robust step, :data:`STEPS`) and many robust
spreads of the levels themselves (:data:`SPREADS`). The second condition keeps what a process does
produce: a sharp regular pattern (a machine cycle, a square wave) is far from its local median in
steps, but not in spreads of its own levels; a level shift or an outage that lasts more than
``HALF`` readings moves the median with it. And glitches are rare: where more than
:data:`MOST` of a series' readings qualify (a pulse every few readings), they are its pattern and
nothing is replaced. A glitch is replaced by that median for fitting only: validation scores every
candidate on the readings as they are, as the daemon will see them.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

#: Neighbours on each side whose median a reading is compared with.
HALF = 3
#: How far (in the series' typical one-step changes) a glitch is from that median, at least...
STEPS = 10.0
#: ... and in robust spreads (1.4826 MAD) of the series' levels.
SPREADS = 5.0
#: Largest fraction of the readings that may be glitches; beyond it they are the series' pattern.
MOST = 0.01


def scales(segments: Sequence[np.ndarray]) -> tuple[float, float]:
    """The typical step and the robust spread of the levels over all ``segments``."""
    steps = np.concatenate([np.diff(s) for s in segments if len(s) > 1] or [np.zeros(0)])
    levels = np.concatenate([np.asarray(s, dtype=np.float64) for s in segments] or [np.zeros(0)])
    return _robust_spread(steps), _robust_spread(levels)


def _robust_spread(x: np.ndarray) -> float:
    """1.4826 MAD, or the standard deviation where more than half the values are equal."""
    if x.size == 0:
        return 0.0
    mad = 1.4826 * float(np.median(np.abs(x - np.median(x))))
    return mad if mad > 0 else float(np.std(x))


def glitches(values: np.ndarray, step: float, spread: float) -> np.ndarray:
    """A boolean mask of the readings of one segment that are glitches (see the module doc)."""
    v = np.asarray(values, dtype=np.float64)
    width = 2 * HALF + 1
    if v.size < width or step <= 0 or spread <= 0:
        return np.zeros(v.shape, dtype=bool)
    med = local_median(v)
    off = np.abs(v - med)
    return (off > STEPS * step) & (off > SPREADS * spread)


def local_median(values: np.ndarray) -> np.ndarray:
    """The median of each reading's neighbourhood (the segment's ends repeated beyond it)."""
    padded = np.pad(np.asarray(values, dtype=np.float64), HALF, mode="edge")
    return np.median(np.lib.stride_tricks.sliding_window_view(padded, 2 * HALF + 1), axis=1)


def cleaned(segments: Sequence[np.ndarray]) -> tuple[list[np.ndarray], int]:
    """``segments`` with every glitch replaced by its local median, and how many there were
    (none at all where more than :data:`MOST` of the readings qualify)."""
    step, spread = scales(segments)
    masks = [glitches(seg, step, spread) for seg in segments]
    found = sum(int(m.sum()) for m in masks)
    if not found or found > MOST * sum(len(seg) for seg in segments):
        return list(segments), 0
    return [
        np.where(m, local_median(seg), seg) if m.any() else seg
        for seg, m in zip(segments, masks, strict=True)
    ], found
