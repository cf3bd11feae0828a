"""The search's guard: a network whose validation gain over its line is noise ships the line.

Small and CPU-only: a seasonal series of 400 readings, one short training run.
"""

from __future__ import annotations

import numpy as np
import torch

from forecaster.data import Dataset, Series
from forecaster.training import search
from forecaster.training.config import TrainConfig
from forecaster.training.loop import Fit
from forecaster.training.stateful import prepare, torch_predictor, train_one


def dataset(seed: int, n: int = 400) -> Dataset:
    rng = np.random.default_rng(seed)
    t = np.arange(n)
    values = 50 + 5 * np.sin(2 * np.pi * t / 12) + rng.normal(0, 1, size=n)
    series = Series("s", values, np.arange(n), None)
    return Dataset("synthetic.csv", "0" * 64, [series], ["value"], None, None, rows=n)


def test_noise_network_ships_the_best_line_alone() -> None:
    torch.set_num_threads(1)
    prep = prepare(dataset(0), TrainConfig(), lambda _t: None)
    cfg = TrainConfig().resolved(hidden=8, epochs=2)
    model, result = train_one(prep, cfg, prep.candidates[0].ar, False, lambda _t: None)
    # Pretend the network won on validation with a head that adds small noise-like output.
    with torch.no_grad():
        model.head.weight.normal_(0, 1e-3)
    faked = Fit(result.history, 1, result.best_merit, False, 0.0)
    logged: list[str] = []
    out, fit, record = search.significant(prep, model, faked, logged.append)
    assert record is not None and not record["kept"], record
    assert fit.best_epoch == 0
    assert out.spec.ar_lags == prep.candidates[0].ar.lags
    x = prep.series[0].values
    line = search.alone(model, prep.candidates[0].ar)
    assert np.allclose(torch_predictor(out)(x), torch_predictor(line)(x))
    assert logged and "linear path alone" in logged[0]


def test_a_network_at_epoch_zero_is_left_alone() -> None:
    prep = prepare(dataset(1), TrainConfig(), lambda _t: None)
    cfg = TrainConfig().resolved(hidden=8, epochs=1)
    model, result = train_one(prep, cfg, prep.candidates[0].ar, False, lambda _t: None)
    zero = Fit(result.history, 0, result.best_merit, False, 0.0)
    out, fit, record = search.significant(prep, model, zero, lambda _t: None)
    assert out is model and fit is zero and record is None
