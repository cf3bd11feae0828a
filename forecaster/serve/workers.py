"""``forecaster serve --workers N``: N serve processes on one machine under one small supervisor.

Each worker is an ordinary ``forecaster serve --worker-id i`` process with the same
configuration; the worker id shifts two settings so the processes do not collide
(:func:`worker_metrics_port`, :func:`worker_state_dir`), the same rule the systemd template unit
``forecaster@.service`` relies on (instance name = worker id). Workers only make sense with the
NATS transport, where the streams are split into partitions and every partition is consumed by
exactly one process; with MQTT every process would receive every stream, so the CLI refuses.

The supervisor:

- starts the workers, each with ``PR_SET_PDEATHSIG`` so a supervisor killed with -9 leaves no
  orphan;
- forwards SIGTERM / SIGINT (stop: each worker drains, snapshots and exits) and SIGHUP (reload);
- **restarts no worker itself**. When one exits without being asked to, the supervisor stops the
  others and exits with status 1, so whoever runs it (systemd's ``Restart=on-failure``, a
  container runtime, a person) restarts the group. Under NATS the surviving processes of other
  machines take the partitions over meanwhile. For one-worker-at-a-time restarts on one machine,
  use the template unit instead (systemd supervises each worker itself);
- under systemd (``Type=notify``), gives every worker its own notification socket and relays:
  ``READY=1`` once every worker is ready, ``WATCHDOG=1`` only while every worker keeps pinging
  (one wedged inference loop gets the unit restarted), ``RELOADING=1`` when a worker starts a
  reload (``READY=1`` again once all are ready), ``STOPPING=1`` for the group, ``STATUS=`` with
  each worker's line.

The exit status is 0 when every worker stopped cleanly after a stop request, else 1.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import selectors
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING

from forecaster.serve.notify import Notifier

if TYPE_CHECKING:
    from forecaster.serve.config import Config

log = logging.getLogger(__name__)

MAX_WORKERS = 64
WORKER_DIR_PREFIX = "worker-"
#: After the stop signal, how long the supervisor waits for a worker before SIGKILL. A worker
#: bounds its own stop at 15 s (``lifecycle.STOP_TIMEOUT``); under systemd TimeoutStopSec= acts
#: first.
KILL_AFTER_S = 30.0


# --------------------------------------------------------------------------- pure rules


def worker_metrics_port(base: int, worker_id: int) -> int:
    """Worker ``i`` serves /metrics on ``base + i``; 0 (any free port) stays 0."""
    if worker_id < 0:
        raise ValueError(f"worker id must be >= 0, got {worker_id}")
    if base == 0:
        return 0
    port = base + worker_id
    if port > 65535:
        raise ValueError(f"metrics port {base} + worker id {worker_id} is above 65535")
    return port


def worker_state_dir(base: Path, worker_id: int) -> Path:
    """Worker ``i`` keeps its local files (snapshots, journal) in ``base/worker-<i>``."""
    if worker_id < 0:
        raise ValueError(f"worker id must be >= 0, got {worker_id}")
    return base / f"{WORKER_DIR_PREFIX}{worker_id}"


def transport_of(cfg: Config) -> str:
    """The transport a configuration selects: ``"mqtt"`` (the default) or ``"nats"``."""
    return str(cfg.transport.kind)


def worker_member(member: str, hostname: str, worker_id: int) -> str:
    """Worker ``i``'s name in the NATS leases: ``<nats.member or hostname>-w<i>``, cut to the
    64 characters of ``[A-Za-z0-9_-]`` that ``nats.member`` allows (a dotted host name keeps its
    first label). Two workers of one machine, or of one config, never share a name."""
    base = member or hostname.split(".")[0]
    base = re.sub(r"[^A-Za-z0-9_-]", "-", base) or "forecaster"
    suffix = f"-w{worker_id}"
    return base[: 64 - len(suffix)] + suffix


def apply_worker_id(cfg: Config, worker_id: int) -> None:
    """Make ``cfg`` worker ``worker_id``'s: its own metrics port, state directory and (NATS)
    lease member name."""
    cfg.metrics.port = worker_metrics_port(cfg.metrics.port, worker_id)
    cfg.daemon.state_dir = worker_state_dir(cfg.daemon.state_dir, worker_id)
    cfg.nats.member = worker_member(cfg.nats.member, socket.gethostname(), worker_id)


def check_workers(workers: int) -> None:
    if not 1 <= workers <= MAX_WORKERS:
        raise ValueError(f"--workers must be between 1 and {MAX_WORKERS}, got {workers}")


def describe_exit(code: int) -> str:
    """``Popen.returncode`` in words: a negative code is the signal that killed the process."""
    if code < 0:
        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = f"signal {-code}"
        return f"killed by {name}"
    return f"exited with status {code}"


def group_status(codes: Sequence[int], stop_requested: bool) -> int:
    """The supervisor's exit status: 0 only when it was asked to stop and every worker then
    exited 0; any worker that ended on its own, or failed while stopping, makes it 1."""
    return 0 if stop_requested and all(c == 0 for c in codes) else 1


def child_environment(
    env: Mapping[str, str], notify_socket: str | None, watchdog_usec: str | None
) -> dict[str, str]:
    """A worker's environment: the supervisor's, with the notification socket replaced by the
    worker's own (or removed) and ``WATCHDOG_PID`` dropped (it names the supervisor)."""
    out = {k: v for k, v in env.items() if k not in ("NOTIFY_SOCKET", "WATCHDOG_PID",
                                                     "WATCHDOG_USEC")}  # fmt: skip
    if notify_socket is not None:
        out["NOTIFY_SOCKET"] = notify_socket
        if watchdog_usec:
            out["WATCHDOG_USEC"] = watchdog_usec
    return out


@dataclass
class NotifyRelay:
    """What the supervisor tells systemd, from what its workers tell it (pure bookkeeping).

    :meth:`feed` takes one datagram of worker ``i`` and returns the fields to send upstream
    (possibly none). READY goes up once every worker has been ready since the last (re)start
    or reload; WATCHDOG goes up once every worker has pinged since the last one that went up.
    """

    workers: int
    ready: set[int] = field(default_factory=set)
    pinged: set[int] = field(default_factory=set)
    status: dict[int, str] = field(default_factory=dict)
    announced_ready: bool = False

    def feed(self, worker: int, datagram: bytes) -> list[str]:
        out: list[str] = []
        fields = dict(
            line.split("=", 1) for line in datagram.decode("utf-8", "replace").splitlines()
            if "=" in line
        )  # fmt: skip
        if "STATUS" in fields:
            self.status[worker] = fields["STATUS"]
        if fields.get("RELOADING") == "1":
            # A worker reloads (it says READY=1 when done): the group reloads until all are
            # ready again. Said only when a worker says so: a worker that did not start a
            # reload (a SIGHUP that arrived while it was starting) must not leave the unit
            # "reloading" forever.
            self.ready.discard(worker)
            if self.announced_ready:
                self.announced_ready = False
                usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
                out += ["RELOADING=1", f"MONOTONIC_USEC={usec}"]
        if fields.get("STOPPING") == "1":
            self.ready.discard(worker)
        if fields.get("READY") == "1":
            self.ready.add(worker)
            if len(self.ready) == self.workers and not self.announced_ready:
                self.announced_ready = True
                out.append("READY=1")
        if fields.get("WATCHDOG") == "1":
            self.pinged.add(worker)
            if len(self.pinged) == self.workers:
                self.pinged.clear()
                out.append("WATCHDOG=1")
        if "STATUS" in fields or out:
            out.append(self.status_field())
        return out

    def status_field(self) -> str:
        parts = [f"{len(self.ready)}/{self.workers} workers ready"]
        parts += [f"w{i}: {self.status[i]}" for i in sorted(self.status)]
        return "STATUS=" + "; ".join(parts)


# --------------------------------------------------------------------------- the supervisor


def _die_with_parent() -> None:  # pragma: no cover - runs in the child between fork and exec
    import ctypes

    pr_set_pdeathsig = 1
    ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGTERM)


@dataclass
class Worker:
    id: int
    proc: subprocess.Popen[bytes]
    sock: socket.socket | None = None
    code: int | None = None


class Supervisor:
    """Run ``command(i)`` for ``i`` in ``range(workers)`` until a stop signal or a worker's end.

    ``command`` builds a worker's argv (the CLI passes ``forecaster serve ... --worker-id i``).
    """

    def __init__(
        self,
        workers: int,
        command: Callable[[int], list[str]],
        *,
        env: Mapping[str, str] | None = None,
        notifier: Notifier | None = None,
        kill_after: float = KILL_AFTER_S,
    ) -> None:
        check_workers(workers)
        self.n = workers
        self.command = command
        self.env: Mapping[str, str] = os.environ if env is None else env
        self.notifier = notifier if notifier is not None else Notifier(self.env)
        self.kill_after = kill_after
        self.relay = NotifyRelay(workers)
        self.workers: list[Worker] = []
        self.stop_requested = False
        self._reload_requested = False
        self._sel = selectors.DefaultSelector()
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._tmp: tempfile.TemporaryDirectory[str] | None = None
        raw = self.env.get("NOTIFY_SOCKET", "") if self.notifier.enabled else ""
        self._upstream: str | None = ("\0" + raw[1:] if raw.startswith("@") else raw) or None
        self._up_sock: socket.socket | None = None

    # ---------------------------------------------------------------- signals

    def _on_stop(self, signum: int, _frame: FrameType | None) -> None:
        self.stop_requested = True

    def _on_hup(self, _signum: int, _frame: FrameType | None) -> None:
        self._reload_requested = True

    def install_signals(self) -> None:
        signal.signal(signal.SIGTERM, self._on_stop)
        signal.signal(signal.SIGINT, self._on_stop)
        signal.signal(signal.SIGHUP, self._on_hup)
        # A signal arriving while select() waits wakes it through this socket.
        signal.set_wakeup_fd(self._wake_w.fileno(), warn_on_full_buffer=False)

    # ---------------------------------------------------------------- running

    def _up(self, *fields: str) -> None:
        """Send ``fields`` to systemd as one datagram, never blocking: a relay that waited on
        a full notification socket would stop supervising."""
        if self._upstream is None:
            return
        try:
            if self._up_sock is None:
                self._up_sock = socket.socket(
                    socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC
                )
            self._up_sock.sendto("\n".join(fields).encode(), socket.MSG_DONTWAIT, self._upstream)
        except OSError as exc:
            log.warning("sd_notify %r failed: %s", fields, exc)

    def _notify_socket(self, worker_id: int) -> tuple[socket.socket, str] | None:
        if not self.notifier.enabled:
            return None
        if self._tmp is None:
            base = self.env.get("RUNTIME_DIRECTORY", "").split(":")[0] or None
            self._tmp = tempfile.TemporaryDirectory(prefix="forecaster-workers-", dir=base)
        path = str(Path(self._tmp.name) / f"notify-{worker_id}.sock")
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        sock.bind(path)
        sock.setblocking(False)
        return sock, path

    def start(self) -> None:
        watchdog = self.env.get("WATCHDOG_USEC") if self.notifier.watchdog_interval() else None
        for i in range(self.n):
            made = self._notify_socket(i)
            env = child_environment(self.env, made[1] if made else None, watchdog)
            proc = subprocess.Popen(self.command(i), env=env, preexec_fn=_die_with_parent)
            worker = Worker(i, proc, made[0] if made else None)
            if worker.sock is not None:
                self._sel.register(worker.sock, selectors.EVENT_READ, worker)
            self.workers.append(worker)
            log.info("worker %d started (pid %d)", i, proc.pid)
        self._sel.register(self._wake_r, selectors.EVENT_READ, None)
        self._up(self.relay.status_field())

    def _pump(self, timeout: float) -> None:
        for key, _ in self._sel.select(timeout):
            if key.data is None:
                with contextlib.suppress(OSError):
                    self._wake_r.recv(4096)
                continue
            worker: Worker = key.data
            while True:
                try:
                    datagram = key.fileobj.recv(4096)  # type: ignore[union-attr]
                except (BlockingIOError, InterruptedError):
                    break
                except OSError:
                    break
                fields = self.relay.feed(worker.id, datagram)
                if fields:
                    self._up(*fields)

    def _reap(self) -> list[Worker]:
        ended = []
        for w in self.workers:
            if w.code is None:
                code = w.proc.poll()
                if code is not None:
                    w.code = code
                    ended.append(w)
        return ended

    def _signal_all(self, sig: int) -> None:
        for w in self.workers:
            if w.code is None:
                with contextlib.suppress(ProcessLookupError):
                    w.proc.send_signal(sig)

    def run(self) -> int:
        """Start the workers and supervise them; the supervisor's exit status."""
        failed: Worker | None = None
        try:
            try:
                self.start()
            except OSError:
                log.error("could not start every worker; stopping those that started")
                self._stop_all()
                raise
            while not self.stop_requested:
                self._pump(0.2)
                if self._reload_requested:
                    self._reload_requested = False
                    log.info("SIGHUP: forwarded to every worker")
                    self._signal_all(signal.SIGHUP)
                ended = self._reap()
                if ended:
                    failed = ended[0]
                    break
            if failed is not None:
                log.error(
                    "worker %d (pid %d) %s without being asked to stop; stopping the other "
                    "workers (the supervisor restarts none: restart the group, e.g. systemd's "
                    "Restart=on-failure)",
                    failed.id,
                    failed.proc.pid,
                    describe_exit(failed.code or 0),
                )
            else:
                log.info("stopping %d workers", self.n)
            self._up("STOPPING=1")
            self._stop_all()
        finally:
            self.close()
        codes = [w.code if w.code is not None else 1 for w in self.workers]
        for w in self.workers:
            if w is not failed and w.code not in (0, None):
                log.error("worker %d %s while stopping", w.id, describe_exit(w.code))
        return group_status(codes, self.stop_requested and failed is None)

    def _stop_all(self) -> None:
        self._signal_all(signal.SIGTERM)
        deadline = time.monotonic() + self.kill_after
        while any(w.code is None for w in self.workers):
            if time.monotonic() > deadline:
                log.error("workers still running %.0f s after SIGTERM: SIGKILL", self.kill_after)
                self._signal_all(signal.SIGKILL)
                for w in self.workers:
                    if w.code is None:
                        w.code = w.proc.wait()
                break
            self._pump(0.1)
            self._reap()

    def close(self) -> None:
        for w in self.workers:
            if w.sock is not None:
                with contextlib.suppress(KeyError, ValueError):
                    self._sel.unregister(w.sock)
                w.sock.close()
        with contextlib.suppress(ValueError):
            signal.set_wakeup_fd(-1)
        self._sel.close()
        self._wake_r.close()
        self._wake_w.close()
        if self._up_sock is not None:
            self._up_sock.close()
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None


def serve_command(options: Sequence[str], worker_id: int) -> list[str]:
    """The argv of worker ``worker_id``: this interpreter running ``forecaster serve``."""
    return [sys.executable, "-m", "forecaster", "serve", *options, "--worker-id", str(worker_id)]
