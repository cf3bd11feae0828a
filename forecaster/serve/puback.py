"""paho's PUBACK handling without the objects it builds for every acknowledgement.

For each PUBACK (and PUBCOMP) it receives, paho decodes a ``ReasonCode`` and a ``Properties``
before it looks up the message id, though a success acknowledgement carries neither: it is two
bytes, the message id (always under MQTT 3.1.1; under MQTT 5 whenever the reason is success and
there are no properties, which is how brokers send it). Each prediction the daemon publishes at
QoS 1 comes back as one, and profiles of the daemon with single-reading messages put about 6 %
of its samples in building those objects.

:func:`install` answers a two-byte acknowledgement from the message id alone and gives the
publish callback one shared success reason code and one shared empty property set (the
daemon's callback reads neither; nothing may change them). Any longer packet, a failure reason
or properties, goes through paho's own decoding, unchanged.

It relies on paho's private ``_handle_pubackcomp``, ``_in_packet``, ``_out_message_mutex``,
``_out_messages``, ``_do_on_publish`` and ``_easy_log`` (paho-mqtt 2.x, pinned below 3 in
pyproject.toml); ``tests/unit/test_puback.py`` fails if they disappear.
"""

from __future__ import annotations

from typing import Literal

import paho.mqtt.client as paho
from paho.mqtt.enums import MQTTErrorCode
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


def install(client: paho.Client) -> None:
    """Handle ``client``'s two-byte PUBACKs and PUBCOMPs without decoding objects."""
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
