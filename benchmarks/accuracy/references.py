"""The linear references of the accuracy benchmark, fitted on the training part only.

Every reference is scored one step ahead on the held-out targets, as the model is: the forecast
for target ``t`` uses readings before ``t`` only (they may lie in the held-out part: that is
what "one step ahead" means, and what ``forecaster evaluate --from`` does), with parameters
fitted once on ``values[:cut]`` and never refitted. Where a reference needs a reading that is
missing (NaN), its forecast falls back to persistence, so every reference has a forecast for
every target and all are scored on exactly the same points.

Pure numpy except ETS (statsmodels, imported on use: it is a ``dev`` dependency).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial

import numpy as np

AR_LEVEL_ORDER = 24
"""AR order on levels of the issue's protocol; ``period + 1`` is added for each period found."""
RANDOM_WALK_MARGIN = 0.02
"""A series counts as a random walk when no reference beats persistence by this much skill."""


@dataclass(frozen=True)
class Reference:
    """One reference's forecasts for the scored targets, or why it has none."""

    name: str
    predicted: np.ndarray | None
    error: str | None = None


def persistence(values: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """The previous reading (for a scored target it always exists: same segment)."""
    return np.asarray(values, dtype=np.float64)[targets - 1]


def _fallback(pred: np.ndarray, values: np.ndarray, targets: np.ndarray) -> np.ndarray:
    bad = ~np.isfinite(pred)
    if bad.any():
        pred = pred.copy()
        pred[bad] = persistence(values, targets[bad])
    return pred


def seasonal_naive(values: np.ndarray, targets: np.ndarray, period: int) -> np.ndarray:
    """The reading one period before the target."""
    x = np.asarray(values, dtype=np.float64)
    src = targets - period
    pred = np.full(targets.shape, np.nan)
    ok = src >= 0
    pred[ok] = x[src[ok]]
    return _fallback(pred, x, targets)


def _lags(x: np.ndarray, rows: np.ndarray, order: int) -> np.ndarray:
    """``[len(rows), order]``: ``x[t-1], …, x[t-order]`` for each ``t`` (NaN before the start)."""
    idx = rows[:, None] - np.arange(1, order + 1)[None, :]
    out = np.full(idx.shape, np.nan)
    ok = idx >= 0
    out[ok] = x[idx[ok]]
    return out


def fit_ar(train: np.ndarray, order: int) -> np.ndarray:
    """Least-squares AR(``order``) with intercept on ``train``: ``[c, a_1, …, a_order]``.

    Uses every target whose lags are all present (missing values just remove rows). Raises
    ``ValueError`` when there are fewer complete rows than parameters.
    """
    x = np.asarray(train, dtype=np.float64)
    rows = np.arange(order, x.size)
    design = _lags(x, rows, order)
    target = x[rows]
    ok = np.isfinite(target) & np.isfinite(design).all(axis=1)
    if int(ok.sum()) <= order + 1:
        raise ValueError(f"{int(ok.sum())} complete rows for AR({order}): too short")
    a = np.column_stack([np.ones(int(ok.sum())), design[ok]])
    coef, *_ = np.linalg.lstsq(a, target[ok], rcond=None)
    return np.asarray(coef)


def ar_levels(values: np.ndarray, cut: int, targets: np.ndarray, order: int) -> np.ndarray:
    """AR(``order``) on levels, fitted on ``values[:cut]``, one step ahead at ``targets``."""
    x = np.asarray(values, dtype=np.float64)
    coef = fit_ar(x[:cut], order)
    pred = coef[0] + _lags(x, targets, order) @ coef[1:]
    return _fallback(pred, x, targets)


def ar_differences(values: np.ndarray, cut: int, targets: np.ndarray, order: int = 2) -> np.ndarray:
    """AR(``order``) on first differences, fitted on the training part: last reading + change."""
    x = np.asarray(values, dtype=np.float64)
    d = np.full(x.shape, np.nan)
    d[1:] = np.diff(x)
    coef = fit_ar(d[:cut], order)
    change = coef[0] + _lags(d, targets, order) @ coef[1:]
    return _fallback(x[targets - 1] + change, x, targets)


def ets(values: np.ndarray, cut: int, targets: np.ndarray, period: int | None) -> np.ndarray:
    """ETS(A, Ad, A) (additive error, damped additive trend, additive season at ``period``, or
    none), fitted by maximum likelihood on the training part with statsmodels, then run over the
    whole series with those parameters fixed: its fitted values are one-step forecasts.

    Missing readings are interpolated linearly first (ETS needs a complete series); the
    heuristic initial state reads the first cycles, which lie in the training part.
    """
    from statsmodels.tsa.exponential_smoothing.ets import ETSModel

    x = np.asarray(values, dtype=np.float64)
    idx = np.arange(x.size)
    ok = np.isfinite(x)
    filled = np.interp(idx, idx[ok], x[ok]) if not ok.all() else x

    def model(data: np.ndarray) -> ETSModel:
        return ETSModel(
            data,
            error="add",
            trend="add",
            damped_trend=True,
            seasonal="add" if period else None,
            seasonal_periods=period,
            initialization_method="heuristic",
        )

    with warnings.catch_warnings():
        # Convergence warnings are part of the result (the fit is what it is); keep output clean.
        warnings.simplefilter("ignore")
        fitted = model(filled[:cut]).fit(disp=False)
        smoothed = model(filled).smooth(fitted.params)
    pred = np.asarray(smoothed.fittedvalues, dtype=np.float64)[targets]
    return _fallback(pred, x, targets)


def references(
    values: np.ndarray, cut: int, targets: np.ndarray, periods: Sequence[int]
) -> list[Reference]:
    """Every reference of the protocol for one series (see the module docstring).

    ``periods`` are the seasonal periods found on the training part; each adds a seasonal naive,
    an AR(period + 1) on levels and an ETS with that season. A reference that cannot be fitted
    (too short, a statsmodels failure) is returned with its error instead of forecasts.
    """
    x = np.asarray(values, dtype=np.float64)
    t = np.asarray(targets, dtype=np.int64)
    out = [Reference("persistence", persistence(x, t))]
    for p in periods:
        out.append(Reference(f"seasonal naive ({p})", seasonal_naive(x, t, p)))
    orders = [AR_LEVEL_ORDER, *(p + 1 for p in periods if p + 1 != AR_LEVEL_ORDER)]
    for order in orders:
        out.append(_guarded(f"AR({order}) levels", partial(ar_levels, x, cut, t, order)))
    out.append(_guarded("AR(2) differences", partial(ar_differences, x, cut, t, 2)))
    seasons: list[int | None] = [*periods] or [None]
    for season in seasons:
        name = f"ETS(A,Ad,A {season})" if season else "ETS(A,Ad,N)"
        out.append(_guarded(name, partial(ets, x, cut, t, season)))
    return out


def _guarded(name: str, fit: Callable[[], np.ndarray]) -> Reference:
    """Run one reference; a failure to fit becomes its recorded error (the others still run).

    Broad on purpose: statsmodels raises many types on a degenerate series, and one failing
    reference must not lose the benchmark's other results. The error text goes to the results.
    """
    try:
        pred = fit()
    except Exception as exc:
        return Reference(name, None, f"{type(exc).__name__}: {exc}")
    return Reference(name, np.asarray(pred, dtype=np.float64))


def rmse(actual: np.ndarray, predicted: np.ndarray) -> float:
    """Root mean squared error."""
    return float(np.sqrt(np.mean((np.asarray(predicted) - np.asarray(actual)) ** 2)))


def skill(error: float, naive_error: float) -> float:
    """1 − RMSE / RMSE(persistence); 0 when persistence is exact."""
    return 1.0 - error / naive_error if naive_error > 0 else 0.0


def is_random_walk(reference_skills: dict[str, float]) -> bool:
    """The rule: no reference other than persistence beats it by ``RANDOM_WALK_MARGIN`` skill on
    the held-out part (persistence is then the best linear forecast there)."""
    others = [v for k, v in reference_skills.items() if k != "persistence" and math.isfinite(v)]
    return not others or max(others) < RANDOM_WALK_MARGIN
