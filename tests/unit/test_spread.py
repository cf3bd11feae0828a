"""A stream's spread (forecaster/model/spread.py) and the interval scaled by it: the one-stream,
batch and per-wave forms agree exactly, and the calibration follows a change in volatility.

Every randomized case names its seed in its failure message.
"""

from __future__ import annotations

import numpy as np
import pytest

from forecaster.data import Series
from forecaster.evaluation.unroll import unroll
from forecaster.model import spread
from forecaster.model.bundle import Interval
from forecaster.training.intervals import conformal, scaled

SEEDS = range(4)


def test_along_by_hand() -> None:
    # start 2; changes 1, 3, (missing), (after the gap none), 4
    got = spread.along(np.array([5.0, 6.0, 3.0, np.nan, 8.0, 4.0]), 2.0, 0.5)
    np.testing.assert_array_equal(got, [2.0, 1.5, 2.25, 2.25, 2.25, 3.125])


@pytest.mark.parametrize("seed", SEEDS)
def test_batch_and_waves_give_exactly_the_one_stream_spreads(seed: int) -> None:
    """``rows`` over a padded batch, and ``advance`` one wave at a time, equal ``along`` per
    stream bit for bit (the daemon's two paths against evaluate's)."""
    rng = np.random.default_rng(seed)
    w = spread.WEIGHT
    streams = [rng.normal(0, rng.uniform(0.1, 10), rng.integers(1, 40)) for _ in range(7)]
    start = 1.3
    # The first k readings already stepped (state: last value and spread), the rest in a batch.
    done = [int(rng.integers(0, len(s))) for s in streams]
    full = [spread.along(s, start, w) for s in streams]
    prev = np.array([s[k - 1] if k else np.nan for s, k in zip(streams, done, strict=True)])
    sp = np.array([f[k - 1] if k else start for f, k in zip(full, done, strict=True)])
    rest = [s[k:] for s, k in zip(streams, done, strict=True)]
    width = max(len(x) for x in rest)
    grid = np.array(
        [np.concatenate([x, np.full(width - len(x), x[-1] if len(x) else 0.0)]) for x in rest]
    )
    got = spread.rows(grid, prev, sp, w)
    for i, (x, f, k) in enumerate(zip(rest, full, done, strict=True)):
        assert np.array_equal(got[i, : len(x)], f[k:]), f"seed {seed} stream {i}"
        # One row alone takes the plain-float path: the same numbers.
        alone = spread.rows(grid[i : i + 1], prev[i : i + 1], sp[i : i + 1], w)
        assert np.array_equal(alone[0, : len(x)], f[k:]), f"seed {seed} stream {i} alone"
    # One wave at a time: wave t holds each stream's t-th remaining reading.
    s, p = sp.copy(), prev.copy()
    for t in range(width):
        live = np.array([t < len(x) for x in rest])
        s = np.where(live, spread.advance(s, p, grid[:, t], w), s)
        p = np.where(live, grid[:, t], p)
        for i in np.flatnonzero(live):
            assert s[i] == full[i][done[i] + t], f"seed {seed} stream {i} step {t}"


def test_interval_bounds_scale_and_keep_a_floor() -> None:
    iv = Interval(coverage=0.9, lower=-2.0, upper=1.0, n=50, spread_weight=0.2, spread_start=4.0)
    lo, hi = iv.bounds(np.array([10.0, 10.0, 10.0]), np.array([1.0, 3.0, 0.0]))
    np.testing.assert_array_equal(lo, [8.0, 4.0, 10.0 - 2.0 * 0.4])
    np.testing.assert_array_equal(hi, [11.0, 13.0, 10.0 + 0.4])
    plain = Interval(coverage=0.9, lower=-2.0, upper=1.0, n=50)
    lo, hi = plain.bounds(np.array([10.0]), np.array([7.0]))
    assert (lo[0], hi[0]) == (8.0, 11.0)
    with pytest.raises(ValueError, match="go together"):
        Interval(coverage=0.9, lower=-1.0, upper=1.0, n=5, spread_start=1.0)


@pytest.mark.parametrize("seed", SEEDS)
def test_scaled_calibration_covers_after_volatility_rises(seed: int) -> None:
    """Persistence on a walk whose steps triple after the calibration part: the constant
    interval under-covers the rough part, the one scaled by the spread does not."""
    rng = np.random.default_rng(seed)
    steps = np.concatenate([rng.normal(0, 1, 1500), rng.normal(0, 3, 500)])
    values = 100 + np.cumsum(steps)
    series = Series("s", values, np.arange(values.size), None, None)
    u = unroll([series], lambda v: v.copy(), warmup=1, cuts=[1500])
    calib = ~u.scored & u.warm
    start = spread.typical([values[:1500]])
    res = u.actual - u.predicted
    at = u.spreads(spread.WEIGHT, start)
    constant = Interval.model_validate(conformal(res[calib], 0.9))
    follows = Interval.model_validate(scaled(res[calib], at[calib], start, 0.9))
    assert follows.scaled and not constant.scaled
    for iv, lo_cov, hi_cov in ((constant, 0.0, 0.75), (follows, 0.85, 0.95)):
        u.with_interval(iv)
        got = u.interval_score()
        assert got is not None
        cov = got["interval_coverage"]
        assert lo_cov <= cov <= hi_cov, f"seed {seed}: {iv.scaled=} coverage {cov:.3f}"
