"""The transport's ack bookkeeping (``mqtt.AckBook``), driven without a broker.

Which readings each prediction acknowledges, the QoS ≥ 1 window, the on_publish-before-record
race, QoS 0 entries the link forgot, message-id reuse, predictions the broker refused. Plus
``Transport.publish`` against a real paho client that is never connected: the failure paths leave
nothing behind, and a refusing PUBACK fed to paho's own packet handling is reported.
"""

from __future__ import annotations

import struct
import threading

import pytest
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.reasoncodes import ReasonCode

from forecaster.serve.config import MQTTConfig
from forecaster.serve.mqtt import AckBook, Delivery, PublishResult, Transport, refusal

Refusals = list[tuple[Delivery, str]]


def test_qos1_reading_acked_only_after_the_broker_confirms() -> None:
    book = AckBook(window=4)
    assert book.reserve(1, stopping=lambda: False)
    assert book.inflight == 1
    assert book.sent(mid=7, qos=1, acks=[(100, 1)]) == []  # nothing yet: no PUBACK
    assert book.pending == 1 and book.pending_readings == 1
    assert book.done(7) == [(100, 1)]
    assert book.inflight == 0 and book.pending == 0
    assert book.done(7) == []  # a second confirmation acknowledges nothing twice


def test_confirmation_before_record_completes_on_record() -> None:
    # paho may run on_publish before publish() has returned the message id to us.
    book = AckBook(window=4)
    assert book.reserve(1, stopping=lambda: False)
    assert book.done(9) == []
    assert book.sent(mid=9, qos=1, acks=[(1, 1), (2, 1)]) == [(1, 1), (2, 1)]
    assert book.inflight == 0 and book.pending == 0


def test_qos0_holds_no_window_slot_and_acks_when_written() -> None:
    book = AckBook(window=1)
    assert book.reserve(0, stopping=lambda: False)
    assert book.inflight == 0
    assert book.sent(mid=3, qos=0, acks=[(5, 1)]) == []
    assert book.done(3) == [(5, 1)]


def test_link_drop_settles_forgotten_qos0_but_keeps_qos1() -> None:
    book = AckBook(window=4)
    book.sent(mid=1, qos=0, acks=[(10, 1)])
    assert book.reserve(1, stopping=lambda: False)
    book.sent(mid=2, qos=1, acks=[(20, 1)])
    # paho forgets unwritten QoS 0 packets on disconnect; it resends QoS 1 ones.
    assert book.drop_unconfirmed() == [(10, 1)]
    assert book.pending == 1 and book.inflight == 1
    assert book.done(2) == [(20, 1)]


def test_a_late_confirmation_of_a_forgotten_qos0_message_completes_nothing_later() -> None:
    book = AckBook(window=4)
    book.sent(mid=5, qos=0, acks=[(1, 1)])
    assert book.drop_unconfirmed() == [(1, 1)]
    assert book.done(5) == []  # paho confirmed it after all, too late
    # the id comes round again for a QoS 1 message: its reading waits for its own PUBACK
    assert book.reserve(1, stopping=lambda: False)
    assert book.sent(mid=5, qos=1, acks=[(2, 1)]) == []
    assert book.done(5) == [(2, 1)]


def test_reused_message_id_settles_the_stale_entry_instead_of_losing_it() -> None:
    book = AckBook(window=4)
    book.sent(mid=65535, qos=0, acks=[(1, 1)])  # never confirmed
    # ids wrap: the same id comes back for a new message
    assert book.sent(mid=65535, qos=0, acks=[(2, 1)]) == [(1, 1)]
    assert book.done(65535) == [(2, 1)]
    assert book.pending == 0


def test_release_returns_the_slot_of_an_unsent_message() -> None:
    book = AckBook(window=1)
    assert book.reserve(1, stopping=lambda: False)
    book.release(1)
    assert book.inflight == 0
    assert book.reserve(1, stopping=lambda: False)  # would wait forever if the slot leaked


def test_full_window_waits_calls_on_wait_and_gives_up_when_stopping() -> None:
    book = AckBook(window=1)
    assert book.reserve(1, stopping=lambda: False)
    book.sent(mid=1, qos=1, acks=[(1, 1)])
    waits: list[int] = []
    stop = threading.Event()

    def on_wait() -> None:
        waits.append(1)
        if len(waits) >= 3:
            stop.set()

    assert not book.reserve(1, stopping=stop.is_set, on_wait=on_wait, turn=0.001)
    assert len(waits) >= 3  # the waiting worker reported itself alive each turn
    assert book.inflight == 1


def test_full_window_opens_when_the_broker_confirms() -> None:
    book = AckBook(window=1)
    assert book.reserve(1, stopping=lambda: False)
    book.sent(mid=1, qos=1, acks=[])
    got: list[bool] = []
    waiter = threading.Thread(
        target=lambda: got.append(book.reserve(1, stopping=lambda: False, turn=0.01))
    )
    waiter.start()
    book.done(1)
    waiter.join(timeout=10)
    assert got == [True] and book.inflight == 1


def test_wait_empty_waits_for_every_entry() -> None:
    book = AckBook(window=4)
    assert book.wait_empty(0.0)
    book.sent(mid=1, qos=0, acks=[(1, 1)])
    calls: list[int] = []
    assert not book.wait_empty(0.02, on_wait=lambda: calls.append(1), turn=0.005)
    assert calls
    book.done(1)
    assert book.wait_empty(0.0)


def out(topic: str) -> Delivery:
    """A one-prediction message of route "water" to ``topic``."""
    return Delivery("water", 1, topic)


def _transport(
    max_inflight: int = 2, refused: Refusals | None = None
) -> tuple[Transport, list[tuple[int, int]]]:
    acked: list[tuple[int, int]] = []
    t = Transport(
        MQTTConfig(max_inflight=max_inflight),
        None,
        ["#"],
        lambda *_: None,
        on_error=print,
        on_refused=None if refused is None else lambda d, why: refused.append((d, why)),
    )
    t.ack = lambda mid, qos: acked.append((mid, qos))  # type: ignore[method-assign]
    return t, acked


def test_publish_topic_too_long_leaves_no_slot_and_no_entry() -> None:
    t, acked = _transport(max_inflight=1)
    topic = "forecast/" + "x" * 65530  # over MQTT's 65,535 bytes: paho raises ValueError
    for _ in range(3):  # with a leak, the second would wait for a slot forever
        assert t.publish(out(topic), b"{}", 1, False, [(1, 1)]) is PublishResult.TOPIC_TOO_LONG
    assert t.inflight == 0 and t.book.pending == 0 and acked == []


def test_qos0_publish_while_disconnected_is_a_failure_not_a_leak() -> None:
    t, acked = _transport()
    assert t.publish(out("forecast/a"), b"{}", 0, False, [(4, 1)]) is PublishResult.FAILED
    assert t.book.pending == 0 and acked == []  # the caller decides about the reading


def test_qos1_publish_while_disconnected_is_queued_for_the_reconnect() -> None:
    t, _acked = _transport()
    assert t.publish(out("forecast/a"), b"{}", 1, False, [(4, 1)]) is PublishResult.SENT
    assert t.inflight == 1 and t.pending_readings == 1  # paho resends it after reconnecting


def test_publish_stops_waiting_when_interrupted() -> None:
    t, _acked = _transport(max_inflight=1)
    assert t.publish(out("forecast/a"), b"{}", 1, False, [(1, 1)]) is PublishResult.SENT
    t.interrupt()
    assert t.publish(out("forecast/b"), b"{}", 1, False, [(2, 1)]) is PublishResult.STOPPING
    assert t.inflight == 1 and t.pending_readings == 1


# ------------------------------------------------------------------ refused by the broker

WATER = Delivery("water", 3, "forecast/sensors/a/flow")


def _book() -> tuple[AckBook, Refusals]:
    refused: Refusals = []
    return AckBook(window=2, on_refused=lambda d, why: refused.append((d, why))), refused


def test_a_refused_prediction_is_reported_and_its_readings_still_acknowledged() -> None:
    book, refused = _book()
    book.sent(mid=1, qos=1, acks=[(10, 1)], delivery=WATER)
    book.sent(mid=2, qos=1, acks=[(11, 1)], delivery=WATER._replace(route="power"))
    assert book.done(1, "not_authorized") == [(10, 1)]  # the broker would refuse it again
    assert refused == [(WATER, "not_authorized")]
    assert book.done(2) == [(11, 1)]  # confirmed: nothing reported
    assert refused == [(WATER, "not_authorized")]
    assert book.inflight == 0 and book.pending == 0  # the window does not silt up


def test_a_refusal_before_the_record_is_reported_on_the_record() -> None:
    book, refused = _book()
    assert book.done(5, "quota_exceeded") == []  # PUBACK before publish() returned the id
    assert refused == []  # what the message carried is not known yet
    assert book.sent(mid=5, qos=1, acks=[(1, 1)], delivery=WATER) == [(1, 1)]
    assert refused == [(WATER, "quota_exceeded")]
    assert book.sent(mid=5, qos=1, acks=[(2, 1)], delivery=WATER) == []  # the id is clean again
    assert book.done(5) == [(2, 1)] and len(refused) == 1


def test_a_failing_refusal_handler_costs_no_acknowledgement() -> None:
    def broken(_d: Delivery, _why: str) -> None:
        raise RuntimeError("handler bug")

    book = AckBook(window=1, on_refused=broken)
    book.sent(mid=1, qos=1, acks=[(7, 1)], delivery=WATER)
    assert book.done(1, "not_authorized") == [(7, 1)]
    assert book.inflight == 0


@pytest.mark.parametrize(
    ("code", "want"),
    [
        (0x00, None),  # success
        (0x10, None),  # "no matching subscribers": delivered to nobody, but accepted
        (0x80, "unspecified_error"),
        (0x83, "implementation_specific_error"),
        (0x87, "not_authorized"),
        (0x90, "topic_name_invalid"),
        (0x97, "quota_exceeded"),
        (0x99, "payload_format_invalid"),
    ],
)
def test_refusal_names_the_broker_s_reason(code: int, want: str | None) -> None:
    assert refusal(ReasonCode(PacketTypes.PUBACK, identifier=code)) == want


def test_refusal_of_what_is_not_a_failure_is_none() -> None:
    assert refusal(None) is None and refusal(0) is None

    class Unnamed:  # a failure code paho has no name for
        is_failure = True
        value = 0xAB

        def getName(self) -> str:  # paho's name
            raise KeyError(self.value)

    assert refusal(Unnamed()) == "code_171"


def _puback(t: Transport, mid: int, reason: int | None) -> None:
    """Feed paho's publisher client a PUBACK for ``mid``, as read from the socket."""
    c = t._pub.client
    body = struct.pack("!H", mid) + (b"" if reason is None else bytes([reason, 0]))
    c._in_packet["command"] = 0x40
    c._in_packet["packet"] = bytearray(body)
    c._handle_pubackcomp("PUBACK")


def test_a_refusing_puback_reaches_on_refused_through_paho() -> None:
    refused: Refusals = []
    t, acked = _transport(refused=refused)
    d1, d2 = WATER, WATER._replace(topic="forecast/sensors/b/flow", predictions=1)
    assert t.publish(d1, b"{}", 1, False, [(100, 1)]) is PublishResult.SENT
    assert t.publish(d2, b"{}", 1, False, [(101, 1)]) is PublishResult.SENT
    mids = sorted(t._pub.client._out_messages)
    assert len(mids) == 2
    _puback(t, mids[0], 0x87)  # MQTT 5: mosquitto's answer outside the ACL
    _puback(t, mids[1], None)  # a two-byte success PUBACK
    assert acked == [(100, 1), (101, 1)]
    assert refused == [(d1, "not_authorized")]
    assert t.inflight == 0 and t.pending_readings == 0


def test_acks_queued_together_are_the_bytes_paho_queues_one_by_one() -> None:
    acks = [(1, 1), (2, 0), (3, 2), (65535, 1), (258, 1)]
    wires = []
    for together in (True, False):
        t = Transport(MQTTConfig(), None, ["#"], lambda *_: None, on_error=print)
        if together:
            t.ack_many(acks)
        else:
            for mid, qos in acks:
                t.ack(mid, qos)
        queued = list(t._sub.client._out_packet)
        assert len(queued) == (1 if together else 4)
        wires.append(b"".join(bytes(p["packet"]) for p in queued))
    assert (
        wires[0]
        == wires[1]
        == b"".join(struct.pack("!BBH", 0x40 if q == 1 else 0x70, 2, m) for m, q in acks if q)
    )


def test_the_pubacks_of_one_read_acknowledge_their_readings_together() -> None:
    t, acked = _transport(max_inflight=3)
    batches: list[list[tuple[int, int]]] = []
    t.ack_many = batches.append  # type: ignore[method-assign]
    for k in range(3):
        assert t.publish(WATER, b"{}", 1, False, [(100 + k, 1)]) is PublishResult.SENT
    mids = sorted(t._pub.client._out_messages)
    pub = t._pub.client
    pub.reading = True  # as inside BufferedClient.loop_read
    _puback(t, mids[0], None)
    _puback(t, mids[1], None)
    assert acked == [] and batches == []
    pub.reading = False
    assert pub.on_read_done is not None
    pub.on_read_done()
    assert batches == [[(100, 1), (101, 1)]]
    _puback(t, mids[2], None)  # outside a read step (a QoS 0 write): acknowledged at once
    assert acked == [(102, 1)]
