"""Intake: from an MQTT message to queued readings, and from the queue to micro-batches.

Runs on paho's subscriber thread (:meth:`Intake.on_message`: route, decode, count rejects,
enqueue) and on the inference worker (:meth:`Intake.take`). The queue is bounded in *readings*,
as ``daemon.queue_size`` and ``forecaster_queue_depth`` say, not in messages: a gateway batch of
5,000 readings weighs 5,000. A single message larger than the whole bound is still admitted into
an empty queue (it could never fit otherwise; its size is capped by the codec's ``max_items``).

When the queue is full, ``on_full`` decides:

- ``block``: the subscriber thread waits for room, so the broker holds the backlog
  (back-pressure without loss; predictions leave on the other connection, so waiting here
  cannot stall the acknowledgements the worker waits for). A wait interrupted by a stop leaves
  the message unacknowledged: the broker redelivers it to the next run.
- ``drop_newest`` / ``drop_oldest``: drop whole messages, counted per reading as ``queue_full``
  and acknowledged deliberately.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

from forecaster.logs import RateLimitedLog
from forecaster.serve.codec import Reading
from forecaster.serve.fastcodec import decode
from forecaster.serve.metrics import NO_ROUTE, Metrics
from forecaster.serve.routes import Route

log = logging.getLogger("forecaster.serve.intake")

Policy = Literal["block", "drop_newest", "drop_oldest"]

#: Seconds between checks of ``accepting`` while ``block`` waits for room.
BLOCK_TURN = 0.25


@dataclass(slots=True)
class Work:
    """One decoded message waiting for the worker.

    ``settled`` turns True once its readings were acknowledged or handed to the transport to
    be acknowledged after their predictions (see responder.py), so a last-resort handler knows
    which messages nobody has answered for.
    """

    route: Route
    readings: list[Reading]
    batch: bool
    topic: str
    mid: int
    qos: int
    settled: bool = False


class Intake:
    """A readings-bounded queue between the subscriber thread and the worker."""

    def __init__(
        self,
        capacity: int,
        policy: Policy,
        metrics: Metrics,
        route_for: Callable[[str], Route | None],
        ack: Callable[[int, int], None],
        wall: Callable[[], float] = time.time,
        clock: Callable[[], float] = time.monotonic,
        rl: RateLimitedLog | None = None,
    ) -> None:
        self.capacity = capacity
        self.policy = policy
        self.metrics = metrics
        self._route_for = route_for
        self._ack = ack
        self._wall = wall
        self._clock = clock
        self._rl = rl or RateLimitedLog(log)
        self._cond = threading.Condition()
        self._items: deque[Work] = deque()
        self._readings = 0
        #: Producers waiting for room (``block``); tests wait on it instead of sleeping.
        self.waiting = 0
        #: Readings the worker waits for (0: it is not waiting): 1 while idle, then a full batch.
        self._want = 0
        #: Messages are taken only while True; before start and after stop they are left
        #: unacknowledged so the broker redelivers them to the next run.
        self.accepting = False

    # ------------------------------------------------------------------ state

    @property
    def readings(self) -> int:
        """Readings queued now (what ``forecaster_queue_depth`` shows)."""
        return self._readings

    def __len__(self) -> int:
        """Messages queued now."""
        return len(self._items)

    def empty(self) -> bool:
        return not self._items

    def stop_accepting(self) -> None:
        """Refuse new messages and wake producers blocked on a full queue."""
        with self._cond:
            self.accepting = False
            self._cond.notify_all()

    # ------------------------------------------------------------------ subscriber thread

    def on_message(self, topic: str, payload: bytes, mid: int, qos: int) -> None:
        """Route, decode, count, enqueue. Runs on paho's thread; never steps the model."""
        if not self.accepting:
            return  # not acknowledged: the broker redelivers it to the next run
        route = self._route_for(topic)
        if route is None:
            self.metrics.reject(NO_ROUTE, "no_route")
            self._ack(mid, qos)
            return
        decoded = decode(payload, topic, route.spec, self._wall())
        for reason, detail, lost in decoded.rejects:  # lost: a batch refused whole counts all
            self.metrics.reject(route.name, reason.value, lost)
            self._rl.warning(
                f"reject:{route.name}:{reason.value}",
                "route %s: rejected %d reading(s) on %r: %s (%s)",
                route.name,
                lost,
                topic[:200],
                reason.value,
                detail,
            )
        if not decoded.readings:
            self._ack(mid, qos)
            return
        self.metrics.accept(route.name, len(decoded.readings))
        self.put(Work(route, decoded.readings, decoded.batch, topic, mid, qos))

    def put(self, work: Work) -> bool:
        """Queue ``work`` under the ``on_full`` policy; True if it was queued.

        A message not queued was either dropped (counted as ``queue_full``, acknowledged) or,
        under ``block``, interrupted by a stop (left unacknowledged for redelivery).
        """
        n = len(work.readings)
        dropped: list[Work] = []
        queued = False
        with self._cond:
            if self.policy == "block":
                while not self._fits(n):
                    if not self.accepting:
                        return False
                    self.waiting += 1
                    try:
                        self._cond.wait(BLOCK_TURN)
                    finally:
                        self.waiting -= 1
                queued = True
            elif self._fits(n):
                queued = True
            elif self.policy == "drop_oldest":
                while not self._fits(n):
                    old = self._items.popleft()
                    self._readings -= len(old.readings)
                    dropped.append(old)
                queued = True
            else:  # drop_newest
                dropped.append(work)
            if queued:
                self._items.append(work)
                self._readings += n
                self._wake()
        for w in dropped:
            self._drop(w)
        return queued

    def _fits(self, n: int) -> bool:
        # Caller holds the lock. An empty queue takes any message (see the module docstring).
        return not self._items or self._readings + n <= self.capacity

    def _drop(self, work: Work) -> None:
        self.metrics.reject(work.route.name, "queue_full", len(work.readings))
        self._rl.warning(
            "queue_full",
            "queue full (%d readings): dropping readings (on_full=%s)",
            self.capacity,
            self.policy,
        )
        work.settled = True
        self._ack(work.mid, work.qos)

    # ------------------------------------------------------------------ worker

    def take(self, first_timeout: float, max_readings: int, max_delay: float) -> list[Work]:
        """A micro-batch: wait up to ``first_timeout`` for a first message, then gather more
        until ``max_readings`` are in hand or ``max_delay`` seconds have passed since the first.

        Messages are never split, so a batch can exceed ``max_readings`` by less than one
        message. Returns [] if nothing arrived in time.

        The worker is woken twice per batch at most, not once per message: by the message that
        ends an idle wait, and by the one that fills the batch (see :meth:`_wake`). Each wake-up
        is a thread hand-off (a futex and the GIL changing hands) that single-reading messages
        would otherwise pay one by one while a batch fills.
        """
        with self._cond:
            if not self._items:
                self._want = 1
                try:
                    self._cond.wait(first_timeout)
                finally:
                    self._want = 0
                if not self._items:
                    return []
            deadline = self._clock() + max_delay
            # A queue smaller than a batch wakes the worker when full, not at the deadline.
            want = min(max_readings, self.capacity)
            while self._readings < want:
                left = deadline - self._clock()
                if left <= 0:
                    break
                had = self._readings
                self._want = want
                try:
                    self._cond.wait(left)
                finally:
                    self._want = 0
                if self._readings == had:
                    break  # timed out (or woken by a stop): go with what is here
            items = [self._pop()]
            n = len(items[0].readings)
            while n < max_readings and self._items:
                item = self._pop()
                items.append(item)
                n += len(item.readings)
        return items

    def _wake(self) -> None:
        # Caller holds the lock. Wake the worker only when what it waits for is here.
        if self._want and self._readings >= self._want:
            self._cond.notify_all()

    def _pop(self) -> Work:
        # Caller holds the lock.
        work = self._items.popleft()
        self._readings -= len(work.readings)
        if self.waiting:
            self._cond.notify_all()  # room for producers blocked under ``block``
        return work
