"""The closed-form linear path and the split-conformal interval (numpy only, fast).

Every randomized case draws from a fixed seed and names it in its failure message.
"""

from __future__ import annotations

import numpy as np
import pytest

from forecaster.training import linear
from forecaster.training.intervals import conformal

SEEDS = range(5)


def ar2(rng: np.random.Generator, n: int, a1: float, a2: float, level: float) -> np.ndarray:
    x = np.zeros(n)
    e = rng.normal(size=n)
    for t in range(2, n):
        x[t] = a1 * x[t - 1] + a2 * x[t - 2] + e[t]
    return x + level


@pytest.mark.parametrize("seed", SEEDS)
def test_fit_recovers_a_known_ar2_on_levels(seed: int) -> None:
    """x_t+1 = 0.6 x_t + 0.3 x_t-1 (+ level): in the fitted form coef[0] = a1 + a2 - 1 and
    coef[1] = a2 (differences from the last reading), bias = (1 - a1 - a2) * level."""
    rng = np.random.default_rng(seed)
    x = ar2(rng, 20_000, 0.6, 0.3, 1000.0)
    ar = linear.fit([x], [1, 2])
    assert abs(ar.coef[0] - (-0.1)) < 0.01, f"{seed=}: {ar}"
    assert abs(ar.coef[1] - 0.3) < 0.02, f"{seed=}: {ar}"
    assert abs(ar.bias - 100.0) < 10.0, f"{seed=}: {ar}"


@pytest.mark.parametrize("seed", SEEDS)
def test_prediction_matches_the_documented_formula(seed: int) -> None:
    """ar_segment against a plain loop over a buffer that starts full of the first reading."""
    rng = np.random.default_rng(seed)
    x = rng.normal(50, 5, size=60)
    ar = linear.LinearAR((1, 3, 7), tuple(rng.normal(0, 0.3, size=7)), float(rng.normal()))
    buf = [x[0]] * 7
    want = []
    for v in x:
        buf = [v, *buf[:-1]]
        want.append(
            v + ar.bias + ar.coef[0] * v + sum(ar.coef[k] * (buf[k] - v) for k in range(1, 7))
        )
    got = linear.ar_segment(x, ar)
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-9, err_msg=f"{seed=}")


def test_persistence_is_no_line() -> None:
    x = np.array([3.0, 5.0, 4.0])
    assert linear.PERSISTENCE.size == 0
    np.testing.assert_array_equal(linear.ar_segment(x, linear.PERSISTENCE), x)


@pytest.mark.parametrize("seed", SEEDS)
def test_seasonal_series_selects_a_seasonal_lag_and_beats_persistence(seed: int) -> None:
    rng = np.random.default_rng(seed)
    n, s = 1200, 12
    t = np.arange(n)
    x = 100 + 10 * np.sin(2 * np.pi * t / s) + rng.normal(0, 1, n)
    cut = 960
    ranked = linear.select(
        [x[:cut]], [(x, cut)], linear.candidate_lag_sets([s], cut), scale=float(np.std(np.diff(x)))
    )
    best = ranked[0]
    naive = next(c for c in ranked if c.ar.size == 0)
    assert s in best.ar.lags or len(best.ar.lags) >= s, f"{seed=}: {best.ar.lags}"
    assert best.val_rmse < 0.5 * naive.val_rmse, f"{seed=}: {best.val_rmse} vs {naive.val_rmse}"


def test_candidates_include_orders_and_seasonal_pairs() -> None:
    sets = linear.candidate_lag_sets([12], 1000)
    assert (1, 2) in sets and (1, 12, 13) in sets  # persistence is added by select()
    assert tuple(range(1, 14)) in sets  # AR(s + 1) on levels
    # too little data: no seasonal pair needing more than a third of the readings
    assert all(max(s, default=0) < 10 for s in linear.candidate_lag_sets([12], 30))


def test_huber_fit_ignores_an_outage() -> None:
    rng = np.random.default_rng(0)
    x = 100 + rng.normal(0, 0.3, 3000)
    x[1000:1010] = 20.0  # an outage: ten readings far below
    squared = linear.fit([x], range(1, 5), "squared")
    huber = linear.fit([x], range(1, 5), "huber")
    clean = 100 + rng.normal(0, 0.3, 2000)
    err = {
        name: np.sqrt(np.mean((linear.ar_segment(clean, ar)[:-1] - clean[1:]) ** 2))
        for name, ar in (("squared", squared), ("huber", huber))
    }
    assert err["huber"] <= err["squared"], err


@pytest.mark.parametrize("seed", SEEDS)
def test_conformal_interval_covers_fresh_residuals(seed: int) -> None:
    rng = np.random.default_rng(seed)
    calib = rng.standard_t(4, size=500)
    fresh = rng.standard_t(4, size=20_000)
    iv = conformal(calib, 0.9)
    assert iv is not None and iv["lower"] <= 0 <= iv["upper"] and iv["n"] == 500
    covered = np.mean((fresh >= iv["lower"]) & (fresh <= iv["upper"]))
    assert 0.86 <= covered <= 0.95, f"{seed=}: coverage {covered}"


def test_conformal_needs_two_residuals() -> None:
    assert conformal(np.array([1.0]), 0.9) is None


def test_long_orders_need_readings_per_lag() -> None:
    """AR(48) and AR(96) are candidates only with ROWS_PER_LAG training readings per lag."""
    small = linear.candidate_lag_sets([], 1000)
    assert tuple(range(1, 49)) in small and tuple(range(1, 97)) not in small
    assert tuple(range(1, 97)) in linear.candidate_lag_sets([], 96 * linear.ROWS_PER_LAG)
    assert max(max(s) for s in linear.candidate_lag_sets([], 900)) == 24
