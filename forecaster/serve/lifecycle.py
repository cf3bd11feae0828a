"""``forecaster serve``: the thin :class:`Daemon` that wires the parts and runs their threads.

The parts, each unit-tested alone: :mod:`~forecaster.serve.routes` (models and states),
:mod:`~forecaster.serve.intake` (MQTT message → queued readings → micro-batches),
:mod:`~forecaster.serve.responder` (stepped batch → publishes, acks, metrics) and
:mod:`~forecaster.serve.mqtt` (the two connections and the ack bookkeeping).

Threads: paho's subscriber thread runs the intake (decode, enqueue; never the model); one
inference worker owns every state store and bundle, steps micro-batches, publishes, snapshots and
reloads between batches (so no lock guards the stores); the main thread handles signals,
readiness and sd_notify; the metrics server answers HTTP.

Lifecycle promises (docs/reliability.md):

- The worker dying ends the process with status 1, so systemd's ``Restart=on-failure`` restarts
  it and the broker redelivers what was not acknowledged.
- Snapshots are taken by the worker between batches. The last one comes after the final flush;
  if the broker does not confirm in time it is skipped. With the journal (the default) periodic
  snapshots need no flush; without it they wait for an empty publish window as the last one does.
- The watchdog and ``/healthz`` tell "alive, waiting for the broker" (the worker beats while it
  waits for a publish window or a flush) from "hung" (no beat at all).
"""

from __future__ import annotations

import logging
import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path
from types import FrameType
from typing import Protocol

from prometheus_client import CollectorRegistry

from forecaster.errors import ForecasterError
from forecaster.logs import RateLimitedLog
from forecaster.serve.config import Config, load_config, read_password
from forecaster.serve.http import Liveness, MetricsServer
from forecaster.serve.intake import Intake
from forecaster.serve.metrics import Metrics
from forecaster.serve.mqtt import Delivery, Transport
from forecaster.serve.notify import Notifier
from forecaster.serve.responder import Publisher, Responder
from forecaster.serve.routes import RouteSet

log = logging.getLogger("forecaster.serve.daemon")

STOP_TIMEOUT = 8.0  # seconds for drain + flush + snapshot; systemd's TimeoutStopSec is longer
HEALTH_TIMEOUT = 30.0  # the worker beats at least every second; a snapshot may take a few
SNAPSHOT_FLUSH_TIMEOUT = 2.0  # how long a periodic snapshot waits for in-flight predictions
SNAPSHOT_RETRY = 5.0  # seconds before retrying a snapshot deferred by an unconfirmed flush
TAKE_TIMEOUT = 0.25  # the worker's idle turn: beats, housekeeping and stop checks between waits


class Link(Publisher, Protocol):
    """What the lifecycle needs of the transport; tests pass a fake."""

    filters: list[str]

    @property
    def connected(self) -> bool: ...

    @property
    def subscribed(self) -> bool: ...

    @property
    def inflight(self) -> int: ...

    @property
    def pending_readings(self) -> int: ...

    @property
    def reconnects(self) -> int: ...

    def start(self) -> None: ...

    def stop(self, timeout: float = 3.0) -> None: ...

    def flush(self, timeout: float) -> bool: ...

    def interrupt(self) -> None: ...


def mqtt_transport(d: Daemon) -> Link:
    """The production transport: two paho connections to the configured broker."""
    return Transport(
        d.cfg.mqtt,
        read_password(d.cfg.mqtt),
        d.routes.filters,
        d.intake.on_message,
        on_error=d.on_callback_error,
        on_state=d.on_mqtt_state,
        on_wait=d.waiting_for_broker,
        on_refused=d.on_prediction_refused,
        on_messages=d.intake.on_messages,
    )


class Daemon:
    def __init__(
        self,
        cfg: Config,
        config_path: Path | None = None,
        registry: CollectorRegistry | None = None,
        transport_factory: Callable[[Daemon], Link] = mqtt_transport,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.cfg = cfg
        self.config_path = config_path
        self.registry = registry or CollectorRegistry()
        self.metrics = Metrics(self.registry)
        self.notifier = Notifier()
        self._clock = clock
        self.liveness = Liveness(clock())
        self._rl = RateLimitedLog(log)
        self.routes = RouteSet(cfg, self.metrics, clock=clock)
        self.intake = Intake(
            cfg.daemon.queue_size,
            cfg.daemon.on_full,
            self.metrics,
            self.routes.route_for,
            ack=self._ack,
            clock=clock,
            rl=self._rl,
        )
        self._transport_factory = transport_factory
        self.transport: Link | None = None
        self.responder: Responder | None = None
        self.server: MetricsServer | None = None
        self._stop = threading.Event()
        self._reload = threading.Event()
        self._worker_done = threading.Event()
        # Set when a stop runs out of time: the worker leaves what is still queued unanswered
        # (unacknowledged, so the broker redelivers it to the next run).
        self._abandon = threading.Event()
        #: Set when the worker ended by an exception: the process then exits with status 1.
        self.worker_failed = False
        self._stop_deadline = float("inf")
        self._ready_sent = False
        self._reconnects_seen = 0
        self._state_lock = threading.Lock()
        self._ping_every: float | None = None
        self._last_ping = clock()

    # ------------------------------------------------------------------ setup

    def setup(self) -> None:
        """Load bundles and states (fatal if a bundle is bad: nothing to serve), open metrics."""
        self.routes.load()
        if self.cfg.metrics.enabled:
            self.server = MetricsServer(
                self.registry,
                self.cfg.metrics.bind,
                self.cfg.metrics.port,
                health=self._health,
                ready=self._ready,
            )
            self.server.start()
        self.transport = link = self._transport_factory(self)
        # Read at scrape time, so they stay true while the worker waits (e.g. on the broker).
        self.metrics.queue_depth.set_function(lambda: self.intake.readings)
        self.metrics.publish_inflight.set_function(lambda: link.inflight)
        self.responder = Responder(self.transport, self.metrics, rl=self._rl)

    @property
    def _mqtt(self) -> Link:
        if self.transport is None:
            raise RuntimeError("the daemon is not set up: call setup() first")
        return self.transport

    def _ack(self, mid: int, qos: int) -> None:
        self._mqtt.ack(mid, qos)

    # ------------------------------------------------------------------ health

    def _health(self) -> tuple[bool, str]:
        return self.liveness.check(self._clock(), HEALTH_TIMEOUT)

    def _ready(self) -> tuple[bool, str]:
        if not len(self.routes):
            return False, "models not loaded"
        if self.transport is None or not self._mqtt.connected:
            return False, "MQTT not connected"
        if not self._mqtt.subscribed:
            return False, "MQTT subscriptions pending"
        if self._stop.is_set():
            return False, "stopping"
        return True, "ready"

    def on_mqtt_state(self, connected: bool) -> None:
        """Either link went up or down (called from its network thread)."""
        with self._state_lock:
            self.metrics.mqtt_connected.set(1 if connected else 0)
            if self.transport is not None:
                seen = self.transport.reconnects
                self.metrics.mqtt_reconnects.inc(max(0, seen - self._reconnects_seen))
                self._reconnects_seen = max(seen, self._reconnects_seen)

    def on_callback_error(self, callback: str) -> None:
        self.metrics.callback_errors.labels(callback).inc()

    def on_prediction_refused(self, out: Delivery, reason: str) -> None:
        """The broker refused a published prediction message (called from paho's thread).

        Counted and logged, never retried: a broker that refuses a topic (its ACL) refuses it
        again, and the transport has acknowledged the message's readings."""
        self.metrics.predictions_refused.labels(out.route, reason).inc(out.predictions)
        self._rl.warning(
            f"refused:{out.route}:{reason}",
            "route %s: the broker refused %d prediction(s) on %r (%s); they are lost and their "
            "readings acknowledged. Check that the broker lets this client publish there "
            "(its ACL); counted in forecaster_predictions_refused_total",
            out.route,
            out.predictions,
            out.topic[:200],
            reason,
        )

    def _alive(self, now: float, note: str = "") -> None:
        """The worker is alive: beat ``/healthz`` and, when due, systemd's watchdog."""
        self.liveness.beat(now, note)
        if self._ping_every is not None and now - self._last_ping >= self._ping_every:
            self.notifier.watchdog()
            self._last_ping = now

    def waiting_for_broker(self) -> None:
        """The worker is waiting for the broker's acknowledgements (a full publish window, or
        a flush): alive, not hung, so the watchdog keeps being fed."""
        inflight = self.transport.inflight if self.transport is not None else 0
        self._alive(self._clock(), f"waiting for the broker ({inflight} in flight)")

    # ------------------------------------------------------------------ worker

    def _worker(self) -> None:
        try:
            self._serve()
            self._finish()
        except BaseException:
            self.worker_failed = True
            log.critical(
                "the inference worker died; the process will exit with status 1", exc_info=True
            )
        finally:
            self._worker_done.set()

    def _serve(self) -> None:
        interval = self.notifier.watchdog_interval()
        self._ping_every = interval / 2 if interval else None
        last_housekeeping = next_snapshot = self._clock()
        next_snapshot += self.cfg.daemon.snapshot_interval
        d = self.cfg.daemon
        responder = self.responder
        if responder is None:
            raise RuntimeError("the daemon is not set up: call setup() first")
        while not self._abandon.is_set():
            items = self.intake.take(TAKE_TIMEOUT, d.max_batch, d.max_delay_ms / 1000.0)
            now = self._clock()
            self._alive(now)
            if items:
                try:
                    responder.respond(items)
                except Exception as exc:
                    # A bug outside the responder's per-message isolation: whoever was not
                    # answered is counted and acknowledged, message by message.
                    self.metrics.callback_errors.labels("worker").inc()
                    log.debug("unexpected error in the worker", exc_info=exc)
                    self._rl.warning(
                        "error:worker",
                        "unexpected error while answering a batch (caught, counted): %s: %s",
                        type(exc).__name__,
                        exc,
                    )
                    responder.settle_unanswered(items, "internal_error")
            if self._reload.is_set():
                self._reload.clear()
                self._do_reload()
            if now - last_housekeeping >= 1.0:
                self._housekeeping(now)
                last_housekeeping = now
            if d.snapshot_interval > 0 and now >= next_snapshot:
                # With the journal, a snapshot is consistent at any batch boundary (it carries
                # the journal position and the recent predictions that answer redeliveries), so
                # only a journal-less daemon stalls the worker to empty the publish window first.
                done = self._snapshot(SNAPSHOT_FLUSH_TIMEOUT, flush=not d.journal)
                next_snapshot = self._clock() + (d.snapshot_interval if done else SNAPSHOT_RETRY)
            if self._stop.is_set() and not self.intake.accepting and self.intake.empty():
                return

    def _finish(self) -> None:
        """After the last batch: wait for the broker, then the last snapshot (worker thread)."""
        if self._abandon.is_set() and not self.intake.empty():
            log.warning(
                "stopping before %d queued reading(s) were answered: they stay unacknowledged "
                "and will be redelivered",
                self.intake.readings,
            )
        left = max(0.5, self._stop_deadline - 1.0 - self._clock())
        if not self._snapshot(left):
            log.warning(
                "stopping with %d prediction(s) unconfirmed by the broker: the %d reading "
                "message(s) they answer stay unacknowledged and will be redelivered; the "
                "states were not snapshotted past them",
                self._mqtt.inflight,
                self._mqtt.pending_readings,
            )

    def _snapshot(self, flush_timeout: float, flush: bool = True) -> bool:
        """Snapshot, with ``flush`` at a point consistent with the broker: nothing in flight.

        Without the journal, a snapshot written while predictions await their acknowledgement
        would hold states stepped past readings the broker will redeliver after a crash. The
        last snapshot always flushes first: the stop must send the acknowledgements anyway.
        Returns False (and writes nothing) if the broker does not confirm within
        ``flush_timeout``.
        """
        if flush and not self._mqtt.flush(flush_timeout):
            self._rl.warning(
                "snapshot_deferred",
                "snapshot deferred: %d prediction(s) still unconfirmed by the broker",
                self._mqtt.inflight,
            )
            return False
        self.routes.snapshot()
        return True

    def _housekeeping(self, now: float) -> None:
        self.routes.expire(now)

    # ------------------------------------------------------------------ reload

    def _do_reload(self) -> None:
        self.notifier.reloading()
        try:
            new_cfg = load_config(self.config_path) if self.config_path else self.cfg
        except ForecasterError as exc:
            self.metrics.reloads.labels("failed").inc()
            log.error("reload: configuration refused, keeping the running one: %s", exc)
        else:
            self.routes.reload(new_cfg)
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

    def start(self) -> threading.Thread:
        """Set up, start the worker, then the transport (so nothing arrives before a reader)."""
        self.setup()
        self.intake.accepting = True
        worker = threading.Thread(target=self._worker, name="inference", daemon=True)
        worker.start()
        self._mqtt.start()
        return worker

    def run(self) -> int:
        """Serve until a stop is requested or the worker dies; the process's exit status."""
        if self.cfg.transport.kind == "nats":
            # Partitioned serving on NATS JetStream (nats-py, imported only here).
            from forecaster.serve.nats.worker import run as run_nats

            # SIGHUP sets _reload; the worker reloads between its turns
            return run_nats(self.cfg, self.metrics, self._stop, self._reload, self.config_path)
        # Read at each scrape, so the gauge says what /readyz says at that moment (a value set
        # by this loop lagged it by up to a turn, longer on a busy machine).
        self.metrics.ready.set_function(lambda: 1.0 if self._ready()[0] else 0.0)
        self.start()
        last_status = 0.0
        last_count = 0
        while not self._stop.wait(0.2):
            ready, _why = self._ready()
            if ready and not self._ready_sent:
                self._ready_sent = True
                self.notifier.ready()
                log.info("ready: models warm, subscribed to %s", ", ".join(self._mqtt.filters))
            now = self._clock()
            processed = self.responder.processed if self.responder is not None else 0
            if now - last_status >= 5.0:
                rate = (processed - last_count) / (now - last_status) if last_status else 0.0
                self.notifier.status(f"{self.routes.streams} streams, {rate:.0f} readings/s")
                last_status, last_count = now, processed
            if self._worker_done.is_set():
                log.error("the inference worker stopped unexpectedly")
                break
        return self.shutdown()

    def shutdown(self) -> int:
        """Stop taking readings; the worker answers what is queued, waits for the broker and
        takes the last snapshot; then disconnect. Returns 1 if the worker failed, else 0."""
        started = self._clock()
        self._stop_deadline = started + STOP_TIMEOUT
        self.notifier.stopping()
        self.intake.stop_accepting()
        self._stop.set()  # not ready from here on (the gauge reads it)
        if not self._worker_done.wait(timeout=max(0.0, STOP_TIMEOUT - 1.5)):
            # Still answering or waiting on a full window: stop the waits and the draining;
            # what is not sent stays unacknowledged and is redelivered to the next run.
            self._abandon.set()
            self._mqtt.interrupt()
            if not self._worker_done.wait(timeout=1.0):
                log.error("the inference worker did not finish; stopping without it")
                self.worker_failed = True
        self._mqtt.stop(timeout=max(0.5, self._stop_deadline - self._clock()))
        if self.server is not None:
            self.server.stop()
        log.info("stopped in %.2f s", self._clock() - started)
        return 1 if self.worker_failed else 0
