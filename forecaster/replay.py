"""``forecaster replay``: publish a CSV as live readings, for the demo, tests and benchmarks.

Each series of the CSV becomes ``streams`` MQTT streams (copies). Readings go out in row order,
interleaved across streams, at a total rate the caller gives (the CLI's ``--rate`` is *per
stream* and multiplied here by the number of streams, so ``--rate 10`` replays every stream at
10 readings a second whatever their number; 0 = as fast as the broker takes them). JSON readings
carry a ``ts`` and a ``seq`` number, so a subscriber can check that nothing is lost.

``ts`` is the row's time (``timestamps="file"``: what ``evaluate`` and the demo need for parity)
or the publish time (``"now"``). The daemon never steps a stream back in time: a reading whose
``ts`` is not later than its stream's last one is answered from its recent-predictions cache
(taken for a redelivery) or dropped (``out_of_order``/``duplicate``). So replaying the same file
twice into a running daemon with file times steps nothing: :class:`EchoCounter` watches the
prediction topic and the CLI warns when too few predictions came back.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Literal

import numpy as np
import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion

from forecaster.data import Dataset, cut_index
from forecaster.errors import ForecasterError

Format = Literal["number", "json", "batch"]
Timestamps = Literal["file", "now"]


@dataclass(frozen=True)
class ReplayItem:
    stream: str
    topic: str
    value: float
    ts: float | None
    seq: int
    row: int


def plan(
    data: Dataset, topic: str, streams: int, start: str | None = None, stop: str | None = None
) -> list[ReplayItem]:
    """Every reading to publish, in publishing order: row by row, stream by stream."""
    if streams < 1:
        raise ForecasterError("--streams must be at least 1")
    if "{stream}" not in topic and streams * len(data.series) > 1:
        raise ForecasterError("--topic needs {stream} when replaying more than one stream")
    per_series = []
    for s in data.series:
        a = cut_index(s, start) if start is not None else 0
        b = cut_index(s, stop) if stop is not None else len(s)
        per_series.append((s, a, b))
    longest = max((b - a for _, a, b in per_series), default=0)
    items: list[ReplayItem] = []
    seq = 0
    for k in range(longest):
        for si, (s, a, b) in enumerate(per_series):
            i = a + k
            if i >= b or not np.isfinite(s.values[i]):
                continue
            for c in range(streams):
                name = f"s{si * streams + c}"
                items.append(
                    ReplayItem(
                        stream=name,
                        topic=topic.replace("{stream}", name),
                        value=float(s.values[i]),
                        ts=None if s.times is None else float(s.times[i]),
                        seq=seq,
                        row=int(s.rows[i]),
                    )
                )
                seq += 1
    return items


def encode(item: ReplayItem, fmt: Format, now: float, ts: float | None = None) -> bytes:
    """One reading's payload; ``ts`` overrides the item's time (``--timestamps now``)."""
    if fmt == "number":
        return repr(item.value).encode()
    stamp = ts if ts is not None else item.ts if item.ts is not None else now
    return json.dumps({"value": item.value, "ts": stamp, "seq": item.seq}).encode()


def encode_batch(items: list[ReplayItem], now: float, ts: list[float] | None = None) -> bytes:
    return json.dumps(
        [
            {
                "stream": it.stream,
                "value": it.value,
                "ts": ts[i] if ts is not None else it.ts if it.ts is not None else now,
                "seq": it.seq,
            }
            for i, it in enumerate(items)
        ]
    ).encode()


class _Clock:
    """Publish times as ``ts``, strictly increasing per stream even within one clock tick."""

    def __init__(self) -> None:
        self._last: dict[str, float] = {}

    def stamp(self, stream: str, now: float) -> float:
        last = self._last.get(stream)
        ts = now if last is None or now > last else last + 1e-6
        self._last[stream] = ts
        return ts


def stream_count(items: list[ReplayItem]) -> int:
    """Distinct streams in a plan: the factor between a per-stream and a total rate."""
    return len({it.stream for it in items})


class EchoCounter:
    """Counts the predictions that come back on ``topic`` while a replay runs.

    Replay cannot see the daemon's state, but it can see its answers: a daemon that already
    stepped these timestamps answers only those still in its recent-predictions cache (older
    ones are ``out_of_order``), and a daemon that is not running or serves other topics answers
    nothing. The count makes that visible.
    """

    def __init__(self, client: paho.Client, topic: str) -> None:
        self.topic = topic
        self._lock = threading.Lock()
        self._count = 0
        self._last = time.monotonic()
        self._subscribed = threading.Event()
        client.message_callback_add(topic, self._on_message)
        client.on_subscribe = lambda *_a: self._subscribed.set()
        client.subscribe(topic, qos=0)

    def _on_message(self, _c: paho.Client, _u: object, msg: paho.MQTTMessage) -> None:
        try:
            doc = json.loads(msg.payload)
        except ValueError:
            doc = None
        with self._lock:
            self._count += len(doc) if isinstance(doc, list) else 1
            self._last = time.monotonic()

    def ready(self, timeout: float = 5.0) -> bool:
        """Whether the broker acknowledged the subscription (so nothing sent after is missed)."""
        return self._subscribed.wait(timeout)

    @property
    def count(self) -> int:
        with self._lock:
            return self._count

    def settle(self, expected: int, quiet: float = 1.0, limit: float = 10.0) -> int:
        """Wait until ``expected`` predictions came back, or none for ``quiet`` s (at most
        ``limit`` s); the count."""
        deadline = time.monotonic() + limit
        while time.monotonic() < deadline:
            with self._lock:
                count, last = self._count, self._last
            if count >= expected or time.monotonic() - last >= quiet:
                return count
            time.sleep(0.05)
        return self.count


def _messages(
    items: list[ReplayItem], fmt: Format, batch_topic: str, batch_size: int
) -> Iterator[tuple[str, list[ReplayItem]]]:
    if fmt != "batch":
        for it in items:
            yield it.topic, [it]
        return
    for i in range(0, len(items), batch_size):
        yield batch_topic, items[i : i + batch_size]


def connect(
    host: str,
    port: int,
    client_id: str = "",
    username: str | None = None,
    password: str | None = None,
) -> paho.Client:
    client = paho.Client(
        callback_api_version=CallbackAPIVersion.VERSION2, client_id=client_id, protocol=paho.MQTTv5
    )
    client.max_inflight_messages_set(1000)
    if username:
        client.username_pw_set(username, password)
    try:
        client.connect(host, port, keepalive=30)
    except OSError as exc:
        raise ForecasterError(f"cannot connect to the broker at {host}:{port} ({exc})") from None
    client.loop_start()
    return client


def replay(
    client: paho.Client,
    items: list[ReplayItem],
    fmt: Format,
    qos: int,
    rate: float,
    batch_topic: str = "gateway/batch",
    batch_size: int = 100,
    should_stop: Callable[[], bool] = lambda: False,
    on_sent: Callable[[int], None] | None = None,
    timestamps: Timestamps = "file",
) -> int:
    """Publish ``items`` at ``rate`` readings per second *in total*; returns how many readings
    went out. Waits for QoS ≥ 1 acks in windows (paho stalls beyond 65,535 unacknowledged
    messages). ``timestamps="now"`` stamps each reading with its publish time."""
    clock = _Clock() if timestamps == "now" else None
    sent = 0
    started = time.monotonic()
    window: list[paho.MQTTMessageInfo] = []
    lock = threading.Lock()
    for topic, group in _messages(items, fmt, batch_topic, batch_size):
        if should_stop():
            break
        if rate > 0:
            due = started + sent / rate
            delay = due - time.monotonic()
            if delay > 0:
                time.sleep(delay)
        now = time.time()
        stamps = None if clock is None else [clock.stamp(it.stream, now) for it in group]
        if fmt == "batch":
            payload = encode_batch(group, now, stamps)
        else:
            payload = encode(group[0], fmt, now, None if stamps is None else stamps[0])
        with lock:
            info = client.publish(topic, payload, qos=qos)
        if qos > 0:
            window.append(info)
            if len(window) >= 500:
                for w in window:
                    w.wait_for_publish(timeout=30)
                window.clear()
        sent += len(group)
        if on_sent is not None:
            on_sent(sent)
    for w in window:
        w.wait_for_publish(timeout=30)
    return sent
