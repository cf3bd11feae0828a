"""BulkHistogram exposes exactly what prometheus_client's Histogram would for the same values."""

from __future__ import annotations

import numpy as np
import pytest
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


def test_a_few_values_at_a_time_count_as_many_at_once() -> None:
    """Calls of up to four values take a path of their own (bisect, no numpy): the same
    buckets, count and sum as one call with all of them, bounds and NaN included."""
    seed = 11
    rng = np.random.default_rng(seed)
    values = np.concatenate([rng.lognormal(-3, 2, 300), [0.001, 0.01, 10.0, 1e9, 0.0, np.nan]])
    rng.shuffle(values)
    few, many = CollectorRegistry(), CollectorRegistry()
    a = BulkHistogram("z", "doc", ["route"], buckets=BUCKETS, registry=few)
    b = BulkHistogram("z", "doc", ["route"], buckets=BUCKETS, registry=many)
    start = 0
    while start < len(values):
        size = int(rng.integers(1, 5))
        a.labels("r").observe_many(values[start : start + size])
        start += size
    b.labels("r").observe_many(values)
    for le in ("0.001", "0.01", "0.1", "1.0", "10.0", "+Inf"):
        got = few.get_sample_value("z_bucket", {"route": "r", "le": le})
        assert got == many.get_sample_value("z_bucket", {"route": "r", "le": le}), (le, seed)
    assert few.get_sample_value("z_count", {"route": "r"}) == len(values) - 1
    total = many.get_sample_value("z_sum", {"route": "r"})
    assert few.get_sample_value("z_sum", {"route": "r"}) == pytest.approx(total, rel=1e-12)
