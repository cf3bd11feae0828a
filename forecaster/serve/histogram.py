"""A Prometheus histogram fed a whole array per call.

prometheus_client's ``Histogram.observe`` takes a lock and walks the buckets once per value. The
daemon observes three values per reading (end-to-end latency, model error, persistence error),
which the benchmarks' profile put at ~10 % of the inference thread on gateway batches. Here a
batch costs one ``np.searchsorted`` and one ``np.bincount`` under one lock, and the exposition is
the same as prometheus_client's (a test compares them line by line).
"""

from __future__ import annotations

import math
import threading
from bisect import bisect_left
from collections.abc import Iterable, Sequence

import numpy as np
from prometheus_client.core import HistogramMetricFamily
from prometheus_client.registry import Collector, CollectorRegistry
from prometheus_client.utils import floatToGoString

#: At most this many values are bucketed in Python (:meth:`BulkHistogram._observe_few`).
_FEW = 4


class _Series:
    __slots__ = ("counts", "total")

    def __init__(self, n: int) -> None:
        self.counts = np.zeros(n, dtype=np.int64)
        self.total = 0.0


class BulkHistogramChild:
    """One label set of a :class:`BulkHistogram`."""

    def __init__(self, parent: BulkHistogram, key: tuple[str, ...]) -> None:
        self._parent = parent
        self._key = key

    def observe(self, value: float) -> None:
        self._parent.observe_many(np.array([value], dtype=np.float64), self._key)

    def observe_many(self, values: np.ndarray) -> None:
        self._parent.observe_many(values, self._key)


class BulkHistogram(Collector):
    """A histogram with ``observe_many(values)``; labels like prometheus_client's."""

    def __init__(
        self,
        name: str,
        documentation: str,
        labelnames: Sequence[str] = (),
        buckets: Iterable[float] = (),
        registry: CollectorRegistry | None = None,
    ) -> None:
        bounds = sorted(float(b) for b in buckets)
        if not bounds or bounds[-1] != math.inf:
            bounds.append(math.inf)
        self.name = name
        self.documentation = documentation
        self.labelnames = tuple(labelnames)
        self._bounds = np.array(bounds)
        self._bound_list = bounds
        self._les = [floatToGoString(b) for b in bounds]
        self._series: dict[tuple[str, ...], _Series] = {}
        self._lock = threading.Lock()
        if not self.labelnames:
            self._series[()] = _Series(len(bounds))
        if registry is not None:
            registry.register(self)

    def labels(self, *values: str) -> BulkHistogramChild:
        if len(values) != len(self.labelnames):
            raise ValueError(f"{self.name} takes labels {self.labelnames}, got {values}")
        key = tuple(str(v) for v in values)
        with self._lock:
            self._series.setdefault(key, _Series(len(self._bounds)))
        return BulkHistogramChild(self, key)

    def observe(self, value: float) -> None:
        self.observe_many(np.array([value], dtype=np.float64))

    def observe_many(self, values: np.ndarray, key: tuple[str, ...] = ()) -> None:
        """Count every value of ``values`` (NaN is ignored: it belongs to no bucket)."""
        v = np.asarray(values, dtype=np.float64).ravel()
        if v.size <= _FEW:
            self._observe_few(v.tolist(), key)
            return
        total = float(v.sum())
        if total != total:  # a NaN among them (or infinities of both signs): drop the NaNs
            v = v[~np.isnan(v)]
            if not v.size:
                return
            total = float(v.sum())
        # le is inclusive: a value equal to a bound belongs to that bound's bucket.
        idx = np.searchsorted(self._bounds, v, side="left")
        counts = np.bincount(idx, minlength=len(self._bounds))
        with self._lock:
            series = self._series.setdefault(key, _Series(len(self._bounds)))
            series.counts += counts
            series.total += total

    def _observe_few(self, values: list[float], key: tuple[str, ...]) -> None:
        """:meth:`observe_many` of a few values, bucketed by ``bisect``: numpy's fixed cost per
        call (a dozen calls, ~20 µs on this project's machines) is what a micro-batch's one
        ONNX call size and time paid, every batch."""
        got = [x for x in values if x == x]  # NaN is not equal to itself
        if not got:
            return
        bounds = self._bound_list
        with self._lock:
            series = self._series.setdefault(key, _Series(len(bounds)))
            counts = series.counts
            for x in got:
                counts[bisect_left(bounds, x)] += 1
            series.total += sum(got)

    def describe(self) -> list[HistogramMetricFamily]:
        return [HistogramMetricFamily(self.name, self.documentation, labels=self.labelnames)]

    def collect(self) -> list[HistogramMetricFamily]:
        family = HistogramMetricFamily(self.name, self.documentation, labels=self.labelnames)
        with self._lock:
            snapshot = [(k, s.counts.copy(), s.total) for k, s in self._series.items()]
        for key, counts, total in snapshot:
            cumulative = np.cumsum(counts)
            family.add_metric(
                list(key),
                [(le, float(c)) for le, c in zip(self._les, cumulative, strict=True)],
                total,
            )
        return [family]
