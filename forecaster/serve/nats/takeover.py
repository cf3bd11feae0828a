"""Taking a partition over: its states from the snapshot, its readings from where they stop.

Restore the partition's snapshot (object store), read the ack floor of the partition's previous
consumers, create this ownership epoch's consumer from ``min(S, F) + 1`` (the rule and why:
:mod:`.source`) and subscribe the reply inbox its pull requests are answered on. The returned
:class:`~.partition.Partition` steps the readings up to F without publishing.
"""

from __future__ import annotations

import contextlib
import json
import logging
import shutil
import time
from collections.abc import Callable
from typing import Any

from forecaster.errors import ForecasterError
from forecaster.logs import RateLimitedLog
from forecaster.model.bundle import Bundle
from forecaster.serve.config import Config
from forecaster.serve.engine import Engine
from forecaster.serve.metrics import Metrics
from forecaster.serve.nats import leases, snapshots, source
from forecaster.serve.nats.metrics import NatsMetrics
from forecaster.serve.nats.partition import Partition
from forecaster.serve.nats.partitions import partition_subject
from forecaster.serve.routes import Route, new_store

log = logging.getLogger("forecaster.serve.nats")


class Takeover:
    """What a takeover needs of the process: config, connection, models, metrics."""

    def __init__(
        self,
        cfg: Config,
        nc: Any,
        js: Any,
        objects: Any,
        bundles: dict[str, Bundle],
        metrics: Metrics,
        nm: NatsMetrics,
        rl: RateLimitedLog,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.cfg = cfg
        self.n = cfg.nats
        self.nc = nc
        self.js = js
        self.objects = objects
        self.bundles = bundles
        self.metrics = metrics
        self.nm = nm
        self.rl = rl
        self.clock = clock

    async def consumer_names(self) -> list[str]:
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

    async def _restore(self, k: int, scratch: Any) -> tuple[list[Route], int]:
        """Every route's engine from the snapshot; (routes, S). S = 0 and every route from
        zero when any route's snapshot is unusable, so all agree with the stream."""
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
        if not complete and snap is not None:
            for r in routes:
                r.engine.store = new_store(r.cfg, r.engine.bundle.state_shapes)
                r.engine.recent.clear()
        return routes, snap.seq if snap is not None and complete else 0

    async def _ack_floor(self, k: int) -> tuple[int | None, list[str]]:
        """(the previous consumers' ack floor F, their names).

        By name, then INFO of our partition's old consumers only: nats-server 2.9.10 was
        measured delivering to a pull consumer at a crawl for the rest of its life once a
        CONSUMER.LIST (the info of every consumer, the live ones of other partitions too) had
        run (4 x 5,000 readings: 1 s without a LIST, ~1,000 per consumer in 20 s after).
        """
        floor: int | None = None
        stale: list[str] = []
        for name in await self.consumer_names():
            if not name.startswith(source.consumer_prefix(k)):
                continue
            stale.append(name)
            info = await self.js.consumer_info(self.n.stream, name)
            f = info.ack_floor.stream_seq if info.ack_floor else 0
            if info.config.opt_start_seq:
                f = max(f or 0, info.config.opt_start_seq - 1)
            floor = max(floor or 0, f or 0)
        return floor, stale

    async def take(self, k: int, lease: leases.Lease) -> Partition:
        """Restore partition ``k`` and start its consumer; the caller serves it."""
        from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy

        started = self.clock()
        scratch = self.cfg.daemon.state_dir / "nats" / f"p{k}"
        shutil.rmtree(scratch, ignore_errors=True)
        scratch.mkdir(parents=True, exist_ok=True)
        routes, snap_seq = await self._restore(k, scratch)
        floor, stale = await self._ack_floor(k)
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
        part = Partition(
            k=k,
            lease=lease,
            routes=routes,
            consumer=name,
            quiet_until=quiet,
            scratch=scratch,
            pulls=source.Pulls(self.n.pull_batch),
            metrics=self.metrics,
            rl=self.rl,
            lag=self.nm.lag.labels(str(k)),
            replayed=self.nm.replayed.labels(str(k)),
            clock=self.clock,
            stepped_seq=start - 1,
            acked_seq=start - 1,
            next_snapshot=self.clock() + self.cfg.daemon.snapshot_interval,
        )
        part.inbox = self.nc.new_inbox()
        # one reply subject per request: nats-server 2.9 lets a new request from the same reply
        # subject replace a waiting one, which leaves the old one's messages owed forever
        part.sub = await self.nc.subscribe(part.inbox + ".*", cb=part.on_message)
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
