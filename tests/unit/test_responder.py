"""Responder: every message of a stepped micro-batch is answered exactly once.

A fake publisher records what would go to the broker and can refuse chosen topics; the model,
the engine and the state store are the real ones (the bundled water-flow LSTM).
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import CollectorRegistry

from forecaster.model.bundle import Bundle
from forecaster.serve import fastcodec
from forecaster.serve import responder as responder_module
from forecaster.serve.codec import Reading
from forecaster.serve.columns import ReadingColumns
from forecaster.serve.config import RouteConfig
from forecaster.serve.engine import Engine, Outcome
from forecaster.serve.intake import Work
from forecaster.serve.metrics import Metrics
from forecaster.serve.mqtt import Ack, Delivery, PublishResult
from forecaster.serve.responder import Responder
from forecaster.serve.routes import Route, new_store

ROOT = Path(__file__).resolve().parents[2]
MODEL = ROOT / "models" / "water-flow"
WALL = 1_700_000_000.0


@pytest.fixture(scope="module")
def bundle() -> Bundle:
    return Bundle.load(MODEL)


class FakePublisher:
    """Records publishes and direct acks; ``results`` maps a topic to a refusal."""

    def __init__(self, log: list[str] | None = None) -> None:
        self.published: list[tuple[str, bytes, int, list[Ack]]] = []
        self.acked: list[Ack] = []
        self.deliveries: list[Delivery] = []
        self.results: dict[str, PublishResult | Exception] = {}
        self.log = log if log is not None else []
        self.before_publish: Callable[[], None] = lambda: None

    def publish(
        self, out: Delivery, payload: bytes, qos: int, retain: bool, acks: list[Ack]
    ) -> PublishResult:
        self.log.append(f"publish {out.topic}")
        self.before_publish()
        result = self.results.get(out.topic, PublishResult.SENT)
        if isinstance(result, Exception):
            raise result
        if result is PublishResult.SENT:
            self.published.append((out.topic, payload, qos, acks))
            self.deliveries.append(out)
        return result

    def ack(self, mid: int, qos: int) -> None:
        self.acked.append((mid, qos))


class PoisonEngine(Engine):
    """The real engine, except that a reading of value 666 makes it raise (a stand-in bug)."""

    def step(self, readings: Sequence[Reading], now: float) -> Outcome:
        if any(r.value == 666.0 for r in readings):
            raise RuntimeError("poisoned")
        return super().step(readings, now)


def make_route(bundle: Bundle, engine_cls: type[Engine] = Engine, qos: int = 1) -> Route:
    rc = RouteConfig.model_validate(
        {"name": "water", "subscribe": ["sensors/+/flow"], "bundle": str(MODEL), "qos": qos}
    )
    return Route(rc, engine_cls(bundle, new_store(rc, bundle.state_shapes)))


class Rig:
    def __init__(self, route: Route) -> None:
        self.route = route
        self.registry = CollectorRegistry()
        self.log: list[str] = []
        self.pub = FakePublisher(self.log)
        self.responder = Responder(
            self.pub, Metrics(self.registry), wall=lambda: WALL, clock=lambda: 50.0
        )

    def work(self, mid: int, stream: str, *values: float, qos: int = 1, ts0: float = 0) -> Work:
        topic = f"sensors/{stream}/flow"
        readings = [Reading(topic, v, ts0 + k, WALL - 0.25, topic) for k, v in enumerate(values)]
        return Work(self.route, readings, len(readings) > 1, topic, mid, qos)

    def sample(self, name: str, **labels: str) -> float:
        return self.registry.get_sample_value(name, labels) or 0.0

    def rejected(self, reason: str) -> float:
        return self.sample("forecaster_readings_rejected_total", route="water", reason=reason)

    def answered(self, works: list[Work]) -> tuple[Any, ...]:
        """Everything the broker and a scrape would see of how ``works`` were answered."""
        return (
            self.pub.published,
            self.pub.deliveries,
            self.pub.acked,
            [w.settled for w in works],
            self.sample("forecaster_predictions_total", route="water"),
            self.rejected("duplicate"),
            self.sample("forecaster_end_to_end_seconds_count"),
            self.sample("forecaster_end_to_end_seconds_sum"),
        )


def test_prediction_is_published_and_its_reading_acked_by_the_transport(bundle: Bundle) -> None:
    rig = Rig(make_route(bundle))
    w = rig.work(7, "a", 3.0)
    rig.responder.respond([w])
    ((topic, payload, qos, acks),) = rig.pub.published
    assert (topic, qos, acks) == ("forecast/sensors/a/flow", 1, [(7, 1)])
    assert b'"stream":"sensors/a/flow"' in payload.replace(b" ", b"")
    assert rig.pub.acked == []  # acknowledged once the broker confirms, not before
    assert rig.pub.deliveries == [Delivery("water", 1, "forecast/sensors/a/flow")]
    assert w.settled
    assert rig.sample("forecaster_predictions_total", route="water") == 1
    assert rig.sample("forecaster_end_to_end_seconds_count") == 1
    assert rig.sample("forecaster_end_to_end_seconds_sum") == pytest.approx(0.25)
    assert rig.responder.processed == 1


def test_a_message_s_delivery_counts_its_predictions_not_its_readings(bundle: Bundle) -> None:
    # What a broker's refusal of the message is counted under (forecaster_predictions_refused)
    rig = Rig(make_route(bundle))
    ok = rig.work(1, "a", 1.0, 2.0, 3.0)
    late = rig.work(2, "a", 9.0, 4.0, ts0=2.0)  # its first reading repeats ts 2.0
    rig.responder.respond([ok, late])
    assert rig.pub.deliveries == [
        Delivery("water", 3, "forecast/sensors/a/flow"),
        Delivery("water", 1, "forecast/sensors/a/flow"),
    ]
    assert rig.sample("forecaster_predictions_total", route="water") == 4


def test_qos0_reading_asks_for_no_ack(bundle: Bundle) -> None:
    rig = Rig(make_route(bundle))
    rig.responder.respond([rig.work(1, "a", 3.0, qos=0)])
    assert rig.pub.published[0][3] == []


def test_dropped_readings_are_counted_and_acked_without_a_publish(bundle: Bundle) -> None:
    rig = Rig(make_route(bundle))
    rig.responder.respond([rig.work(1, "a", 1.0, 2.0)])
    rig.pub.published.clear()
    again = rig.work(2, "a", 5.0, ts0=1)  # the last timestamp again: a duplicate
    late = rig.work(3, "a", 5.0, ts0=0)  # an earlier one: out of order
    rig.responder.respond([again, late])
    assert rig.pub.published == [] and rig.pub.acked == [(2, 1), (3, 1)]
    assert again.settled and late.settled
    assert rig.rejected("duplicate") == 1 and rig.rejected("out_of_order") == 1


def test_the_journal_holds_a_batch_before_any_of_it_is_published(
    bundle: Bundle, tmp_path: Path
) -> None:
    route = make_route(bundle)
    route.engine.recover(tmp_path / "water.npz", tmp_path / "water.journal", now=0.0)
    journal = route.engine.journal
    assert journal is not None
    rig = Rig(route)
    seen_at_publish: list[int] = []
    rig.pub.before_publish = lambda: seen_at_publish.append(journal.last_seq)
    before = journal.last_seq
    rig.responder.respond([rig.work(1, "a", 1.0), rig.work(2, "b", 2.0)])
    assert len(seen_at_publish) == 2 and min(seen_at_publish) > before


@pytest.mark.parametrize(
    "refusal", [PublishResult.TOPIC_TOO_LONG, PublishResult.FAILED, ValueError("paho says no")]
)
def test_an_unpublishable_prediction_costs_only_its_own_message(
    bundle: Bundle, refusal: PublishResult | Exception
) -> None:
    rig = Rig(make_route(bundle))
    rig.pub.results["forecast/sensors/bad/flow"] = refusal
    items = [rig.work(1, "a", 1.0), rig.work(2, "bad", 2.0, 3.0), rig.work(3, "c", 4.0)]
    rig.responder.respond(items)
    assert [p[0] for p in rig.pub.published] == [
        "forecast/sensors/a/flow",
        "forecast/sensors/c/flow",
    ]  # the bystanders in the same batch still get their predictions
    assert rig.pub.acked == [(2, 1)]  # acknowledged deliberately, once
    reason = refusal.value if isinstance(refusal, PublishResult) else "internal_error"
    assert rig.rejected(reason) == 2  # counted per reading under its own reason
    assert rig.sample("forecaster_predictions_total", route="water") == 2
    assert all(w.settled for w in items)
    if isinstance(refusal, Exception):
        assert rig.sample("forecaster_callback_errors_total", callback="publish") == 1


def test_stopping_leaves_the_reading_unacked_for_redelivery(bundle: Bundle) -> None:
    rig = Rig(make_route(bundle))
    rig.pub.results["forecast/sensors/a/flow"] = PublishResult.STOPPING
    w = rig.work(1, "a", 1.0)
    rig.responder.respond([w])
    assert rig.pub.acked == [] and w.settled
    assert rig.sample("forecaster_predictions_total", route="water") == 0
    assert (
        rig.sample("forecaster_readings_rejected_total", route="water", reason="publish_failed")
        == 0
    )


def test_an_engine_error_is_isolated_to_the_message_that_causes_it(bundle: Bundle) -> None:
    rig = Rig(make_route(bundle, PoisonEngine))
    items = [rig.work(1, "a", 1.0), rig.work(2, "p", 666.0), rig.work(3, "c", 4.0)]
    rig.responder.respond(items)
    assert sorted(p[0] for p in rig.pub.published) == [
        "forecast/sensors/a/flow",
        "forecast/sensors/c/flow",
    ]
    assert rig.pub.acked == [(2, 1)]
    assert rig.rejected("internal_error") == 1
    assert rig.sample("forecaster_callback_errors_total", callback="step") == 2  # batch, then alone


def test_settle_unanswered_counts_and_acks_only_the_unanswered(bundle: Bundle) -> None:
    rig = Rig(make_route(bundle))
    done, left = rig.work(1, "a", 1.0), rig.work(2, "b", 1.0, 2.0)
    done.settled = True
    rig.responder.settle_unanswered([done, left], "internal_error")
    assert rig.pub.acked == [(2, 1)] and left.settled
    assert rig.rejected("internal_error") == 2


class TypoEngine(Engine):
    """The real engine, reporting a drop under a reason the metrics do not know (a bug)."""

    def step(self, readings: Sequence[Reading], now: float) -> Outcome:
        out = super().step(readings, now)
        out.drops["tpyo"] += 1
        return out


def test_a_metrics_bug_does_not_cost_the_predictions(bundle: Bundle) -> None:
    rig = Rig(make_route(bundle, TypoEngine))
    rig.responder.respond([rig.work(1, "a", 1.0), rig.work(2, "b", 2.0)])
    assert len(rig.pub.published) == 2 and rig.pub.acked == []
    assert rig.sample("forecaster_callback_errors_total", callback="metrics") == 1


def test_single_reading_messages_are_answered_as_the_general_path_answers_them(
    bundle: Bundle, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A micro-batch of single-reading messages takes a path of its own (payloads encoded
    together); it publishes, acknowledges and counts exactly what the per-message path does,
    with dropped readings (a repeated ts) and QoS 0 among them. A gateway batch of one reading
    in the micro-batch sends it down the general path (its payload is a list)."""
    seed = 20261203
    rng = random.Random(seed)

    taken: list[int] = []
    singles = Responder._singles

    def spy(self: Responder, route: Route, works: list[Work], preds: Any) -> Any:
        taken.append(len(works))
        return singles(self, route, works, preds)

    def run(single_path: bool) -> tuple[Any, ...]:
        monkeypatch.setattr(Responder, "_singles", spy)
        rig = Rig(make_route(bundle))
        works = []
        for mid in range(1, 61):
            stream = f"s{rng.randrange(8)}"
            w = rig.work(mid, stream, rng.uniform(0, 50), qos=rng.choice((0, 1)), ts0=mid // 2)
            works.append(w)
        if not single_path:
            monkeypatch.setattr(responder_module, "_all_single", lambda works: False)
        rig.responder.respond(works)
        monkeypatch.undo()
        return rig.answered(works)

    fast = run(True)
    rng.seed(seed)
    general = run(False)
    assert fast == general, f"seed {seed}"
    assert taken == [60], f"seed {seed}: the single-reading path was not taken once"
    _, _, acked, settled, _, duplicates, _, _ = fast
    assert duplicates > 0 and acked and all(settled), f"seed {seed}: the mix lacks a case"

    rig = Rig(make_route(bundle))
    works = [rig.work(1, "a", 1.0), rig.work(2, "b", 2.0)]
    works[1].batch = True
    monkeypatch.setattr(Responder, "_singles", None)  # not taken: would raise
    rig.responder.respond(works)
    assert [payload.lstrip()[:1] for _, payload, _, _ in rig.pub.published] == [b"{", b"["]


def test_gateway_batches_as_columns_are_answered_as_their_objects(bundle: Bundle) -> None:
    """Gateway batches decoded by the fast codec hold their readings as columns, and a
    micro-batch of them is answered from the engine's prediction columns: the same payloads,
    deliveries, acknowledgements and counts as the same messages with reading objects, with
    dropped readings (repeated timestamps) and QoS 0 among them."""
    seed = 20261203
    rng = random.Random(seed)
    spec = make_route(bundle).spec
    messages = []
    for mid in range(1, 25):
        items = [
            {"stream": f"s{i}", "value": round(rng.uniform(0, 50), 3), "ts": 1000 + mid // 3}
            for i in rng.sample(range(30), rng.randint(1, 12))
        ]
        messages.append((mid, json.dumps(items).encode(), rng.choice((0, 1))))

    def run(as_columns: bool) -> tuple[Any, ...]:
        rig = Rig(make_route(bundle))
        works = []
        for mid, payload, qos in messages:
            decoded = fastcodec.decode(payload, "gateway/batch", spec, WALL - 0.25)
            readings = decoded.readings if as_columns else list(decoded.readings)
            assert isinstance(decoded.readings, ReadingColumns), f"seed {seed}"
            works.append(Work(rig.route, readings, True, "gateway/batch", mid, qos))
        for start in range(0, len(works), 6):  # micro-batches of six messages
            rig.responder.respond(works[start : start + 6])
        return rig.answered(works)

    columns, objects = run(True), run(False)
    assert columns == objects, f"seed {seed}"
    published, _, _, settled, _, duplicates, _, _ = columns
    assert duplicates > 0 and all(settled) and published, f"seed {seed}: a case lacks"
