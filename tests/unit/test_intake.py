"""Intake: routing and decoding on the MQTT thread, the readings-bounded queue, micro-batches.

No broker: acknowledgements are recorded by a fake, routes come from a real ``RouteSet`` over
the bundled water-flow model, metrics are read back from a fresh registry.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry

from forecaster.harness import wait_until
from forecaster.serve.codec import Reading
from forecaster.serve.config import Config
from forecaster.serve.intake import Intake, Policy, Work
from forecaster.serve.metrics import Metrics
from forecaster.serve.routes import Route, RouteSet

ROOT = Path(__file__).resolve().parents[2]
MODEL = ROOT / "models" / "water-flow"


class FakeClock:
    """Returns ``now``, then moves it on by ``step`` on every reading."""

    def __init__(self, now: float = 1000.0, step: float = 0.0) -> None:
        self.now = now
        self.step = step

    def __call__(self) -> float:
        now = self.now
        self.now += self.step
        return now


@pytest.fixture(scope="module")
def route(tmp_path_factory: pytest.TempPathFactory) -> Route:
    cfg = Config.model_validate(
        {
            "daemon": {"state_dir": str(tmp_path_factory.mktemp("state"))},
            "metrics": {"enabled": False},
            "routes": [{"name": "water", "subscribe": ["sensors/+/flow"], "bundle": str(MODEL)}],
        }
    )
    routes = RouteSet(cfg, Metrics(CollectorRegistry()))
    routes.load()
    return routes.routes[0]


class Rig:
    """An Intake with recorded acks and its own metrics."""

    def __init__(
        self,
        route: Route,
        capacity: int = 10,
        policy: Policy = "block",
        clock: Callable[[], float] | None = None,
    ) -> None:
        self.route = route
        self.registry = CollectorRegistry()
        self.metrics = Metrics(self.registry)
        self.acked: list[tuple[int, int]] = []
        self.intake = Intake(
            capacity,
            policy,
            self.metrics,
            lambda t: route if t.startswith("sensors/") else None,
            lambda m, q: self.acked.append((m, q)),
            wall=lambda: 1_700_000_000.0,
            clock=clock or FakeClock(),
        )
        self.intake.accepting = True

    def work(self, mid: int, n: int = 1) -> Work:
        readings = [Reading(f"s{mid}", float(k), float(k), 0.0, "t") for k in range(n)]
        return Work(self.route, readings, n > 1, f"sensors/s{mid}/flow", mid, 1)

    def rejected(self, reason: str, route: str = "water") -> float:
        v = self.registry.get_sample_value(
            "forecaster_readings_rejected_total", {"route": route, "reason": reason}
        )
        return v or 0.0


def test_message_is_routed_decoded_and_queued(route: Route) -> None:
    rig = Rig(route)
    rig.intake.on_message("sensors/a/flow", b'{"value": 3.5, "ts": 12}', 5, 1)
    assert rig.acked == []  # acknowledged only once answered
    (w,) = rig.intake.take(0, 100, 0)
    assert (w.mid, w.qos, w.topic, w.route.name) == (5, 1, "sensors/a/flow", "water")
    assert [(r.stream, r.value, r.ts) for r in w.readings] == [("sensors/a/flow", 3.5, 12.0)]
    assert rig.registry.get_sample_value("forecaster_readings_total", {"route": "water"}) == 1


def test_unrouted_and_rejected_messages_are_counted_and_acked(route: Route) -> None:
    rig = Rig(route)
    rig.intake.on_message("elsewhere/x", b"1", 1, 1)
    rig.intake.on_message("sensors/a/flow", b"NaN", 2, 1)
    rig.intake.on_message(
        "sensors/a/flow", b'[{"value": 1, "stream": "s"}, {"value": "x", "stream": "s"}]', 3, 1
    )
    assert rig.rejected("no_route", route="none") == 1
    assert rig.rejected("not_finite") == 1
    assert rig.rejected("wrong_type") == 1
    assert rig.acked == [(1, 1), (2, 1)]  # the batch still has a good reading: queued
    (w,) = rig.intake.take(0, 100, 0)
    assert w.mid == 3 and len(w.readings) == 1


def test_nothing_is_taken_or_acked_before_accepting(route: Route) -> None:
    rig = Rig(route)
    rig.intake.accepting = False
    rig.intake.on_message("sensors/a/flow", b"1", 1, 1)
    assert rig.acked == [] and rig.intake.empty()  # the broker redelivers it to the next run


def test_queue_is_bounded_in_readings_not_messages(route: Route) -> None:
    rig = Rig(route, capacity=10, policy="drop_newest")
    assert rig.intake.put(rig.work(1, n=6))
    assert not rig.intake.put(rig.work(2, n=5))  # 6 + 5 > 10 readings, though only 2 messages
    assert rig.intake.put(rig.work(3, n=4))  # 6 + 4 fits exactly
    assert rig.intake.readings == 10 and len(rig.intake) == 2
    assert rig.rejected("queue_full") == 5  # counted per reading, not per message
    assert rig.acked == [(2, 1)]


def test_a_message_larger_than_the_bound_enters_an_empty_queue(route: Route) -> None:
    rig = Rig(route, capacity=3, policy="drop_newest")
    assert rig.intake.put(rig.work(1, n=50))
    assert not rig.intake.put(rig.work(2, n=1))
    assert [w.mid for w in rig.intake.take(0, 1000, 0)] == [1]
    assert rig.intake.readings == 0


def test_drop_oldest_drops_as_many_old_messages_as_needed(route: Route) -> None:
    rig = Rig(route, capacity=10, policy="drop_oldest")
    for mid, n in ((1, 4), (2, 4), (3, 2)):
        assert rig.intake.put(rig.work(mid, n))
    assert rig.intake.put(rig.work(4, n=7))  # needs 7: drops 1 (4) and 2 (4)
    assert rig.acked == [(1, 1), (2, 1)]
    assert rig.rejected("queue_full") == 8
    assert [w.mid for w in rig.intake.take(0, 1000, 0)] == [3, 4]


def test_block_waits_for_room_and_loses_nothing(route: Route) -> None:
    rig = Rig(route, capacity=2, policy="block")
    assert rig.intake.put(rig.work(1, n=2))
    done: list[bool] = []
    producer = threading.Thread(target=lambda: done.append(rig.intake.put(rig.work(2, n=1))))
    producer.start()
    assert wait_until(lambda: rig.intake.waiting == 1, 10), (
        "the producer did not block on a full queue"
    )
    assert [w.mid for w in rig.intake.take(0, 1, 0)] == [1]
    producer.join(timeout=10)
    assert done == [True] and rig.acked == [] and rig.rejected("queue_full") == 0
    assert [w.mid for w in rig.intake.take(0, 1, 0)] == [2]


def test_block_gives_up_unacked_when_stopping(route: Route) -> None:
    rig = Rig(route, capacity=1, policy="block")
    assert rig.intake.put(rig.work(1))
    done: list[bool] = []
    producer = threading.Thread(target=lambda: done.append(rig.intake.put(rig.work(2))))
    producer.start()
    assert wait_until(lambda: rig.intake.waiting == 1, 10)
    rig.intake.stop_accepting()
    producer.join(timeout=10)
    assert done == [False] and rig.acked == []  # left for the broker to redeliver


def test_take_gathers_whole_messages_up_to_max_batch(route: Route) -> None:
    rig = Rig(route, capacity=100, policy="drop_newest")
    for mid in range(1, 6):
        rig.intake.put(rig.work(mid, n=3))
    batch = rig.intake.take(0, 7, 10.0)  # 3 + 3 < 7, so a third message: 9 readings
    assert [w.mid for w in batch] == [1, 2, 3]
    assert rig.intake.readings == 6


def test_take_returns_at_max_delay_without_a_full_batch(route: Route) -> None:
    # Each clock reading is a second later: the 0.5 s deadline has passed at the first check,
    # so the batch ends with what is in hand instead of waiting for more.
    rig = Rig(route, capacity=100, policy="drop_newest", clock=FakeClock(step=1.0))
    rig.intake.put(rig.work(1))
    assert [w.mid for w in rig.intake.take(0, 1000, 0.5)] == [1]


def test_take_includes_a_message_that_arrives_within_max_delay(route: Route) -> None:
    rig = Rig(route, capacity=100, policy="drop_newest")  # a clock that stands still
    rig.intake.put(rig.work(1))
    late = threading.Timer(0.05, lambda: rig.intake.put(rig.work(2)))
    late.start()
    try:
        assert [w.mid for w in rig.intake.take(0, 2, 30.0)] == [1, 2]
    finally:
        late.cancel()


class WaitCountingCondition(threading.Condition):
    """A condition that counts its ``wait`` calls (the worker's waits for a batch to fill)."""

    def __init__(self) -> None:
        super().__init__()
        self.waits = 0

    def wait(self, timeout: float | None = None) -> bool:
        self.waits += 1
        return super().wait(timeout)


def test_the_batching_window_counts_from_the_oldest_message_s_arrival(route: Route) -> None:
    """Messages that waited while the worker stepped the previous batch are taken at once
    once ``max_delay`` has passed since they arrived: no second full window for them."""
    now = [0.0]
    rig = Rig(route, capacity=100, policy="drop_newest", clock=lambda: now[0])
    cond = WaitCountingCondition()
    rig.intake._cond = cond
    rig.intake.put(rig.work(1))
    now[0] = 29.0  # queued 29 s ago with a 30 s window: waits for more
    rig.intake.put(rig.work(2))
    late = threading.Timer(0.05, lambda: rig.intake.put(rig.work(3)))
    late.start()
    try:
        assert [w.mid for w in rig.intake.take(0, 3, 30.0)] == [1, 2, 3]
    finally:
        late.cancel()
    assert cond.waits >= 1
    rig.intake.put(rig.work(4))
    now[0] = 100.0  # queued at 29, its window closed at 59
    rig.intake.put(rig.work(5))
    cond.waits = 0
    assert [w.mid for w in rig.intake.take(0, 1000, 30.0)] == [4, 5]
    assert cond.waits == 0  # taken without waiting


def test_take_on_an_empty_queue_returns_nothing(route: Route) -> None:
    rig = Rig(route)
    assert rig.intake.take(0.0, 10, 0.0) == []


class CountingCondition(threading.Condition):
    """A condition that counts its ``notify_all`` calls (the worker's wake-ups)."""

    def __init__(self) -> None:
        super().__init__()
        self.wakes = 0

    def notify_all(self) -> None:
        self.wakes += 1
        super().notify_all()


def test_the_worker_is_woken_once_to_start_and_once_when_the_batch_is_full(route: Route) -> None:
    """Not once per message: each wake-up is a thread hand-off."""
    rig = Rig(route, capacity=100, policy="drop_newest")  # a clock that stands still
    cond = CountingCondition()
    rig.intake._cond = cond
    got: list[list[int]] = []
    worker = threading.Thread(
        target=lambda: got.append([w.mid for w in rig.intake.take(30.0, 10, 30.0)])
    )
    worker.start()
    try:
        for mid in range(1, 11):
            want = 1 if mid == 1 else 10  # what the worker waits for before this message
            assert wait_until(lambda w=want: rig.intake._want == w, 10), (mid, rig.intake._want)
            rig.intake.put(rig.work(mid))
        worker.join(timeout=10)
        assert got == [list(range(1, 11))]
        assert cond.wakes == 2
    finally:
        rig.intake.stop_accepting()
        worker.join(timeout=10)


def test_a_queue_smaller_than_a_batch_wakes_the_worker_when_full(route: Route) -> None:
    rig = Rig(route, capacity=3, policy="drop_newest")  # a clock that stands still
    got: list[list[int]] = []
    worker = threading.Thread(
        target=lambda: got.append([w.mid for w in rig.intake.take(30.0, 256, 30.0)])
    )
    worker.start()
    assert wait_until(lambda: rig.intake._want == 1, 10)
    for mid in (1, 2, 3):
        rig.intake.put(rig.work(mid))
    worker.join(timeout=10)  # well before the 30 s deadline: the queue is full at 3
    assert got == [[1, 2, 3]]
    assert rig.rejected("queue_full") == 0


MIXED = [
    ("sensors/a/flow", b'{"value": 1.5, "ts": 12}'),
    ("elsewhere/x", b"1"),  # no route
    ("sensors/b/flow", b"NaN"),  # rejected
    ("sensors/c/flow", b'[{"value": 1, "stream": "s"}, {"value": "x", "stream": "s"}]'),
    ("sensors/d/flow", b"7.25"),  # a plain number
    ("sensors/e/flow", b'{"value": 2, "ts": 13, "label": 1}'),
    ("sensors/f/flow", b'{"value": 1, "value": 2}'),  # a repeated key: rejected
]


def _outcome(rig: Rig) -> tuple[object, ...]:
    works = rig.intake.take(0, 1000, 0)
    samples = sorted(
        (s.name, tuple(sorted(s.labels.items())), s.value)
        for m in rig.registry.collect()
        if m.name.startswith("forecaster_readings")
        for s in m.samples
        if not s.name.endswith("_created")
    )
    shown = [(w.mid, w.topic, w.batch, w.readings, w.route.name) for w in works]
    return shown, rig.acked, samples


@pytest.mark.parametrize("clean", [True, False])
def test_messages_taken_together_are_taken_as_one_by_one(route: Route, clean: bool) -> None:
    """Queued works, acknowledgements and counters are the same as from on_message per
    message, for a burst of clean reading objects (decoded together) and for a mixed one."""
    messages = (
        [(f"sensors/s{k}/flow", b'{"value": %d.5, "ts": %d}' % (k, 100 + k)) for k in range(20)]
        if clean
        else MIXED
    )
    alone, together = Rig(route, capacity=1000), Rig(route, capacity=1000)
    for mid, (topic, payload) in enumerate(messages):
        alone.intake.on_message(topic, payload, mid, 1)
    together.intake.on_messages([(t, p, mid, 1) for mid, (t, p) in enumerate(messages)])
    assert _outcome(together) == _outcome(alone)


def test_messages_taken_together_respect_the_queue_policy(route: Route) -> None:
    rig = Rig(route, capacity=3, policy="drop_newest")
    messages = [(f"sensors/s{k}/flow", b'{"value": %d}' % k, k, 1) for k in range(5)]
    rig.intake.on_messages(messages)
    assert [w.mid for w in rig.intake.take(0, 1000, 0)] == [0, 1, 2]
    assert rig.acked == [(3, 1), (4, 1)] and rig.rejected("queue_full") == 2
    rig.intake.accepting = False
    rig.intake.on_messages(messages)
    assert rig.intake.empty() and len(rig.acked) == 2  # left for the broker to redeliver


def test_a_failure_while_taking_messages_costs_only_its_message(route: Route) -> None:
    rig = Rig(route, capacity=100)
    real = rig.intake._route_for

    def flaky(topic: str) -> Route | None:
        if "boom" in topic:
            raise RuntimeError("boom")
        return real(topic)

    rig.intake._route_for = flaky
    for names in ("a boom b", "a b boom c d e"):  # one by one, and taken together
        rig.intake.on_messages(
            [(f"sensors/{s}/flow", b'{"value": 1}', mid, 1) for mid, s in enumerate(names.split())]
        )
    assert [w.mid for w in rig.intake.take(0, 100, 0)] == [0, 2, 0, 1, 3, 4, 5]
    assert rig.acked == []  # the one that failed is left for the broker to redeliver
    errors = {"callback": "on_message"}
    assert rig.registry.get_sample_value("forecaster_callback_errors_total", errors) == 2


def test_a_queue_blocked_mid_burst_wakes_the_worker_for_what_is_queued(route: Route) -> None:
    rig = Rig(route, capacity=2, policy="block")
    messages = [(f"sensors/s{k}/flow", b'{"value": %d}' % k, k, 1) for k in range(4)]
    producer = threading.Thread(target=rig.intake.on_messages, args=(messages,))
    producer.start()
    taken: list[int] = []
    while len(taken) < 4:
        taken += [w.mid for w in rig.intake.take(10, 2, 10.0)]  # woken when 2 are queued
    producer.join(timeout=10)
    assert taken == [0, 1, 2, 3] and rig.acked == []
