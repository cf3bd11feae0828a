"""Prediction intervals in the daemon: bounds on every prediction, live coverage counts, JSON.

The engine runs a fake model with a closed form (its state is the running sum of a stream's
readings and it predicts that sum), so every expected bound and count is plain arithmetic.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import cast

import numpy as np
from prometheus_client import CollectorRegistry

from forecaster.model.bundle import Bundle, Interval
from forecaster.serve.codec import Prediction, Reading, encode_predictions
from forecaster.serve.engine import Engine
from forecaster.serve.metrics import Metrics
from forecaster.serve.state import StateStore

INTERVAL = Interval(coverage=0.9, lower=-2.0, upper=1.0, n=100)


@dataclass
class FakeManifest:
    warmup: int = 2
    task: str = "regress"
    horizon: int = 0
    threshold: float | None = None
    interval: Interval | None = INTERVAL
    name: str = "fake"
    version: str = "1"


@dataclass
class FakeBundle:
    """One state tensor [1, B, 1]: the running sum; y = the new sum."""

    sha256: str = "f" * 64
    mode: str = "stateful"
    window: int = 0
    manifest: FakeManifest = field(default_factory=FakeManifest)

    @property
    def state_shapes(self) -> list[tuple[int, int]]:
        return [(1, 1)]

    def step(self, x: np.ndarray, state: tuple[np.ndarray, ...]) -> tuple[np.ndarray, list]:
        (h,) = state
        new = h + x.reshape(1, -1, 1)
        return new[0, :, 0].copy(), [new]


def engine(interval: Interval | None = INTERVAL) -> Engine:
    fake = FakeBundle(manifest=FakeManifest(interval=interval))
    return Engine(cast(Bundle, fake), StateStore(fake.state_shapes, 100))


def reading(stream: str, ts: float, value: float) -> Reading:
    return Reading(stream, value, ts, 0.0, stream)


def test_every_prediction_carries_its_bounds_and_readings_are_checked_against_them() -> None:
    e = engine()
    # running sums 1, 3, 6, 13, 10; a stream is warm after 2 readings, so readings 3-5 are
    # checked against the previous prediction's [p - 2, p + 1]:
    #   3 in [1, 4] inside; 7 in [4, 7] inside (bounds are inclusive); -3 vs [11, 14] outside.
    vals = [1.0, 2.0, 3.0, 7.0, -3.0]
    out = e.step([reading("a", float(i + 1), v) for i, v in enumerate(vals)], now=0.0)
    preds = [p for p in out.predictions if p is not None]
    assert [p.value for p in preds] == [1, 3, 6, 13, 10]
    assert [(p.lower, p.upper) for p in preds] == [(-1, 2), (1, 4), (4, 7), (11, 14), (8, 11)]
    assert (out.interval_inside, out.interval_outside) == (2, 1)
    assert out.interval_coverage == 0.9
    # A stream interleaved in the same batch is checked on its own predictions.
    out = e.step([reading("b", 1, 5), reading("a", 6, 9), reading("b", 2, 5)], now=1.0)
    # a: previous prediction 10 -> [8, 11]; 9 inside. b is not warm yet: not checked.
    assert (out.interval_inside, out.interval_outside) == (1, 0)


def test_without_an_interval_nothing_is_added_or_counted() -> None:
    e = engine(interval=None)
    out = e.step([reading("a", float(i + 1), 1.0) for i in range(5)], now=0.0)
    assert all(p is not None and p.lower is None and p.upper is None for p in out.predictions)
    assert (out.interval_inside, out.interval_outside, out.interval_coverage) == (0, 0, None)


def test_bounds_are_published_only_when_present() -> None:
    with_bounds = Prediction("s", 1.5, 10.0, True, lower=8.5, upper=11.25)
    doc = json.loads(encode_predictions([with_bounds], "m", "1", batch=False))
    assert (doc["lower"], doc["upper"]) == (8.5, 11.25)
    plain = json.loads(encode_predictions([Prediction("s", 1.5, 10.0, True)], "m", "1", False))
    assert "lower" not in plain and "upper" not in plain
    broken = Prediction("s", 1.5, 10.0, True, lower=float("nan"), upper=float("inf"))
    doc = json.loads(encode_predictions([broken], "m", "1", batch=True))[0]
    assert doc["lower"] is None and doc["upper"] is None  # still valid JSON


def test_live_coverage_metrics() -> None:
    registry = CollectorRegistry()
    m = Metrics(registry)

    def value(name: str, **labels: str) -> float | None:
        return registry.get_sample_value(name, labels)

    m.count_interval("water", inside=9, outside=0, target=0.9)
    # Created with the first call, at 0, so a ratio over it exists before any miss.
    assert value("forecaster_interval_checks_total", route="water", outcome="outside") == 0
    m.count_interval("water", inside=3, outside=2, target=0.9)
    assert value("forecaster_interval_checks_total", route="water", outcome="inside") == 12
    assert value("forecaster_interval_checks_total", route="water", outcome="outside") == 2
    assert value("forecaster_interval_coverage_target", route="water") == 0.9
