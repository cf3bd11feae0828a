"""One ``forecaster serve`` process on NATS JetStream: claim partitions, serve them, hand them over.

The loop (one asyncio thread; the model steps on it between awaits, so no lock guards a store):

- **leases** (:mod:`.leases`): every TTL/3 renew ours (a failed renewal, or TTL·0.75 without a
  successful one, stops that partition at once), write our heartbeat, count live members, claim
  free partitions up to ``ceil(N / live)`` and hand back extras one at a time;
- **takeover** of partition k: restore its snapshot (object store), read the previous
  consumers' ack floor, create this epoch's consumer from ``min(S, F) + 1`` and step readings up
  to F without publishing (:mod:`.source`);
- **serve**: pull requests straight to ``$JS.API.CONSUMER.MSG.NEXT``; each message goes
  through the MQTT daemon's own :class:`~forecaster.serve.intake.Intake` (route, decode, reject
  counting) and :class:`~forecaster.serve.responder.Responder` (step, encode, error isolation);
  the predictions are published (``publish = "jetstream"``: awaited PubAcks, retried until
  stored; ``"core"``: a flush), then the batch's last reading is acknowledged (AckPolicy ALL);
- **snapshots** every ``daemon.snapshot_interval`` and at every hand-over or stop.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import shutil
import socket
import threading
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge

from forecaster.errors import ForecasterError
from forecaster.logs import RateLimitedLog
from forecaster.model.bundle import Bundle
from forecaster.serve.codec import topic_matches
from forecaster.serve.config import Config, RouteConfig
from forecaster.serve.engine import Engine
from forecaster.serve.http import Liveness, MetricsServer
from forecaster.serve.intake import Intake, Work
from forecaster.serve.metrics import Metrics
from forecaster.serve.mqtt import Ack, PublishResult
from forecaster.serve.nats import leases, snapshots, source
from forecaster.serve.nats.partitions import partition_subject, split_subject, topic_to_subject
from forecaster.serve.notify import Notifier
from forecaster.serve.responder import Responder
from forecaster.serve.routes import Route, new_store

log = logging.getLogger("forecaster.serve.nats")

HEALTH_TIMEOUT = 30.0
TURN = 0.02  # seconds the loop sleeps when nothing arrived
PUBACK_TIMEOUT = 5.0
STOP_TIMEOUT = 8.0


class NatsMetrics:
    """The per-partition metrics (names on the board and in docs/reliability.md)."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.connected = Gauge(
            "forecaster_nats_connected", "1 while connected to a NATS server", registry=registry
        )
        self.owned = Gauge(
            "forecaster_nats_partitions_owned", "Partitions this process serves", registry=registry
        )
        self.owned_by = Gauge(
            "forecaster_nats_partition_owned",
            "1 if this process serves the partition",
            ["partition"],
            registry=registry,
        )
        self.takeovers = Counter(
            "forecaster_nats_takeovers",
            "Partitions taken (restored from snapshot and stream)",
            registry=registry,
        )
        self.released = Counter(
            "forecaster_nats_partitions_released",
            "Partitions handed back cleanly (rebalance or stop)",
            registry=registry,
        )
        self.lost = Counter(
            "forecaster_nats_partitions_lost",
            "Partitions dropped because the lease could not be renewed in time (fencing)",
            registry=registry,
        )
        self.renew_failures = Counter(
            "forecaster_nats_lease_renew_failures",
            "Lease renewals that failed",
            registry=registry,
        )
        self.replayed = Counter(
            "forecaster_nats_replayed_readings",
            "Readings stepped without publishing after a takeover (already answered before)",
            ["partition"],
            registry=registry,
        )
        self.lag = Gauge(
            "forecaster_nats_consumer_lag",
            "Readings in the partition's stream not yet delivered to us",
            ["partition"],
            registry=registry,
        )
        self.members = Gauge(
            "forecaster_nats_live_members", "Live forecaster processes seen", registry=registry
        )


class _Sink:
    """The responder's publisher: collects one partition's predictions for the async publish,
    drops those of readings the previous owner already answered (``quiet``)."""

    def __init__(self) -> None:
        self.out: list[tuple[str, bytes]] = []
        self.quiet = 0

    def begin(self, quiet: int) -> None:
        self.out = []
        self.quiet = quiet

    def publish(
        self, topic: str, payload: bytes, qos: int, retain: bool, acks: list[Ack]
    ) -> PublishResult:
        if acks and acks[0][0] <= self.quiet:
            return PublishResult.STOPPING  # replay: state only, no message
        self.out.append((topic_to_subject(topic), payload))
        return PublishResult.SENT

    def ack(self, mid: int, qos: int) -> None:
        """Acknowledgement is per batch (AckPolicy ALL), after the publishes: nothing here."""


@dataclass
class Partition:
    k: int
    lease: leases.Lease
    routes: list[Route]
    intake: Intake
    consumer: str
    quiet_until: int
    scratch: Path
    pulls: source.Pulls
    inbox: str = ""
    sub: Any = None
    #: the newest message received (and its stream sequence), acknowledged after its batch
    last_msg: Any = None
    last_seq: int = 0
    #: stream sequence of the newest reading the states include
    stepped_seq: int = 0
    acked_seq: int = 0
    wall: float = 0.0
    releasing: bool = False
    lost: bool = False
    next_snapshot: float = 0.0
    _cache: dict[str, Route | None] = field(default_factory=dict)

    def route_for(self, topic: str) -> Route | None:
        try:
            return self._cache[topic]
        except KeyError:
            pass
        found = next(
            (r for r in self.routes if any(topic_matches(f, topic) for f in r.cfg.subscribe)), None
        )
        if len(self._cache) > 100_000:
            self._cache.clear()
        self._cache[topic] = found
        return found


@dataclass
class _Answer:
    """One partition's stepped batch: predictions to publish, then the message to ack."""

    part: Partition
    out: list[tuple[str, bytes]]
    cut_msg: Any
    cut_seq: int


def prediction_subjects(routes: list[RouteConfig]) -> list[str]:
    """Subjects the prediction stream captures: each template up to ``{topic}``, then ``>``."""
    out: list[str] = []
    for rc in routes:
        levels = rc.prediction_topic.split("/")
        head = []
        for level in levels:
            if "{topic}" in level:
                break
            head.append(level)
        subject = ".".join([*head, ">"]) if head else ">"
        if subject not in out:
            out.append(subject)
    return out


def default_member() -> str:
    host = "".join(c if c.isalnum() or c in "-_" else "-" for c in socket.gethostname())
    return f"{host[:40]}-{os.getpid()}"


class NatsWorker:
    def __init__(
        self,
        cfg: Config,
        metrics: Metrics | None = None,
        stop: threading.Event | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.cfg = cfg
        self.n = cfg.nats
        self.metrics = metrics or Metrics(CollectorRegistry())
        self.registry = self.metrics.registry
        self.nm = NatsMetrics(self.registry)
        self.stop_event = stop or threading.Event()
        self.clock = clock
        self.member = self.n.member or default_member()
        self.rl = RateLimitedLog(log)
        self.sink = _Sink()
        self.responder = Responder(self.sink, self.metrics, rl=self.rl)
        self.parts: dict[int, Partition] = {}
        #: every lease we hold, also those of partitions still being taken over
        self.held: dict[int, leases.Lease] = {}
        self.bundles: dict[str, Bundle] = {}
        self.liveness = Liveness(clock())
        self.notifier = Notifier()
        self.server: MetricsServer | None = None
        self.nc: Any = None
        self.js: Any = None
        self.book: leases.LeaseBook | None = None
        self.objects: Any = None
        self.ready_flag = False
        self.failed = False

    # ------------------------------------------------------------------ setup

    def load(self) -> None:
        for rc in self.cfg.routes:
            bundle = Bundle.load(rc.bundle, intra_op_threads=self.cfg.daemon.intra_op_threads)
            bundle.warm_up()
            self.bundles[rc.name] = bundle
            m = bundle.manifest
            self.metrics.set_model(rc.name, m.name, m.version, m.onnx_sha256)
        if self.cfg.metrics.enabled:
            self.server = MetricsServer(
                self.registry,
                self.cfg.metrics.bind,
                self.cfg.metrics.port,
                health=lambda: self.liveness.check(self.clock(), HEALTH_TIMEOUT),
                ready=self._ready,
            )
            self.server.start()

    def _ready(self) -> tuple[bool, str]:
        if self.stop_event.is_set():
            return False, "stopping"
        if self.nc is None or not self.nc.is_connected:
            return False, "NATS not connected"
        if not self.ready_flag:
            return False, "setting up streams and buckets"
        return True, f"ready, {len(self.parts)} partition(s)"

    async def connect(self) -> None:
        import nats

        async def disconnected() -> None:
            self.nm.connected.set(0)
            log.warning("disconnected from NATS")

        async def reconnected() -> None:
            self.nm.connected.set(1)
            log.info("reconnected to NATS %s", self.nc.connected_url.netloc)

        async def error(exc: Exception) -> None:
            self.rl.warning("nats:error", "NATS: %s: %s", type(exc).__name__, exc)

        opts: dict[str, Any] = {
            "name": f"forecaster-{self.member}",
            "max_reconnect_attempts": -1,
            "reconnect_time_wait": 0.5,
            "disconnected_cb": disconnected,
            "reconnected_cb": reconnected,
            "error_cb": error,
            "allow_reconnect": True,
        }
        if self.n.credentials_file is not None:
            opts["user_credentials"] = str(self.n.credentials_file)
        deadline = self.clock() + 60.0
        while True:
            try:
                self.nc = await nats.connect(self.n.servers, **opts)
                break
            except Exception as exc:  # no server up yet: keep trying until the deadline
                if self.clock() > deadline or self.stop_event.is_set():
                    raise ForecasterError(
                        f"cannot connect to NATS {self.n.servers}: {exc}"
                    ) from exc
                self.rl.warning("nats:connect", "NATS not reachable yet: %s", exc)
                await asyncio.sleep(0.5)
        self.nm.connected.set(1)
        self.js = self.nc.jetstream(publish_async_max_pending=20000)
        await self._retry("streams and buckets", self._ensure)
        self.ready_flag = True
        log.info(
            "connected to %s as %s: %d partitions of stream %s",
            self.nc.connected_url.netloc,
            self.member,
            self.n.partitions,
            self.n.stream,
        )

    async def _retry(self, what: str, fn: Callable[[], Any], timeout: float = 60.0) -> Any:
        deadline = self.clock() + timeout
        while True:
            try:
                return await fn()
            except Exception as exc:
                if self.clock() > deadline or self.stop_event.is_set():
                    raise
                self.rl.warning(
                    f"retry:{what}", "%s: %s: %s (retrying)", what, type(exc).__name__, exc
                )
                await asyncio.sleep(0.5)

    async def _ensure(self) -> None:
        from nats.js.api import (
            KeyValueConfig,
            ObjectStoreConfig,
            RetentionPolicy,
            StorageType,
            StreamConfig,
        )
        from nats.js.errors import BadRequestError

        n = self.n
        wanted = [
            StreamConfig(
                name=n.stream,
                subjects=["part.>"],
                retention=RetentionPolicy.LIMITS,
                max_age=n.max_age,
                storage=StorageType.FILE,
                num_replicas=n.replicas,
                duplicate_window=120.0,
            )
        ]
        if n.publish == "jetstream":
            wanted.append(
                StreamConfig(
                    name=n.prediction_stream,
                    subjects=prediction_subjects(self.cfg.routes),
                    retention=RetentionPolicy.LIMITS,
                    max_age=n.prediction_max_age,
                    storage=StorageType.FILE,
                    num_replicas=n.replicas,
                )
            )
        for sc in wanted:
            try:
                await self.js.add_stream(sc)
            except BadRequestError:
                await self.js.stream_info(sc.name)  # exists with other settings: use it as is
        try:
            kv = await self.js.key_value(n.lease_bucket)
        except Exception:
            kv = await self.js.create_key_value(
                KeyValueConfig(
                    bucket=n.lease_bucket, history=1, ttl=n.lease_ttl, replicas=n.replicas
                )
            )
        self.book = leases.LeaseBook(kv, self.member, n.partitions, n.lease_ttl)
        try:
            self.objects = await self.js.object_store(n.snapshot_bucket)
        except Exception:
            self.objects = await self.js.create_object_store(
                n.snapshot_bucket, ObjectStoreConfig(bucket=n.snapshot_bucket, replicas=n.replicas)
            )

    def _book(self) -> leases.LeaseBook:
        if self.book is None:
            raise RuntimeError("not connected: call connect() first")
        return self.book

    def _store(self) -> Any:
        if self.objects is None:
            raise RuntimeError("not connected: call connect() first")
        return self.objects

    # ------------------------------------------------------------------ ownership

    async def renew_loop(self) -> None:
        """Renew every lease we hold (serving or being taken over) every TTL/3, all at once;
        one that fails is dropped at once (its partition stops being served)."""
        book = self._book()
        period = self.n.lease_ttl / 3
        while not self.stop_event.is_set():
            started = self.clock()
            held = list(self.held.values())
            results = await asyncio.gather(
                *(book.renew(lease, started) for lease in held), return_exceptions=True
            )
            for lease, ok in zip(held, results, strict=True):
                if ok is True:
                    continue
                self.nm.renew_failures.inc()
                if self.held.get(lease.k) is lease:
                    del self.held[lease.k]
                part = self.parts.get(lease.k)
                if part is not None and part.lease is lease:
                    part.lost = True
                log.warning("partition %d: lease renewal failed; stopped serving it", lease.k)
            try:
                await book.heartbeat()
            except Exception as exc:
                self.rl.warning("heartbeat", "heartbeat failed: %s: %s", type(exc).__name__, exc)
            await asyncio.sleep(max(0.05, period - (self.clock() - started)))

    async def claim_loop(self) -> None:
        """Claim free partitions up to our share, one per turn; hand back extras."""
        book = self._book()
        period = self.n.lease_ttl / 3
        while not self.stop_event.is_set():
            started = self.clock()
            more = False
            try:
                more = await self._claim_turn(book)
            except Exception as exc:
                self.rl.warning("lease", "lease turn failed: %s: %s", type(exc).__name__, exc)
            if not more:
                await asyncio.sleep(max(0.05, period - (self.clock() - started)))

    async def _claim_turn(self, book: leases.LeaseBook) -> bool:
        """One claim or release decision; True if more claims are wanted right away."""
        live = await book.live_members()
        self.nm.members.set(live)
        if self.stop_event.is_set():
            return False
        owned = {k for k, p in self.parts.items() if not p.lost and not p.releasing}
        free = await book.free()
        claim, release = leases.plan(owned, free, self.n.partitions, live)
        for k in release:
            self.parts[k].releasing = True
        claim = [k for k in claim if k not in self.parts and k not in self.held]
        if not claim:
            return False
        k = claim[0]
        lease = await book.claim(k, self.clock())
        if lease is None:
            return len(claim) > 1
        self.held[k] = lease
        try:
            part = await self._take(k, lease)
        except Exception as exc:
            log.error("partition %d: takeover failed: %s: %s", k, type(exc).__name__, exc)
            self.held.pop(k, None)
            await book.release(lease)
            return False
        if self.held.get(k) is not lease or not lease.valid(self.clock()):
            log.warning("partition %d: lease lost during the takeover; not serving it", k)
            self.held.pop(k, None)
            await self._drop(part, "dropped (lease lost during the takeover)")
            return False
        self.parts[k] = part
        self._gauge()
        return len(claim) > 1

    def _gauge(self) -> None:
        self.nm.owned.set(sum(1 for p in self.parts.values() if not p.lost))
        for k in range(self.n.partitions):
            self.nm.owned_by.labels(str(k)).set(1 if k in self.parts else 0)

    async def _consumer_names(self) -> list[str]:
        """Every consumer name of the readings stream ($JS.API.CONSUMER.NAMES, paged)."""
        names: list[str] = []
        while True:
            body = json.dumps({"offset": len(names)}).encode()
            msg = await self.nc.request(
                f"$JS.API.CONSUMER.NAMES.{self.n.stream}", body, timeout=5.0
            )
            resp = json.loads(msg.data)
            if "error" in resp:
                raise ForecasterError(f"consumer names: {resp['error']}")
            page = resp.get("consumers") or []
            names.extend(page)
            if not page or len(names) >= int(resp.get("total", 0)):
                return names

    async def _take(self, k: int, lease: leases.Lease) -> Partition:
        """Restore partition ``k`` and start its consumer (see :mod:`.source`)."""
        from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy

        started = self.clock()
        scratch = self.cfg.daemon.state_dir / "nats" / f"p{k}"
        shutil.rmtree(scratch, ignore_errors=True)
        scratch.mkdir(parents=True, exist_ok=True)
        self._store()
        snap: snapshots.PartitionSnapshot | None
        try:
            snap = await snapshots.load(self.objects, k)
        except snapshots.EnvelopeError as exc:
            log.warning("partition %d: snapshot unusable (%s); fresh states", k, exc)
            snap = None
        routes: list[Route] = []
        complete = snap is not None
        for rc in self.cfg.routes:
            bundle = self.bundles[rc.name]
            engine = Engine(
                bundle, new_store(rc, bundle.state_shapes), recent=rc.recent_predictions
            )
            path = scratch / f"{rc.name}.npz"
            if snap is not None and rc.name in snap.routes:
                path.write_bytes(snap.routes[rc.name])
            rec = engine.recover(path, None, now=self.clock())
            self.metrics.snapshot_restores.labels(rec.snapshot).inc()
            if rec.snapshot != "ok" and snap is not None:
                complete = False
                log.warning(
                    "partition %d route %s: snapshot %s; replaying the stream from its start",
                    k,
                    rc.name,
                    rec.snapshot,
                )
            routes.append(Route(rc, engine))
        snap_seq = snap.seq if snap is not None and complete else 0
        if not complete and snap is not None:
            for r in routes:  # every route from zero, so all agree with the stream
                r.engine.store = new_store(r.cfg, r.engine.bundle.state_shapes)
                r.engine.recent.clear()
        floor: int | None = None
        stale: list[str] = []
        # By name, then INFO of our partition's old consumers only: nats-server 2.9.10 was
        # measured delivering to a pull consumer at a crawl for the rest of its life once a
        # CONSUMER.LIST (the info of every consumer, the live ones of other partitions too)
        # had run (4 x 5,000 readings: 1 s without a LIST, ~1,000 per consumer in 20 s after).
        for name in await self._consumer_names():
            if not name.startswith(source.consumer_prefix(k)):
                continue
            stale.append(name)
            info = await self.js.consumer_info(self.n.stream, name)
            f = info.ack_floor.stream_seq if info.ack_floor else 0
            if info.config.opt_start_seq:
                f = max(f or 0, info.config.opt_start_seq - 1)
            floor = max(floor or 0, f or 0)
        start, quiet = source.resume_point(snap_seq, floor)
        name = source.consumer_name(k, lease.revision)
        cc = ConsumerConfig(
            durable_name=name,
            deliver_policy=DeliverPolicy.BY_START_SEQUENCE if start > 1 else DeliverPolicy.ALL,
            opt_start_seq=start if start > 1 else None,
            ack_policy=AckPolicy.ALL,
            ack_wait=self.n.ack_wait,
            max_ack_pending=self.n.max_ack_pending,
            filter_subject=partition_subject(k),
            num_replicas=self.n.replicas,
        )
        await self.js.add_consumer(self.n.stream, cc)
        for old in stale:
            if old != name:
                with contextlib.suppress(Exception):
                    await self.js.delete_consumer(self.n.stream, old)
        holder: dict[str, Partition] = {}

        def wall() -> float:
            return holder["p"].wall

        def route_for(topic: str) -> Route | None:
            return holder["p"].route_for(topic)

        intake = Intake(
            1 << 60,
            "block",
            self.metrics,
            route_for,
            ack=lambda mid, qos: None,
            wall=wall,
            clock=self.clock,
            rl=self.rl,
        )
        part = holder["p"] = Partition(
            k=k,
            lease=lease,
            routes=routes,
            intake=intake,
            consumer=name,
            quiet_until=quiet,
            scratch=scratch,
            pulls=source.Pulls(self.n.pull_batch),
            stepped_seq=start - 1,
            acked_seq=start - 1,
            next_snapshot=self.clock() + self.cfg.daemon.snapshot_interval,
        )
        part.intake.accepting = True
        part.inbox = self.nc.new_inbox()
        # one reply subject per request: nats-server 2.9 lets a new request from the same reply
        # subject replace a waiting one, which leaves the old one's messages owed forever
        part.sub = await self.nc.subscribe(part.inbox + ".*", cb=self._on_message(part))
        self.nm.takeovers.inc()
        log.info(
            "partition %d: taken (lease rev %d) in %.2f s: snapshot seq %d, ack floor %s, "
            "reading from %d, quiet up to %d",
            k,
            lease.revision,
            self.clock() - started,
            snap_seq,
            floor,
            start,
            quiet,
        )
        return part

    def _on_message(self, part: Partition) -> Callable[[Any], Any]:
        k = str(part.k)
        lag = self.nm.lag.labels(k)
        replayed = self.nm.replayed.labels(k)

        async def on_msg(msg: Any) -> None:
            if part.lost:
                return
            hdr = msg.headers
            if hdr and hdr.get("Status"):
                pending = hdr.get("Nats-Pending-Messages")
                part.pulls.ended(int(pending) if pending and pending.isdigit() else None)
                return
            part.pulls.received()
            try:
                meta = msg.metadata
                seq = meta.sequence.stream
                part.wall = meta.timestamp.timestamp() if meta.timestamp else time.time()
                lag.set(meta.num_pending)
                _, topic = split_subject(msg.subject)
            except Exception as exc:  # not a reading of ours: acknowledged with the batch
                self.rl.warning("nats:foreign", "unexpected message %r: %s", msg.subject[:200], exc)
                return
            if seq <= part.quiet_until:
                replayed.inc()
            if seq > part.last_seq:
                part.last_msg, part.last_seq = msg, seq
            try:
                part.intake.on_message(topic, msg.data, seq, 1)
            except Exception as exc:  # never let one message take the worker down
                self.metrics.callback_errors.labels("on_message").inc()
                self.rl.warning("nats:intake", "intake failed on %r: %s", topic[:200], exc)

        return on_msg

    # ------------------------------------------------------------------ serving

    async def _pull(self, part: Partition) -> None:
        want = part.pulls.want(self.clock())
        if want and not (part.lost or part.releasing):
            part.pulls.sent(want, self.clock())
            await self.nc.publish(
                source.next_subject(self.n.stream, part.consumer),
                source.request_body(want),
                reply=f"{part.inbox}.{part.pulls.requests}",
            )

    def _step_part(self, part: Partition) -> _Answer | None:
        """Step what the partition has received (no await: the states and the cut agree);
        None if there is nothing to answer or acknowledge."""
        items: list[Work] = []
        while True:
            got = part.intake.take(0, 1 << 30, 0)
            if not got:
                break
            items.extend(got)
        cut_msg, cut_seq = part.last_msg, part.last_seq
        if not items and (cut_msg is None or cut_seq <= part.acked_seq):
            return None
        out: list[tuple[str, bytes]] = []
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
        return _Answer(part, out, cut_msg, cut_seq)

    async def _finish(self, answer: _Answer) -> None:
        """Publish and confirm the predictions, then acknowledge the batch (AckPolicy ALL)."""
        part = answer.part
        if answer.out and not await self._publish(part, answer.out):
            return  # not acknowledged: redelivered (the recent cache answers it again)
        if answer.cut_msg is not None and answer.cut_seq > part.acked_seq and not part.lost:
            await answer.cut_msg.ack()
            part.acked_seq = answer.cut_seq

    async def _serve_part(self, part: Partition) -> bool:
        """Answer what the partition has received; True if it did anything."""
        answer = self._step_part(part)
        if answer is None:
            return False
        await self._finish(answer)
        return True

    async def _publish(self, part: Partition, out: list[tuple[str, bytes]]) -> bool:
        """Publish and confirm; False if the partition was lost before confirmation."""
        if self.n.publish == "core":
            for subject, payload in out:
                await self.nc.publish(subject, payload)
            try:
                await self.nc.flush(timeout=PUBACK_TIMEOUT)
            except Exception as exc:
                # not acknowledged, and no later batch may acknowledge past it (AckPolicy ALL):
                # give the partition up, its next owner answers these readings again
                self.rl.warning("nats:flush", "flush failed: %s; giving the partition up", exc)
                part.lost = True
                return False
            return True
        todo = out
        while todo:
            futs = [await self.js.publish_async(s, p) for s, p in todo]
            done, _ = await asyncio.wait(futs, timeout=PUBACK_TIMEOUT)
            failed = []
            for (s, p), fut in zip(todo, futs, strict=True):
                if fut in done and fut.exception() is None:
                    continue
                if fut not in done:
                    fut.cancel()
                failed.append((s, p))
            if failed:
                self.metrics.callback_errors.labels("publish").inc()
                self.rl.warning(
                    "nats:puback", "%d prediction(s) not confirmed; publishing again", len(failed)
                )
                if part.lost or not part.lease.valid(self.clock()):
                    return False
                await asyncio.sleep(0.2)
            todo = failed
        return True

    async def _snapshot(self, part: Partition) -> bool:
        self._store()
        snap = snapshots.PartitionSnapshot(part.stepped_seq)
        try:
            for r in part.routes:
                r.engine.snapshot()
                path = part.scratch / f"{r.name}.npz"
                snap.routes[r.name] = path.read_bytes()
            size = await snapshots.save(self.objects, part.k, snap)
        except Exception as exc:
            self.metrics.snapshots.labels("failed").inc()
            log.error("partition %d: snapshot failed: %s: %s", part.k, type(exc).__name__, exc)
            return False
        self.metrics.snapshots.labels("ok").inc()
        log.debug("partition %d: snapshot at seq %d, %d bytes", part.k, snap.seq, size)
        return True

    async def _drop(self, part: Partition, how: str) -> None:
        if self.parts.get(part.k) is part:
            del self.parts[part.k]
        if self.held.get(part.k) is part.lease:
            del self.held[part.k]
        if part.sub is not None:
            with contextlib.suppress(Exception):
                await part.sub.unsubscribe()
            part.sub = None
        for r in part.routes:
            r.engine.close()
        self._gauge()
        log.info("partition %d: %s", part.k, how)

    async def _hand_back(self, part: Partition) -> None:
        """Clean hand-over: stop pulling, answer what came, snapshot, delete the lease."""
        if part.sub is not None:
            with contextlib.suppress(Exception):
                await part.sub.unsubscribe()
            part.sub = None
        await self._serve_part(part)
        if not part.lost and part.lease.valid(self.clock()):
            await self._snapshot(part)
            self.held.pop(part.k, None)  # no renewal may race the release
            await self._book().release(part.lease)
            self.nm.released.inc()
        await self._drop(part, "handed back")

    async def _guarded(self, part: Partition, work: Awaitable[Any]) -> None:
        """Run ``work`` for ``part``; an error (an ack or a request while the connection is
        down) gives the partition up: whoever takes it next (us, maybe) restores it exactly
        and answers what was not acknowledged."""
        try:
            await work
        except Exception as exc:
            self.metrics.callback_errors.labels("nats").inc()
            log.warning("partition %d: %s: %s; giving it up", part.k, type(exc).__name__, exc)
            part.lost = True

    async def serve_loop(self) -> None:
        interval = self.cfg.daemon.snapshot_interval
        watchdog = self.notifier.watchdog_interval()
        last_ping = self.clock()
        while not self.stop_event.is_set():
            now = self.clock()
            self.liveness.beat(now, f"{len(self.parts)} partition(s)")
            if watchdog and now - last_ping >= watchdog / 2:
                self.notifier.watchdog()
                last_ping = now
            busy = False
            answers: list[_Answer] = []
            for part in list(self.parts.values()):
                if part.lost or not part.lease.valid(self.clock()):
                    if not part.lost:
                        self.nm.renew_failures.inc()
                    self.nm.lost.inc()
                    await self._drop(part, "lost (lease not renewed in time): stopped serving")
                    continue
                if part.releasing:
                    await self._guarded(part, self._hand_back(part))
                    continue
                answer = self._step_part(part)
                if answer is not None:
                    answers.append(answer)
            # every partition's confirmations awaited together: one round trip per turn
            if answers:
                busy = True
                await asyncio.gather(*(self._guarded(a.part, self._finish(a)) for a in answers))
            for part in list(self.parts.values()):
                if part.lost or part.releasing:
                    continue
                if interval > 0 and self.clock() >= part.next_snapshot:
                    await self._guarded(part, self._snapshot(part))
                    part.next_snapshot = self.clock() + interval
                await self._guarded(part, self._pull(part))
            if not busy:
                await asyncio.sleep(TURN)
            else:
                await asyncio.sleep(0)

    async def run_async(self) -> int:
        await self.connect()
        self.notifier.ready()
        tasks = [
            asyncio.create_task(self.renew_loop()),
            asyncio.create_task(self.claim_loop()),
            asyncio.create_task(self.serve_loop()),
        ]
        stop_wait = asyncio.create_task(asyncio.to_thread(self.stop_event.wait))
        done, _ = await asyncio.wait({*tasks, stop_wait}, return_when=asyncio.FIRST_COMPLETED)
        self.stop_event.set()
        for task in tasks:
            if task in done and task.exception() is not None:
                self.failed = True
                log.critical("NATS worker task died", exc_info=task.exception())
        for task in tasks[1:]:  # renewals go on through the hand-over
            task.cancel()
            with contextlib.suppress(BaseException):
                await task
        await self.shutdown()
        tasks[0].cancel()
        with contextlib.suppress(BaseException):
            await tasks[0]
        return 1 if self.failed else 0

    async def shutdown(self) -> None:
        self.notifier.stopping()
        self.ready_flag = False
        try:
            await asyncio.wait_for(self._hand_back_all(), STOP_TIMEOUT)
        except TimeoutError:
            log.warning("stop: hand-over not finished in %.0f s; the leases expire", STOP_TIMEOUT)
        if self.book is not None:
            with contextlib.suppress(Exception):
                await self.book.leave()
        with contextlib.suppress(Exception):  # bounded: a dead server must not hold the stop
            await asyncio.wait_for(self.nc.drain(), 2.0)
        with contextlib.suppress(Exception):
            await self.nc.close()
        if self.server is not None:
            self.server.stop()

    async def _hand_back_all(self) -> None:
        for part in list(self.parts.values()):
            await self._hand_back(part)


def run(cfg: Config, metrics: Metrics | None = None, stop: threading.Event | None = None) -> int:
    """``forecaster serve`` with ``transport.kind = "nats"``: the process's exit status."""
    try:
        import nats  # noqa: F401
    except ImportError:
        raise ForecasterError(
            'transport.kind = "nats" needs nats-py: pip install "forecaster[nats]"'
        ) from None
    worker = NatsWorker(cfg, metrics, stop)
    worker.load()
    try:
        return asyncio.run(worker.run_async())
    except ForecasterError:
        raise
    except Exception:
        log.critical("the NATS worker died; the process will exit with status 1", exc_info=True)
        return 1
