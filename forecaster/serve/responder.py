"""The responder: a stepped micro-batch becomes metrics, prediction messages and acknowledgements.

This is the heart of at-least-once delivery. For every message taken from the intake, exactly one
of these happens, and :attr:`Work.settled` records that it did:

- it has predictions: they are encoded into one message and published; its reading is
  acknowledged by the transport once that message is out (written for QoS 0, PUBACK for QoS ≥ 1);
- it has none (every reading dropped, counted by the engine, or a window still filling): its
  reading is acknowledged now;
- its prediction cannot be published (topic over MQTT's limit, paho refused it): only this
  message pays. Its readings are counted under the transport's reason (``topic_too_long``,
  ``publish_failed``), acknowledged deliberately, logged once per 10 s per reason;
- the broker refuses the published prediction (MQTT 5, e.g. its ACL): the transport
  acknowledges the readings and reports the message's :class:`Delivery` (route, predictions,
  topic), which the daemon counts in ``forecaster_predictions_refused_total`` and logs;
- the engine raised on the route's batch (a bug): the route's messages are stepped again one by
  one, so only the message that raises again is counted (``internal_error``) and acknowledged;
- the transport is stopping: the message is left unacknowledged and the broker redelivers it.

Durability comes first: with a journal (see journal.py), ``engine.step`` has appended the batch
and its predictions before any of them is published or any reading acknowledged here.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from operator import attrgetter
from typing import Protocol, cast

import numpy as np

from forecaster.logs import RateLimitedLog
from forecaster.serve.codec import RECEIVED_OF, Prediction, Reading, prediction_topic
from forecaster.serve.columns import ReadingColumns, join_readings
from forecaster.serve.engine import Outcome
from forecaster.serve.fastcodec import encode_predictions, encode_singles
from forecaster.serve.intake import Work
from forecaster.serve.metrics import Metrics
from forecaster.serve.mqtt import Ack, Delivery, PublishResult
from forecaster.serve.routes import Route

log = logging.getLogger("forecaster.serve.responder")

__all__ = ["Publisher", "Responder"]


class Publisher(Protocol):
    """What the responder needs of the transport (:class:`forecaster.serve.mqtt.Transport`)."""

    def publish(
        self, out: Delivery, payload: bytes, qos: int, retain: bool, acks: list[Ack]
    ) -> PublishResult: ...

    def ack(self, mid: int, qos: int) -> None: ...


#: A prediction message to publish: its delivery, payload and the readings' acknowledgements.
Outgoing = tuple[Delivery, bytes, list[Ack]]
#: A message with predictions: its work, its predicted readings and its prediction message.
Ready = tuple[Work, Sequence[Reading], Outgoing]
#: :meth:`forecaster.serve.mqtt.Transport.publish_many`: messages, QoS, retain → a result each.
PublishMany = Callable[[Sequence[Outgoing], int, bool], list[PublishResult]]


_READINGS_OF, _BATCH_OF = attrgetter("readings"), attrgetter("batch")


def _all_single(works: Sequence[Work]) -> bool:
    """Every message carries one reading as a reading object (not a batch of one, whose
    prediction message is a list)."""
    return list(map(len, map(_READINGS_OF, works))).count(1) == len(works) and not any(
        map(_BATCH_OF, works)
    )


def _outgoing(route: str, w: Work, predictions: int, topic: str, payload: bytes) -> Outgoing:
    """A prediction message: where it goes and what it carries, its payload, and the reading
    message it acknowledges once out (none for QoS 0)."""
    return Delivery(route, predictions, topic), payload, [(w.mid, w.qos)] if w.qos else []


class Responder:
    """Steps each route's share of a micro-batch and answers every message in it."""

    def __init__(
        self,
        publisher: Publisher,
        metrics: Metrics,
        wall: Callable[[], float] = time.time,
        clock: Callable[[], float] = time.monotonic,
        rl: RateLimitedLog | None = None,
    ) -> None:
        self.publisher = publisher
        self.metrics = metrics
        self._wall = wall
        self._clock = clock
        self._rl = rl or RateLimitedLog(log)
        # A publisher that takes many messages at once (the MQTT transport) does.
        self._publish_many: PublishMany | None = getattr(publisher, "publish_many", None)
        #: Readings stepped so far (for the STATUS line).
        self.processed = 0

    # ------------------------------------------------------------------ entry point

    def respond(self, items: Sequence[Work]) -> None:
        """Step and answer ``items`` (one micro-batch), route by route, in arrival order."""
        now = self._clock()
        by_route: dict[str, list[Work]] = {}
        for w in items:
            by_route.setdefault(w.route.name, []).append(w)
        for works in by_route.values():
            route = works[0].route
            readings = join_readings([w.readings for w in works])
            try:
                outcome = route.engine.step(readings, now)
            except Exception as exc:
                self._error("step", route.name, exc)
                for w in works:
                    self._respond_alone(route, w, now)
                continue
            self._answer(route, works, readings, outcome)

    def _respond_alone(self, route: Route, work: Work, now: float) -> None:
        """Step one message by itself, after its route's whole batch raised."""
        try:
            outcome = route.engine.step(work.readings, now)
        except Exception as exc:
            self._error("step", route.name, exc)
            self.settle_unanswered([work], "internal_error")
            return
        self._answer(route, [work], work.readings, outcome)

    def settle_unanswered(self, works: Sequence[Work], reason: str) -> None:
        """Count and acknowledge the messages of ``works`` that nobody answered yet.

        The last resort of the worker's error handler: deliberate, counted per reading, never
        a silent acknowledgement of a whole batch.
        """
        for w in works:
            if w.settled:
                continue
            self.metrics.reject(w.route.name, reason, len(w.readings))
            self._ack_now(w)

    def _ack_now(self, w: Work) -> None:
        """Settle ``w`` by acknowledging it at once: no prediction message will carry its ack."""
        w.settled = True
        self.publisher.ack(w.mid, w.qos)

    # ------------------------------------------------------------------ one route

    def _answer(
        self, route: Route, works: list[Work], readings: Sequence[Reading], outcome: Outcome
    ) -> None:
        try:
            self._count(route.name, outcome)
        except Exception as exc:  # a metrics bug must not cost the predictions
            self._error("metrics", route.name, exc)
        # The messages with predictions, encoded, then published together (one paho call for a
        # micro-batch of single-reading messages, see bulkpub.py).
        if len(readings) == len(works) and _all_single(works):
            ready = self._singles(route, works, outcome.predictions)
        else:
            ready = self._messages(route, works, outcome.predictions)
        published = 0
        # Each answered reading's receive time, gathered with C-level passes (no Python step
        # per reading of a gateway batch); all were published at ``now``.
        received: list[float] = []
        results = self._send(route, ready)
        now = self._wall()
        for (w, stepped, item), result in zip(ready, results, strict=True):
            if self._settle(route, w, result):
                published += item[0].predictions
                if isinstance(stepped, ReadingColumns):
                    received.extend(stepped.received)
                elif len(stepped) == 1:
                    received.append(stepped[0].received)
                else:
                    received.extend(map(RECEIVED_OF, stepped))
        m = self.metrics
        if received:
            latencies = now - np.asarray(received)
            m.end_to_end_seconds.observe_many(np.maximum(latencies, 0.0))
        m.predictions.labels(route.name).inc(published)
        m.streams.labels(route.name).set(len(route.engine.store))
        self.processed += len(readings)

    def _messages(
        self, route: Route, works: list[Work], predictions: Sequence[Prediction | None]
    ) -> list[Ready]:
        """Each message's prediction message; a message none of whose readings has a
        prediction (all dropped, a window filling) is acknowledged now instead."""
        manifest = route.engine.bundle.manifest
        ready: list[Ready] = []
        pos = 0
        for w in works:
            k = len(w.readings)
            preds = predictions[pos : pos + k]
            pos += k
            missing = preds.count(None)
            if missing == k:
                self._ack_now(w)
                continue
            answered: Sequence[Prediction]
            stepped: Sequence[Reading]
            if missing:
                keep = [i for i, p in enumerate(preds) if p is not None]
                answered = [cast(Prediction, preds[i]) for i in keep]
                stepped = [w.readings[i] for i in keep]
            else:  # a list of predictions, or columns (written by the encoder as they are)
                answered, stepped = cast(Sequence[Prediction], preds), w.readings
            item = self._message(route, w, answered, manifest.name, manifest.version)
            if item is not None:
                ready.append((w, stepped, item))
        return ready

    def _singles(
        self, route: Route, works: list[Work], predictions: Sequence[Prediction | None]
    ) -> list[Ready]:
        """:meth:`_messages` for single-reading messages, their payloads encoded together
        (``fastcodec.encode_singles``): profiles put the general path's per-message encoding
        and bookkeeping at over a third of the worker's step-and-answer time on single
        readings; this path cut that time per reading by about a fifth (``benchmarks.worker``,
        benchmarks/README.md, 2026-12-03)."""
        preds: Sequence[Prediction]
        if predictions.count(None):
            answered: list[Work] = []
            for w, p in zip(works, predictions, strict=True):
                if p is None:
                    self._ack_now(w)
                else:
                    answered.append(w)
            preds = [p for p in predictions if p is not None]
        else:
            answered, preds = works, cast(Sequence[Prediction], predictions)
        if not preds:
            return []
        manifest = route.engine.bundle.manifest
        try:
            payloads = encode_singles(preds, manifest.name, manifest.version)
        except Exception:  # a bug: message by message, so only a message that fails pays
            return self._messages(route, answered, list(preds))
        name, template = route.name, route.cfg.prediction_topic
        return [
            (w, w.readings, _outgoing(name, w, 1, prediction_topic(template, w.topic), payload))
            for w, payload in zip(answered, payloads, strict=True)
        ]

    def _message(
        self, route: Route, w: Work, preds: Sequence[Prediction], name: str, version: str
    ) -> Outgoing | None:
        """One message's prediction message (delivery, payload, the reading's ack), or None when
        it cannot be made (counted and acknowledged as an internal error)."""
        try:
            payload = encode_predictions(preds, name, version, w.batch)
            topic = prediction_topic(route.cfg.prediction_topic, w.topic)
        except Exception as exc:
            self._error("publish", route.name, exc)
            self.settle_unanswered([w], "internal_error")
            return None
        return _outgoing(route.name, w, len(preds), topic, payload)

    def _send(self, route: Route, ready: list[Ready]) -> list[PublishResult | None]:
        """Publish the messages, together where the publisher can; None where publishing raised
        (counted and acknowledged as an internal error)."""
        qos, retain = route.cfg.qos, route.cfg.retain
        if self._publish_many is not None and len(ready) > 1:
            try:
                return list(self._publish_many([item for _, _, item in ready], qos, retain))
            except Exception as exc:  # a bug: the messages not settled yet are answered so
                self._error("publish", route.name, exc)
                self.settle_unanswered([w for w, _, _ in ready], "internal_error")
                return [None] * len(ready)
        results: list[PublishResult | None] = []
        for w, _, (out, payload, acks) in ready:
            try:
                results.append(self.publisher.publish(out, payload, qos, retain, acks))
            except Exception as exc:
                self._error("publish", route.name, exc)
                self.settle_unanswered([w], "internal_error")
                results.append(None)
        return results

    def _settle(self, route: Route, w: Work, result: PublishResult | None) -> bool:
        """What publishing one message came to; True if it went out (or will, for QoS ≥ 1)."""
        if result is None:
            return False  # raised: settled as an internal error already
        if result is PublishResult.SENT:
            w.settled = True  # the transport acknowledges it once the prediction is out
            return True
        if result is PublishResult.STOPPING:
            w.settled = True  # deliberately unacknowledged: redelivered to the next run
            return False
        self._rl.warning(
            f"publish:{route.name}:{result.value}",
            "route %s: prediction for %r not published (%s); its %d reading(s) are "
            "acknowledged and counted",
            route.name,
            w.topic[:200],
            result.value,
            len(w.readings),
        )
        self.settle_unanswered([w], result.value)
        return False

    def _count(self, route_name: str, outcome: Outcome) -> None:
        m = self.metrics
        if outcome.calls:
            calls = np.asarray(outcome.calls, dtype=np.float64)
            m.batch_size.observe_many(calls[:, 0])
            m.inference_seconds.observe_many(calls[:, 1])
        for reason, n in outcome.drops.items():
            if n:
                m.reject(route_name, reason, n)
                self._rl.warning(
                    f"drop:{route_name}:{reason}",
                    "route %s: %d reading(s) dropped: %s",
                    route_name,
                    n,
                    reason,
                )
        for reason, n in outcome.resets.items():
            if n:
                m.state_resets.labels(route_name, reason).inc(n)
        if outcome.evicted:
            m.streams_evicted.labels(route_name, "lru").inc(len(outcome.evicted))
        if outcome.events:
            m.count_events(route_name, outcome.events)
        if outcome.abs_err:
            m.observe_errors(
                route_name, np.concatenate(outcome.abs_err), np.concatenate(outcome.naive_abs_err)
            )
        if outcome.interval_coverage is not None:
            m.count_interval(
                route_name,
                outcome.interval_inside,
                outcome.interval_outside,
                outcome.interval_coverage,
            )
        if outcome.repeated:
            m.predictions_repeated.labels(route_name).inc(outcome.repeated)
        if outcome.clipped:
            m.readings_clipped.labels(route_name).inc(outcome.clipped)
        if outcome.journal_error is not None:
            m.journal_write_errors.labels(route_name).inc()
            self._rl.warning(
                f"journal:{route_name}",
                "route %s: journal append failed (%s); answering anyway, a crash before the "
                "next snapshot would restore older states",
                route_name,
                outcome.journal_error,
            )
        if outcome.snapshot is not None:  # the journal reached its bound: snapshot + rotate
            m.snapshots.labels(outcome.snapshot).inc()

    def _error(self, where: str, route_name: str, exc: Exception) -> None:
        """An unexpected exception: counted, and logged once per 10 s per place (no flood)."""
        self.metrics.callback_errors.labels(where).inc()
        log.debug("unexpected error in %s on route %s", where, route_name, exc_info=exc)
        self._rl.warning(
            f"error:{where}:{route_name}",
            "route %s: unexpected error in %s (caught, counted): %s: %s",
            route_name,
            where,
            type(exc).__name__,
            exc,
        )
