"""Subscribe and keep every message: what a test or the demo sees of the daemon's output.

The collector subscribes again in ``on_connect``, so it survives a broker restart; with
``persistent=True`` it also keeps an MQTT 5 session (expiry one hour), so predictions published
while it reconnects are queued by the broker instead of lost to the observer.
"""

from __future__ import annotations

import itertools
import json
import os
import threading
import time
from collections.abc import Iterable
from types import TracebackType
from typing import Any

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from forecaster.harness.ports import LOOPBACK, HarnessError, wait_until

_ids = itertools.count()


def mqtt_client(
    port: int,
    client_id: str = "",
    *,
    persistent: bool = False,
    auth: tuple[str, str] | None = None,
    host: str = LOOPBACK,
    keepalive: int = 10,
    v311: bool = False,
) -> paho.Client:
    """An MQTT 5 client set up for loopback tests (``connect_async``: call ``loop_start()``).

    Fast reconnects and a large in-flight window; ``persistent`` asks for a one-hour session so
    the broker queues QoS 1 messages while the client is away. ``v311`` speaks MQTT 3.1.1
    instead (nats-server's MQTT listener knows no other).
    """
    c = paho.Client(
        callback_api_version=CallbackAPIVersion.VERSION2,
        client_id=client_id or f"harness-{os.getpid()}-{next(_ids)}",
        protocol=paho.MQTTv311 if v311 else paho.MQTTv5,
        clean_session=not persistent if v311 else None,  # MQTT 5 says it in connect
    )
    if auth:
        c.username_pw_set(*auth)
    c.max_inflight_messages_set(1000)
    c.reconnect_delay_set(1, 1)  # paho takes whole seconds
    props = None
    if persistent:
        props = Properties(PacketTypes.CONNECT)
        props.SessionExpiryInterval = 3600
    if v311:
        c.connect_async(host, port, keepalive=keepalive)
    else:
        c.connect_async(
            host, port, keepalive=keepalive, clean_start=not persistent, properties=props
        )
    return c


def predictions(messages: Iterable[tuple[str, bytes]]) -> dict[str, list[dict[str, Any]]]:
    """Every prediction by stream id, in arrival order (gateway batches flattened)."""
    out: dict[str, list[dict[str, Any]]] = {}
    for _topic, payload in messages:
        doc = json.loads(payload)
        for p in doc if isinstance(doc, list) else [doc]:
            out.setdefault(p["stream"], []).append(p)
    return out


class Collector:
    """Subscribes ``topics`` (comma-separated filters) at QoS 1 and keeps every message."""

    def __init__(
        self,
        port: int,
        topics: str = "forecast/#",
        *,
        client_id: str = "",
        persistent: bool = False,
        auth: tuple[str, str] | None = None,
        host: str = LOOPBACK,
        timeout: float = 30.0,
        v311: bool = False,
    ) -> None:
        self.port = port
        self.topics = [t for t in topics.split(",") if t]
        self.messages: list[tuple[str, bytes]] = []
        self._lock = threading.Lock()
        self._subscribed = threading.Event()
        #: monotonic time of every SUBACK: when the broker routes the topics to this collector
        #: again after a reconnect (a broker killed before it saved the session forgot them)
        self.subscribed_at: list[float] = []
        self.client = mqtt_client(
            port, client_id, persistent=persistent, auth=auth, host=host, v311=v311
        )
        self.client.on_connect = self._on_connect
        self.client.on_subscribe = self._on_subscribe
        self.client.on_message = self._on_message
        self.client.loop_start()
        if not self._subscribed.wait(timeout):
            self.close()
            raise HarnessError(f"could not subscribe {self.topics} on port {port}")

    def _on_connect(self, client: paho.Client, *_: object) -> None:
        client.subscribe([(t, 1) for t in self.topics])

    def _on_subscribe(self, *_: object) -> None:
        with self._lock:
            self.subscribed_at.append(time.monotonic())
        self._subscribed.set()

    def subscribed_since(self, t: float) -> bool:
        """Whether the broker acknowledged a subscription at or after monotonic time ``t``."""
        with self._lock:
            return any(at >= t for at in self.subscribed_at)

    def _on_message(self, _c: object, _u: object, msg: paho.MQTTMessage) -> None:
        with self._lock:
            self.messages.append((msg.topic, bytes(msg.payload)))

    def snapshot(self) -> list[tuple[str, bytes]]:
        """A copy of every message so far, in arrival order."""
        with self._lock:
            return list(self.messages)

    def __len__(self) -> int:
        with self._lock:
            return len(self.messages)

    def predictions(self) -> dict[str, list[dict[str, Any]]]:
        return predictions(self.snapshot())

    def prediction_count(self) -> int:
        """Predictions so far (a gateway batch counts for each of its items)."""
        return sum(len(p) for p in self.predictions().values())

    def wait_for(self, n: int, timeout: float = 60.0) -> list[tuple[str, bytes]]:
        """Wait until ``n`` messages arrived; all of them, or HarnessError saying how many came."""
        if not wait_until(lambda: len(self) >= n, timeout):
            raise HarnessError(f"{len(self)} of {n} messages on {self.topics} in {timeout} s")
        return self.snapshot()

    def wait_predictions(self, n: int, timeout: float = 60.0) -> dict[str, list[dict[str, Any]]]:
        """Wait until ``n`` predictions (batch items counted one by one) arrived."""
        if not wait_until(lambda: self.prediction_count() >= n, timeout, step=0.1):
            raise HarnessError(f"{self.prediction_count()} of {n} predictions in {timeout} s")
        return self.predictions()

    def wait_quiet(self, quiet: float = 1.0, timeout: float = 30.0) -> list[tuple[str, bytes]]:
        """Wait until nothing new arrived for ``quiet`` seconds (late duplicates, redeliveries):
        the only way to know that something did *not* come is to watch for a while."""
        deadline = time.monotonic() + timeout
        seen, since = len(self), time.monotonic()
        while time.monotonic() < deadline:
            now = len(self)
            if now != seen:
                seen, since = now, time.monotonic()
            elif time.monotonic() - since >= quiet:
                return self.snapshot()
            time.sleep(0.05)
        raise HarnessError(f"messages still arriving after {timeout} s ({len(self)} so far)")

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()

    def __enter__(self) -> Collector:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
