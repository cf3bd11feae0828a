"""Fault-suite fixtures: the integration suite's real mosquitto and daemon (both from
:mod:`forecaster.harness`), plus the tools to break them and to check what survived.

- ``broker`` (from ``tests/integration/conftest.py``): mosquitto with persistence on,
  restartable on the same port and directory;
- ``daemon``: ``make(**options)`` → a not-yet-started :class:`DaemonProcess`, configured through
  the Config model (``mqtt=``, ``metrics=``, ``route=`` dicts, ``routes=`` a list of dicts);
- ``reference`` (from ``tests/conftest.py``): the uninterrupted prediction for every reading;
- ``seed`` / ``rng`` (from ``tests/conftest.py``): reported on failure, ``TEST_SEED`` replays;
- :class:`Feed`: sequence-numbered readings (``forecaster.replay``'s plan, so ``seq`` is in every
  JSON payload) published from a thread at a set rate, recording what the broker acknowledged;
- :class:`Sink`: a persistent-session :class:`~forecaster.harness.Collector`, so predictions
  published while it reconnects after a broker restart are not lost to the test;
- :func:`verify`: every reading ``(stream, ts)`` has a prediction; duplicates counted;
- :func:`drift`: how far each stream's predictions are from ``forecaster evaluate``'s;
- ``rss_mb``, ``log_text`` and ``wait_until``.
"""

from __future__ import annotations

import json
import os
import random
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from forecaster.data import load_csv
from forecaster.harness import (
    Broker,
    Collector,
    DaemonProcess,
    mqtt_client,
    predictions,
    wait_until,
)
from forecaster.replay import ReplayItem, plan
from tests.integration.conftest import (  # noqa: F401 - fixtures are found by name
    MODEL,
    ROOT,
    broker,
    make_daemon,
)

__all__ = [
    "MODEL",
    "ROOT",
    "Broker",
    "DaemonProcess",
    "Feed",
    "Sink",
    "drift",
    "log_text",
    "mqtt_client",
    "predictions",
    "report",
    "rss_mb",
    "verify",
    "wait_until",
    "water_items",
]

WATER = ROOT / "data" / "water-flow.csv"
PASSWORD_MARKER = "pw-Zq8!not-in-logs-7c41"  # noqa: S105 - a test secret to look for


def water_items(
    streams: int = 1,
    start: str | None = None,
    stop: str | None = None,
    topic: str = "sensors/{stream}/flow",
) -> list[ReplayItem]:
    return plan(load_csv(WATER, time_column="Time"), topic, streams, start, stop)


# ------------------------------------------------------------------ daemon


@pytest.fixture
def daemon(tmp_path: Path, broker: Broker) -> Iterator[Callable[..., DaemonProcess]]:  # noqa: F811
    """``make(bundle=MODEL, mqtt=, metrics=, route=, routes=, **daemon_options)`` → a
    not-yet-started :class:`DaemonProcess` on ``broker``.

    All daemons of one test share the client id and the state directory (``tmp_path/state``),
    so a second one is a restart of the first.
    """
    procs: list[DaemonProcess] = []

    def make(
        bundle: Path = MODEL,
        *,
        mqtt: Mapping[str, Any] | None = None,
        metrics: Mapping[str, Any] | None = None,
        route: Mapping[str, Any] | None = None,
        routes: list[Mapping[str, Any]] | None = None,
        **options: Any,
    ) -> DaemonProcess:
        d = make_daemon(
            tmp_path,
            broker.port,
            len(procs),
            bundle,
            mqtt=mqtt,
            metrics=metrics,
            route=route,
            routes=routes,
            **options,
        )
        procs.append(d)
        return d

    yield make
    for d in procs:
        d.close()


def log_text(*procs: DaemonProcess) -> str:
    return "".join(p.log_text() for p in procs)


def rss_mb(pid: int) -> float:
    """Resident set size from /proc (no psutil needed)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024.0
    raise AssertionError(f"no VmRSS for pid {pid}")


def ready(d: DaemonProcess) -> bool:
    return d.ready()


# ------------------------------------------------------------------ MQTT clients


class Sink(Collector):
    """Collects predictions on a persistent session; survives broker restarts."""

    def __init__(self, port: int, topic: str = "forecast/#", client_id: str = "fault-sink") -> None:
        super().__init__(port, topic, client_id=client_id, persistent=True)

    def count(self) -> int:
        return self.prediction_count()

    def answered(self) -> set[tuple[str, float]]:
        """The ``(stream, ts)`` of every prediction received."""
        return {
            (str(p["stream"]), float(p["ts"])) for ps in self.predictions().values() for p in ps
        }


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
        self.client = mqtt_client(port, client_id, persistent=True)
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
    """Compare the *last* prediction made for each reading with the uninterrupted reference.

    Every prediction must have a reference (``reference`` covers every reading of the series):
    one that has none is a failure, never skipped, or a parity check could pass on nothing.
    """
    steps = longest = compared = 0
    worst = 0.0
    for stream, preds in predictions(messages).items():
        last: dict[float, float] = {}
        for p in preds:
            last[float(p["ts"])] = float(p["value"])
        unmatched = [ts for ts in last if ts not in reference]
        assert unmatched == [], f"{stream}: {len(unmatched)} predictions without a reference"
        run = 0
        for ts in sorted(last):
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


#: A final wait fails only when no new prediction arrived for this long: slow progress on a busy
#: machine is not a loss.
STALL_S = 60.0


def wait_all_predicted(items: list[ReplayItem], sink: Sink, stall: float = STALL_S) -> bool:
    """Wait until every reading has a prediction, failing only when none arrives for
    ``stall`` seconds."""
    last, since = -1, time.monotonic()
    while True:
        got = verify(items, sink.snapshot()).predicted
        if got == len(items):
            return True
        if got != last:
            last, since = got, time.monotonic()
        elif time.monotonic() - since > stall:
            return False
        time.sleep(0.2)


def kill_moments(
    rng: random.Random, duration: float, kills: int, edge: float, gap: float
) -> list[float]:
    """``kills`` sorted random moments in ``[edge, duration - edge]``, at least ``gap`` s apart,
    so each run between two kills gets some work done."""
    moments: list[float] = []
    while len(moments) < kills:
        t = rng.uniform(edge, duration - edge)
        if all(abs(t - m) > gap for m in moments):
            moments.append(t)
    return sorted(moments)
