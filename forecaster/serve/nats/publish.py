"""Predictions out: collected from the responder, then made durable (or flushed) per batch.

A batch's readings are acknowledged only after :meth:`Out.confirm` returned True for its
predictions; what "confirmed" means is the ``nats.publish`` setting:

- ``"jetstream"`` (:class:`JetStreamOut`): every prediction is published with a reply subject
  of our own PubAck inbox and counted when the stream's PubAck comes back; the batch is confirmed
  when all are stored. Those not confirmed within ``PUBACK_TIMEOUT`` (or refused) are published
  again while the lease holds. One wildcard subscription collects every PubAck, so a prediction
  costs one buffered publish and one dictionary entry: nats-py's ``publish_async`` (a future, a
  semaphore and a wait per message) was a tenth of a saturated worker's time.
- ``"core"`` (:class:`CoreOut`): the predictions are written and the connection flushed; the
  server has them, but a prediction in flight when that server dies, or one sent while no
  subscriber listens, is gone (at-most-once for predictions; readings still at-least-once).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import Any, Protocol

from forecaster.logs import RateLimitedLog
from forecaster.serve.metrics import Metrics
from forecaster.serve.mqtt import Ack, Delivery, PublishResult
from forecaster.serve.nats.partition import Partition
from forecaster.serve.nats.partitions import topic_to_subject

log = logging.getLogger("forecaster.serve.nats")

PUBACK_TIMEOUT = 5.0
#: seconds between attempts at predictions the stream did not confirm
REPUBLISH_PAUSE = 0.2

Message = tuple[str, bytes]


class Sink:
    """The responder's publisher: collects one partition's predictions for :class:`Out`, and
    drops those of readings the previous owner already answered (``quiet``)."""

    def __init__(self) -> None:
        self.out: list[Message] = []
        self.quiet = 0

    def begin(self, quiet: int) -> None:
        self.out = []
        self.quiet = quiet

    def publish(
        self, out: Delivery, payload: bytes, qos: int, retain: bool, acks: list[Ack]
    ) -> PublishResult:
        if acks and acks[0][0] <= self.quiet:
            return PublishResult.STOPPING  # replay: state only, no message
        self.out.append((topic_to_subject(out.topic), payload))
        return PublishResult.SENT

    def ack(self, mid: int, qos: int) -> None:
        """Acknowledgement is per batch (AckPolicy ALL), after the publishes: nothing here."""


class Out(Protocol):
    """A way out for predictions, chosen by ``nats.publish``."""

    async def start(self) -> None:
        """Set up what it needs on the connection (a PubAck inbox)."""
        ...

    async def confirm(self, part: Partition, out: list[Message]) -> bool:
        """Publish ``out``; True once it may be acknowledged, False if the partition was lost
        (or given up) first: its readings are then answered again by the next owner."""
        ...


class CoreOut:
    """``publish = "core"``: written and flushed (a PING/PONG round trip) before the ack.

    The partitions' batches of one turn share one flush: a batch joins the flush whose PING is
    not sent yet (so it follows the batch's publishes), rather than each sending its own."""

    def __init__(self, nc: Any, rl: RateLimitedLog) -> None:
        self.nc = nc
        self.rl = rl
        self._next: asyncio.Future[bool] | None = None

    async def start(self) -> None:
        """Nothing to set up."""

    async def _flush(self) -> bool:
        self._next = None  # publishes from now on need the next flush
        try:
            await self.nc.flush(timeout=PUBACK_TIMEOUT)
        except Exception as exc:
            self.rl.warning("nats:flush", "flush failed: %s; giving the partition up", exc)
            return False
        return True

    async def confirm(self, part: Partition, out: list[Message]) -> bool:
        publish = self.nc.publish
        for subject, payload in out:
            await publish(subject, payload)
        flushed = self._next
        if flushed is None:
            flushed = self._next = asyncio.ensure_future(self._flush())
        if not await asyncio.shield(flushed):
            # not acknowledged, and no later batch may acknowledge past it (AckPolicy ALL):
            # give the partition up, its next owner answers these readings again
            part.lost = True
            return False
        return True


class _Batch:
    """The predictions of one batch still waiting for a PubAck."""

    def __init__(self) -> None:
        self.left: dict[str, Message] = {}
        self.refused = 0
        self.done: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def answered(self, token: str, stored: bool) -> None:
        if stored:
            self.left.pop(token, None)
        else:
            self.refused += 1
        if len(self.left) <= self.refused and not self.done.done():
            self.done.set_result(None)


class JetStreamOut:
    """``publish = "jetstream"``: stored in the prediction stream before the ack (PubAcks)."""

    def __init__(
        self,
        nc: Any,
        metrics: Metrics,
        rl: RateLimitedLog,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.nc = nc
        self.metrics = metrics
        self.rl = rl
        self.clock = clock
        self.prefix = ""
        self.sub: Any = None
        self.sent = 0
        #: reply token -> the batch waiting for it
        self.waiting: dict[str, _Batch] = {}

    async def start(self) -> None:
        self.prefix = self.nc.new_inbox()
        self.sub = await self.nc.subscribe(self.prefix + ".*", cb=self._on_puback)

    async def _on_puback(self, msg: Any) -> None:
        batch = self.waiting.pop(msg.subject, None)
        if batch is not None:  # else: late, its batch already gave up on it
            data = msg.data  # {"stream":..,"seq":..} or {"error":..}; a 503 status is empty
            batch.answered(msg.subject, bool(data) and b'"error"' not in data)

    async def _send(self, out: list[Message]) -> list[Message]:
        """Publish ``out`` once; those not stored within ``PUBACK_TIMEOUT``."""
        batch = _Batch()
        publish = self.nc.publish
        for subject, payload in out:
            self.sent += 1
            token = f"{self.prefix}.{self.sent}"
            batch.left[token] = (subject, payload)
            self.waiting[token] = batch
            await publish(subject, payload, reply=token)
        if len(batch.left) > batch.refused:
            try:
                await asyncio.wait_for(asyncio.shield(batch.done), PUBACK_TIMEOUT)
            except TimeoutError:
                pass
        for token in batch.left:
            self.waiting.pop(token, None)
        return list(batch.left.values())

    async def confirm(self, part: Partition, out: list[Message]) -> bool:
        todo = out
        while todo:
            todo = await self._send(todo)
            if todo:
                self.metrics.callback_errors.labels("publish").inc()
                self.rl.warning(
                    "nats:puback", "%d prediction(s) not confirmed; publishing again", len(todo)
                )
                if part.lost or not part.lease.valid(self.clock()):
                    return False
                await asyncio.sleep(REPUBLISH_PAUSE)
        return True
