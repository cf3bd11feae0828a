"""The last reading put back into a delta-head prediction (``model.bundle.restore_last``).

The graph sees readings rounded to float32; the daemon, ``evaluate`` and training's validation all
restore the reading itself, so persistence is exact at any level and all three agree."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from forecaster.evaluation.unroll import bundle_predictor
from forecaster.model.bundle import Bundle, restore_last
from forecaster.serve.codec import Reading
from forecaster.serve.engine import Engine
from forecaster.serve.state import StateStore

ROOT = Path(__file__).resolve().parents[2]
SEEDS = [0, 1, 2]


@pytest.mark.parametrize("seed", SEEDS)
def test_a_rounded_reading_is_put_back(seed: int) -> None:
    rng = np.random.default_rng(seed)
    x = 1e9 + np.cumsum(rng.poisson(3, 500)).astype(np.float64)  # a meter: steps under float32's
    seen = x.astype(np.float32)
    assert not np.array_equal(seen.astype(np.float64), x)  # the graph sees them rounded
    np.testing.assert_array_equal(restore_last(seen, x), x, err_msg=f"seed={seed}")  # persistence
    change = seen.astype(np.float64) + 64.0  # the graph added 64 to what it saw
    np.testing.assert_array_equal(restore_last(change, x), x + 64.0, err_msg=f"seed={seed}")


def test_only_delta_heads_are_restored() -> None:
    assert Bundle.load(ROOT / "models" / "water-flow").restores_last
    assert not Bundle.load(ROOT / "models" / "yahoo-anomaly").restores_last  # a window classifier


@pytest.mark.parametrize("seed", SEEDS)
def test_evaluate_and_the_engine_restore_the_same(seed: int) -> None:
    bundle = Bundle.load(ROOT / "models" / "water-flow")
    rng = np.random.default_rng(seed)
    # Readings with digits float32 cannot hold (its steps are 0.008 at this level).
    values = 1e5 + np.cumsum(rng.normal(0, 0.3, 200)) + 1e-4 * rng.random(200)
    by_evaluate = bundle_predictor(bundle)(values)
    y, _ = bundle.run(
        values.astype(np.float32).reshape(1, -1, 1), np.array([200]), bundle.zero_state(1)
    )
    # The change the graph made, added to the reading itself.
    np.testing.assert_array_equal(
        by_evaluate - values, y[0].astype(np.float64) - values.astype(np.float32), f"seed={seed}"
    )
    engine = Engine(bundle, StateStore(bundle.state_shapes, 10, 0.0))
    made = []
    for k, v in enumerate(values):  # one reading per call, then the rest as one batch
        if k < 100:
            out = engine.step([Reading("s", float(v), float(k), 0.0, "s")], now=float(k))
            made += out.predictions
    batch = [Reading("s", float(v), float(k), 0.0, "s") for k, v in enumerate(values) if k >= 100]
    made += engine.step(batch, now=200.0).predictions
    by_engine = [p.value for p in made if p is not None]
    assert len(by_engine) == len(values), f"seed={seed}: readings without a prediction"
    np.testing.assert_allclose(by_engine, by_evaluate, rtol=0, atol=1e-5, err_msg=f"seed={seed}")
