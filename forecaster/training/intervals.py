"""Split-conformal prediction intervals from held-out one-step residuals (numpy only).

The validation part is never used for gradients, so its residuals ``actual - predicted`` are
exchangeable with future ones as far as the data allows; the interval ``[y + lower, y + upper]``
uses their empirical quantiles with the finite-sample correction of split conformal prediction
(rank ``ceil((n + 1) q)``), one per side so a skewed error distribution gets a skewed interval.
"""

from __future__ import annotations

import math

import numpy as np


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
