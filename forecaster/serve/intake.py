"""Intake: from an MQTT message to queued readings, and from the queue to micro-batches.

Runs on paho's subscriber thread (:meth:`Intake.on_message`: route, decode, count rejects,
enqueue; :meth:`Intake.on_messages` for what one read of the socket brought, decoded together)
and on the inference worker (:meth:`Intake.take`). The queue is bounded in *readings*,
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
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from operator import itemgetter
from typing import Literal, cast

from forecaster.logs import RateLimitedLog
from forecaster.serve.codec import Reading
from forecaster.serve.fastcodec import clean_objects, decode
from forecaster.serve.metrics import NO_ROUTE, Metrics
from forecaster.serve.routes import Route

log = logging.getLogger("forecaster.serve.intake")

Policy = Literal["block", "drop_newest", "drop_oldest"]

#: Fewest messages :meth:`Intake.on_messages` takes together: below it, one by one costs less
#: (the joint decode's fixed cost; measured with 2, 4 and 16 single-reading messages).
TOGETHER = 4

#: One MQTT message as the transport hands it over: topic, payload, message id, QoS.
Message = tuple[str, bytes, int, int]
_TOPIC = itemgetter(0)


def _alone(reading: Reading) -> list[Reading]:
    return [reading]


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
    readings: Sequence[Reading]  # a list, or a gateway batch's columns (columns.py)
    batch: bool
    topic: str
    mid: int
    qos: int
    settled: bool = False
    #: When it entered the queue (the intake's monotonic clock): what ``max_delay`` counts from.
    queued: float = 0.0


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
        work = self._admit(topic, payload, mid, qos, self._wall())
        if work is not None:
            self.put(work)

    def on_messages(self, messages: Sequence[Message]) -> None:
        """:meth:`on_message` for each of ``messages`` (in order; what one read of the socket
        brought), with the reading objects of a route decoded in one call
        (:func:`~forecaster.serve.fastcodec.clean_objects`), the accepted readings counted once
        per route, and the queue's lock taken once (:meth:`put_many`)."""
        if len(messages) < TOGETHER:
            self._one_by_one(messages)
            return
        if not self.accepting:
            return  # not acknowledged: the broker redelivers them to the next run
        received = self._wall()
        try:  # nothing is counted, acknowledged or queued before this succeeds
            routes = list(map(self._route_for, map(_TOPIC, messages)))
            fast = self._objects(messages, routes, received)
        except Exception:  # a bug must cost no more than one message: take them one by one
            self._one_by_one(messages)
            return
        works: list[Work] = []
        accepted: dict[str, int] = {}
        for k, (topic, payload, mid, qos) in enumerate(messages):
            route = routes[k]
            readings = fast.get(k)
            if route is None or readings is None:
                try:
                    work = self._admit(topic, payload, mid, qos, received, route, count=False)
                except Exception as exc:  # as paho's guard would: this message only
                    self._failed(f"message on {topic[:200]!r}", exc)
                    continue
                if work is None:
                    continue
            else:
                work = Work(route, readings, False, topic, mid, qos)
            accepted[work.route.name] = accepted.get(work.route.name, 0) + len(work.readings)
            works.append(work)
        for name, n in accepted.items():
            self.metrics.accept(name, n)
        self.put_many(works)

    def _one_by_one(self, messages: Sequence[Message]) -> None:
        """:meth:`on_message` for each, an exception costing only its own message."""
        for message in messages:
            try:
                self.on_message(*message)
            except Exception as exc:
                self._failed(f"message on {message[0][:200]!r}", exc)

    def _failed(self, what: str, exc: Exception) -> None:
        """An unexpected exception while taking messages in: counted as a callback error of
        ``on_message`` and logged once per 10 s; a message it cost stays unacknowledged, as
        one whose callback raised (the broker redelivers it after a reconnect)."""
        self.metrics.callback_errors.labels("on_message").inc()
        log.debug("intake failed on %s", what, exc_info=exc)
        self._rl.warning(
            "intake:error",
            "intake failed on %s (caught, counted): %s: %s",
            what,
            type(exc).__name__,
            exc,
        )

    def _objects(
        self, messages: Sequence[Message], routes: list[Route | None], received: float
    ) -> dict[int, list[Reading]]:
        """Each message's reading, by position, for the routes whose messages are all clean
        reading objects (decoded together); the others are left to :func:`decode`."""
        by_route: dict[int, list[int]] = {}
        for k, route in enumerate(routes):
            if route is not None:
                by_route.setdefault(id(route), []).append(k)
        out: dict[int, list[Reading]] = {}
        for where in by_route.values():
            if len(where) < 2:
                continue
            spec = cast(Route, routes[where[0]]).spec
            got = clean_objects(
                [messages[k][1] for k in where], [messages[k][0] for k in where], spec, received
            )
            if got is not None:
                out.update(zip(where, map(_alone, got), strict=True))
        return out

    def _admit(
        self,
        topic: str,
        payload: bytes,
        mid: int,
        qos: int,
        received: float,
        route: Route | None = None,
        *,
        count: bool = True,
    ) -> Work | None:
        """Route and decode one message, counting and acknowledging what is rejected; its
        :class:`Work` when it holds readings (counted as accepted unless ``count`` is False)."""
        if route is None:
            route = self._route_for(topic)
        if route is None:
            self.metrics.reject(NO_ROUTE, "no_route")
            self._ack(mid, qos)
            return None
        decoded = decode(payload, topic, route.spec, received)
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
            return None
        if count:
            self.metrics.accept(route.name, len(decoded.readings))
        return Work(route, decoded.readings, decoded.batch, topic, mid, qos)

    def put(self, work: Work) -> bool:
        """Queue ``work`` under the ``on_full`` policy; True if it was queued.

        A message not queued was either dropped (counted as ``queue_full``, acknowledged) or,
        under ``block``, interrupted by a stop (left unacknowledged for redelivery).
        """
        return self.put_many([work]) == 1

    def put_many(self, works: Sequence[Work]) -> int:
        """:meth:`put` for each of ``works`` in order, under one hold of the lock and with at
        most one wake-up of the worker; returns how many were queued."""
        dropped: list[Work] = []
        queued = 0
        now = self._clock()
        with self._cond:
            for work in works:
                work.queued = now  # a message that waits for room below only looks older
                done = self._put_locked(work, dropped)
                if done is None:
                    break  # stopping while blocked: this one and the rest stay unacknowledged
                queued += done
            self._wake()
        for w in dropped:
            self._drop(w)
        return queued

    def _put_locked(self, work: Work, dropped: list[Work]) -> bool | None:
        """Queue ``work`` (True) or drop it (False; the messages to drop go to ``dropped``);
        None when ``block`` gave up because the intake stopped accepting. Caller holds the
        lock."""
        n = len(work.readings)
        if self.policy == "block":
            while not self._fits(n):
                if not self.accepting:
                    return None
                self._wake()  # what is queued so far may be the batch the worker waits for
                self.waiting += 1
                try:
                    self._cond.wait(BLOCK_TURN)
                finally:
                    self.waiting -= 1
        elif not self._fits(n):
            if self.policy == "drop_newest":
                dropped.append(work)
                return False
            while not self._fits(n):  # drop_oldest
                old = self._items.popleft()
                self._readings -= len(old.readings)
                dropped.append(old)
        self._items.append(work)
        self._readings += n
        return True

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
        until ``max_readings`` are in hand or the oldest queued message has waited
        ``max_delay`` seconds.

        Counted from the oldest message's arrival, not from this call: messages that arrived
        while the worker stepped the previous batch have waited already, and waiting a full
        ``max_delay`` more for them (as this did before 2026-12-03) added up to a whole
        batch's processing time to every reading's latency at moderate rates, where batches
        never fill (benchmarks/README.md, 2026-12-03: at 6,000 single-reading messages/s, p99
        18-24 → 12-18 ms, for 5-10 % more CPU per reading in smaller batches).

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
            deadline = self._items[0].queued + max_delay
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
