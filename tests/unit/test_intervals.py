"""Prediction intervals in the daemon's output: the JSON bounds and the live coverage metrics.

The engine's side (bounds on every prediction, readings checked against them) is tested in
test_engine.py with its closed-form fake model; the end-to-end parity with ``evaluate`` in
tests/integration/test_intervals.py.
"""

from __future__ import annotations

import json

from prometheus_client import CollectorRegistry

from forecaster.serve.codec import Prediction, encode_predictions
from forecaster.serve.metrics import Metrics


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
