"""A real mosquitto on a free port, the real daemon as a subprocess, a real subscriber."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import paho.mqtt.client as paho
import pytest
from paho.mqtt.enums import CallbackAPIVersion

ROOT = Path(__file__).resolve().parents[2]
MODEL = ROOT / "models" / "water-flow"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def mosquitto_binary() -> str:
    path = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
    if not os.path.exists(path):
        pytest.fail("mosquitto is not installed: apt-get install mosquitto (make test does it)")
    return path


def wait_port(port: int, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.05)
    raise AssertionError(f"nothing listens on port {port}")


@dataclass
class Broker:
    port: int
    workdir: Path
    proc: subprocess.Popen[bytes] | None = None
    #: mosquitto drops a client's backlog beyond this silently (0 = no limit)
    max_queued: int = 100000

    def start(self) -> None:
        conf = self.workdir / "mosquitto.conf"
        conf.write_text(
            f"listener {self.port} 127.0.0.1\nallow_anonymous true\npersistence true\n"
            f"persistence_location {self.workdir}/\nautosave_interval 1\n"
            f"max_queued_messages {self.max_queued}\nmax_inflight_messages 0\nuser root\n"
        )
        log = (self.workdir / "mosquitto.log").open("ab")
        self.proc = subprocess.Popen([mosquitto_binary(), "-c", str(conf)], stdout=log, stderr=log)
        wait_port(self.port)

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(sig)
            self.proc.wait(timeout=10)


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[Broker]:
    b = Broker(free_port(), tmp_path / "broker")
    b.workdir.mkdir()
    b.start()
    yield b
    b.stop(signal.SIGKILL)


@dataclass
class Collector:
    """Subscribes and keeps every message, in arrival order."""

    port: int
    topic: str = "forecast/#"
    messages: list[tuple[str, bytes]] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def __post_init__(self) -> None:
        self.client = paho.Client(
            callback_api_version=CallbackAPIVersion.VERSION2, protocol=paho.MQTTv5
        )
        self.client.on_message = self._on_message
        subscribed = threading.Event()
        self.client.on_subscribe = lambda *a: subscribed.set()
        self.client.connect("127.0.0.1", self.port)
        self.client.loop_start()
        self.client.subscribe(self.topic, qos=1)
        assert subscribed.wait(5)

    def _on_message(self, _c: object, _u: object, msg: paho.MQTTMessage) -> None:
        with self.lock:
            self.messages.append((msg.topic, msg.payload))

    def wait_for(self, n: int, timeout: float = 60.0) -> list[tuple[str, bytes]]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self.lock:
                if len(self.messages) >= n:
                    return list(self.messages)
            time.sleep(0.05)
        with self.lock:
            return list(self.messages)

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


def write_config(
    path: Path,
    port: int,
    metrics_port: int,
    state_dir: Path,
    bundle: Path = MODEL,
    extra_route: str = "",
    **daemon: object,
) -> Path:
    daemon_lines = "\n".join(f"{k} = {v!r}".replace("'", '"') for k, v in daemon.items())
    path.write_text(f"""
[mqtt]
host = "127.0.0.1"
port = {port}
client_id = "forecaster-test-{port}"
reconnect_min_delay = 0.2
reconnect_max_delay = 1.0

[daemon]
state_dir = "{state_dir}"
max_delay_ms = 2
{daemon_lines}

[metrics]
port = {metrics_port}

[[routes]]
name = "water"
subscribe = ["sensors/+/flow", "gateway/batch"]
bundle = "{bundle}"
{extra_route}
""")
    return path


@dataclass
class DaemonProc:
    config: Path
    metrics_port: int
    log: Path
    proc: subprocess.Popen[bytes] | None = None

    def start(self, wait_ready: bool = True) -> None:
        fh = self.log.open("ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "forecaster", "serve", "--config", str(self.config)],
            stdout=fh,
            stderr=fh,
            cwd=ROOT,
        )
        if wait_ready:
            self.wait_ready()

    def http(self, path: str) -> tuple[int, str]:
        try:
            with urllib.request.urlopen(
                f"http://127.0.0.1:{self.metrics_port}{path}", timeout=2
            ) as r:
                return r.status, r.read().decode()
        except urllib.error.HTTPError as e:
            return e.code, e.read().decode()

    def wait_ready(self, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise AssertionError(
                    f"daemon exited {self.proc.returncode}:\n{self.log.read_text()}"
                )
            try:
                if self.http("/readyz")[0] == 200:
                    return
            except OSError:
                pass
            time.sleep(0.1)
        raise AssertionError(f"daemon not ready in {timeout} s:\n{self.log.read_text()}")

    def metric(self, metric_name: str, **labels: str) -> float:
        from prometheus_client.parser import text_string_to_metric_families

        _, text = self.http("/metrics")
        total = 0.0
        found = False
        for fam in text_string_to_metric_families(text):
            for s in fam.samples:
                if s.name == metric_name and all(s.labels.get(k) == v for k, v in labels.items()):
                    total += s.value
                    found = True
        return total if found else 0.0

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 15.0) -> int:
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        return self.proc.wait(timeout=timeout)


@pytest.fixture
def daemon_factory(tmp_path: Path, broker: Broker) -> Iterator:
    procs: list[DaemonProc] = []

    def make(bundle: Path = MODEL, extra_route: str = "", **daemon: object) -> DaemonProc:
        mport = free_port()
        cfg = write_config(
            tmp_path / f"forecaster-{len(procs)}.toml",
            broker.port,
            mport,
            tmp_path / "state",
            bundle,
            extra_route,
            **daemon,
        )
        d = DaemonProc(cfg, mport, tmp_path / f"daemon-{len(procs)}.log")
        procs.append(d)
        return d

    yield make
    for d in procs:
        if d.proc and d.proc.poll() is None:
            d.proc.kill()
            d.proc.wait()
