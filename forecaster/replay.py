"""``forecaster replay``: publish a CSV as live readings, for the demo, tests and benchmarks.

Each series of the CSV becomes ``streams`` MQTT streams (copies). Readings go out in row order,
interleaved across streams, at ``rate`` readings per second (0 = as fast as the broker takes
them). JSON readings carry the row's time (or the publish time when the data has none) as ``ts``
and a ``seq`` number, so a subscriber can check that nothing is lost.
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


def encode(item: ReplayItem, fmt: Format, now: float) -> bytes:
    if fmt == "number":
        return repr(item.value).encode()
    return json.dumps(
        {"value": item.value, "ts": item.ts if item.ts is not None else now, "seq": item.seq}
    ).encode()


def encode_batch(items: list[ReplayItem], now: float) -> bytes:
    return json.dumps(
        [
            {
                "stream": it.stream,
                "value": it.value,
                "ts": it.ts if it.ts is not None else now,
                "seq": it.seq,
            }
            for it in items
        ]
    ).encode()


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
) -> int:
    """Publish ``items``; returns how many readings went out. Waits for QoS ≥ 1 acks in windows
    (paho stalls beyond 65,535 unacknowledged messages)."""
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
        payload = encode_batch(group, now) if fmt == "batch" else encode(group[0], fmt, now)
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
