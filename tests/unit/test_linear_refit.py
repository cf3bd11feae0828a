"""The final refit may change the linear path's buffer (a refitted smoothing filter is cut where
its own weights become negligible): the shipped model must then be exactly the new line, with
its lags recorded, whatever the first fit's buffer was."""

from __future__ import annotations

import numpy as np
import pytest

from forecaster.training import linear
from forecaster.training.nn import ModelSpec, RNNForecaster
from forecaster.training.search import alone
from forecaster.training.smoothing import Form
from forecaster.training.stateful import torch_predictor, with_line


@pytest.mark.parametrize("seed", range(3))
def test_with_line_of_another_size_is_exactly_that_line(seed: int) -> None:
    rng = np.random.default_rng(seed)
    t = np.arange(400)
    v = 500 + np.cumsum(rng.normal(size=400)) + 20 * np.sin(2 * np.pi * t / 12)
    first = linear.fit([v[:200]], [1, 2, 12, 13], "huber")
    spec = ModelSpec(
        "gru", 1, 4, 1, "delta", 0.0, (500.0,), (30.0,), 1.0,
        ar_coef=first.coef, ar_bias=first.bias, ar_lags=first.lags, ar_loss=first.loss,
    )  # fmt: skip
    model = alone(RNNForecaster(spec), None)  # head at zero: the output is the line
    line = linear.fit_ets([v[:300]], Form("N", 12))
    assert line.size != first.size, f"{seed=}: the case needs another buffer size"
    out = with_line(model, line)
    assert out.spec.lag_buffer == line.size and out.spec.ar_lags == line.lags, f"{seed=}"
    got = torch_predictor(out)(v)
    want = linear.ar_segment(v, line)
    assert np.max(np.abs(got - want)) < 1e-3, f"{seed=}"  # float32 at a level of ~500
