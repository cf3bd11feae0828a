"""Bulk publishing (``serve/bulkpub.py``) leaves paho what its own ``publish`` leaves.

Two never-connected paho clients with a stand-in socket: one publishes message by message
through paho, the other through ``publish_many``. The bytes queued for the broker, the records
of the messages in flight and the message ids must be the same, for both MQTT versions, both
QoS levels it takes, payloads around the remaining length's size steps, and message ids that
wrap. Whatever it declines must leave nothing behind.
"""

from __future__ import annotations

import random
import threading

import paho.mqtt.client as paho
import pytest

from forecaster.harness import wait_until
from forecaster.serve import bulkpub
from forecaster.serve.config import MQTTConfig
from forecaster.serve.mqtt import Delivery, PublishResult, Transport


class StandIn:
    """A socket for paho to see: it only checks one is there before queuing a packet."""

    def close(self) -> None:
        pass


def _client(protocol: int) -> paho.Client:
    c = paho.Client(paho.CallbackAPIVersion.VERSION2, protocol=protocol)
    c.max_inflight_messages_set(0)  # as the transport's publisher (paho's own limit off)
    c._sock = StandIn()
    c._thread = threading.current_thread()  # queue only; no write from the calling thread
    return c


def _records(c: paho.Client) -> list[tuple[object, ...]]:
    """Every slot of each record and of its ``info`` (but the time, and the condition, which
    is each record's own); reading a slot that was never set raises, so a slot a paho release
    adds and bulkpub does not set fails here."""
    out = []
    for m in c._out_messages.values():
        fields = [
            getattr(m, k) for k in paho.MQTTMessage.__slots__ if k not in ("info", "timestamp")
        ]
        slots = [k for cls in type(m.info).__mro__ for k in getattr(cls, "__slots__", ())]
        info = [getattr(m.info, k) for k in slots if k != "_condition"]
        out.append((*fields, *info, type(m.info), m.timestamp > 0))
    return out


def _wire(c: paho.Client) -> bytes:
    return b"".join(bytes(p["packet"]) for p in c._out_packet)


@pytest.mark.parametrize("protocol", [paho.MQTTv311, paho.MQTTv5])
@pytest.mark.parametrize("qos", [1, 2])
def test_many_messages_leave_what_paho_s_publish_leaves(protocol: int, qos: int, seed: int) -> None:
    rng = random.Random(seed)
    sizes = [0, 1, 100, 121, 122, 123, 124, 16370, 16384, 20000]
    messages = [
        (f"forecast/sensors/s{rng.randrange(10 ** rng.randrange(1, 5))}/flow", rng.randbytes(size))
        for size in (rng.choice(sizes) for _ in range(40))
    ]
    retain = rng.random() < 0.5
    alone, together = _client(protocol), _client(protocol)
    start = rng.choice([0, 65500])  # message ids that wrap past 65,535
    alone._last_mid = together._last_mid = start
    infos = [alone.publish(t, p, qos=qos, retain=retain) for t, p in messages]
    got = bulkpub.publish_many(together, messages, qos, retain)
    assert got is not None, f"seed {seed}"
    assert [i.mid for i in got] == [i.mid for i in infos], f"seed {seed}"
    assert all(i.rc == paho.MQTT_ERR_SUCCESS for i in got)
    assert _records(together) == _records(alone), f"seed {seed}"
    assert together._inflight_messages == alone._inflight_messages == len(messages)
    assert together._last_mid == alone._last_mid
    assert _wire(together) == _wire(alone), f"seed {seed}"
    assert len(together._out_packet) == 1  # one queued write


@pytest.mark.parametrize(
    "topic", ["forecast/+/x", "forecast/#", "x" * 65536, "forecast/\udcff", ""]
)
def test_what_paho_would_refuse_is_declined_untouched(topic: str) -> None:
    c = _client(paho.MQTTv311)
    assert bulkpub.publish_many(c, [("forecast/a", b"1"), (topic, b"2")], 1, False) is None
    assert not c._out_messages and not c._out_packet and c._last_mid == 0


def test_qos0_a_link_that_is_down_and_paho_s_own_limit_are_declined() -> None:
    c = _client(paho.MQTTv311)
    assert bulkpub.publish_many(c, [("a", b"1"), ("b", b"2")], 0, False) is None
    c.max_inflight_messages_set(20)  # paho would queue beyond it: its publish decides
    assert bulkpub.publish_many(c, [("a", b"1"), ("b", b"2")], 1, False) is None
    c.max_inflight_messages_set(0)
    c._sock = None  # paho's publish queues these for the reconnect itself
    assert bulkpub.publish_many(c, [("a", b"1"), ("b", b"2")], 1, False) is None
    assert not c._out_messages and not c._out_packet


def test_the_transport_publishes_many_and_acknowledges_on_their_pubacks() -> None:
    t = Transport(MQTTConfig(max_inflight=10), None, ["#"], lambda *_: None, on_error=print)
    acked: list[tuple[int, int]] = []
    t.ack = lambda mid, qos: acked.append((mid, qos))  # type: ignore[method-assign]
    items = [(Delivery("water", 1, f"forecast/s{k}"), b"{}", [(100 + k, 1)]) for k in range(3)]
    for connected in (False, True):  # down: one by one through paho (queued for the reconnect)
        c = t._pub.client
        c._sock = StandIn() if connected else None
        c._thread = threading.current_thread()
        assert t.publish_many(items, 1, False) == [PublishResult.SENT] * 3
        assert len(c._out_messages) == 3 and t.inflight == 3
        for mid in sorted(c._out_messages):
            c._in_packet["command"] = 0x40
            c._in_packet["packet"] = bytearray(mid.to_bytes(2, "big"))
            c._handle_pubackcomp("PUBACK")
        assert acked == [(100, 1), (101, 1), (102, 1)] and t.inflight == 0
        acked.clear()
    c._sock = None


def test_the_privates_it_relies_on_are_still_there() -> None:
    c = paho.Client(paho.CallbackAPIVersion.VERSION2)
    for name in ("_mid_generate_mutex", "_out_message_mutex", "_out_messages", "_out_packet"):
        assert hasattr(c, name), name
    assert isinstance(c._last_mid, int) and isinstance(c._inflight_messages, int)
    assert c._max_inflight_messages >= 0 and callable(c._packet_queue)
    assert isinstance(c._manual_ack, bool)
    assert paho.mqtt_ms_wait_for_puback != paho.mqtt_ms_wait_for_pubrec


def test_publishing_many_through_a_small_window_waits_for_pubacks_in_turn() -> None:
    """More messages than the in-flight window: published as slots free up, never all
    reserved before any is sent (which would wait for PUBACKs of messages never sent)."""
    t = Transport(MQTTConfig(max_inflight=2), None, ["#"], lambda *_: None, on_error=print)
    acked: list[tuple[int, int]] = []
    t.ack = lambda mid, qos: acked.append((mid, qos))  # type: ignore[method-assign]
    c = t._pub.client
    c._sock = StandIn()
    c._thread = threading.current_thread()
    items = [(Delivery("water", 1, f"forecast/s{k}"), b"{}", [(100 + k, 1)]) for k in range(7)]
    results: list[list[PublishResult]] = []
    worker = threading.Thread(target=lambda: results.append(t.publish_many(items, 1, False)))
    worker.start()
    answered: set[int] = set()

    def waiting() -> set[int]:
        with c._out_message_mutex:  # the worker thread adds to it
            return set(c._out_messages) - answered

    while len(answered) < len(items):  # the broker: a PUBACK for each message that arrives
        assert wait_until(lambda: bool(waiting()), 30), acked
        assert t.inflight <= 2
        for mid in sorted(waiting()):
            answered.add(mid)
            c._in_packet["command"] = 0x40
            c._in_packet["packet"] = bytearray(mid.to_bytes(2, "big"))
            c._handle_pubackcomp("PUBACK")
    worker.join(timeout=30)
    assert results == [[PublishResult.SENT] * 7]
    assert sorted(acked) == [(100 + k, 1) for k in range(7)] and t.inflight == 0
    c._sock = None
