"""``forecaster serve``: wiring of routes, MQTT, the inference worker, metrics and lifecycle.

Threads: paho's network thread (``mqtt.Transport``) decodes and enqueues, never runs the model;
one inference worker owns every state store and bundle, steps micro-batches and publishes; the
main thread handles signals and readiness; the metrics server answers HTTP. Reloads and
snapshots run on the worker between batches, so no lock guards the stores.
"""

from __future__ import annotations

import logging
import queue
import signal
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from types import FrameType

import numpy as np
from prometheus_client import CollectorRegistry

from forecaster.errors import ForecasterError
from forecaster.logs import RateLimitedLog
from forecaster.model.bundle import Bundle
from forecaster.serve.codec import (
    PayloadSpec,
    Reading,
    decode,
    encode_predictions,
    prediction_topic,
    topic_matches,
)
from forecaster.serve.config import Config, RouteConfig, load_config, read_password
from forecaster.serve.engine import Engine
from forecaster.serve.http import Liveness, MetricsServer
from forecaster.serve.metrics import NO_ROUTE, Metrics
from forecaster.serve.mqtt import Transport
from forecaster.serve.notify import Notifier
from forecaster.serve.state import SnapshotError, StateStore

log = logging.getLogger("forecaster.serve.daemon")

STOP_TIMEOUT = 8.0  # seconds for drain + flush + snapshot; systemd's TimeoutStopSec is longer
HEALTH_TIMEOUT = 30.0  # the worker beats at least every second; a snapshot may take a few
_TOPIC_CACHE_MAX = 100_000


class Route:
    """A route's configuration, its model and its streams' states."""

    def __init__(self, cfg: RouteConfig, engine: Engine) -> None:
        self.cfg = cfg
        self.spec: PayloadSpec = cfg.payload_spec()
        self.engine = engine

    @property
    def name(self) -> str:
        return self.cfg.name

    def snapshot_path(self, state_dir: Path) -> Path:
        return state_dir / f"{self.name}.npz"


@dataclass(slots=True)
class Work:
    """One decoded message waiting for the worker."""

    route: Route
    readings: list[Reading]
    batch: bool
    topic: str
    mid: int
    qos: int


def compatible(a: Bundle, b: Bundle) -> bool:
    """Whether ``b`` can continue from states ``a`` produced (same shapes, same inputs)."""
    ma, mb = a.manifest, b.manifest
    return (ma.cell, ma.layers, ma.hidden, ma.features, ma.mode, ma.window) == (
        mb.cell,
        mb.layers,
        mb.hidden,
        mb.features,
        mb.mode,
        mb.window,
    )


class Daemon:
    def __init__(
        self,
        cfg: Config,
        config_path: Path | None = None,
        registry: CollectorRegistry | None = None,
    ) -> None:
        self.cfg = cfg
        self.config_path = config_path
        self.registry = registry or CollectorRegistry()
        self.metrics = Metrics(self.registry)
        self.notifier = Notifier()
        self.liveness = Liveness(time.monotonic())
        self.routes: list[Route] = []
        self._topic_route: dict[str, Route | None] = {}
        self._queue: queue.Queue[Work] = queue.Queue(maxsize=cfg.daemon.queue_size)
        self._stop = threading.Event()
        self._reload = threading.Event()
        self._accepting = False
        self._worker_done = threading.Event()
        self._rl = RateLimitedLog(log)
        self._ready_sent = False
        self._processed = 0
        self._reconnects_seen = 0
        self._state_lock = threading.Lock()
        self.transport: Transport | None = None
        self.server: MetricsServer | None = None

    # ------------------------------------------------------------------ setup

    def _load_route(self, rc: RouteConfig) -> Route:
        bundle = Bundle.load(rc.bundle, intra_op_threads=self.cfg.daemon.intra_op_threads)
        bundle.warm_up()
        shapes = bundle.state_shapes  # a window model's are its buffers (see window.py)
        route = Route(rc, Engine(bundle, self._new_store(rc, shapes)))
        path = route.snapshot_path(self.cfg.daemon.state_dir)
        try:
            store, used = StateStore.restore_latest(
                path,
                bundle.sha256,
                shapes,
                rc.max_streams,
                rc.reset_after,
                rc.idle_ttl,
                now=time.monotonic(),
            )
        except SnapshotError as exc:
            self.metrics.snapshot_restores.labels(exc.reason).inc()
            if exc.reason == "missing":
                log.info("route %s: no snapshot, starting with fresh states", rc.name)
            else:
                log.warning(
                    "route %s: snapshot refused (%s): %s; starting with fresh states",
                    rc.name,
                    exc.reason,
                    exc,
                )
        else:
            route.engine.store = store
            self.metrics.snapshot_restores.labels("ok").inc()
            log.info("route %s: restored %d streams from %s", rc.name, len(store), used)
        m = bundle.manifest
        self.metrics.set_model(rc.name, m.name, m.version, m.onnx_sha256)
        log.info(
            "route %s: %s %s (%s %dx%d, warm-up %d) on %s",
            rc.name,
            m.name,
            m.version,
            m.cell,
            m.layers,
            m.hidden,
            m.warmup,
            ", ".join(rc.subscribe),
        )
        return route

    @staticmethod
    def _new_store(rc: RouteConfig, shapes: list[tuple[int, int]]) -> StateStore:
        return StateStore(shapes, rc.max_streams, rc.reset_after, rc.idle_ttl)

    def setup(self) -> None:
        """Load bundles and states (fatal if a bundle is bad: nothing to serve), open metrics."""
        self.cfg.daemon.state_dir.mkdir(parents=True, exist_ok=True)
        self.routes = [self._load_route(rc) for rc in self.cfg.routes]
        if self.cfg.metrics.enabled:
            self.server = MetricsServer(
                self.registry,
                self.cfg.metrics.bind,
                self.cfg.metrics.port,
                health=self._health,
                ready=self._ready,
            )
            self.server.start()
            log.info("metrics on http://%s:%d/metrics", self.cfg.metrics.bind, self.server.port)
        filters = [f for r in self.routes for f in r.cfg.subscribe]
        self.transport = Transport(
            self.cfg.mqtt,
            read_password(self.cfg.mqtt),
            filters,
            self._on_message,
            on_error=self._on_callback_error,
            on_state=self._on_mqtt_state,
        )

    @property
    def _mqtt(self) -> Transport:
        if self.transport is None:
            raise RuntimeError("the daemon is not set up: call setup() first")
        return self.transport

    # ------------------------------------------------------------------ health

    def _health(self) -> tuple[bool, str]:
        return self.liveness.check(time.monotonic(), HEALTH_TIMEOUT)

    def _ready(self) -> tuple[bool, str]:
        if not self.routes:
            return False, "models not loaded"
        if self.transport is None or not self._mqtt.connected:
            return False, "MQTT not connected"
        if not self._mqtt.subscribed:
            return False, "MQTT subscriptions pending"
        if self._stop.is_set():
            return False, "stopping"
        return True, "ready"

    def _on_mqtt_state(self, connected: bool) -> None:
        # Called from either link's network thread.
        with self._state_lock:
            self.metrics.mqtt_connected.set(1 if connected else 0)
            if self.transport is not None:
                seen = self.transport.reconnects
                self.metrics.mqtt_reconnects.inc(max(0, seen - self._reconnects_seen))
                self._reconnects_seen = max(seen, self._reconnects_seen)

    def _on_callback_error(self, callback: str) -> None:
        self.metrics.callback_errors.labels(callback).inc()

    # ------------------------------------------------------------------ MQTT thread

    def _route_for(self, topic: str) -> Route | None:
        try:
            return self._topic_route[topic]
        except KeyError:
            pass
        found = next(
            (r for r in self.routes if any(topic_matches(f, topic) for f in r.cfg.subscribe)), None
        )
        if len(self._topic_route) >= _TOPIC_CACHE_MAX:
            self._topic_route.clear()
        self._topic_route[topic] = found
        return found

    def _on_message(self, topic: str, payload: bytes, mid: int, qos: int) -> None:
        """Runs on paho's thread: decode, count, enqueue. Never steps the model."""
        if not self._accepting:
            return  # not acknowledged: the broker redelivers it to the next run
        route = self._route_for(topic)
        if route is None:
            self.metrics.reject(NO_ROUTE, "no_route")
            self._mqtt.ack(mid, qos)
            return
        decoded = decode(payload, topic, route.spec, time.time())
        for reason, detail in decoded.rejects:
            self.metrics.reject(route.name, reason.value)
            self._rl.warning(
                f"reject:{route.name}:{reason.value}",
                "route %s: rejected a reading on %r: %s (%s)",
                route.name,
                topic[:200],
                reason.value,
                detail,
            )
        if not decoded.readings:
            self._mqtt.ack(mid, qos)
            return
        self.metrics.readings.labels(route.name).inc(len(decoded.readings))
        self._enqueue(Work(route, decoded.readings, decoded.batch, topic, mid, qos))

    def _enqueue(self, work: Work) -> None:
        """Queue a message; with ``on_full = "block"`` wait for room.

        Waiting here stalls only the subscriber connection (predictions leave on another), so
        the broker holds the backlog: back-pressure without loss. The wait wakes up to notice a
        stop; a message not queued by then is not acknowledged and comes back on restart.
        """
        policy = self.cfg.daemon.on_full
        if policy == "block":
            while True:
                try:
                    self._queue.put(work, timeout=0.25)
                    return
                except queue.Full:
                    if not self._accepting:
                        return
        try:
            self._queue.put_nowait(work)
            return
        except queue.Full:
            pass
        if policy == "drop_oldest":
            try:
                old = self._queue.get_nowait()
            except queue.Empty:
                pass
            else:
                self._drop(old)
                try:
                    self._queue.put_nowait(work)
                    return
                except queue.Full:
                    pass
        self._drop(work)

    def _drop(self, work: Work) -> None:
        self.metrics.reject(work.route.name, "queue_full", len(work.readings))
        self._rl.warning(
            "queue_full",
            "queue full (%d messages): dropping readings (on_full=%s)",
            self.cfg.daemon.queue_size,
            self.cfg.daemon.on_full,
        )
        self._mqtt.ack(work.mid, work.qos)

    # ------------------------------------------------------------------ worker

    def _take(self, first_timeout: float) -> list[Work]:
        try:
            items = [self._queue.get(timeout=first_timeout)]
        except queue.Empty:
            return []
        n = len(items[0].readings)
        deadline = time.monotonic() + self.cfg.daemon.max_delay_ms / 1000.0
        while n < self.cfg.daemon.max_batch:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                try:
                    item = self._queue.get(timeout=left)
                except queue.Empty:
                    break
            items.append(item)
            n += len(item.readings)
        return items

    def _worker(self) -> None:
        interval = self.notifier.watchdog_interval()
        ping_every = interval / 2 if interval else None
        last_ping = last_housekeeping = last_snapshot = time.monotonic()
        try:
            while True:
                items = self._take(first_timeout=0.25)
                now = time.monotonic()
                self.liveness.beat(now)
                if ping_every is not None and now - last_ping >= ping_every:
                    self.notifier.watchdog()
                    last_ping = now
                if items:
                    try:
                        self._process(items)
                    except Exception:
                        # A bug must not silently stop serving: log, count, keep going.
                        log.exception("unexpected error while processing a batch")
                        self.metrics.callback_errors.labels("worker").inc()
                        for w in items:
                            self._mqtt.ack(w.mid, w.qos)
                if self._reload.is_set():
                    self._reload.clear()
                    self._do_reload()
                if now - last_housekeeping >= 1.0:
                    self._housekeeping(now)
                    last_housekeeping = now
                interval_s = self.cfg.daemon.snapshot_interval
                if interval_s > 0 and now - last_snapshot >= interval_s:
                    self.snapshot()
                    last_snapshot = time.monotonic()
                if self._stop.is_set() and not self._accepting and self._queue.empty():
                    break
        finally:
            self._worker_done.set()

    def _process(self, items: list[Work]) -> None:
        m = self.metrics
        now = time.monotonic()
        by_route: dict[str, list[Work]] = {}
        for w in items:
            by_route.setdefault(w.route.name, []).append(w)
        for route_name, works in by_route.items():
            route = works[0].route
            readings = [r for w in works for r in w.readings]
            outcome = route.engine.step(readings, now)
            if outcome.calls:
                calls = np.asarray(outcome.calls, dtype=np.float64)
                m.batch_size.observe_many(calls[:, 0])
                m.inference_seconds.observe_many(calls[:, 1])
            for reason, n in outcome.drops.items():
                if n:
                    m.reject(route_name, reason, n)
                    self._rl.warning(
                        f"drop:{route_name}:{reason}",
                        "route %s: %d reading(s) dropped: %s",
                        route_name,
                        n,
                        reason,
                    )
            for reason, n in outcome.resets.items():
                if n:
                    m.state_resets.labels(route_name, reason).inc(n)
            if outcome.evicted:
                m.streams_evicted.labels(route_name, "lru").inc(len(outcome.evicted))
            if outcome.events:
                m.count_events(route_name, outcome.events)
            if outcome.abs_err:
                m.observe_errors(
                    route_name,
                    np.concatenate(outcome.abs_err),
                    np.concatenate(outcome.naive_abs_err),
                )
            manifest = route.engine.bundle.manifest
            pos = 0
            published = 0
            latencies: list[float] = []
            for w in works:
                pairs = zip(
                    w.readings, outcome.predictions[pos : pos + len(w.readings)], strict=True
                )
                pos += len(w.readings)
                answered = [(r, p) for r, p in pairs if p is not None]
                if not answered:
                    self._mqtt.ack(w.mid, w.qos)
                    continue
                preds = [p for _, p in answered]
                acks = [(w.mid, w.qos)] if w.qos > 0 else []
                payload = encode_predictions(preds, manifest.name, manifest.version, w.batch)
                topic = prediction_topic(route.cfg.prediction_topic, w.topic)
                self._mqtt.publish(topic, payload, route.cfg.qos, route.cfg.retain, acks)
                published += len(preds)
                sent = time.time()
                latencies.extend(sent - r.received for r, _ in answered)
            if latencies:
                m.end_to_end_seconds.observe_many(np.maximum(np.asarray(latencies), 0.0))
            m.predictions.labels(route_name).inc(published)
            m.streams.labels(route_name).set(len(route.engine.store))
            self._processed += len(readings)

    def _housekeeping(self, now: float) -> None:
        for route in self.routes:
            gone = route.engine.store.expire(now)
            if gone:
                self.metrics.streams_evicted.labels(route.name, "idle").inc(len(gone))
            self.metrics.streams.labels(route.name).set(len(route.engine.store))
        self.metrics.queue_depth.set(self._queue.qsize())
        if self.transport is not None:
            self.metrics.publish_inflight.set(self._mqtt.inflight)

    def snapshot(self) -> None:
        for route in self.routes:
            path = route.snapshot_path(self.cfg.daemon.state_dir)
            try:
                size = route.engine.store.snapshot(path, route.engine.bundle.sha256)
            except OSError as exc:
                self.metrics.snapshots.labels("failed").inc()
                log.error("route %s: snapshot to %s failed: %s", route.name, path, exc)
            else:
                self.metrics.snapshots.labels("ok").inc()
                log.debug(
                    "route %s: snapshot %d streams, %d bytes",
                    route.name,
                    len(route.engine.store),
                    size,
                )

    # ------------------------------------------------------------------ reload

    def _do_reload(self) -> None:
        self.notifier.reloading()
        try:
            new_cfg = load_config(self.config_path) if self.config_path else self.cfg
        except ForecasterError as exc:
            self.metrics.reloads.labels("failed").inc()
            log.error("reload: configuration refused, keeping the running one: %s", exc)
            self.notifier.ready()
            return
        ok = True
        by_name = {r.name: r for r in self.routes}
        new_names = [rc.name for rc in new_cfg.routes]
        if set(new_names) != set(by_name) or any(
            by_name[rc.name].cfg.subscribe != rc.subscribe for rc in new_cfg.routes
        ):
            log.warning(
                "reload: routes or subscriptions changed; that needs a restart "
                "(models and route options are reloaded)"
            )
        for rc in new_cfg.routes:
            route = by_name.get(rc.name)
            if route is None:
                continue
            try:
                bundle = Bundle.load(rc.bundle, intra_op_threads=self.cfg.daemon.intra_op_threads)
                bundle.warm_up()
            except ForecasterError as exc:
                ok = False
                log.error(
                    "reload: route %s keeps %s %s: %s",
                    rc.name,
                    route.engine.bundle.manifest.name,
                    route.engine.bundle.manifest.version,
                    exc,
                )
                continue
            old = route.engine.bundle
            route.cfg = rc
            route.spec = rc.payload_spec()
            if bundle.sha256 == old.sha256:
                continue
            if not compatible(old, bundle):
                n = len(route.engine.store)
                shapes = bundle.state_shapes
                route.engine.store = self._new_store(rc, shapes)
                self.metrics.state_resets.labels(rc.name, "model_changed").inc(n)
                log.warning(
                    "reload: route %s: new model has other state shapes; %d streams reset",
                    rc.name,
                    n,
                )
            route.engine.bundle = bundle
            m = bundle.manifest
            self.metrics.set_model(rc.name, m.name, m.version, m.onnx_sha256)
            log.info("reload: route %s now serves %s %s", rc.name, m.name, m.version)
        self.metrics.reloads.labels("ok" if ok else "failed").inc()
        self.notifier.ready()

    # ------------------------------------------------------------------ lifecycle

    def request_stop(self, *_: object) -> None:
        self._stop.set()

    def request_reload(self, *_: object) -> None:
        self._reload.set()

    def install_signals(self) -> None:
        def stop(signum: int, _frame: FrameType | None) -> None:
            log.info("signal %s: stopping", signal.Signals(signum).name)
            self.request_stop()

        signal.signal(signal.SIGTERM, stop)
        signal.signal(signal.SIGINT, stop)
        signal.signal(signal.SIGHUP, lambda _s, _f: self.request_reload())

    def run(self) -> int:
        self.setup()
        self._accepting = True
        worker = threading.Thread(target=self._worker, name="inference", daemon=True)
        worker.start()
        self._mqtt.start()
        last_status = 0.0
        last_count = 0
        while not self._stop.wait(0.2):
            ready, _why = self._ready()
            self.metrics.ready.set(1 if ready else 0)
            if ready and not self._ready_sent:
                self._ready_sent = True
                self.notifier.ready()
                log.info("ready: models warm, subscribed to %s", ", ".join(self._mqtt.filters))
            now = time.monotonic()
            if now - last_status >= 5.0:
                rate = (self._processed - last_count) / (now - last_status) if last_status else 0.0
                streams = sum(len(r.engine.store) for r in self.routes)
                self.notifier.status(f"{streams} streams, {rate:.0f} readings/s")
                last_status, last_count = now, self._processed
            if self._worker_done.is_set():
                log.error("the inference worker stopped unexpectedly")
                break
        return self.shutdown()

    def shutdown(self) -> int:
        """Stop taking readings, finish and publish what is queued, snapshot, disconnect."""
        started = time.monotonic()
        self.notifier.stopping()
        self.metrics.ready.set(0)
        self._accepting = False
        self._stop.set()
        self._worker_done.wait(timeout=STOP_TIMEOUT / 2)
        if not self._mqtt.flush(timeout=max(0.5, STOP_TIMEOUT / 2 - (time.monotonic() - started))):
            log.warning(
                "stopping with %d prediction(s) unacknowledged by the broker; their "
                "readings will be redelivered",
                self._mqtt.inflight,
            )
        self.snapshot()
        self._mqtt.stop()
        if self.server is not None:
            self.server.stop()
        log.info("stopped in %.2f s", time.monotonic() - started)
        return 0
