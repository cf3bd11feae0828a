"""Fault-suite fixtures: the integration suite's real mosquitto and daemon, plus the tools to
break them and to check what survived.

Reused from ``tests/integration/conftest.py``: the ``broker`` fixture (mosquitto with
persistence on, restartable on the same port and directory), ``DaemonProc`` (the daemon as a
subprocess, ``metric()`` scraping ``/metrics``), ``write_config`` and ``free_port``. Added here:

- :class:`Feed`: sequence-numbered readings (``forecaster.replay``'s plan, so ``seq`` is in every
  JSON payload) published from a thread at a set rate, recording what the broker acknowledged;
- :class:`Sink`: a persistent-session subscriber that resubscribes after a broker restart, so
  predictions published while it reconnects are not lost to the test;
- :func:`verify`: every reading ``(stream, ts)`` has a prediction; duplicates counted;
- :func:`drift`: how far each stream's predictions are from ``forecaster evaluate``'s;
- ``rss_mb``, ``log_text`` and small waiting helpers.
"""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import paho.mqtt.client as paho
import pytest
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from forecaster.data import load_csv
from forecaster.replay import ReplayItem, plan
from tests.integration.conftest import (  # noqa: F401 - fixtures are found by name
    MODEL,
    ROOT,
    Broker,
    DaemonProc,
    broker,
    free_port,
    write_config,
)

WATER = ROOT / "data" / "water-flow.csv"
PASSWORD_MARKER = "pw-Zq8!not-in-logs-7c41"  # noqa: S105 - a test secret to look for


# ------------------------------------------------------------------ reference predictions


@pytest.fixture(scope="session")
def reference(tmp_path_factory: pytest.TempPathFactory) -> dict[float, float]:
    """``forecaster evaluate --predictions``: the prediction made at each reading's time, from
    a zero state and without interruption (an independent path through the same model)."""
    out = tmp_path_factory.mktemp("ref") / "p.csv"
    args = ["evaluate", str(MODEL), str(WATER), "--predictions", str(out)]
    subprocess.run(
        [sys.executable, "-m", "forecaster", *args],
        check=True,
        capture_output=True,
        cwd=ROOT,
    )
    times = load_csv(WATER, time_column="Time").series[0].times
    assert times is not None
    with out.open() as fh:
        rows = list(csv.DictReader(fh))
    # evaluate lists the prediction *for* row r; it was made on reading r-1
    return {float(times[int(r["row"]) - 1]): float(r["predicted"]) for r in rows}


def water_items(
    streams: int = 1,
    start: str | None = None,
    stop: str | None = None,
    topic: str = "sensors/{stream}/flow",
) -> list[ReplayItem]:
    return plan(load_csv(WATER, time_column="Time"), topic, streams, start, stop)


# ------------------------------------------------------------------ daemon


@pytest.fixture
def daemon(tmp_path: Path, broker: Broker) -> Iterator[Callable[..., DaemonProc]]:  # noqa: F811
    """``make(**daemon_options)`` → a not-yet-started :class:`DaemonProc` on ``broker``.

    All daemons of one test share the client id and the state directory, so a second one is a
    restart of the first. ``mqtt=``, ``routes=`` and ``metrics=`` take raw TOML lines.
    """
    procs: list[DaemonProc] = []

    def make(
        bundle: Path = MODEL,
        extra_route: str = "",
        mqtt: str = "",
        metrics: str = "",
        routes: str | None = None,
        **options: object,
    ) -> DaemonProc:
        mport = free_port()
        cfg = write_config(
            tmp_path / f"forecaster-{len(procs)}.toml",
            broker.port,
            mport,
            tmp_path / "state",
            bundle,
            extra_route,
            **options,
        )
        text = cfg.read_text()
        if "max_delay_ms" in options:  # write_config sets 2 ms; TOML refuses a second value
            text = text.replace("max_delay_ms = 2\n", "", 1)
        if mqtt:
            text = text.replace("[mqtt]\n", f"[mqtt]\n{mqtt}\n", 1)
        if metrics:
            text = text.replace("[metrics]\n", f"[metrics]\n{metrics}\n", 1)
        if routes is not None:
            text = text[: text.index("[[routes]]")] + routes
        cfg.write_text(text)
        d = DaemonProc(cfg, mport, tmp_path / f"daemon-{len(procs)}.log")
        procs.append(d)
        return d

    yield make
    for d in procs:
        if d.proc and d.proc.poll() is None:
            d.proc.kill()
            d.proc.wait()


def log_text(*procs: DaemonProc) -> str:
    return "".join(p.log.read_text(errors="replace") for p in procs if p.log.exists())


def rss_mb(pid: int) -> float:
    """Resident set size from /proc (no psutil needed)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024.0
    raise AssertionError(f"no VmRSS for pid {pid}")


def wait_until(cond: Callable[[], bool], timeout: float, step: float = 0.05) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(step)
    return cond()


def ready(d: DaemonProc) -> bool:
    try:
        return d.http("/readyz")[0] == 200
    except OSError:
        return False


# ------------------------------------------------------------------ MQTT clients


def _client(
    port: int, client_id: str, persistent: bool, auth: tuple[str, str] | None = None
) -> paho.Client:
    c = paho.Client(
        callback_api_version=CallbackAPIVersion.VERSION2,
        client_id=client_id,
        protocol=paho.MQTTv5,
    )
    if auth:
        c.username_pw_set(*auth)
    c.max_inflight_messages_set(1000)
    c.reconnect_delay_set(0.1, 0.5)
    props = None
    if persistent:
        props = Properties(PacketTypes.CONNECT)
        props.SessionExpiryInterval = 3600
    c.connect_async("127.0.0.1", port, keepalive=10, clean_start=not persistent, properties=props)
    return c


@dataclass
class Sink:
    """Collects predictions on a persistent session; survives broker restarts."""

    port: int
    topic: str = "forecast/#"
    client_id: str = "fault-sink"
    messages: list[tuple[str, bytes]] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def __post_init__(self) -> None:
        self.subscribed = threading.Event()
        self.client = _client(self.port, self.client_id, persistent=True)
        self.client.on_connect = self._on_connect
        self.client.on_subscribe = lambda *a: self.subscribed.set()
        self.client.on_message = self._on_message
        self.client.loop_start()
        assert self.subscribed.wait(10), "sink could not subscribe"

    def _on_connect(self, client: paho.Client, *_: object) -> None:
        client.subscribe([(t, 1) for t in self.topic.split(",")])

    def _on_message(self, _c: object, _u: object, msg: paho.MQTTMessage) -> None:
        with self.lock:
            self.messages.append((msg.topic, msg.payload))

    def count(self) -> int:
        with self.lock:
            return sum(len(p) for p in predictions(self.messages[:]).values())

    def snapshot(self) -> list[tuple[str, bytes]]:
        with self.lock:
            return list(self.messages)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


class Feed(threading.Thread):
    """Publishes ``items`` (QoS 1, JSON with ``seq``) at ``rate`` per second from a thread.

    ``acked`` holds the seq numbers the broker acknowledged (PUBACK): those are the readings
    the broker took responsibility for. Survives broker restarts (paho reconnects and resends
    unacknowledged messages).
    """

    def __init__(
        self, port: int, items: list[ReplayItem], rate: float, client_id: str = "fault-feed"
    ) -> None:
        super().__init__(daemon=True, name="feed")
        self.items = items
        self.rate = rate
        self.sent = 0
        self.acked: set[int] = set()
        self._mids: dict[int, int] = {}
        self._early: set[int] = set()
        self._lock = threading.Lock()
        self.stop_flag = threading.Event()
        self.connected = threading.Event()
        self.client = _client(port, client_id, persistent=True)
        self.client.on_connect = lambda *a: self.connected.set()
        self.client.on_disconnect = lambda *a: self.connected.clear()
        self.client.on_publish = self._on_publish
        self.client.loop_start()
        assert self.connected.wait(10), "feed could not connect"

    def _on_publish(self, _c: object, _u: object, mid: int, _r: object, _p: object) -> None:
        with self._lock:
            seq = self._mids.pop(mid, None)
            if seq is None:
                self._early.add(mid)
            else:
                self.acked.add(seq)

    def run(self) -> None:
        started = time.monotonic()
        for k, it in enumerate(self.items):
            if self.stop_flag.is_set():
                break
            if self.rate > 0:
                delay = started + k / self.rate - time.monotonic()
                if delay > 0:
                    time.sleep(delay)
            if not self.connected.is_set():
                self._resync()
            payload = json.dumps({"value": it.value, "ts": it.ts, "seq": it.seq})
            # paho calls on_publish with its own lock held: never call paho under ours
            info = self.client.publish(it.topic, payload, qos=1)
            with self._lock:
                if info.mid in self._early:
                    self._early.discard(info.mid)
                    self.acked.add(it.seq)
                else:
                    self._mids[info.mid] = it.seq
            self.sent = k + 1
            # keep paho's unacknowledged window well below 65,535 message ids
            while len(self._mids) > 20_000 and not self.stop_flag.is_set():
                time.sleep(0.01)

    def _resync(self) -> None:
        """After a lost connection, wait until paho has resent (in order) and the broker has
        acknowledged everything outstanding before publishing more. paho runs ``on_connect``
        before resending its backlog, so a publisher that carries straight on can overtake its
        own backlog and reorder a stream (the daemon then drops the older readings as
        ``out_of_order``): a well-behaved gateway resynchronises like this."""
        while not self.connected.wait(0.1):
            if self.stop_flag.is_set():
                return
        wait_until(lambda: not self._mids or self.stop_flag.is_set(), 30)

    def wait_acked(self, timeout: float) -> bool:
        return wait_until(lambda: len(self.acked) >= self.sent and not self.is_alive(), timeout)

    def close(self) -> None:
        self.stop_flag.set()
        self.join(timeout=10)
        self.client.disconnect()
        self.client.loop_stop()


# ------------------------------------------------------------------ verification


def predictions(messages: list[tuple[str, bytes]]) -> dict[str, list[dict]]:
    """Every prediction by stream, in arrival order (batches flattened)."""
    out: dict[str, list[dict]] = {}
    for _topic, payload in messages:
        doc = json.loads(payload)
        for p in doc if isinstance(doc, list) else [doc]:
            out.setdefault(p["stream"], []).append(p)
    return out


@dataclass
class Verdict:
    readings: int
    predicted: int
    missing: list[ReplayItem]
    duplicates: int
    extra: int  # predictions for readings that were never published


def verify(items: list[ReplayItem], messages: list[tuple[str, bytes]]) -> Verdict:
    """Match every published reading ``(topic, ts)`` with its prediction(s)."""
    by_key: dict[tuple[str, float], int] = {}
    for stream, preds in predictions(messages).items():
        for p in preds:
            key = (stream, float(p["ts"]))
            by_key[key] = by_key.get(key, 0) + 1
    wanted = {(it.topic, float(it.ts or 0.0)) for it in items}
    missing = [it for it in items if by_key.get((it.topic, float(it.ts or 0.0)), 0) == 0]
    duplicates = sum(n - 1 for k, n in by_key.items() if k in wanted and n > 1)
    extra = sum(n for k, n in by_key.items() if k not in wanted)
    return Verdict(len(items), len(items) - len(missing), missing, duplicates, extra)


@dataclass
class Drift:
    steps: int  # predictions (first per reading) further than ``tol`` from the reference
    max_abs: float
    longest_run: int  # longest run of consecutive drifting steps in one stream
    compared: int


def drift(
    messages: list[tuple[str, bytes]], reference: dict[float, float], tol: float = 1e-4
) -> Drift:
    """Compare the *last* prediction made for each reading with the uninterrupted reference."""
    steps = longest = compared = 0
    worst = 0.0
    for preds in predictions(messages).values():
        last: dict[float, float] = {}
        for p in preds:
            last[float(p["ts"])] = float(p["value"])
        run = 0
        for ts in sorted(last):
            if ts not in reference:
                continue
            compared += 1
            d = abs(last[ts] - reference[ts])
            if not np.isfinite(d):
                d = float("inf")
            worst = max(worst, d)
            if d > tol:
                steps += 1
                run += 1
                longest = max(longest, run)
            else:
                run = 0
    return Drift(steps, worst, longest, compared)


def report(name: str, **figures: object) -> None:
    """Print a measured figure line (``pytest -s``); also appended to $FAULTS_FIGURES."""
    text = ", ".join(f"{k}={v}" for k, v in figures.items())
    print(f"\n[figures] {name}: {text}")
    path = os.environ.get("FAULTS_FIGURES")
    if path:
        with open(path, "a") as fh:
            fh.write(f"{name}: {text}\n")
