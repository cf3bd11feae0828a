"""The daemon's HTTP endpoints: ``/metrics`` (the exposition is prometheus_client's
``generate_latest``), ``/healthz`` (is the inference loop alive) and ``/readyz`` (can it serve).

Deliberately thin (pure core, thin I/O): the server routes three paths to the registry and to two
callbacks; :class:`Liveness` is the pure heartbeat behind ``/healthz``.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

log = logging.getLogger(__name__)


class Liveness:
    """Heartbeat of the inference loop, for ``/healthz``.

    The HTTP thread cannot tell a wedged inference worker from a quiet one by itself; the worker
    beats on every loop turn (including idle timeouts), so a stale beat means stuck, not idle.
    Pure: the clock is passed in, so tests need no sleeping. A float assignment is atomic under the
    GIL, so no lock is needed between the beating thread and the reading one.
    """

    def __init__(self, now: float) -> None:
        # Counting construction as a beat gives the loop ``timeout`` seconds to start.
        self._last = now
        self._note = ""

    def beat(self, now: float, note: str = "") -> None:
        """The loop is alive; ``note`` says what it is doing if not its ordinary work (e.g.
        waiting for the broker), and shows in ``/healthz``'s body while it stays healthy."""
        self._last = now
        self._note = note

    @property
    def last_beat(self) -> float:
        return self._last

    def alive(self, now: float, timeout: float) -> bool:
        return now - self._last <= timeout

    def check(self, now: float, timeout: float) -> tuple[bool, str]:
        """``alive`` in the shape :class:`MetricsServer` callbacks return."""
        age = now - self._last
        if age <= timeout:
            return True, f"ok: {self._note}" if self._note else "ok"
        return False, f"inference loop silent for {age:.1f}s (limit {timeout:g}s)"


HealthCheck = Callable[[], tuple[bool, str]]


class _Handler(BaseHTTPRequestHandler):
    """Routes the three paths; the server object carries the registry and callbacks."""

    server: _Server
    protocol_version = "HTTP/1.1"
    # Keep-alive connections from scrapers hold a thread each; drop the idle ones.
    timeout = 30

    def do_GET(self) -> None:
        path = self.path.split("?", 1)[0]
        if path == "/metrics":
            try:
                body = generate_latest(self.server.registry)
            except Exception:
                # A broken custom collector must not take the endpoint down with a traceback.
                log.exception("collecting metrics failed")
                self._send(500, b"collecting metrics failed\n", "text/plain; charset=utf-8")
                return
            self._send(200, body, CONTENT_TYPE_LATEST)
        elif path == "/healthz":
            self._probe(self.server.health)
        elif path == "/readyz":
            self._probe(self.server.ready)
        else:
            self._send(404, b"not found\n", "text/plain; charset=utf-8")

    def _probe(self, check: HealthCheck) -> None:
        try:
            ok, reason = check()
        except Exception as exc:
            log.exception("health callback failed")
            ok, reason = False, f"health check raised {type(exc).__name__}: {exc}"
        if ok:
            # "ok", or "ok: <note>" from Liveness (e.g. waiting for the broker).
            text = reason if reason.startswith("ok: ") else "ok"
        else:
            text = reason or "not ok"
        self._send(200 if ok else 503, (text + "\n").encode(), "text/plain; charset=utf-8")

    def _send(self, status: int, body: bytes, content_type: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        # Prometheus scrapes every few seconds; an access log line each time is noise in journald.
        log.debug("%s - " + format, self.address_string(), *args)


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    # Rebinding right after a restart must not fail on TIME_WAIT sockets of the previous process.
    allow_reuse_address = True

    def __init__(
        self,
        address: tuple[str, int],
        registry: CollectorRegistry,
        health: HealthCheck,
        ready: HealthCheck,
    ) -> None:
        self.registry = registry
        self.health = health
        self.ready = ready
        super().__init__(address, _Handler)


class MetricsServer:
    """``/metrics``, ``/healthz`` and ``/readyz`` on a background thread.

    Not prometheus_client's ``start_http_server``: that one has no health paths and cannot be
    stopped, and tests need to stop it and see the port freed.
    """

    def __init__(
        self,
        registry: CollectorRegistry,
        bind: str,
        port: int,
        health: HealthCheck,
        ready: HealthCheck,
    ) -> None:
        self._registry = registry
        self._address = (bind, port)
        self._health = health
        self._ready = ready
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        """Bind and serve; raises ``OSError`` if the port is taken, so start-up fails loudly."""
        if self._server is not None:
            raise RuntimeError("MetricsServer already started")
        server = _Server(self._address, self._registry, self._health, self._ready)
        thread = threading.Thread(
            target=server.serve_forever,
            kwargs={"poll_interval": 0.2},
            name="metrics-http",
            daemon=True,
        )
        thread.start()
        self._server, self._thread = server, thread
        log.info("metrics on http://%s:%d/metrics", self._address[0], self.port)

    def stop(self) -> None:
        """Stop serving and close the listening socket (idempotent)."""
        server, thread = self._server, self._thread
        self._server = self._thread = None
        if server is None:
            return
        server.shutdown()
        server.server_close()
        if thread is not None:
            thread.join(timeout=5)

    @property
    def port(self) -> int:
        """The bound port; differs from the requested one when that was 0 (ephemeral)."""
        if self._server is None:
            raise RuntimeError("MetricsServer not started")
        return int(self._server.server_address[1])
