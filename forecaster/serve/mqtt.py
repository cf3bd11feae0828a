"""The MQTT side of the daemon: paho-mqtt 2.x clients with the semantics a daemon needs.

Choices that differ from paho's defaults, each measured here or documented as a trap in the
project's original design notes:

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
- paho's per-message topic matcher is replaced by one that leaves no reference cycle
  (:mod:`forecaster.serve.matcher`): paho's left one per received message, and collecting them
  was the largest stall in the single-reading latency.
- paho's network thread is woken by one byte per wake-up, not one per queued packet
  (:mod:`forecaster.serve.wakeup`): a micro-batch's predictions, or a burst of acknowledgements,
  cost one system call, not one each.
- The messages one buffered read brought (:mod:`forecaster.serve.sockbuf`) are handed to the
  daemon together (``on_messages``), so its intake decodes a burst of reading objects in one
  call and takes its queue's lock once, not per message; the readings the PUBACKs of one read
  make due are acknowledged with one queued write.
- A PUBLISH without MQTT 5 properties is decoded without building an empty property set, and a
  success PUBACK (two bytes) from its message id alone (:mod:`forecaster.serve.packets`).
- Reconnects use exponential backoff with full jitter (paho's own has none, so a fleet of
  gateways would reconnect in lockstep after a broker restart).
- A prediction the broker refuses (an MQTT 5 PUBACK or PUBREC with a failure reason, such as 0x87
  "not authorized" when its ACL does not let the daemon write the prediction topic) is reported
  to ``on_refused`` with what the message carried; paho would have reported it as published.
"""

from __future__ import annotations

import logging
import random
import ssl
import threading
import time
from collections.abc import Callable, Sequence
from enum import StrEnum
from typing import Any, NamedTuple, cast

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from forecaster.serve import bulkpub, matcher, packets, pubinfo, wakeup
from forecaster.serve.config import MQTTConfig
from forecaster.serve.probe import tls_context, why_unreachable
from forecaster.serve.sockbuf import BufferedClient

log = logging.getLogger("forecaster.serve.mqtt")

#: Most messages held back for one hand-over to ``on_messages``: a read step that brings more
#: (a backlog after a reconnect) hands them over in parts, so the first is queued promptly.
STAGED_MAX = 256

#: (topic, payload, mid, qos) of a received message. It may block (back-pressure).
MessageHandler = Callable[[str, bytes, int, int], None]
#: Takes the messages one read of the socket brought, in order: (topic, payload, mid, qos) each.
ManyHandler = Callable[[list[tuple[str, bytes, int, int]]], None]

#: (incoming mid, qos) of a reading to acknowledge once its prediction is out.
Ack = tuple[int, int]


class Delivery(NamedTuple):
    """Where one prediction message goes and what it carries, kept with it until the broker
    answers: what a refusal is counted and logged under."""

    route: str
    predictions: int
    topic: str


#: Called with a refused message's :class:`Delivery` and the broker's reason (:func:`refusal`),
#: from paho's network thread.
RefusalHandler = Callable[[Delivery, str], None]


def refusal(reason: Any) -> str | None:
    """The broker's reason for refusing a published message as a label (``not_authorized``),
    or None when ``reason`` (paho's ``ReasonCode``, or anything else) is not a failure."""
    if not getattr(reason, "is_failure", False):
        return None
    try:
        name = str(reason.getName())
    except (KeyError, AttributeError):  # a code paho has no name for
        return f"code_{getattr(reason, 'value', 'unknown')}"
    return "_".join("".join(c if c.isalnum() else " " for c in name.lower()).split())


#: Seconds between checks of ``stopping`` (and ``on_wait`` calls) while waiting for the window.
WAIT_TURN = 0.2


class PublishResult(StrEnum):
    """What :meth:`Transport.publish` did with one prediction message.

    The failures double as reject reasons (``forecaster_readings_rejected{reason=...}``): the
    caller acknowledges the readings of a failed message itself and counts them, because the
    transport kept nothing for it (no window slot, no ack-map entry).
    """

    SENT = "sent"  # handed to paho; its readings are acknowledged when it is out
    STOPPING = "stopping"  # not sent: shutting down; leave the readings for redelivery
    TOPIC_TOO_LONG = "topic_too_long"  # the prediction topic breaks MQTT's 65,535-byte limit
    FAILED = "publish_failed"  # paho refused it (invalid topic, its queue full, ...)


class AckBook:
    """Which readings each outgoing prediction acknowledges, and the QoS ≥ 1 publish window.

    Pure bookkeeping (no paho), so every path is unit-tested without a broker. Thread-safe: the
    worker calls :meth:`reserve`/:meth:`sent`/:meth:`release`, paho's publisher thread calls
    :meth:`done`/:meth:`drop_unconfirmed`. Methods return the readings to acknowledge instead of
    acknowledging them, so no lock is held while calling into paho (paho runs ``on_publish``
    with its own callback mutex held: two locks taken in opposite orders deadlock).

    - ``on_publish`` can run before ``publish()`` returns the message id: whichever of
      :meth:`sent` and :meth:`done` comes second completes the entry.
    - QoS 0 messages are not in the window but are in the map until written. paho forgets
      unwritten QoS 0 packets when the connection drops (no ``on_publish`` ever), so
      :meth:`drop_unconfirmed` settles them; and message ids wrap at 65,535, so an id that
      is reused while an old QoS 0 entry still holds it settles the old entry instead of
      overwriting it.
    - A message the broker refused is settled like any other (its readings are acknowledged:
      the broker would refuse it again) and reported to ``on_refused`` with its
      :class:`Delivery`, outside the lock.
    """

    def __init__(self, window: int, on_refused: RefusalHandler | None = None) -> None:
        self.window = window
        self._on_refused = on_refused
        self._cond = threading.Condition()
        # out mid -> (acks, qos, what the message carries)
        self._entries: dict[int, tuple[list[Ack], int, Delivery | None]] = {}
        # out mid -> the broker's refusal (None: confirmed), for confirmations before sent()
        self._done_early: dict[int, str | None] = {}
        # QoS 0 ids settled by drop_unconfirmed: a late confirmation of one must not be kept
        # as "done early", where it would complete the next message given the same id.
        self._forgotten: set[int] = set()
        self._inflight = 0

    @property
    def inflight(self) -> int:
        """QoS ≥ 1 predictions sent (or reserved) and not yet acknowledged by the broker."""
        return self._inflight

    @property
    def pending(self) -> int:
        """Prediction messages whose readings are still waiting for their acknowledgement."""
        with self._cond:
            return len(self._entries)

    @property
    def pending_readings(self) -> int:
        """Messages of readings that stay unacknowledged until their predictions are out."""
        with self._cond:
            return sum(len(entry[0]) for entry in self._entries.values())

    def reserve(
        self,
        qos: int,
        stopping: Callable[[], bool],
        on_wait: Callable[[], None] = lambda: None,
        turn: float = WAIT_TURN,
    ) -> bool:
        """Take a window slot for a QoS ≥ 1 message (QoS 0 needs none); False if stopping.

        Waits while the window is full, calling ``on_wait`` every ``turn`` seconds: a worker
        waiting for the broker is alive, and says so (watchdog, ``/healthz``).
        """
        if qos == 0:
            return True
        with self._cond:
            while self._inflight >= self.window:
                if stopping():
                    return False
                self._cond.wait(turn)
                if self._inflight >= self.window:
                    self._cond.release()
                    try:
                        on_wait()
                    finally:
                        self._cond.acquire()
            self._inflight += 1
        return True

    def take(self, qos: int, n: int) -> int:
        """Take up to ``n`` window slots that are free now, without waiting; how many."""
        if qos == 0:
            return n
        with self._cond:
            k = max(0, min(n, self.window - self._inflight))
            self._inflight += k
        return k

    def release(self, qos: int) -> None:
        """Give back a slot taken for a message that was not sent after all."""
        if qos > 0:
            with self._cond:
                self._inflight = max(0, self._inflight - 1)
                self._cond.notify_all()

    def sent(
        self, mid: int, qos: int, acks: list[Ack], delivery: Delivery | None = None
    ) -> list[Ack]:
        """Record a message paho accepted; returns the readings to acknowledge now."""
        out: list[Ack] = []
        refused: str | None = None
        with self._cond:
            self._forgotten.discard(mid)
            stale = self._entries.pop(mid, None)
            if stale is not None:
                # An id reused while an old QoS 0 entry held it: that one was never confirmed
                # and never will be (QoS ≥ 1 ids are not reused while in flight: paho refuses).
                out.extend(self._settle(stale))
            if mid in self._done_early:
                refused = self._done_early.pop(mid)
                out.extend(self._settle((acks, qos, delivery)))
            else:
                self._entries[mid] = (acks, qos, delivery)
        if refused is not None:
            self._report(delivery, refused)
        return out

    def done(self, mid: int, refused: str | None = None) -> list[Ack]:
        """paho confirmed ``mid`` (written for QoS 0, PUBACK/PUBCOMP for QoS ≥ 1), or the
        broker refused it for the reason ``refused``."""
        with self._cond:
            entry = self._entries.pop(mid, None)
            if entry is None:
                if mid in self._forgotten:
                    self._forgotten.discard(mid)
                else:
                    self._done_early[mid] = refused
                return []
            acks = self._settle(entry)
        if refused is not None:
            self._report(entry[2], refused)
        return acks

    def _report(self, delivery: Delivery | None, reason: str) -> None:
        # Called without the lock; the readings are acknowledged whatever the handler does.
        if self._on_refused is None or delivery is None:
            log.warning("the broker refused a prediction (%s): %s", reason, delivery)
            return
        try:
            self._on_refused(delivery, reason)
        except Exception:
            log.exception("reporting a refused prediction failed")

    def drop_unconfirmed(self) -> list[Ack]:
        """The publisher connection dropped: settle the QoS 0 entries paho has forgotten.

        Their predictions may or may not have left (QoS 0 promises nothing); their readings are
        acknowledged so they do not hold the subscriber's in-flight window forever. QoS ≥ 1
        entries stay: paho resends those after reconnecting.
        """
        out: list[Ack] = []
        with self._cond:
            for mid in [m for m, entry in self._entries.items() if entry[1] == 0]:
                out.extend(self._settle(self._entries.pop(mid)))
                self._forgotten.add(mid)
        return out

    def wait_empty(
        self, timeout: float, on_wait: Callable[[], None] = lambda: None, turn: float = WAIT_TURN
    ) -> bool:
        """Wait until every message sent is confirmed (so every reading it answers is
        acknowledged), or ``timeout``; calls ``on_wait`` as :meth:`reserve` does."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while self._inflight > 0 or self._entries:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._cond.wait(min(left, turn))
                self._cond.release()
                try:
                    on_wait()
                finally:
                    self._cond.acquire()
        return True

    def _settle(self, entry: tuple[list[Ack], int, Delivery | None]) -> list[Ack]:
        # Caller holds the lock.
        acks, qos, _delivery = entry
        if qos > 0:
            self._inflight = max(0, self._inflight - 1)
        self._cond.notify_all()
        return list(acks)


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
        client_cls = BufferedClient if cfg.buffered_reads else paho.Client
        self.client = client_cls(
            callback_api_version=CallbackAPIVersion.VERSION2,
            client_id=client_id,
            protocol=paho.MQTTv5 if v5 else paho.MQTTv311,
            clean_session=None if v5 else not persistent,
            manual_ack=persistent,
        )
        matcher.install(self.client)  # no reference cycle per received message
        wakeup.install(self.client)  # one wake-up byte per wake-up, not per queued packet
        packets.install(self.client)  # no empty MQTT 5 property sets decoded per message
        pubinfo.install()  # no condition variable made and notified per published message
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
        # Both links fail together: the subscriber says why, once per attempt; the publisher's
        # failures would only repeat it.
        if self.persistent:
            tls = self.cfg.tls
            ctx = (
                tls_context(tls.ca_file, tls.cert_file, tls.key_file, tls.insecure)
                if tls.enabled
                else None
            )
            log.warning(
                "cannot connect to %s:%s: %s; retrying",
                self.cfg.host,
                self.cfg.port,
                why_unreachable(self.cfg.host, self.cfg.port, ctx),
            )
        else:
            log.debug("publisher: cannot connect to %s:%s", self.cfg.host, self.cfg.port)
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
        on_wait: Callable[[], None] | None = None,
        on_refused: RefusalHandler | None = None,
        on_messages: ManyHandler | None = None,
    ) -> None:
        self.cfg = cfg
        self.filters = filters
        self._on_message = on_message
        self._on_messages = on_messages
        # Messages handled by the read step under way, handed to ``on_messages`` together at
        # its end (buffered reads only: paho's own read handles one packet per step).
        self._staged: list[tuple[str, bytes, int, int]] = []
        self._on_error = on_error
        self._on_state = on_state or (lambda _connected: None)
        # Called about every WAIT_TURN s while publish()/flush() wait for the broker.
        self._on_wait = on_wait or (lambda: None)
        rng = random.Random()  # noqa: S311 - jitter, not security
        self._sub = _Link(cfg, password, cfg.client_id, True, on_error, rng)
        self._pub = _Link(cfg, password, f"{cfg.client_id}-pub", False, on_error, rng)
        self._subscribed = False
        self._pending_subs: set[int] = set()
        self.book = AckBook(cfg.max_inflight, on_refused)
        self._stopping = False

        sub, pub = self._sub.client, self._pub.client
        sub.will_set(cfg.status_topic, b"offline", qos=1, retain=True)
        sub.on_connect = self._sub.guard("on_connect", self._sub_connect)
        sub.on_disconnect = self._sub.guard("on_disconnect", self._sub_disconnect)
        sub.on_message = self._sub.guard("on_message", self._handle_message)
        self._staging = False
        if on_messages is not None and isinstance(sub, BufferedClient):
            self._staging = True
            sub.on_read_done = self._sub.guard("on_message", self._hand_over)
        sub.on_subscribe = self._sub.guard("on_subscribe", self._handle_subscribe)
        # The AckBook window (max_inflight) is the only bound on publishes in flight, which
        # keeps them far below the 65,535 message ids. paho's own limit stays off (0): with a
        # limit set, paho walks every in-flight message on each PUBACK looking for queued ones
        # to release, O(window) per prediction, and profiles showed that walk (and the lock it
        # holds against publish()) as the largest cost of the publishing thread.
        pub.max_inflight_messages_set(0)
        pub.on_connect = self._pub.guard("on_connect", self._pub_connect)
        pub.on_disconnect = self._pub.guard("on_disconnect", self._pub_disconnect)
        pub.on_publish = self._pub.guard("on_publish", self._handle_publish)
        # Readings to acknowledge for the PUBACKs one read step of the publisher handled, sent
        # together at its end (buffered reads only).
        self._acks: list[Ack] = []
        if isinstance(pub, BufferedClient):
            pub.on_read_done = self._pub.guard("on_publish", self._send_acks)

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
        return self.book.inflight

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

    @property
    def pending_readings(self) -> int:
        """Reading messages whose acknowledgement waits for a prediction to be confirmed."""
        return self.book.pending_readings

    def interrupt(self) -> None:
        """Stop waiting for the publish window: later publishes that would wait return
        :attr:`PublishResult.STOPPING` (their readings stay unacknowledged, redelivered)."""
        self._stopping = True

    def flush(self, timeout: float) -> bool:
        """Wait until every prediction sent is confirmed (written for QoS 0, acknowledged by
        the broker for QoS ≥ 1), so every reading it answers is acknowledged; or ``timeout``."""
        return self.book.wait_empty(timeout, self._on_wait)

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
        if self._staging:
            self._staged.append((topic, bytes(msg.payload), msg.mid, msg.qos))
            if len(self._staged) >= STAGED_MAX:  # a long burst: the first waits no longer
                self._hand_over()
        else:
            self._on_message(topic, bytes(msg.payload), msg.mid, msg.qos)

    def _hand_over(self) -> None:
        """The messages of one read step, to ``on_messages`` together (network thread)."""
        if self._staged:
            staged, self._staged = self._staged, []
            cast(ManyHandler, self._on_messages)(staged)

    def ack(self, mid: int, qos: int) -> None:
        """Acknowledge a reading (QoS ≥ 1) on the subscriber link; thread-safe in paho."""
        if qos > 0:
            self._sub.client.ack(mid, qos)

    def ack_many(self, acks: list[Ack]) -> None:
        """:meth:`ack` for each of ``acks``, in order, queued to paho as one write
        (:func:`bulkpub.ack_many`: the bytes paho's ``ack`` queues one packet at a time)."""
        if len(acks) < 2:
            for mid, qos in acks:
                self.ack(mid, qos)
            return
        bulkpub.ack_many(self._sub.client, acks)

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
        lost = self.book.drop_unconfirmed()
        if lost and not self._stopping:
            log.warning(
                "%d reading(s) acknowledged whose QoS 0 predictions may not have left "
                "before the publisher connection dropped",
                len(lost),
            )
        for in_mid, in_qos in lost:
            self.ack(in_mid, in_qos)
        self._changed()

    def publish(
        self, out: Delivery, payload: bytes, qos: int, retain: bool, acks: list[Ack]
    ) -> PublishResult:
        """Publish one prediction message to ``out.topic``; ``acks`` (incoming mid, qos) are
        acknowledged once it is written (QoS 0) or acknowledged by the broker (QoS ≥ 1). If the
        broker refuses it (MQTT 5), ``on_refused`` gets ``out`` and the reason, and ``acks`` are
        acknowledged all the same.

        Blocks while the in-flight window is full (calling ``on_wait``). Anything but
        :attr:`PublishResult.SENT` leaves no trace here (no slot, no ack entry) and ``acks``
        unacknowledged: the caller decides. A QoS 0 message while the link is down is a failure
        (paho drops it without a callback); a QoS ≥ 1 one is queued by paho and sent on reconnect.
        """
        if not self.book.reserve(qos, lambda: self._stopping, self._on_wait):
            return PublishResult.STOPPING
        return self._send(out, payload, qos, retain, acks)

    def publish_many(
        self, items: Sequence[tuple[Delivery, bytes, list[Ack]]], qos: int, retain: bool
    ) -> list[PublishResult]:
        """:meth:`publish` for each of ``items`` (delivery, payload, acks), in order: QoS ≥ 1
        messages are queued to paho together (:func:`bulkpub.publish_many`: one lock hold and
        one queued write), as many at a time as the in-flight window has free slots (a full
        window waits for one, as :meth:`publish` does); what bulkpub declines goes through
        paho's ``publish`` one by one."""
        if qos == 0 or len(items) < 2:
            return [self.publish(out, payload, qos, retain, acks) for out, payload, acks in items]
        results: list[PublishResult] = []
        while len(results) < len(items):
            left = len(items) - len(results)
            k = self.book.take(qos, left)  # the slots free now: published at once
            if k == 0:  # the window is full: wait for a slot as publish() does
                if not self.book.reserve(qos, lambda: self._stopping, self._on_wait):
                    return results + [PublishResult.STOPPING] * left
                k = 1 + self.book.take(qos, left - 1)
            results += self._send_many(items[len(results) : len(results) + k], qos, retain)
        return results

    def _send_many(
        self, items: Sequence[tuple[Delivery, bytes, list[Ack]]], qos: int, retain: bool
    ) -> list[PublishResult]:
        """:meth:`publish_many` of messages whose slots are taken."""
        infos = None
        if len(items) > 1:
            messages = [(out.topic, payload) for out, payload, _ in items]
            infos = bulkpub.publish_many(self._pub.client, messages, qos, retain)
        if infos is None:
            return [self._send(out, payload, qos, retain, acks) for out, payload, acks in items]
        for info, (out, _, acks) in zip(infos, items, strict=True):
            for in_mid, in_qos in self.book.sent(info.mid, qos, acks, out):
                self.ack(in_mid, in_qos)
        return [PublishResult.SENT] * len(items)

    def _send(
        self, out: Delivery, payload: bytes, qos: int, retain: bool, acks: list[Ack]
    ) -> PublishResult:
        """:meth:`publish` once its slot is taken."""
        # Never hold a lock of ours while calling into paho (see AckBook).
        try:
            info = self._pub.client.publish(out.topic, payload, qos=qos, retain=retain)
        except ValueError:
            self.book.release(qos)
            if len(out.topic.encode("utf-8", "surrogatepass")) > 65535:
                return PublishResult.TOPIC_TOO_LONG
            return PublishResult.FAILED
        queued = info.rc == MQTTErrorCode.MQTT_ERR_SUCCESS or (
            qos > 0 and info.rc == MQTTErrorCode.MQTT_ERR_NO_CONN
        )
        if not queued:
            self.book.release(qos)
            return PublishResult.FAILED
        for in_mid, in_qos in self.book.sent(info.mid, qos, acks, out):
            self.ack(in_mid, in_qos)
        return PublishResult.SENT

    def _handle_publish(self, _c: paho.Client, _u: Any, mid: int, reason: Any, _p: Any) -> None:
        # A failure reason comes in an MQTT 5 PUBACK (QoS 1) or PUBREC (QoS 2, reported here by
        # packets.py). MQTT 3.1.1 has no reasons, and QoS 0 no answer: there a refused
        # prediction looks published.
        done = self.book.done(mid, refusal(reason))
        pub = self._pub.client
        if isinstance(pub, BufferedClient) and pub.reading:
            self._acks.extend(done)  # sent with the rest of this read step's (_send_acks)
            return
        for in_mid, in_qos in done:
            self.ack(in_mid, in_qos)

    def _send_acks(self) -> None:
        """The acknowledgements one read step of the publisher made due, in one write."""
        if self._acks:
            acks, self._acks = self._acks, []
            self.ack_many(acks)
