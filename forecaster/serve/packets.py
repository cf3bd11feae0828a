"""paho's decoding of the two packets every reading brings, without the objects it builds for
MQTT 5 properties that are not there: the PUBLISH in, and the PUBACK for its prediction.

- **PUBLISH** (the subscriber link, MQTT 5): paho builds a fresh ``Properties`` for each one,
  whose constructor lays out its lookup tables of every property name and type (about 19 µs
  here), and whose ``unpack`` first clears every possible attribute (about 11 µs), though
  readings arrive without properties. :func:`install` replaces ``paho.mqtt._packet``'s
  ``decode_publish`` with one that, when the property block is empty (its length byte is 0),
  decodes the rest as paho does and returns an empty property set made from a template (the
  tables shared, read-only, as paho only reads them). Anything else is paho's own decoding.
  This is process-wide: every paho client in the process gets the same result, faster.
- **PUBACK** (the publisher link): paho decodes a ``ReasonCode`` and a ``Properties`` for each
  one before it looks up the message id, though a success acknowledgement is two bytes, the
  message id (always under MQTT 3.1.1; under MQTT 5 whenever the reason is success and there
  are no properties, which is how brokers send it). :func:`install` answers those from the id
  alone and gives the publish callback one shared success reason code and one shared empty
  property set (the daemon's callback reads neither; nothing may change them). A longer packet,
  a failure reason or properties, goes through paho's own decoding.
- **PUBREC with a failure reason** (MQTT 5, QoS 2): the broker refused the message, and the flow
  ends there (no PUBREL: MQTT 5.0, section 4.3.3). paho ignores the reason, sends a PUBREL and
  reports the PUBCOMP that comes back as a success, so a refused QoS 2 prediction looked
  delivered. :func:`install` ends the flow as the standard says and reports it as paho reports a
  refusing PUBACK: the publish callback with the PUBREC's reason.

Profiles of the daemon with single-reading messages put about 15 % of its samples in these
objects. It relies on paho's private ``_packet.decode_publish``, ``_handle_pubackcomp``,
``_in_packet``, ``_out_message_mutex``, ``_out_messages``, ``_do_on_publish`` and ``_easy_log``
(and ``_handle_pubrec``, ``_protocol``; paho-mqtt 2.x, pinned below 3 in pyproject.toml);
``tests/unit/test_packets.py`` compares these paths with paho's own and fails if those disappear.
"""

from __future__ import annotations

from typing import Any, Literal

import paho.mqtt.client as paho
from paho.mqtt import _packet
from paho.mqtt.enums import MQTTErrorCode, MQTTProtocolVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

_SUCCESS = {
    "PUBACK": ReasonCode(PacketTypes.PUBACK),
    "PUBCOMP": ReasonCode(PacketTypes.PUBCOMP),
}
_EMPTY = {
    "PUBACK": Properties(PacketTypes.PUBACK),
    "PUBCOMP": Properties(PacketTypes.PUBCOMP),
}
#: A fresh PUBLISH property set's attributes: its lookup tables, and no property.
_PUBLISH_TEMPLATE = dict(vars(Properties(PacketTypes.PUBLISH)))
_paho_decode_publish = _packet.decode_publish


def empty_publish_properties() -> Properties:
    """What ``Properties(PacketTypes.PUBLISH)`` makes, without laying out its tables again."""
    props = Properties.__new__(Properties)
    vars(props).update(_PUBLISH_TEMPLATE)
    return props


def decode_publish(header: int, packet: bytes | bytearray, protocol: MQTTProtocolVersion) -> Any:
    """paho's ``decode_publish``, with an empty MQTT 5 property block decoded for nothing.

    Without properties the packet is laid out as under MQTT 3.1.1 (where a topic must not be
    empty: MQTT 5 allows it with a topic alias, which is a property), and is read here in
    place: paho's unpacking copies the rest of the packet at each of its three steps."""
    if protocol == MQTTProtocolVersion.MQTTv5 and len(packet) >= 2:
        topic_len = (packet[0] << 8) | packet[1]
        qos = (header & 0x06) >> 1
        at = 2 + topic_len + (2 if qos else 0)  # the property length, after the mid
        if topic_len and len(packet) > at and packet[at] == 0:
            mid = (packet[at - 2] << 8) | packet[at - 1] if qos else 0
            return _packet.PublishPacket(
                dup=(header & 0x08) != 0,
                qos=qos,
                retain=(header & 0x01) != 0,
                topic=bytes(packet[2 : 2 + topic_len]),
                mid=mid,
                properties=empty_publish_properties(),
                payload=bytes(packet[at + 1 :]),
            )
    return _paho_decode_publish(header, packet, protocol)


def install(client: paho.Client) -> None:
    """Decode ``client``'s PUBLISH packets and two-byte PUBACKs and PUBCOMPs cheaply, and end a
    QoS 2 flow whose PUBREC carries a failure reason."""
    _packet.decode_publish = decode_publish
    original = client._handle_pubackcomp  # paho's private handler, see the module doc

    def handle(cmd: Literal["PUBACK", "PUBCOMP"]) -> MQTTErrorCode:
        packet = client._in_packet["packet"]
        if len(packet) != 2:
            return original(cmd)
        mid = (packet[0] << 8) | packet[1]
        client._easy_log(paho.MQTT_LOG_DEBUG, "Received %s (Mid: %d)", cmd, mid)
        with client._out_message_mutex:
            if mid in client._out_messages:
                # Only inform the client the message has been sent once (paho's own rule).
                return client._do_on_publish(mid, _SUCCESS[cmd], _EMPTY[cmd])
        return MQTTErrorCode.MQTT_ERR_SUCCESS

    client._handle_pubackcomp = handle  # type: ignore[method-assign]
    original_pubrec = client._handle_pubrec

    def pubrec() -> MQTTErrorCode:
        packet = client._in_packet["packet"]
        if client._protocol != paho.MQTTv5 or len(packet) < 3 or packet[2] < 0x80:
            return original_pubrec()
        result = _packet.decode_pubrec(client._in_packet["command"], packet, client._protocol)
        client._easy_log(
            paho.MQTT_LOG_DEBUG, "Received PUBREC (Mid: %d, %s)", result.mid, result.reason
        )
        with client._out_message_mutex:
            if result.mid in client._out_messages:
                return client._do_on_publish(result.mid, result.reason, result.properties)
        return MQTTErrorCode.MQTT_ERR_SUCCESS

    client._handle_pubrec = pubrec  # type: ignore[method-assign]
