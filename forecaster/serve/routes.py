"""The route set: which model serves which topics, with its streams' states.

Loading (bundle, warm-up, snapshot restore, journal replay), topic → route lookup (cached),
reload on SIGHUP (same shapes: states carry over; other shapes: states reset, counted) and
snapshots. The inference worker is the only thread that steps, reloads or snapshots, so nothing
here locks; the MQTT thread only reads :meth:`RouteSet.route_for`, whose cache is a plain dict
(single assignments and lookups are atomic under the GIL).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

from forecaster.errors import ForecasterError
from forecaster.model.bundle import Bundle
from forecaster.serve.codec import PayloadSpec, topic_matches
from forecaster.serve.config import Config, RouteConfig
from forecaster.serve.engine import Engine
from forecaster.serve.metrics import Metrics
from forecaster.serve.state import StateStore

log = logging.getLogger("forecaster.serve.routes")

#: Topics remembered by :meth:`RouteSet.route_for`; cleared whole when full (cheap, rare).
TOPIC_CACHE_MAX = 100_000


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

    def journal_path(self, state_dir: Path) -> Path:
        return state_dir / f"{self.name}.journal"


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


def new_store(rc: RouteConfig, shapes: list[tuple[int, int]]) -> StateStore:
    return StateStore(shapes, rc.max_streams, rc.reset_after, rc.idle_ttl)


def route_for(routes: Sequence[Route], cache: dict[str, Route | None], topic: str) -> Route | None:
    """The route whose filters match ``topic`` (first in configuration order), remembered in
    ``cache``, which is emptied at ``TOPIC_CACHE_MAX`` topics so a flood of new topics cannot
    grow it. Shared by the MQTT daemon's routes and each NATS partition's."""
    try:
        return cache[topic]
    except KeyError:
        pass
    found = next((r for r in routes if any(topic_matches(f, topic) for f in r.cfg.subscribe)), None)
    if len(cache) >= TOPIC_CACHE_MAX:
        cache.clear()
    cache[topic] = found
    return found


def swap_bundle(route: Route, bundle: Bundle, metrics: Metrics) -> bool:
    """Serve ``route`` with ``bundle`` from now on; False if it already does (same sha256).

    States carry over when the shapes agree (:func:`compatible`); otherwise the route's streams
    start afresh, counted as ``model_changed`` resets. Shared by the MQTT daemon's reload and
    the NATS worker's (which holds one engine per route in every partition it serves).
    """
    old = route.engine.bundle
    if bundle.sha256 == old.sha256:
        return False
    if not compatible(old, bundle):
        n = len(route.engine.store)
        route.engine.store = new_store(route.cfg, bundle.state_shapes)
        metrics.state_resets.labels(route.name, "model_changed").inc(n)
        log.warning(
            "reload: route %s: new model has other state shapes; %d streams reset", route.name, n
        )
    route.engine.bundle = bundle
    return True


def forget_idle(route: Route, now: float, metrics: Metrics) -> int:
    """Forget ``route``'s streams idle past its ``idle_ttl`` (journaled, so a replay forgets
    them too), counted as ``idle`` evictions; how many. Shared by both transports."""
    gone = route.engine.expire(now)
    if gone:
        metrics.streams_evicted.labels(route.name, "idle").inc(len(gone))
    return len(gone)


class RouteSet:
    """Every route of the configuration, loaded; the worker owns it."""

    def __init__(
        self,
        cfg: Config,
        metrics: Metrics,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.cfg = cfg
        self.metrics = metrics
        self._clock = clock
        self.routes: list[Route] = []
        self._topic_route: dict[str, Route | None] = {}

    def __iter__(self) -> Iterator[Route]:
        return iter(self.routes)

    def __len__(self) -> int:
        return len(self.routes)

    @property
    def state_dir(self) -> Path:
        return self.cfg.daemon.state_dir

    # ------------------------------------------------------------------ loading

    def load(self) -> None:
        """Load every bundle and its states; a bad bundle is fatal (raises ForecasterError)."""
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self.routes = [self._load_route(rc) for rc in self.cfg.routes]
        self._topic_route.clear()

    def _load_bundle(self, rc: RouteConfig) -> Bundle:
        bundle = Bundle.load(rc.bundle, intra_op_threads=self.cfg.daemon.intra_op_threads)
        bundle.warm_up()
        return bundle

    def _load_route(self, rc: RouteConfig) -> Route:
        bundle = self._load_bundle(rc)
        shapes = bundle.state_shapes  # a window model's are its buffers (see window.py)
        route = Route(rc, Engine(bundle, new_store(rc, shapes), recent=rc.recent_predictions))
        self._recover(route)
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

    def _recover(self, route: Route) -> None:
        """Newest usable snapshot, then the journal after it (engine.recover; never raises for
        damaged files), with a log line and a counter for every outcome."""
        d = self.cfg.daemon
        name = route.name
        rec = route.engine.recover(
            route.snapshot_path(self.state_dir),
            route.journal_path(self.state_dir) if d.journal else None,
            now=self._clock(),
            fsync=d.journal_fsync == "always",
            max_journal_bytes=d.journal_max_bytes,
        )
        self.metrics.snapshot_restores.labels(rec.snapshot).inc()
        if rec.snapshot == "ok":
            log.info("route %s: restored %d streams from %s", name, rec.streams, rec.source)
        elif rec.snapshot == "missing":
            log.info("route %s: no snapshot, starting with fresh states", name)
        else:
            log.warning(
                "route %s: snapshot refused (%s): %s; starting with fresh states",
                name,
                rec.snapshot,
                rec.snapshot_error,
            )
        for reason, detail in rec.refused:
            self.metrics.journal_refused.labels(name, reason).inc()
            log.warning("route %s: journal refused from there on (%s): %s", name, reason, detail)
        if rec.replayed:
            self.metrics.journal_replayed.labels(name).inc(rec.replayed)
            log.info(
                "route %s: replayed %d journal record(s), %d reading(s); %d stream(s) now",
                name,
                rec.replayed,
                rec.readings,
                len(route.engine.store),
            )
        if rec.mismatches:
            log.warning(
                "route %s: %d replayed prediction(s) differ from the journal's; the journal's "
                "are kept for redeliveries",
                name,
                rec.mismatches,
            )

    # ------------------------------------------------------------------ lookup

    @property
    def filters(self) -> list[str]:
        return [f for r in self.routes for f in r.cfg.subscribe]

    def route_for(self, topic: str) -> Route | None:
        """The route whose filters match ``topic`` (first in configuration order), cached."""
        return route_for(self.routes, self._topic_route, topic)

    # ------------------------------------------------------------------ worker-side upkeep

    def expire(self, now: float) -> None:
        """Forget idle streams (``idle_ttl``) and refresh the per-route stream gauges."""
        for route in self.routes:
            forget_idle(route, now, self.metrics)
            self.metrics.streams.labels(route.name).set(len(route.engine.store))
            journal = route.engine.journal
            self.metrics.journal_bytes.labels(route.name).set(journal.size if journal else 0)

    @property
    def streams(self) -> int:
        return sum(len(r.engine.store) for r in self.routes)

    def snapshot(self) -> bool:
        """Write every route's states; True if all were written.

        The caller chooses the moment: snapshots are meant to be taken with nothing in flight
        (see ``Daemon._snapshot``); each engine's snapshot also rotates its journal.
        """
        ok = True
        for route in self.routes:
            path = route.snapshot_path(self.state_dir)
            try:
                # with the journal position and the recent predictions; rotates the journal
                size = route.engine.snapshot()
            except OSError as exc:
                ok = False
                self.metrics.snapshots.labels("failed").inc()
                log.error("route %s: snapshot to %s failed: %s", route.name, path, exc)
                continue
            self.metrics.snapshots.labels("ok").inc()
            log.debug(
                "route %s: snapshot %d streams, %d bytes", route.name, len(route.engine.store), size
            )
        return ok

    # ------------------------------------------------------------------ reload

    def reload(self, new_cfg: Config) -> bool:
        """Apply a new configuration's models and route options; True if every route took it.

        A bundle that fails to load keeps the running one for its route. A bundle with the same
        state shapes continues the streams' states; one with other shapes starts them afresh
        (counted as ``model_changed`` resets). Routes added, removed or resubscribed need a
        restart (subscriptions are made once per connection); that is logged, not applied.
        """
        ok = True
        changed = 0
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
                bundle = self._load_bundle(rc)
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
            route.cfg = rc
            route.spec = rc.payload_spec()
            if swap_bundle(route, bundle, self.metrics):
                m = bundle.manifest
                self.metrics.set_model(rc.name, m.name, m.version, m.onnx_sha256)
                log.info("reload: route %s now serves %s %s", rc.name, m.name, m.version)
                changed += 1
        if ok:
            # Always one line, so `journalctl -u forecaster` shows that a reload happened even
            # when no model changed (route options may have).
            log.info(
                "reload: done, %d route(s) reloaded, %d with a new model", len(self.routes), changed
            )
        self.metrics.reloads.labels("ok" if ok else "failed").inc()
        return ok
