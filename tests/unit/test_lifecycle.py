"""The thin Daemon: worker death, the last snapshot, the watchdog while waiting for the broker.

The daemon runs for real (routes with the bundled water-flow model, the intake, the responder,
its threads); only the MQTT transport is a fake that the test drives and can make fail or wait.
"""

from __future__ import annotations

import os
import socket
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from forecaster.harness import wait_until
from forecaster.serve.config import Config
from forecaster.serve.lifecycle import HEALTH_TIMEOUT, Daemon
from forecaster.serve.mqtt import Ack, Delivery, PublishResult
from forecaster.serve.notify import Notifier

ROOT = Path(__file__).resolve().parents[2]
MODEL = ROOT / "models" / "water-flow"


class FakeLink:
    """Stands in for ``mqtt.Transport``: confirms every publish at once unless ``gate`` is
    closed, in which case publish waits (as a full window does), telling the daemon so."""

    def __init__(self, d: Daemon) -> None:
        self.d = d
        self.filters = d.routes.filters
        self.connected = True
        self.subscribed = True
        self.inflight = 0
        self.pending_readings = 0
        self.reconnects = 0
        self.events: list[str] = []
        self.published: list[str] = []
        self.acked: list[Ack] = []
        self.gate = threading.Event()
        self.gate.set()
        self.waiting = threading.Event()
        self.flush_result = True
        self.flush_error: Exception | None = None

    def deliver(self, topic: str, payload: bytes, mid: int) -> None:
        self.d.intake.on_message(topic, payload, mid, 1)

    def publish(
        self, out: Delivery, payload: bytes, qos: int, retain: bool, acks: list[Ack]
    ) -> PublishResult:
        while not self.gate.is_set():
            self.waiting.set()
            self.d.waiting_for_broker()
            self.gate.wait(0.01)
        self.published.append(out.topic)
        self.acked.extend(acks)
        return PublishResult.SENT

    def ack(self, mid: int, qos: int) -> None:
        self.acked.append((mid, qos))

    def start(self) -> None:
        self.events.append("start")

    def stop(self, timeout: float = 3.0) -> None:
        self.events.append("stop")

    def flush(self, timeout: float) -> bool:
        self.events.append(f"flush on {threading.current_thread().name}")
        if self.flush_error is not None:
            raise self.flush_error
        return self.flush_result

    def interrupt(self) -> None:
        self.events.append("interrupt")
        self.gate.set()


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def make(tmp_path: Path, clock: Clock | None = None, **daemon: object) -> Daemon:
    cfg = Config.model_validate(
        {
            "daemon": {"state_dir": str(tmp_path / "state"), "snapshot_interval": 0, **daemon},
            "metrics": {"enabled": False},
            "routes": [{"name": "water", "subscribe": ["sensors/+/flow"], "bundle": str(MODEL)}],
        }
    )
    if clock is None:
        return Daemon(cfg, transport_factory=FakeLink)
    return Daemon(cfg, transport_factory=FakeLink, clock=clock)


def snapshots_ok(d: Daemon) -> float:
    value = d.metrics.registry.get_sample_value("forecaster_snapshots_total", {"result": "ok"})
    return value or 0.0


class Running:
    """``Daemon.run()`` on a thread, its exit status kept."""

    def __init__(self, d: Daemon) -> None:
        self.d = d
        self.status: list[int] = []
        self.thread = threading.Thread(target=lambda: self.status.append(d.run()))
        self.thread.start()
        assert wait_until(lambda: d.transport is not None, 30), "the daemon did not start"

    @property
    def link(self) -> FakeLink:
        assert isinstance(self.d.transport, FakeLink)
        return self.d.transport

    def stop(self) -> int:
        self.d.request_stop()
        return self.wait()

    def wait(self) -> int:
        self.thread.join(timeout=60)
        assert not self.thread.is_alive(), "run() did not return"
        return self.status[0]


def test_worker_death_makes_the_process_exit_nonzero(tmp_path: Path) -> None:
    d = make(tmp_path, snapshot_interval=0.001, journal=False)  # periodic snapshots flush
    run = Running(d)
    run.link.flush_error = RuntimeError("a bug outside per-message isolation")
    assert run.wait() == 1  # systemd's Restart=on-failure restarts a status-1 exit
    assert d.worker_failed


def test_clean_stop_answers_then_flushes_then_snapshots_on_the_worker(tmp_path: Path) -> None:
    d = make(tmp_path)
    run = Running(d)
    for k in range(5):
        run.link.deliver(f"sensors/s{k}/flow", f'{{"value": {k}, "ts": 1}}'.encode(), k + 1)
    assert wait_until(lambda: len(run.link.published) == 5, 30)
    assert run.stop() == 0
    flushes = [e for e in run.link.events if e.startswith("flush")]
    assert flushes == ["flush on inference"]  # the last snapshot is the worker's, after its flush
    assert run.link.events.index(flushes[0]) < run.link.events.index("stop")
    assert sorted(run.link.acked) == [(k, 1) for k in range(1, 6)]
    assert snapshots_ok(d) == 1
    again = make(tmp_path)
    again.routes.load()
    assert len(again.routes.routes[0].engine.store) == 5


def test_no_snapshot_when_the_broker_does_not_confirm(tmp_path: Path) -> None:
    d = make(tmp_path)
    run = Running(d)
    run.link.deliver("sensors/a/flow", b'{"value": 1, "ts": 1}', 1)
    assert wait_until(lambda: len(run.link.published) == 1, 30)
    run.link.flush_result = False
    assert run.stop() == 0
    assert snapshots_ok(d) == 0  # states stepped past unconfirmed readings are not written


def test_waiting_for_the_broker_is_alive_not_hung(tmp_path: Path) -> None:
    clock = Clock()
    d = make(tmp_path, clock=clock)
    run = Running(d)
    run.link.gate.clear()  # publishes now wait, as they do on a full window
    run.link.deliver("sensors/a/flow", b'{"value": 1, "ts": 1}', 1)
    assert run.link.waiting.wait(30)
    clock.now += 10 * HEALTH_TIMEOUT  # far past the health limit, yet the waiting worker beats
    assert wait_until(lambda: d._health()[0], 30)
    ok, why = d._health()
    assert ok and why.startswith("ok: waiting for the broker"), why
    run.link.inflight = 5  # the gauges are read at scrape time, not by the (waiting) worker
    assert d.registry.get_sample_value("forecaster_publish_inflight") == 5
    assert d.registry.get_sample_value("forecaster_queue_depth") == 0
    run.link.gate.set()
    assert run.stop() == 0


def test_a_silent_worker_is_reported_hung(tmp_path: Path) -> None:
    clock = Clock()
    d = make(tmp_path, clock=clock)  # built, never started: nobody beats
    clock.now += HEALTH_TIMEOUT + 1
    ok, why = d._health()
    assert not ok and "silent" in why


@pytest.fixture
def notify_socket(tmp_path: Path) -> Iterator[tuple[socket.socket, str]]:
    path = tmp_path / "n.sock"
    if len(str(path)) > 100:
        pytest.fail(f"tmp path too long for AF_UNIX: {path}")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(path))
    sock.settimeout(30)
    yield sock, str(path)
    sock.close()


def test_watchdog_pings_go_on_while_the_worker_waits_for_the_broker(
    tmp_path: Path, notify_socket: tuple[socket.socket, str]
) -> None:
    sock, path = notify_socket
    d = make(tmp_path)
    d.notifier = Notifier(
        {"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "200000", "WATCHDOG_PID": str(os.getpid())}
    )
    run = Running(d)
    run.link.gate.clear()
    run.link.deliver("sensors/a/flow", b'{"value": 1, "ts": 1}', 1)
    assert run.link.waiting.wait(30)
    sock.setblocking(False)  # forget what was sent before the worker started waiting
    while True:
        try:
            sock.recv(4096)
        except BlockingIOError:
            break
    sock.settimeout(30)
    seen = 0
    while seen < 3:  # pings keep coming while the worker is stuck in publish
        if "WATCHDOG=1" in sock.recv(4096).decode().split("\n"):
            seen += 1
        assert run.link.published == [] and run.link.gate.is_set() is False
    run.link.gate.set()
    assert run.stop() == 0
