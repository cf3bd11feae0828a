"""BulkHistogram exposes exactly what prometheus_client's Histogram would for the same values."""

from __future__ import annotations

import numpy as np
from prometheus_client import CollectorRegistry, Histogram, generate_latest

from forecaster.serve.histogram import BulkHistogram

BUCKETS = (0.001, 0.01, 0.1, 1.0, 10.0)


def lines(registry: CollectorRegistry) -> list[str]:
    text = generate_latest(registry).decode()
    return [ln for ln in text.splitlines() if "_created" not in ln]


def test_same_exposition_as_prometheus_client() -> None:
    rng = np.random.default_rng(0)
    values = np.concatenate([rng.lognormal(-3, 2, 500), [0.001, 0.01, 10.0, 1e9, 0.0]])
    r1, r2 = CollectorRegistry(), CollectorRegistry()
    ref = Histogram("x_seconds", "doc", ["route"], buckets=BUCKETS, registry=r1)
    bulk = BulkHistogram("x_seconds", "doc", ["route"], buckets=BUCKETS, registry=r2)
    for v in values:
        ref.labels("a").observe(float(v))
    bulk.labels("a").observe_many(values[:100])
    bulk.labels("a").observe_many(values[100:])
    bulk.labels("b")  # a label set with nothing observed, as prometheus_client shows it
    ref.labels("b")
    assert lines(r2) == lines(r1)


def test_unlabelled_and_nan_ignored() -> None:
    r = CollectorRegistry()
    h = BulkHistogram("y", "doc", buckets=BUCKETS, registry=r)
    h.observe_many(np.array([0.5, np.nan, 2.0]))
    h.observe(0.005)
    assert r.get_sample_value("y_count") == 3
    assert r.get_sample_value("y_sum") == 2.505
    assert r.get_sample_value("y_bucket", {"le": "0.01"}) == 1
    assert r.get_sample_value("y_bucket", {"le": "+Inf"}) == 3
