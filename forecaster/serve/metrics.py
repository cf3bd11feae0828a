"""Every Prometheus metric of the daemon, defined once, on a registry passed in.

Nothing is registered at import time: the daemon builds one :class:`Metrics` on its own
``CollectorRegistry`` and tests build as many as they like on fresh ones. Labels are bounded by
configuration (routes) or by code (reasons, results); a stream id is never a label, because a
flood of new topics would otherwise become a flood of time series in every Prometheus scraping us.

The HTTP side is deliberately thin (see ``STYLE.md``: pure core, thin I/O): the exposition text is
``generate_latest``; :class:`MetricsServer` only routes three paths to it and to two callbacks.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from typing import Final

import numpy as np
from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    PlatformCollector,
    ProcessCollector,
)

from forecaster.serve.histogram import BulkHistogram

log = logging.getLogger(__name__)

#: Route label used when a reading matched no route: Prometheus treats an empty label value as an
#: absent label, which would merge these series with unlabelled ones.
NO_ROUTE: Final = "none"

#: Reasons a reading is rejected. The first group mirrors the codec's payload checks; the second
#: comes from the state store, the queue and the MQTT layer. Listed here so dashboards and tests
#: have one source of truth, and so :meth:`Metrics.reject` can refuse a typo that would otherwise
#: silently create a new series.
PAYLOAD_REJECT_REASONS: Final = (
    "not_utf8",
    "too_large",
    "bad_json",
    "too_deep",
    "not_finite",
    "wrong_type",
    "missing_key",
    "bad_timestamp",
    "empty",
    "bad_stream",
    "too_many",
    "out_of_range",
    "future_timestamp",
    "duplicate_key",
)
REJECT_REASONS: Final = (
    *PAYLOAD_REJECT_REASONS,
    "duplicate",
    "out_of_order",
    "queue_full",
    "non_finite_state",
    "evicted",
    "no_route",
    "callback_error",
    # A prediction that could not be published costs only its own message: its readings are
    # acknowledged deliberately and counted here (see responder.py).
    "topic_too_long",
    "publish_failed",
    # An unexpected exception while handling these readings (a bug): counted, acknowledged.
    "internal_error",
)
STATE_RESET_REASONS: Final = ("gap", "non_finite", "model_changed")
EVICTION_REASONS: Final = ("lru", "idle")
RESULTS: Final = ("ok", "failed")
RESTORE_RESULTS: Final = ("ok", "missing", "corrupt", "foreign")
#: An event classifier's prediction against the label that arrived: true/false positive/negative.
EVENT_OUTCOMES: Final = ("tp", "fp", "tn", "fn")

# Buckets. Seconds and counts are base units; prometheus_client appends ``+Inf`` itself.
#: One ONNX call: ~40 µs at batch 1 up to a pathological second.
INFERENCE_BUCKETS: Final = (
    50e-6, 100e-6, 250e-6, 500e-6,
    1e-3, 2.5e-3, 5e-3, 10e-3, 25e-3, 50e-3, 100e-3, 250e-3, 500e-3, 1.0,
)  # fmt: skip
#: Readings per ONNX call: powers of two up to the largest ``max_batch`` worth configuring.
BATCH_SIZE_BUCKETS: Final = tuple(float(2**i) for i in range(13))  # 1 … 4096
#: Received → published: sub-millisecond when idle, seconds when a backlog drains.
END_TO_END_BUCKETS: Final = (
    0.5e-3, 1e-3, 2.5e-3, 5e-3, 10e-3, 25e-3, 50e-3, 100e-3, 250e-3, 500e-3, 1.0, 2.5, 5.0,
)  # fmt: skip
#: Absolute errors in raw sensor units, whose scale we cannot know: a 1-2.5-5 ladder over seven
#: decades covers millivolts to kilopascals without per-route configuration.
ABS_ERROR_BUCKETS: Final = (
    # Built from decimal text so the le labels read 0.0025, not 0.0025000000000000005.
    *(float(f"{m}e{e}") for e in range(-3, 4) for m in (1, 2.5, 5)),
    1e4,
)


class Metrics:
    """All daemon metrics, created on ``registry``.

    Attributes are the prometheus_client objects themselves, so callers use the ordinary
    ``.labels(...).inc()`` API; the few helpers below exist where a call site would otherwise have
    to know an invariant (one model-info series per route, batched error sums).
    """

    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        r = registry

        self.readings = Counter(
            "forecaster_readings",
            "Readings accepted for a route (decoded, validated, in order).",
            ["route"],
            registry=r,
        )
        self.readings_rejected = Counter(
            "forecaster_readings_rejected",
            "Readings dropped, by route ('none' when no route matched) and reason.",
            ["route", "reason"],
            registry=r,
        )
        self.predictions = Counter(
            "forecaster_predictions",
            "Predictions published.",
            ["route"],
            registry=r,
        )
        self.inference_seconds = BulkHistogram(
            "forecaster_inference_seconds",
            "Wall time of one ONNX Runtime call (one micro-batch wave).",
            buckets=INFERENCE_BUCKETS,
            registry=r,
        )
        self.batch_size = BulkHistogram(
            "forecaster_batch_size",
            "Readings stepped per ONNX Runtime call.",
            buckets=BATCH_SIZE_BUCKETS,
            registry=r,
        )
        self.end_to_end_seconds = BulkHistogram(
            "forecaster_end_to_end_seconds",
            "Time from a reading's arrival at the daemon to its prediction being published.",
            buckets=END_TO_END_BUCKETS,
            registry=r,
        )
        self.streams = Gauge(
            "forecaster_streams",
            "Streams with live recurrent state.",
            ["route"],
            registry=r,
        )
        self.state_resets = Counter(
            "forecaster_state_resets",
            "Stream states reset to zero (gap: time gap over the limit; non_finite: NaN/Inf in "
            "the state; model_changed: a reload changed the model).",
            ["route", "reason"],
            registry=r,
        )
        self.streams_evicted = Counter(
            "forecaster_streams_evicted",
            "Stream states dropped (lru: max_streams cap; idle: TTL expired).",
            ["route", "reason"],
            registry=r,
        )
        self.queue_depth = Gauge(
            "forecaster_queue_depth",
            "Readings waiting between the MQTT thread and the inference worker.",
            registry=r,
        )
        self.mqtt_connected = Gauge(
            "forecaster_mqtt_connected",
            "1 while the MQTT session is up, else 0.",
            registry=r,
        )
        self.mqtt_reconnects = Counter(
            "forecaster_mqtt_reconnects",
            "MQTT connections established after the first one.",
            registry=r,
        )
        self.ready = Gauge(
            "forecaster_ready",
            "1 while the daemon reports ready (models loaded and warm, MQTT subscribed; under "
            "NATS: connected, streams and buckets set up), else 0: what /readyz answers.",
            registry=r,
        )
        self.model_info = Gauge(
            "forecaster_model_info",
            "The model bundle serving each route (value is always 1).",
            ["route", "name", "version", "sha256"],
            registry=r,
        )
        self.reloads = Counter(
            "forecaster_reloads",
            "Configuration/model reloads (SIGHUP), by result.",
            ["result"],
            registry=r,
        )
        self.snapshots = Counter(
            "forecaster_snapshots",
            "State snapshots written, by result.",
            ["result"],
            registry=r,
        )
        self.snapshot_restores = Counter(
            "forecaster_snapshot_restores",
            "State snapshot restores at start-up (foreign: written for another model bundle).",
            ["result"],
            registry=r,
        )
        # Exact recovery (engine.py, journal.py): what a start replayed or refused, and the
        # redeliveries answered from the recent-predictions cache.
        self.journal_replayed = Counter(
            "forecaster_journal_replayed_records",
            "Journal records (micro-batches) stepped again at start-up over the restored snapshot.",
            ["route"],
            registry=r,
        )
        self.journal_refused = Counter(
            "forecaster_journal_refused",
            "Journal segments cut short at start-up, by reason (torn, corrupt, gap, foreign): "
            "the records from there on were not replayed.",
            ["route", "reason"],
            registry=r,
        )
        self.journal_write_errors = Counter(
            "forecaster_journal_write_errors",
            "Journal appends that failed (the batch is still answered; a crash before the next "
            "snapshot then restores older states).",
            ["route"],
            registry=r,
        )
        self.journal_bytes = Gauge(
            "forecaster_journal_bytes",
            "Size of the route's current journal segment.",
            ["route"],
            registry=r,
        )
        self.predictions_refused = Counter(
            "forecaster_predictions_refused",
            "Predictions the broker refused after they were published (an MQTT 5 PUBACK or "
            "PUBREC with a failure reason, e.g. not_authorized: its ACL does not let the daemon "
            "write the prediction topic), by route and reason. Included in "
            "forecaster_predictions_total; their readings are acknowledged (the broker would "
            "refuse them again).",
            ["route", "reason"],
            registry=r,
        )
        self.predictions_repeated = Counter(
            "forecaster_predictions_repeated",
            "Readings already stepped (redelivered after a crash, or resent) answered with the "
            "prediction they had the first time; included in forecaster_predictions_total.",
            ["route"],
            registry=r,
        )
        self.readings_clipped = Counter(
            "forecaster_readings_clipped",
            "Readings that entered the model clipped, being farther from their prediction than "
            "the bundle's clip limit (spikes; their predictions are still published and scored).",
            ["route"],
            registry=r,
        )
        self.callback_errors = Counter(
            "forecaster_callback_errors",
            "Exceptions caught and survived, by where: an MQTT callback (an uncaught one would "
            "kill paho's thread), the inference worker, the journal.",
            ["callback"],
            registry=r,
        )
        self.publish_inflight = Gauge(
            "forecaster_publish_inflight",
            "QoS>0 prediction publishes not yet acknowledged by the broker.",
            registry=r,
        )
        self.prediction_abs_error = BulkHistogram(
            "forecaster_prediction_abs_error",
            "|actual - predicted| for each reading that had a prediction, in raw units.",
            ["route"],
            buckets=ABS_ERROR_BUCKETS,
            registry=r,
        )
        self.naive_abs_error = BulkHistogram(
            "forecaster_naive_abs_error",
            "|actual - previous actual| (persistence baseline) for the same readings.",
            ["route"],
            buckets=ABS_ERROR_BUCKETS,
            registry=r,
        )
        self.prediction_squared_error = Counter(
            "forecaster_prediction_squared_error",
            "Sum of (actual - predicted)^2; divide its rate by the abs-error _count rate for MSE.",
            ["route"],
            registry=r,
        )
        self.naive_squared_error = Counter(
            "forecaster_naive_squared_error",
            "Sum of (actual - previous actual)^2, the persistence baseline's squared error.",
            ["route"],
            registry=r,
        )

        self.events = Counter(
            "forecaster_events",
            "Event classifiers: predictions judged against a label that arrived in a payload, "
            "by outcome (tp, fp, tn, fn); precision = tp / (tp + fp), recall = tp / (tp + fn).",
            ["route", "outcome"],
            registry=r,
        )
        self.interval_checks = Counter(
            "forecaster_interval_checks",
            "Readings that resolved a warm prediction carrying an interval, by whether they fell "
            "inside [lower, upper] (outcome inside, outside); live coverage = 1 - outside / all.",
            ["route", "outcome"],
            registry=r,
        )
        self.interval_target = Gauge(
            "forecaster_interval_coverage_target",
            "Coverage the route's prediction interval was calibrated for (e.g. 0.9); compare "
            "with the live coverage from forecaster_interval_checks_total.",
            ["route"],
            registry=r,
        )

        # Process RSS/CPU/FDs and the Python version, on *this* registry rather than the global one.
        BootClockProcessCollector(registry=r)
        PlatformCollector(registry=r)

        # route -> label values of its current forecaster_model_info series.
        self._model_labels: dict[str, tuple[str, str, str, str]] = {}
        self._model_lock = threading.Lock()
        # route -> its forecaster_readings_total child (never removed, so safe to keep).
        self._accepted: dict[str, Counter] = {}

    def accept(self, route: str, n: int) -> None:
        """Count ``n`` accepted readings: called per message, so the labelled child is looked
        up once per route instead of through ``labels()`` (a lock and a validation) each time."""
        child = self._accepted.get(route)
        if child is None:
            child = self._accepted[route] = self.readings.labels(route)
        child.inc(n)

    def reject(self, route: str, reason: str, n: int = 1) -> None:
        """Count ``n`` rejected readings; maps an unmatched route ('') to ``none``.

        Refuses unknown reasons so a typo fails a test instead of inventing a series that no
        dashboard or alert looks at.
        """
        if reason not in REJECT_REASONS:
            raise ValueError(f"unknown reject reason {reason!r}")
        self.readings_rejected.labels(route or NO_ROUTE, reason).inc(n)

    def set_model(self, route: str, name: str, version: str, sha256: str) -> None:
        """Publish the model serving ``route``, removing the series of the model it replaces.

        Without the removal a reload would leave two info series at 1 for one route, and a
        ``* on(route) group_left`` join in a dashboard would fail with duplicate matches.
        """
        new = (route, name, version, sha256)
        with self._model_lock:
            old = self._model_labels.get(route)
            if old is not None and old != new:
                self.model_info.remove(*old)
            self.model_info.labels(*new).set(1)
            self._model_labels[route] = new

    def clear_model(self, route: str) -> None:
        """Drop a route's model-info series (the route was removed by a reload)."""
        with self._model_lock:
            old = self._model_labels.pop(route, None)
            if old is not None:
                self.model_info.remove(*old)

    def observe_errors(self, route: str, abs_err: np.ndarray, naive_abs_err: np.ndarray) -> None:
        """Record a batch of online errors of the model and of persistence for one route.

        Both arrays hold the same readings (a reading without a previous prediction is left out of
        both), so the two histograms' ``_count`` agree and skill = 1 - model/persistence compares
        like with like. Squares are summed in numpy and added once: one lock round-trip per batch
        instead of per reading. Non-finite entries are a bug upstream; they are dropped here rather
        than poisoning a counter forever (a NaN in a counter never goes away).
        """
        a = np.asarray(abs_err, dtype=np.float64).ravel()
        b = np.asarray(naive_abs_err, dtype=np.float64).ravel()
        if a.shape != b.shape:
            raise ValueError(f"abs_err {a.shape} and naive_abs_err {b.shape} differ in shape")
        # Both sums finite: every entry is (a NaN or an infinity makes its sum non-finite);
        # otherwise, or when a sum overflows, the entries are checked one by one.
        with np.errstate(over="ignore", invalid="ignore"):
            screened = math.isfinite(float(a.sum()) + float(b.sum()))
        if not screened:
            keep = np.isfinite(a) & np.isfinite(b)
            if not keep.all():
                log.warning(
                    "dropping %d non-finite online errors on route %s", (~keep).sum(), route
                )
                a, b = a[keep], b[keep]
        if a.size == 0:
            return
        model_h = self.prediction_abs_error.labels(route)
        naive_h = self.naive_abs_error.labels(route)
        model_h.observe_many(a)
        naive_h.observe_many(b)
        self.prediction_squared_error.labels(route).inc(float(np.dot(a, a)))
        self.naive_squared_error.labels(route).inc(float(np.dot(b, b)))

    def count_events(self, route: str, outcomes: dict[str, int]) -> None:
        """Add an event classifier's judged predictions; refuses an unknown outcome."""
        for outcome, n in outcomes.items():
            if outcome not in EVENT_OUTCOMES:
                raise ValueError(f"unknown event outcome {outcome!r}")
            if n:
                self.events.labels(route, outcome).inc(n)

    def count_interval(self, route: str, inside: int, outside: int, target: float) -> None:
        """Add readings checked against their prediction's interval, and its target coverage.

        Both outcomes are created together, so a route whose readings all fall inside still has
        an ``outside`` series at 0 (rates and ratios then need no ``or vector(0)``)."""
        self.interval_checks.labels(route, "inside").inc(inside)
        self.interval_checks.labels(route, "outside").inc(outside)
        self.interval_target.labels(route).set(target)


class BootClockProcessCollector(ProcessCollector):
    """prometheus_client's ProcessCollector, still working under systemd's ``ProcSubset=pid``.

    The stock collector reads the boot time from ``/proc/stat`` and, when that file is hidden
    (our unit hides everything in /proc but process directories), silently exports nothing: no
    RSS, no CPU, no start time. The boot time is also realtime minus CLOCK_BOOTTIME, which
    needs no /proc at all.
    """

    def _boot_time(self) -> float:
        try:
            btime = super()._boot_time()
        except OSError:
            btime = None
        if btime:
            return float(btime)
        return time.time() - time.clock_gettime(time.CLOCK_BOOTTIME)
