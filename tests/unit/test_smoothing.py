"""Exponential smoothing as a linear filter (forecaster.training.smoothing) and its use as a
linear-path candidate (forecaster.training.linear). statsmodels (a dev dependency) is the
independent reference of the conversion; training itself never imports it.

Every randomized case draws from a fixed seed and names it in its failure message.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest

from forecaster.training import linear, smoothing
from forecaster.training.smoothing import Form, Params

FORMS = [
    (Form("N"), Params(0.4)),
    (Form("A"), Params(0.4, 0.1)),
    (Form("Ad"), Params(0.5, 0.1, 0.0, 0.9)),
    (Form("N", 12), Params(0.3, 0.0, 0.2)),
    (Form("Ad", 12), Params(0.3, 0.05, 0.15, 0.9)),
]


def seasonal_series(seed: int, n: int, m: int = 12) -> np.ndarray:
    rng = np.random.default_rng(seed)
    t = np.arange(n)
    return (
        100.0
        + 0.1 * t
        + 10.0 * np.sin(2 * np.pi * t / m)
        + np.cumsum(rng.normal(size=n))
        + rng.normal(size=n)
    )


def filter_predictions(y: np.ndarray, c: np.ndarray) -> np.ndarray:
    """``out[k]`` predicts ``y[k + 1]`` with weights ``c`` over the buffer (graph's padding)."""
    return linear.ar_segment(y, linear.from_weights(c, "test"))[:-1]


@pytest.mark.parametrize(("form", "params"), FORMS, ids=[f.label for f, _ in FORMS])
def test_truncated_filter_matches_statsmodels_one_step_forecasts(
    form: Form, params: Params
) -> None:
    """With the same (fixed) parameters, the filter's forecasts equal statsmodels' ETS one-step
    forecasts once the initial state's term has decayed (the filter has no initial state)."""
    ets = pytest.importorskip("statsmodels.tsa.exponential_smoothing.ets")
    y = seasonal_series(0, 5000)
    model = ets.ETSModel(
        y,
        error="add",
        trend=None if form.trend == "N" else "add",
        damped_trend=form.trend == "Ad",
        seasonal="add" if form.period else None,
        seasonal_periods=form.period or None,
        initialization_method="heuristic",
    )
    given = {
        "smoothing_level": params.alpha,
        "smoothing_trend": params.beta,
        "smoothing_seasonal": params.gamma,
        "damping_trend": params.phi,
    }
    values = [given[name] for name in model.param_names]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fitted = np.asarray(model.smooth(np.asarray(values)).fittedvalues)
    c = smoothing.truncated(form, params, cap=2500, tail=1e-12)
    assert abs(c.sum() - 1.0) < 1e-12, form.label
    burn = 4000  # the initial state's term (and the dropped tail) decayed under 1e-8 by then
    got = filter_predictions(y, c)[burn - 1 :]
    want = fitted[burn:]
    assert np.max(np.abs(got - want)) < 1e-6 * np.max(np.abs(y)), form.label


def test_weights_are_the_known_closed_forms() -> None:
    """Simple smoothing: c_j = alpha (1 - alpha)^j; Holt's weights sum to one."""
    c = smoothing.weights(Form("N"), Params(0.3), 10)
    assert np.allclose(c, 0.3 * 0.7 ** np.arange(10))
    holt = smoothing.weights(Form("A"), Params(0.4, 0.1), 400)
    assert abs(holt.sum() - 1.0) < 1e-9


@pytest.mark.parametrize(("form", "params"), FORMS, ids=[f.label for f, _ in FORMS])
def test_filter_forecasts_a_constant_exactly(form: Form, params: Params) -> None:
    """Truncated at the default tail, the weights still sum to one: a flat series (at a large
    level) is forecast exactly, as persistence would."""
    c = smoothing.truncated(form, params, cap=200)
    y = np.full(300, 12345.678)
    assert np.max(np.abs(filter_predictions(y, c) - y[1:])) < 1e-6


@pytest.mark.parametrize("seed", range(3))
def test_fit_recovers_simple_smoothing(seed: int) -> None:
    """Data simulated from ETS(A,N,N) with alpha 0.3: the fitted alpha is close."""
    rng = np.random.default_rng(seed)
    e = rng.normal(size=4000)
    y = np.empty(4000)
    level = 50.0
    for t in range(4000):
        y[t] = level + e[t]
        level += 0.3 * e[t]
    params, _ = smoothing.fit(Form("N"), [y])
    assert abs(params.alpha - 0.3) < 0.05, f"{seed=}: {params}"


def test_labels_round_trip() -> None:
    for form, _ in FORMS:
        assert Form.parse(form.label) == form
    assert linear.parse_lags(linear.lags_text([1, 2, 3, 12, 13, 24])) == [1, 2, 3, 12, 13, 24]
    assert linear.lags_text([5]) == "5"


def test_refit_keeps_the_kind_and_sizes_the_filter_anew() -> None:
    """``linear.fit`` with an ETS or a combination's ``loss`` refits it (what the run's final
    refit on training + validation relies on): the same kind, and an ETS filter cut where its
    *refitted* weights become negligible, not at the first fit's buffer (a slower refitted
    filter would otherwise lose its tail)."""
    y = seasonal_series(1, 600)
    form = Form("Ad", 12)
    ets = linear.fit_ets([y[:400]], form)
    assert ets.loss == "ETS(A,Ad,A 12)" and ets.lags == tuple(range(1, ets.size + 1))
    again = linear.fit([y], ets.lags, ets.loss)
    assert again.loss == ets.loss and again.lags == tuple(range(1, again.size + 1))
    assert again.coef == linear.fit_ets([y], form).coef
    assert abs(again.coef[0]) < 1e-12 and again.bias == 0.0  # weights sum to one, no bias
    ols = linear.fit([y[:400]], [1, 2, 12, 13], "huber")
    mixed = linear.combine([ols, ets])
    assert mixed.size == max(ols.size, ets.size)
    refit = linear.fit([y], mixed.lags, mixed.loss)
    parts = [linear.fit([y], ols.lags, "huber"), linear.fit([y], ets.lags, ets.loss)]
    assert refit.loss == linear.combine(parts).loss
    assert refit.size == max(p.size for p in parts)
    assert np.allclose(refit.coef, linear.combine(parts).coef)


def recursion_forecasts(y: np.ndarray, params: Params, m: int) -> np.ndarray:
    """ETS(A,N,A m)'s one-step forecasts by its recursion from a zero state: ``out[t]``
    forecasts ``y[t]`` (the infinite filter, once the start has decayed)."""
    level, season = 0.0, np.zeros(m)
    out = np.empty(len(y))
    for t, v in enumerate(y.tolist()):
        out[t] = level + season[t % m]
        e = v - out[t]
        level += params.alpha * e
        season[t % m] += params.gamma * e
    return out


@pytest.mark.parametrize("seed", range(3))
def test_folding_keeps_a_slow_season_that_cutting_loses(seed: int) -> None:
    """A slow seasonal filter cut short keeps its seasonal memory: on a strictly periodic
    series (any level), the folded filter forecasts what the recursion (the uncut filter)
    does, and the filter with the dropped weight put on the newest reading does not."""
    rng = np.random.default_rng(seed)
    m = 12
    pattern = rng.normal(0.0, 10.0, size=m)
    y = 1000.0 + np.tile(pattern, 2000)  # 24,000 readings: the recursion's start has decayed
    form, params = Form("N", m), Params(0.05, 0.0, 0.02)
    cap = 3 * m + 1
    c = smoothing.truncated(form, params, cap=cap, tail=1e-10)  # fold (nearly) all of it
    assert len(c) == cap and abs(c.sum() - 1.0) < 1e-12, f"{seed=}"
    tail = y[-(cap + 100) :]
    want = recursion_forecasts(y, params, m)[-99:]
    got = filter_predictions(tail, c)[-99:]
    cut = filter_predictions(tail, smoothing.sized(smoothing.weights(form, params, cap)))[-99:]
    scale = float(np.std(pattern))
    assert np.max(np.abs(got - want)) < 1e-6 * scale, f"{seed=}"
    assert np.max(np.abs(cut - want)) > 0.1 * scale, f"{seed=}"


def test_combination_is_the_average_of_the_forecasts() -> None:
    rng = np.random.default_rng(3)
    y = seasonal_series(3, 300)
    a = linear.LinearAR((1, 3), tuple(rng.normal(0, 0.2, size=3)), 0.5, "squared")
    b = linear.from_weights(smoothing.truncated(Form("N"), Params(0.4), 50), "ETS(A,N,N)")
    mixed = linear.combine([a, b])
    want = 0.5 * (linear.ar_segment(y, a) + linear.ar_segment(y, b))
    assert np.allclose(linear.ar_segment(y, mixed), want)


@pytest.mark.parametrize("seed", range(2))
def test_extend_adds_smoothing_candidates_that_beat_persistence(seed: int) -> None:
    """On a seasonal series the candidates include ETS filters and combinations, ranked with
    the least-squares lines, and the best one beats persistence on validation."""
    y = seasonal_series(seed, 480)
    train, val = [y[:380]], [(y, 380)]
    scale = float(np.std(np.diff(y[:380])))
    base = linear.select(train, val, linear.candidate_lag_sets([12], 380), scale)
    ranked = linear.extend(base, train, val, [12], 380, scale)
    kinds = {c.ar.loss.split("(")[0] for c in ranked}
    assert {"ETS", "mean", "squared", "huber"} <= kinds, f"{seed=}: {kinds}"
    persistence = next(c for c in ranked if c.ar.size == 0)
    assert ranked[0].val_rmse < 0.8 * persistence.val_rmse, f"{seed=}: {ranked[0]}"
    # one average of the best line, the best seasonal and the best plain ETS filter
    triples = [linear._parts(c.ar.loss) for c in ranked if c.ar.loss.count("[") == 3]
    assert len(triples) == 1, f"{seed=}: {triples}"
    (ols, _), (seasonal, _), (plain, _) = triples[0]
    assert ols in linear.LOSSES, f"{seed=}: {triples}"
    assert Form.parse(seasonal).period == 12 and Form.parse(plain).period == 0, f"{seed=}"
    losses = [c.val_loss for c in ranked]
    assert losses == sorted(losses)
