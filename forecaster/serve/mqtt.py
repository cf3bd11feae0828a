"""The MQTT side of the daemon: paho-mqtt 2.x clients with the semantics a daemon needs.

Choices that differ from paho's defaults, each measured here or documented as a trap
(ARCHITECTURE-NOTES §8):

- **Two connections.** Readings arrive on a *subscriber* connection; predictions leave on a
  *publisher* connection. When the worker falls behind, the subscriber's thread blocks on the
  full queue, the TCP window closes and the broker holds the backlog (persisted, counted in its
  queue limit): real back-pressure, nothing dropped. On one connection that block would also
  stop the PUBACKs the worker's publish window waits for, and the two would stall each other.
  (mosquitto 2.0.11 was measured here sending >16,000 unacknowledged QoS 1 messages to a client
  that asked for a receive maximum of 1,000, so the broker's flow control cannot be relied on.)
- A persistent session for the subscriber (``clean_start=False`` + a session expiry;
  ``clean_session=False`` on 3.1.1), so readings published during a restart are queued.
- ``manual_ack=True``: a QoS 1 reading is acknowledged only after its prediction is out (after
  the broker's PUBACK when predictions are QoS ≥ 1), so a crash means redelivery, not loss.
- Every callback catches everything: an exception escaping a paho callback kills the network
  thread while ``is_connected()`` keeps saying True.
- A window on in-flight QoS ≥ 1 publishes: paho's message ids wrap past 65,535 unacknowledged
  messages and the client stalls.
- Reconnects use exponential backoff with full jitter (paho's own has none, so a fleet of
  gateways would reconnect in lockstep after a broker restart).
"""

from __future__ import annotations

import logging
import random
import ssl
import threading
import time
from collections.abc import Callable
from typing import Any

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from forecaster.serve.config import MQTTConfig

log = logging.getLogger("forecaster.serve.mqtt")

#: (topic, payload, mid, qos) of a received message. It may block (back-pressure).
MessageHandler = Callable[[str, bytes, int, int], None]


def backoff(attempt: int, low: float, high: float, rng: random.Random) -> float:
    """Full-jitter exponential backoff: uniform in [low, min(high, low·2^attempt)]."""
    ceiling = min(high, low * (2.0 ** min(attempt, 30)))
    return rng.uniform(low, max(low, ceiling))


class _Link:
    """One paho client with jittered reconnects and guarded callbacks."""

    def __init__(
        self,
        cfg: MQTTConfig,
        password: str | None,
        client_id: str,
        persistent: bool,
        on_error: Callable[[str], None],
        rng: random.Random,
    ) -> None:
        self.cfg = cfg
        self.persistent = persistent
        self._on_error = on_error
        self._rng = rng
        self.attempt = 0
        self.connected = False
        self.connects = 0
        v5 = cfg.protocol == "5"
        self.client = paho.Client(
            callback_api_version=CallbackAPIVersion.VERSION2,
            client_id=client_id,
            protocol=paho.MQTTv5 if v5 else paho.MQTTv311,
            clean_session=None if v5 else not persistent,
            manual_ack=persistent,
        )
        if cfg.username:
            self.client.username_pw_set(cfg.username, password)
        if cfg.tls.enabled:
            self.client.tls_set(
                ca_certs=str(cfg.tls.ca_file) if cfg.tls.ca_file else None,
                certfile=str(cfg.tls.cert_file) if cfg.tls.cert_file else None,
                keyfile=str(cfg.tls.key_file) if cfg.tls.key_file else None,
                cert_reqs=ssl.CERT_REQUIRED,
                tls_version=ssl.PROTOCOL_TLS_CLIENT,
            )
            self.client.tls_insecure_set(cfg.tls.insecure)
        self._next_delay()
        self.client.on_connect_fail = self.guard("on_connect_fail", self._failed)

    def guard(self, name: str, fn: Callable[..., None]) -> Callable[..., None]:
        """Wrap a paho callback so nothing escapes into the network thread."""

        def wrapped(*args: Any) -> None:
            try:
                fn(*args)
            except Exception:
                log.exception("exception in MQTT callback %s (caught; the client runs on)", name)
                try:
                    self._on_error(name)
                except Exception:  # noqa: S110 - the error hook itself must not kill the thread
                    pass

        return wrapped

    def _next_delay(self) -> None:
        """paho waits ``min_delay`` after a reset: give it a freshly jittered one each time."""
        delay = backoff(
            self.attempt, self.cfg.reconnect_min_delay, self.cfg.reconnect_max_delay, self._rng
        )
        self.client.reconnect_delay_set(min_delay=delay, max_delay=delay)  # type: ignore[arg-type]
        self.attempt += 1

    def _failed(self, _c: paho.Client, _u: Any) -> None:
        log.warning("cannot connect to %s:%s; retrying", self.cfg.host, self.cfg.port)
        self._next_delay()

    def lost(self) -> None:
        self.connected = False
        self._next_delay()

    def up(self) -> None:
        self.connected = True
        self.connects += 1
        self.attempt = 0

    def start(self) -> None:
        props = None
        if self.cfg.protocol == "5":
            props = Properties(PacketTypes.CONNECT)
            if self.persistent:
                props.SessionExpiryInterval = self.cfg.session_expiry
                props.ReceiveMaximum = self.cfg.receive_maximum
        self.client.connect_async(
            self.cfg.host,
            self.cfg.port,
            keepalive=self.cfg.keepalive,
            clean_start=(not self.persistent)
            if self.cfg.protocol == "5"
            else paho.MQTT_CLEAN_START_FIRST_ONLY,
            properties=props,
        )
        self.client.loop_start()

    def stop(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()
        self.connected = False


class Transport:
    """Readings in on one connection, predictions out on another, acks tying them together."""

    def __init__(
        self,
        cfg: MQTTConfig,
        password: str | None,
        filters: list[str],
        on_message: MessageHandler,
        on_error: Callable[[str], None],
        on_state: Callable[[bool], None] | None = None,
    ) -> None:
        self.cfg = cfg
        self.filters = filters
        self._on_message = on_message
        self._on_error = on_error
        self._on_state = on_state or (lambda _connected: None)
        rng = random.Random()  # noqa: S311 - jitter, not security
        self._sub = _Link(cfg, password, cfg.client_id, True, on_error, rng)
        self._pub = _Link(cfg, password, f"{cfg.client_id}-pub", False, on_error, rng)
        self._subscribed = False
        self._pending_subs: set[int] = set()
        self._acks_lock = threading.Lock()
        self._acks: dict[int, tuple[list[tuple[int, int]], int]] = {}  # out mid -> (acks, qos)
        self._done_early: set[int] = set()
        self._window = threading.Condition()
        self._inflight = 0
        self._stopping = False

        sub, pub = self._sub.client, self._pub.client
        sub.will_set(cfg.status_topic, b"offline", qos=1, retain=True)
        sub.on_connect = self._sub.guard("on_connect", self._sub_connect)
        sub.on_disconnect = self._sub.guard("on_disconnect", self._sub_disconnect)
        sub.on_message = self._sub.guard("on_message", self._handle_message)
        sub.on_subscribe = self._sub.guard("on_subscribe", self._handle_subscribe)
        # paho queues QoS>=1 publishes beyond its own limit; our window keeps the total far
        # below the 65,535 message ids.
        pub.max_inflight_messages_set(cfg.max_inflight)
        pub.on_connect = self._pub.guard("on_connect", self._pub_connect)
        pub.on_disconnect = self._pub.guard("on_disconnect", self._pub_disconnect)
        pub.on_publish = self._pub.guard("on_publish", self._handle_publish)

    # ------------------------------------------------------------------ state

    @property
    def connected(self) -> bool:
        return self._sub.connected and self._pub.connected

    @property
    def subscribed(self) -> bool:
        return self.connected and self._subscribed

    @property
    def reconnects(self) -> int:
        """Successful connections after the first, on either link."""
        return max(0, self._sub.connects - 1) + max(0, self._pub.connects - 1)

    @property
    def inflight(self) -> int:
        return self._inflight

    def _changed(self) -> None:
        self._on_state(self.connected)

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> None:
        """Start both network threads; an absent broker is retried, never fatal."""
        self._sub.start()
        self._pub.start()

    def stop(self, timeout: float = 3.0) -> None:
        """Publish ``offline``, wait for in-flight publishes, disconnect (no last will)."""
        self._stopping = True
        self.flush(timeout)
        if self._sub.connected:
            info = self._sub.client.publish(self.cfg.status_topic, b"offline", qos=1, retain=True)
            try:
                info.wait_for_publish(timeout=1.0)
            except (RuntimeError, ValueError) as exc:
                log.warning("could not publish offline status: %s", exc)
        self._sub.stop()
        self._pub.stop()
        self._changed()

    def flush(self, timeout: float) -> bool:
        """Wait until every QoS ≥ 1 prediction is acknowledged by the broker (or ``timeout``)."""
        deadline = time.monotonic() + timeout
        with self._window:
            while self._inflight > 0:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._window.wait(left)
        return True

    # ------------------------------------------------------------------ subscriber link

    def _sub_connect(self, client: paho.Client, _u: Any, flags: Any, reason: Any, _p: Any) -> None:
        if reason.is_failure:
            log.error("broker refused the connection: %s", reason)
            return
        log.info(
            "connected to %s:%s (session present: %s)",
            self.cfg.host,
            self.cfg.port,
            getattr(flags, "session_present", "?"),
        )
        self._sub.up()
        self._subscribed = False
        self._pending_subs.clear()
        for f in self.filters:
            rc, mid = client.subscribe(f, qos=1)
            if rc == MQTTErrorCode.MQTT_ERR_SUCCESS and mid is not None:
                self._pending_subs.add(mid)
        self._subscribed = not self._pending_subs
        client.publish(self.cfg.status_topic, b"online", qos=1, retain=True)
        self._changed()

    def _handle_subscribe(self, _c: paho.Client, _u: Any, mid: int, reasons: Any, _p: Any) -> None:
        failed = [r for r in reasons if getattr(r, "is_failure", False)]
        if failed:
            log.error("subscription refused by the broker: %s", failed)
            return
        self._pending_subs.discard(mid)
        self._subscribed = not self._pending_subs

    def _sub_disconnect(self, _c: paho.Client, _u: Any, _f: Any, reason: Any, _p: Any) -> None:
        if not self._stopping:
            log.warning("subscriber connection lost: %s", reason)
        self._subscribed = False
        self._sub.lost()
        self._changed()

    def _handle_message(self, _c: paho.Client, _u: Any, msg: paho.MQTTMessage) -> None:
        try:
            topic = msg.topic
        except UnicodeDecodeError:
            self._on_error("bad_topic")  # brokers should refuse these; count and move on
            self.ack(msg.mid, msg.qos)
            return
        self._on_message(topic, bytes(msg.payload), msg.mid, msg.qos)

    def ack(self, mid: int, qos: int) -> None:
        """Acknowledge a reading (QoS ≥ 1) on the subscriber link; thread-safe in paho."""
        if qos > 0:
            self._sub.client.ack(mid, qos)

    # ------------------------------------------------------------------ publisher link

    def _pub_connect(self, _c: paho.Client, _u: Any, _f: Any, reason: Any, _p: Any) -> None:
        if reason.is_failure:
            log.error("broker refused the publisher connection: %s", reason)
            return
        self._pub.up()
        self._changed()

    def _pub_disconnect(self, _c: paho.Client, _u: Any, _f: Any, reason: Any, _p: Any) -> None:
        if not self._stopping:
            log.warning("publisher connection lost: %s", reason)
        self._pub.lost()
        self._changed()

    def publish(
        self, topic: str, payload: bytes, qos: int, retain: bool, acks: list[tuple[int, int]]
    ) -> bool:
        """Publish one prediction message; ``acks`` (incoming mid, qos) are acknowledged once it
        is written (QoS 0) or acknowledged by the broker (QoS ≥ 1). Blocks while the in-flight
        window is full; returns False if stopping interrupted the wait."""
        if qos > 0:
            with self._window:
                while self._inflight >= self.cfg.max_inflight:
                    if self._stopping:
                        return False
                    self._window.wait(0.2)
                self._inflight += 1
        # Never hold our lock while calling into paho: paho runs on_publish with its own
        # callback mutex held, and two locks taken in opposite orders deadlock. Whichever of
        # publish() and on_publish() records second sees the other's record.
        info = self._pub.client.publish(topic, payload, qos=qos, retain=retain)
        if info.rc not in (MQTTErrorCode.MQTT_ERR_SUCCESS, MQTTErrorCode.MQTT_ERR_NO_CONN):
            log.warning("publish to %s failed: %s", topic, paho.error_string(info.rc))
        with self._acks_lock:
            if info.mid in self._done_early:
                self._done_early.discard(info.mid)
                done = True
            else:
                self._acks[info.mid] = (acks, qos)
                done = False
        if done:
            self._complete(acks, qos)
        return True

    def _handle_publish(self, _c: paho.Client, _u: Any, mid: int, _r: Any, _p: Any) -> None:
        with self._acks_lock:
            entry = self._acks.pop(mid, None)
            if entry is None:
                self._done_early.add(mid)
                return
        self._complete(*entry)

    def _complete(self, acks: list[tuple[int, int]], qos: int) -> None:
        for in_mid, in_qos in acks:
            self.ack(in_mid, in_qos)
        if qos > 0:
            with self._window:
                self._inflight = max(0, self._inflight - 1)
                self._window.notify_all()
