"""One ``forecaster serve`` process on NATS JetStream: claim partitions, serve them, hand them over.

The loop (one asyncio thread; the model steps on it between awaits, so no lock guards a store):

- **leases** (:mod:`.leases`): every TTL/3 renew ours (a failed renewal, or TTL·0.75 without a
  successful one, stops that partition at once), write our heartbeat, count live members, claim
  free partitions up to ``ceil(N / live)`` and hand back extras one at a time;
- **takeover** of partition k (:mod:`.takeover`): restore its snapshot, read the previous
  consumers' ack floor, create this epoch's consumer and step readings up to F without
  publishing (:mod:`.source`);
- **serve**: pull requests straight to ``$JS.API.CONSUMER.MSG.NEXT``; what a turn received for a
  partition becomes one micro-batch (:meth:`.partition.Partition.take`), stepped, confirmed and
  acknowledged in order by :mod:`.answering` (predictions out: :mod:`.publish`);
- **snapshots** every ``daemon.snapshot_interval`` and at every hand-over or stop;
- **upkeep** about once a second, between turns: streams idle past their route's ``idle_ttl``
  forgotten in every partition served (as the MQTT daemon's housekeeping does);
- **reload** on SIGHUP, between turns (:mod:`.reload`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry

from forecaster.errors import ForecasterError
from forecaster.logs import RateLimitedLog
from forecaster.model.bundle import Bundle
from forecaster.serve.config import Config, load_config
from forecaster.serve.http import Liveness, MetricsServer
from forecaster.serve.metrics import Metrics
from forecaster.serve.nats import connection, leases, reload, snapshots, source
from forecaster.serve.nats.answering import Answerer
from forecaster.serve.nats.metrics import NatsMetrics
from forecaster.serve.nats.partition import Partition
from forecaster.serve.nats.publish import CoreOut, JetStreamOut, Out
from forecaster.serve.nats.takeover import Takeover
from forecaster.serve.notify import Notifier
from forecaster.serve.routes import forget_idle, swap_bundle

log = logging.getLogger("forecaster.serve.nats")

HEALTH_TIMEOUT = 30.0
TURN = 0.02  # seconds the loop waits when nothing arrived
STOP_TIMEOUT = 8.0
UPKEEP = 1.0  # seconds between idle-stream sweeps (the MQTT daemon's housekeeping period)


class NatsWorker:
    """The process: its connection, the leases it holds, the partitions it serves."""

    def __init__(
        self,
        cfg: Config,
        metrics: Metrics | None = None,
        stop: threading.Event | None = None,
        clock: Callable[[], float] = time.monotonic,
        reload_event: threading.Event | None = None,
        config_path: Path | None = None,
    ) -> None:
        self.cfg = cfg
        self.n = cfg.nats
        self.metrics = metrics or Metrics(CollectorRegistry())
        self.registry = self.metrics.registry
        self.nm = NatsMetrics(self.registry)
        self.stop_event = stop or threading.Event()
        #: set by SIGHUP (``Daemon.install_signals``); the serve loop reloads between turns
        self.reload_event = reload_event or threading.Event()
        self.config_path = config_path
        self.clock = clock
        self.member = self.n.member or connection.default_member()
        self.rl = RateLimitedLog(log)
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
        self.answerer: Answerer | None = None
        self.takeover: Takeover | None = None
        self.ready_flag = False
        self.failed = False

    # ------------------------------------------------------------------ setup

    def load(self) -> None:
        for rc in self.cfg.routes:
            bundle = reload.load_bundle(rc, self.cfg.daemon.intra_op_threads)
            self.bundles[rc.name] = bundle
            m = bundle.manifest
            self.metrics.set_model(rc.name, m.name, m.version, m.onnx_sha256)
        # Read at each scrape from the check /readyz answers with, as the MQTT daemon does.
        self.metrics.ready.set_function(lambda: 1.0 if self._ready()[0] else 0.0)
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

    def _connected(self, up: bool) -> None:
        self.nm.connected.set(1 if up else 0)

    async def connect(self) -> None:
        stopping = self.stop_event.is_set
        self.nc = await connection.connect(
            self.n, self.member, self.rl, self._connected, stopping, self.clock
        )
        self.js = self.nc.jetstream()

        async def ensure() -> tuple[leases.LeaseBook, Any]:
            return await connection.ensure(self.js, self.cfg, self.member)

        self.book, self.objects = await connection.retry(
            "streams and buckets", ensure, self.rl, stopping, self.clock
        )
        out: Out = (
            JetStreamOut(self.nc, self.metrics, self.rl, self.clock)
            if self.n.publish == "jetstream"
            else CoreOut(self.nc, self.rl)
        )
        await out.start()
        self.answerer = Answerer(self.nc, out, self.metrics, self.rl)
        self.takeover = Takeover(
            self.cfg,
            self.nc,
            self.js,
            self.objects,
            self.bundles,
            self.metrics,
            self.nm,
            self.rl,
            self.clock,
        )
        self.ready_flag = True
        log.info(
            "connected to %s as %s: %d partitions of stream %s",
            self.nc.connected_url.netloc,
            self.member,
            self.n.partitions,
            self.n.stream,
        )

    def _book(self) -> leases.LeaseBook:
        if self.book is None:
            raise RuntimeError("not connected: call connect() first")
        return self.book

    def _answerer(self) -> Answerer:
        if self.answerer is None:
            raise RuntimeError("not connected: call connect() first")
        return self.answerer

    def _takeover(self) -> Takeover:
        if self.takeover is None:
            raise RuntimeError("not connected: call connect() first")
        return self.takeover

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
        # at our share already: nothing to claim, so no need to read every lease
        full = len(owned) >= leases.target(self.n.partitions, live)
        free = [] if full else await book.free()
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
            part = await self._takeover().take(k, lease)
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
        self._refresh(part)  # a reload may have swapped a model during the takeover
        self.parts[k] = part
        self._gauge()
        return len(claim) > 1

    def _gauge(self) -> None:
        self.nm.owned.set(sum(1 for p in self.parts.values() if not p.lost))
        for k in range(self.n.partitions):
            self.nm.owned_by.labels(str(k)).set(1 if k in self.parts else 0)

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

    async def _snapshot(self, part: Partition) -> bool:
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
        await self._answerer().settle(part)
        if not part.lost and part.lease.valid(self.clock()):
            await self._snapshot(part)
            self.held.pop(part.k, None)  # no renewal may race the release
            await self._book().release(part.lease)
            self.nm.released.inc()
        await self._drop(part, "handed back")

    async def serve_loop(self) -> None:
        answerer = self._answerer()
        interval = self.cfg.daemon.snapshot_interval
        watchdog = self.notifier.watchdog_interval()
        last_ping = last_upkeep = self.clock()
        while not self.stop_event.is_set():
            now = self.clock()
            self.liveness.beat(now, f"{len(self.parts)} partition(s)")
            if watchdog and now - last_ping >= watchdog / 2:
                self.notifier.watchdog()
                last_ping = now
            if self.reload_event.is_set():
                self.reload_event.clear()
                await self.reload()
            if now - last_upkeep >= UPKEEP:
                self.expire(now)
                last_upkeep = now
            stepped = False
            for part in list(self.parts.values()):
                if part.lost or not part.lease.valid(self.clock()):
                    if not part.lost:
                        self.nm.renew_failures.inc()
                    self.nm.lost.inc()
                    await self._drop(part, "lost (lease not renewed in time): stopped serving")
                    continue
                if part.releasing:
                    await part.guarded(self._hand_back(part))
                    continue
                if answerer.due(part) and answerer.step(part):
                    stepped = True
                    # let the lease renewals and the socket in between partitions: on a
                    # starved machine a whole turn can take seconds (leases were lost so)
                    await asyncio.sleep(0)
            for part in list(self.parts.values()):
                if part.lost or part.releasing:
                    continue
                if interval > 0 and self.clock() >= part.next_snapshot:
                    await part.guarded(self._snapshot(part))
                    part.next_snapshot = self.clock() + interval
                await part.guarded(self._pull(part))
            if stepped:
                await asyncio.sleep(0)
                continue
            flying = [p.finishing for p in self.parts.values() if p.in_flight]
            if flying:  # woken by a confirmation (room for the next batch) or the next turn
                await asyncio.wait(flying, timeout=TURN, return_when=asyncio.FIRST_COMPLETED)
            else:
                await asyncio.sleep(TURN)

    # ------------------------------------------------------------------ upkeep and reload

    def expire(self, now: float) -> None:
        """Forget streams idle past ``idle_ttl`` in every partition served (each has its own
        engines), counted per route as under MQTT; ``forecaster_streams`` is the sum over them.

        Not journaled (the NATS transport has no journal): a stream forgotten since the
        partition's last snapshot is back in the states a takeover restores, and forgotten
        again once it has been idle for ``idle_ttl`` there.
        """
        streams = dict.fromkeys(self.bundles, 0)
        for part in self.parts.values():
            if part.lost or part.releasing:
                continue
            for r in part.routes:
                forget_idle(r, now, self.metrics)
                streams[r.name] = streams.get(r.name, 0) + len(r.engine.store)
        for name, n in streams.items():
            self.metrics.streams.labels(name).set(n)

    async def reload(self) -> None:
        """SIGHUP: re-read the config file and apply its routes' models and options (see
        :mod:`.reload` for what is refused); systemd hears RELOADING=1, then READY=1."""
        self.notifier.reloading()
        try:
            ok = await self._reload()
        except Exception as exc:  # a reload must never take the worker down
            ok = False
            log.error("reload failed, keeping the running configuration: %s", exc)
        self.metrics.reloads.labels("ok" if ok else "failed").inc()
        self.notifier.ready()

    async def _reload(self) -> bool:
        """True if every route took the new file. Bundles load in a thread (the leases are
        renewed meanwhile); the swap happens on the loop, between two turns."""
        if self.config_path is None:
            log.warning("reload: no configuration file to re-read (started without --config)")
            return False
        try:
            new = load_config(self.config_path)
            reload.check(self.cfg, new)
        except ForecasterError as exc:
            log.error("reload: configuration refused, keeping the running one: %s", exc)
            return False
        ok = True
        threads = self.cfg.daemon.intra_op_threads
        routes = []
        for old_rc, rc in zip(self.cfg.routes, new.routes, strict=True):
            try:
                bundle = await asyncio.to_thread(reload.load_bundle, rc, threads)
            except ForecasterError as exc:
                ok = False
                running = self.bundles[rc.name].manifest
                log.error(
                    "reload: route %s keeps %s %s: %s", rc.name, running.name, running.version, exc
                )
                routes.append(old_rc)
                continue
            routes.append(rc)
            if bundle.sha256 != self.bundles[rc.name].sha256:
                self.bundles[rc.name] = bundle
                m = bundle.manifest
                self.metrics.set_model(rc.name, m.name, m.version, m.onnx_sha256)
                log.info("reload: route %s now serves %s %s", rc.name, m.name, m.version)
        self.cfg.routes = routes  # what takeovers from now on build their engines from
        for part in self.parts.values():
            self._refresh(part)
        return ok

    def _refresh(self, part: Partition) -> None:
        """Bring ``part``'s routes to the running models and options; a partition whose model
        changed is snapshotted at the next turn, so a takeover restores it under that model."""
        by_name = {rc.name: rc for rc in self.cfg.routes}
        for r in part.routes:
            rc = by_name.get(r.name)
            if rc is None:
                continue
            r.cfg = rc
            r.spec = rc.payload_spec()
            if swap_bundle(r, self.bundles[r.name], self.metrics):
                part.next_snapshot = self.clock()

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


def run(
    cfg: Config,
    metrics: Metrics | None = None,
    stop: threading.Event | None = None,
    reload_event: threading.Event | None = None,
    config_path: Path | None = None,
) -> int:
    """``forecaster serve`` with ``transport.kind = "nats"``: the process's exit status.
    ``reload_event`` (SIGHUP) re-reads ``config_path``."""
    try:
        import nats  # noqa: F401
    except ImportError:
        raise ForecasterError(
            'transport.kind = "nats" needs nats-py: pip install "forecaster[nats]"'
        ) from None
    worker = NatsWorker(cfg, metrics, stop, reload_event=reload_event, config_path=config_path)
    worker.load()
    try:
        return asyncio.run(worker.run_async())
    except ForecasterError:
        raise
    except Exception:
        log.critical("the NATS worker died; the process will exit with status 1", exc_info=True)
        return 1
