"""Answering a partition: its received readings stepped as one micro-batch, the predictions
confirmed, the batch acknowledged, in that order.

A batch is stepped on the loop without an await between taking the readings and recording the
cut (so the states and the stream sequence they include always agree), then confirmed and
acknowledged in a task of its own, so the next batch is stepped while the server stores the
previous one's predictions. Acknowledgements of one partition stay in order: each task waits for
the partition's previous one before acknowledging (AckPolicy ALL acknowledges everything up to
the message), and a batch that cannot be confirmed marks the partition lost, so no later batch
acknowledges past it.
"""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass
from typing import Any

from forecaster.logs import RateLimitedLog
from forecaster.serve.metrics import Metrics
from forecaster.serve.nats.partition import Partition
from forecaster.serve.nats.publish import Message, Out, Sink
from forecaster.serve.responder import Responder

#: batches of one partition stepped and not yet acknowledged at most
MAX_IN_FLIGHT = 3


@dataclass
class _Answer:
    """One partition's stepped batch: predictions to confirm, then the reading to ack."""

    part: Partition
    out: list[Message]
    cut_reply: str
    cut_seq: int


class Answerer:
    """Steps partitions' batches with the MQTT daemon's responder and settles them."""

    def __init__(self, nc: Any, out: Out, metrics: Metrics, rl: RateLimitedLog) -> None:
        self.nc = nc
        self.out = out
        self.metrics = metrics
        self.rl = rl
        self.sink = Sink()
        self.responder = Responder(self.sink, metrics, rl=rl)

    def due(self, part: Partition) -> bool:
        """Step this partition now? Always when nothing of it is in flight; while batches
        are, only once a good batch has gathered (small batches cost a model call and a
        confirmation each), and never beyond ``MAX_IN_FLIGHT``."""
        if not part.received:
            return False
        if part.in_flight == 0:
            return True
        return part.in_flight < MAX_IN_FLIGHT and len(part.received) >= part.pulls.batch // 2

    def step(self, part: Partition) -> bool:
        """Step what ``part`` has received and launch its confirmation; True if it did."""
        answer = self._step(part)
        if answer is None:
            return False
        part.in_flight += 1
        part.finishing = asyncio.create_task(part.guarded(self._finish(answer, part.finishing)))
        return True

    async def settle(self, part: Partition) -> None:
        """Step what ``part`` has received and wait until everything stepped so far was
        confirmed and acknowledged (or the partition lost): before a snapshot that ends an
        ownership, so the next owner replays nothing."""
        self.step(part)
        if part.finishing is not None:
            with contextlib.suppress(BaseException):
                await part.finishing

    def _step(self, part: Partition) -> _Answer | None:
        """No await in here: the states and the cut agree. None if there is nothing to answer
        or acknowledge."""
        items = part.take()
        cut_reply, cut_seq = part.last_reply, part.last_seq
        if not items and cut_seq <= part.stepped_seq:
            return None
        out: list[Message] = []
        if items:
            self.sink.begin(part.quiet_until)
            try:
                self.responder.respond(items)
            except Exception as exc:
                self.metrics.callback_errors.labels("worker").inc()
                self.rl.warning("error:worker", "unexpected error answering a batch: %s", exc)
                self.responder.settle_unanswered(items, "internal_error")
            out = self.sink.out
            self.sink.out = []
        part.stepped_seq = max(part.stepped_seq, cut_seq)
        return _Answer(part, out, cut_reply, cut_seq)

    async def _finish(self, answer: _Answer, before: asyncio.Task[None] | None) -> None:
        """Confirm the predictions, wait for the batch before, then acknowledge the batch's
        last reading (AckPolicy ALL: it acknowledges the whole batch and those before it)."""
        part = answer.part
        try:
            if answer.out and not await self.out.confirm(part, answer.out):
                # not acknowledged: redelivered to the next owner (the recent cache answers
                # it again); no later batch may acknowledge past it
                part.lost = True
            if before is not None:
                await before
            if answer.cut_reply and answer.cut_seq > part.acked_seq and not part.lost:
                await self.nc.publish(answer.cut_reply, b"")
                part.acked_seq = answer.cut_seq
        finally:
            part.in_flight -= 1
