"""Split-conformal prediction intervals from held-out one-step residuals (numpy only).

The validation part is never used for gradients, so its residuals ``actual - predicted`` are
exchangeable with future ones as far as the data allows; the interval ``[y + lower, y + upper]``
uses their empirical quantiles with the finite-sample correction of split conformal prediction
(rank ``ceil((n + 1) q)``), one per side so a skewed error distribution gets a skewed interval.

A stateful regression calibrates residuals divided by the stream's spread when each prediction
was made (:func:`scaled`; :mod:`forecaster.model.spread` says why), so its offsets are in units
of the spread and its interval follows the stream's volatility.
"""

from __future__ import annotations

import math

import numpy as np

from forecaster.model import spread


def conformal(residuals: np.ndarray, coverage: float) -> dict[str, float | int] | None:
    """``{coverage, lower, upper, n}``: offsets from the point forecast; None without data."""
    r = np.sort(np.asarray(residuals, dtype=np.float64)[np.isfinite(residuals)])
    n = r.size
    if n < 2:
        return None
    alpha = (1.0 - coverage) / 2.0
    hi_rank = min(n, math.ceil((n + 1) * (1.0 - alpha)))
    lo_rank = max(1, math.floor((n + 1) * alpha))
    return {
        "coverage": coverage,
        "lower": float(min(r[lo_rank - 1], 0.0)),
        "upper": float(max(r[hi_rank - 1], 0.0)),
        "n": int(n),
    }


def scaled(
    residuals: np.ndarray, spreads: np.ndarray, start: float, coverage: float
) -> dict[str, float | int] | None:
    """:func:`conformal` on ``residuals`` in units of the spread (``spreads``: the stream's
    spread when each prediction was made; ``start``: a new stream's), with the fields that tell
    the daemon and ``evaluate`` to scale the offsets back."""
    out = conformal(np.asarray(residuals) / spread.unit(spreads, start), coverage)
    if out is None:
        return None
    return {**out, "spread_weight": spread.WEIGHT, "spread_start": float(start)}
