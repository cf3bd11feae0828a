"""paho's success PUBACKs handled from the message id (``forecaster.serve.puback``), compared with
paho's own handling on the same packets."""

from __future__ import annotations

from typing import Any

import paho.mqtt.client as paho
import pytest
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode, MQTTProtocolVersion
from paho.mqtt.exception import MalformedPacket

from forecaster.serve import puback

PUBACK = 0x40


def client(
    protocol: MQTTProtocolVersion, fast: bool
) -> tuple[paho.Client, list[tuple[int, int, bool]]]:
    """A client with three QoS 1 messages awaiting acknowledgement (ids 1-3), recording what
    its publish callback is given: (mid, reason value, reason is a failure)."""
    c = paho.Client(CallbackAPIVersion.VERSION2, client_id="t", protocol=protocol)
    got: list[tuple[int, int, bool]] = []

    def on_publish(_c: Any, _u: Any, mid: int, reason: Any, _props: Any) -> None:
        got.append((mid, reason.value, reason.is_failure))

    c.on_publish = on_publish
    if fast:
        puback.install(c)
    for mid in (1, 2, 3):
        msg = paho.MQTTMessage(mid, b"t")
        msg.qos = 1
        c._out_messages[mid] = msg
    return c, got


def feed(c: paho.Client, packet: bytes) -> MQTTErrorCode:
    c._in_packet["command"] = PUBACK
    c._in_packet["packet"] = bytearray(packet)
    return c._handle_pubackcomp("PUBACK")


@pytest.mark.parametrize("protocol", [paho.MQTTv311, paho.MQTTv5])
def test_success_acks_give_the_callback_what_paho_gives_it(protocol: MQTTProtocolVersion) -> None:
    packets = [b"\x00\x02", b"\x00\x07", b"\x00\x02", b"\x00\x01"]  # unknown and repeated ids too
    if protocol == paho.MQTTv5:
        packets.append(b"\x00\x03\x87")  # "not authorized": paho's own decoding
    runs = []
    for fast in (False, True):
        c, got = client(protocol, fast)
        rcs = [feed(c, p) for p in packets]
        runs.append((got, rcs, sorted(c._out_messages)))
    assert runs[0] == runs[1]
    got, _, left = runs[1]
    assert [mid for mid, _, _ in got] == ([2, 1, 3] if protocol == paho.MQTTv5 else [2, 1])
    assert (got[-1][1], got[-1][2]) == ((0x87, True) if protocol == paho.MQTTv5 else (0, False))
    assert left == ([] if protocol == paho.MQTTv5 else [3])


def test_a_malformed_311_ack_is_still_paho_s_to_refuse() -> None:
    c, got = client(paho.MQTTv311, fast=True)
    with pytest.raises(MalformedPacket):
        feed(c, b"\x00\x02\x00")
    assert got == [] and sorted(c._out_messages) == [1, 2, 3]
