"""One served partition: what arrived from its consumer, and the readings it becomes.

Receiving is split in two so the per-message work on nats-py's callback is one append:

- :meth:`Partition.on_message` (the reply-inbox subscription's callback) keeps the subject,
  payload and reply subject of a delivery, or books a status message that ended a pull request;
- :meth:`Partition.take` (the serve loop, once per turn) turns everything received since the
  last turn into the intake's :class:`~forecaster.serve.intake.Work` items: delivery facts read
  from the reply subject (:func:`.source.delivery`), route and decode by the MQTT daemon's own
  :class:`~forecaster.serve.intake.Intake` (so rejects are counted exactly as there), and the
  partition's metrics updated once per batch rather than once per message.

The worker is asyncio-only, so there is no thread hand-off: :class:`BatchIntake` is the intake
without its locked queue.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from forecaster.logs import RateLimitedLog
from forecaster.serve.intake import Intake, Work
from forecaster.serve.metrics import Metrics
from forecaster.serve.nats import leases, source
from forecaster.serve.nats.partitions import split_subject
from forecaster.serve.routes import Route, route_for

log = logging.getLogger("forecaster.serve.nats")


class BatchIntake(Intake):
    """:class:`Intake`'s routing, decoding and reject counting, collecting into a plain list:
    the NATS worker decodes on the same thread that steps, so the bounded, locked queue between
    a subscriber thread and a worker (and its notify per message) has nothing to do here. The
    bound is the consumer's ``max_ack_pending`` instead."""

    def __init__(
        self,
        metrics: Metrics,
        route_for: Callable[[str], Route | None],
        wall: Callable[[], float],
        clock: Callable[[], float],
        rl: RateLimitedLog,
    ) -> None:
        # readings without a prediction are acknowledged with their batch (AckPolicy ALL)
        super().__init__(
            1 << 60, "block", metrics, route_for, lambda mid, qos: None, wall, clock, rl
        )
        self.accepting = True
        self.batch: list[Work] = []

    def put(self, work: Work) -> bool:
        self.batch.append(work)
        return True


@dataclass
class Partition:
    """A partition this process serves, from its takeover to its hand-back or loss."""

    k: int
    lease: leases.Lease
    routes: list[Route]
    consumer: str
    #: readings up to this stream sequence are stepped without publishing (already answered)
    quiet_until: int
    scratch: Path
    pulls: source.Pulls
    metrics: Metrics
    rl: RateLimitedLog
    #: pre-resolved label children of the per-partition metrics (set once per batch)
    lag: Any
    replayed: Any
    clock: Callable[[], float] = time.monotonic
    inbox: str = ""
    sub: Any = None
    #: deliveries not yet taken: (subject, payload, reply subject)
    received: list[tuple[str, bytes, str]] = field(default_factory=list)
    #: reply subject and stream sequence of the newest reading taken (acked after its batch)
    last_reply: str = ""
    last_seq: int = 0
    #: stream sequence of the newest reading the states include
    stepped_seq: int = 0
    acked_seq: int = 0
    #: the stored time of the reading being decoded (its receive time, also on replay)
    wall: float = 0.0
    releasing: bool = False
    lost: bool = False
    next_snapshot: float = 0.0
    #: the confirm-and-acknowledge of this partition's latest batch (acks stay in order)
    finishing: Any = None
    in_flight: int = 0
    intake: BatchIntake = field(init=False)
    _cache: dict[str, Route | None] = field(default_factory=dict)
    #: subject -> MQTT topic (a stream's subject repeats with every reading)
    _topics: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.intake = BatchIntake(self.metrics, self.route_for, self._wall, self.clock, self.rl)

    def _wall(self) -> float:
        return self.wall

    def route_for(self, topic: str) -> Route | None:
        return route_for(self.routes, self._cache, topic)

    async def on_message(self, msg: Any) -> None:
        """The reply inbox's callback: keep a delivery for the next turn; a status message
        (408 expired, 409 ...) ends a pull request with ``Nats-Pending-Messages`` unsent."""
        reply = msg.reply
        if reply:
            self.received.append((msg.subject, msg.data, reply))
            return
        hdr = msg.headers
        if hdr and hdr.get("Status"):
            pending = hdr.get("Nats-Pending-Messages")
            self.pulls.ended(int(pending) if pending and pending.isdigit() else None)

    def take(self) -> list[Work]:
        """Everything received since the last call, routed and decoded, in delivery order."""
        got, self.received = self.received, []
        if not got or self.lost:
            return []
        self.pulls.received(len(got))
        intake = self.intake
        replayed = 0
        pending = -1
        topics = self._topics
        for subject, data, reply in got:
            try:
                seq, stored_ns, pending = source.delivery(reply)
                topic = topics.get(subject) or self._topic(subject)
            except Exception as exc:  # not a reading of ours: acknowledged with the batch
                self.rl.warning("nats:foreign", "unexpected message %r: %s", subject[:200], exc)
                continue
            if seq <= self.quiet_until:
                replayed += 1
            if seq > self.last_seq:
                self.last_reply, self.last_seq = reply, seq
            self.wall = stored_ns / 1e9
            try:
                intake.on_message(topic, data, seq, 1)
            except Exception as exc:  # never let one message take the worker down
                self.metrics.callback_errors.labels("on_message").inc()
                self.rl.warning("nats:intake", "intake failed on %r: %s", topic[:200], exc)
        if replayed:
            self.replayed.inc(replayed)
        if pending >= 0:
            self.lag.set(pending)
        works, intake.batch = intake.batch, []
        return works

    def _topic(self, subject: str) -> str:
        _, topic = split_subject(subject)
        if len(self._topics) > 100_000:
            self._topics.clear()
        self._topics[subject] = topic
        return topic

    async def guarded(self, work: Awaitable[Any]) -> None:
        """Run ``work`` for this partition; an error (an ack or a request while the connection
        is down) gives the partition up: whoever takes it next (us, maybe) restores it exactly
        and answers what was not acknowledged."""
        try:
            await work
        except Exception as exc:
            self.metrics.callback_errors.labels("nats").inc()
            log.warning("partition %d: %s: %s; giving it up", self.k, type(exc).__name__, exc)
            self.lost = True
