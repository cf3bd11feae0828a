"""paho's PUBLISH and PUBACK decoding made cheaper (``forecaster.serve.packets``), compared with
paho's own on the same packets."""

from __future__ import annotations

import random
from typing import Any

import paho.mqtt.client as paho
import pytest
from paho.mqtt import _packet
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode, MQTTProtocolVersion
from paho.mqtt.exception import MalformedPacket
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from forecaster.serve import packets

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
        packets.install(c)
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


def _publish_packet(rng: random.Random) -> tuple[int, bytes]:
    """A PUBLISH's fixed-header byte and body, sometimes with properties, an empty topic, a
    truncated body or a property block longer than the packet."""
    qos = rng.choice([0, 1, 2, 3])
    header = 0x30 | (qos << 1) | rng.choice([0, 1]) | rng.choice([0, 8])
    topic = rng.choice([b"", b"a", b"sensors/s1/flow", "é/\u00ff".encode()])
    body = len(topic).to_bytes(2, "big") + topic
    if qos:
        body += rng.randrange(1 << 16).to_bytes(2, "big")
    props = rng.choice([b"\x00", b"\x00", b"\x03\x23\x00\x05", b"\x02\x01\x01", b"\x05"])
    body += props + bytes(rng.randrange(256) for _ in range(rng.randint(0, 20)))
    if rng.random() < 0.15:
        body = body[: rng.randint(0, len(body))]
    return header, body


def _decoded(decode: Any, header: int, body: bytes, protocol: MQTTProtocolVersion) -> Any:
    try:
        out = decode(header, bytearray(body), protocol)
    except MalformedPacket as exc:
        return ("malformed", str(exc))
    props = out.properties
    kinds = (type(out.topic), type(out.payload))  # bytes equals bytearray: compare the types too
    return out._replace(
        properties=None if props is None else (props.packetType, props.json())
    ), kinds


@pytest.mark.parametrize("protocol", [MQTTProtocolVersion.MQTTv311, MQTTProtocolVersion.MQTTv5])
def test_publish_decodes_as_paho_decodes_it(seed: int, protocol: MQTTProtocolVersion) -> None:
    rng = random.Random(seed)
    paho_decode = packets._paho_decode_publish
    for k in range(2000):
        header, body = _publish_packet(rng)
        want = _decoded(paho_decode, header, body, protocol)
        got = _decoded(packets.decode_publish, header, body, protocol)
        assert got == want, f"seed={seed} packet={k} header={header:#x} body={body!r}"


def test_an_empty_property_set_is_a_fresh_one_that_takes_properties() -> None:
    props = packets.empty_publish_properties()
    assert vars(props).keys() == vars(Properties(PacketTypes.PUBLISH)).keys()
    props.TopicAlias = 5  # paho's own validation still applies, to this set only
    assert props.json() == {"TopicAlias": 5}
    assert packets.empty_publish_properties().json() == {}


def test_installing_routes_paho_s_publish_decoding_through_the_fast_path() -> None:
    client(MQTTProtocolVersion.MQTTv5, fast=True)
    assert _packet.decode_publish is packets.decode_publish


PUBREC = 0x50


def qos2_client(protocol: MQTTProtocolVersion) -> tuple[paho.Client, list[tuple[int, int, bool]]]:
    """:func:`client` with message 1 a QoS 2 one awaiting its PUBREC."""
    c, got = client(protocol, fast=True)
    c._out_messages[1].qos = 2
    c._out_messages[1].state = paho.mqtt_ms_wait_for_pubrec
    return c, got


def feed_pubrec(c: paho.Client, packet: bytes) -> MQTTErrorCode:
    c._in_packet["command"] = PUBREC
    c._in_packet["packet"] = bytearray(packet)
    return c._handle_pubrec()


@pytest.mark.parametrize("reason", [0x80, 0x87, 0x97, 0x99])
def test_a_refusing_pubrec_ends_the_qos2_flow_with_its_reason(reason: int) -> None:
    c, got = qos2_client(paho.MQTTv5)
    assert feed_pubrec(c, b"\x00\x01" + bytes([reason, 0])) == MQTTErrorCode.MQTT_ERR_SUCCESS
    assert got == [(1, reason, True)]  # reported as paho reports a refusing PUBACK
    assert 1 not in c._out_messages  # the flow is over: nothing resent after a reconnect
    assert not c._out_packet  # and no PUBREL (MQTT 5.0, 4.3.3)
    assert feed_pubrec(c, b"\x00\x01" + bytes([reason, 0])) == MQTTErrorCode.MQTT_ERR_SUCCESS
    assert len(got) == 1  # a repeated PUBREC reports nothing twice


@pytest.mark.parametrize(
    ("protocol", "packet"),
    [(paho.MQTTv5, b"\x00\x01"), (paho.MQTTv5, b"\x00\x01\x00\x00"), (paho.MQTTv311, b"\x00\x01")],
)
def test_an_accepting_pubrec_goes_on_as_paho_goes_on(
    protocol: MQTTProtocolVersion, packet: bytes
) -> None:
    c, got = qos2_client(protocol)
    feed_pubrec(c, packet)
    assert got == []  # reported on the PUBCOMP, as paho does
    assert c._out_messages[1].state == paho.mqtt_ms_wait_for_pubcomp
    assert len(c._out_packet) == 1  # the PUBREL
