"""paho's ``publish`` and ``ack`` for many messages at once: one lock hold and one queued write.

The inference worker publishes a micro-batch of prediction messages at a time (one per
single-reading message: hundreds). paho's ``publish`` does per message what the daemon has no
need to repeat: it validates the topic, takes the message-id lock, builds the packet with a dozen
small appends, takes the outgoing-messages lock and queues the packet (another lock and a
wake-up). Profiles of single-reading messages put paho's ``publish`` at about a third of the
inference worker's time under the GIL.

:func:`publish_many` leaves paho exactly the records its own ``publish`` would leave: each
message in ``_out_messages`` as an ``MQTTMessage`` waiting for its PUBACK (QoS 1) or PUBREC
(QoS 2), counted in ``_inflight_messages``, so PUBACK handling, retries and the resend of every
unacknowledged message after a reconnect are paho's own, unchanged. The packets' bytes are the
ones paho's ``_send_publish`` writes (``tests/unit/test_bulkpub.py`` compares them), queued as one
entry of paho's outgoing queue: paho does nothing per packet after writing a QoS ≥ 1 PUBLISH.
What it does not take (QoS 0, whose packets paho reports as published one by one once written;
a link that is down; a topic paho would refuse) it declines, with nothing changed, and the
caller publishes those one by one through paho.

:func:`ack_many` does the same for acknowledgements of received messages: the PUBACKs (QoS 1)
and PUBCOMPs (QoS 2) paho's ``ack`` would queue one packet, one lock and one wake-up at a time,
queued as one write (the publisher's thread acknowledges the readings of a whole read of PUBACKs
at once).

It relies on paho's private ``_mid_generate_mutex``, ``_last_mid``, ``_out_message_mutex``,
``_out_messages``, ``_inflight_messages``, ``_max_inflight_messages``, ``_sock``, ``_protocol``,
``_manual_ack`` and ``_packet_queue`` (paho-mqtt 2.x, pinned below 3 in pyproject.toml);
``tests/unit/test_bulkpub.py`` fails if they disappear.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from functools import lru_cache
from typing import NamedTuple

import paho.mqtt.client as paho
from paho.mqtt.client import time_func
from paho.mqtt.enums import MessageState

__all__ = ["ack_many", "publish_many", "remaining_length"]

_PUBLISH = 0x30
_U16 = struct.Struct("!H")
#: An acknowledgement on the wire: command (PUBACK for QoS 1, PUBCOMP for QoS 2), length 2, id.
_ACK = struct.Struct("!BBH")
_ACK_COMMAND = {1: 0x40, 2: 0x70}
_MAX_TOPIC = 65535
_MAX_PAYLOAD = 268_435_455 - _MAX_TOPIC - 5  # what paho's publish takes, and room for the rest


@lru_cache(maxsize=4096)
def remaining_length(n: int) -> bytes:
    """MQTT's variable-length "remaining length" of a packet's body (cached: a daemon's
    prediction messages come in a few sizes)."""
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        out.append(byte | 0x80 if n else byte)
        if not n:
            return bytes(out)


class _Fixed(NamedTuple):
    """What every PUBLISH packet of one (QoS, retain, protocol) shares."""

    command: bytes  # the first byte
    properties: bytes  # MQTT 5: an empty property set
    extra: int  # bytes of the body besides topic and payload

    @staticmethod
    def of(qos: int, retain: bool, v5: bool) -> _Fixed:
        props = b"\x00" if v5 else b""
        return _Fixed(bytes((_PUBLISH | (qos << 1) | int(retain),)), props, 4 + len(props))


def _packet_parts(fixed: _Fixed, topic: bytes, payload: bytes, mid: int) -> tuple[bytes, ...]:
    """The PUBLISH packet paho's ``_send_publish`` writes for a first (not dup) QoS ≥ 1 send
    without properties (MQTT 5: an empty property set, one zero byte), in pieces: the caller
    joins a micro-batch's packets once."""
    return (
        fixed.command,
        remaining_length(fixed.extra + len(topic) + len(payload)),
        _U16.pack(len(topic)),
        topic,
        _U16.pack(mid),
        fixed.properties,
        payload,
    )


def _record(
    mid: int, topic: bytes, payload: bytes, qos: int, retain: bool, state: MessageState, now: float
) -> paho.MQTTMessage:
    """The record paho's ``publish`` keeps of a message in flight: ``MQTTMessage(mid, topic)``
    with the fields ``publish`` then sets, each slot set once instead of twice (its info made
    by paho's class, which the transport replaces with ``pubinfo.MessageInfo``)."""
    message = _new_message(paho.MQTTMessage)
    message.timestamp = now
    message.state = state
    message.dup = False
    message.mid = mid
    message._topic = topic
    message.payload = payload
    message.qos = qos
    message.retain = retain
    message.info = paho.MQTTMessageInfo(mid)
    message.properties = None
    return message


_new_message = paho.MQTTMessage.__new__


def publish_many(
    client: paho.Client, messages: Sequence[tuple[str, bytes]], qos: int, retain: bool
) -> list[paho.MQTTMessageInfo] | None:
    """Queue ``messages`` ((topic, payload) each) as paho's ``publish`` would, in order, and
    return their records (``mid``, ``rc`` success); None, with nothing changed, where paho's
    own ``publish`` must take them (see the module doc)."""
    if qos not in (1, 2) or not messages or client._max_inflight_messages:
        return None
    try:
        topics = [t.encode("utf-8") for t, _ in messages]  # paho raises for a lone surrogate
    except UnicodeEncodeError:
        return None
    for topic in topics:
        if not topic or len(topic) > _MAX_TOPIC or b"+" in topic or b"#" in topic:
            return None  # paho's publish refuses these: let it say so
    if max(len(p) for _, p in messages) > _MAX_PAYLOAD:
        return None
    v5 = client._protocol == paho.MQTTv5
    now = time_func()
    state = paho.mqtt_ms_wait_for_puback if qos == 1 else paho.mqtt_ms_wait_for_pubrec
    with client._mid_generate_mutex:  # as paho's _mid_generate, once for all
        last = client._last_mid
        mids = []
        for _ in range(len(messages)):
            last = 1 if last >= 65535 else last + 1
            mids.append(last)
        client._last_mid = last
    with client._out_message_mutex:
        if client._sock is None or any(mid in client._out_messages for mid in mids):
            return None  # paho queues for the reconnect, or reports ids in use, per message
        wire: list[bytes] = []
        infos = []
        out = client._out_messages
        fixed = _Fixed.of(qos, retain, v5)
        for mid, topic, (_, payload) in zip(mids, topics, messages, strict=True):
            message = _record(mid, topic, payload, qos, retain, state, now)
            out[mid] = message
            infos.append(message.info)
            wire += _packet_parts(fixed, topic, payload, mid)
        client._inflight_messages += len(mids)
        client._packet_queue(_PUBLISH | (qos << 1), b"".join(wire), mids[-1], qos)
    return infos


def ack_many(client: paho.Client, acks: Sequence[tuple[int, int]]) -> None:
    """What paho's ``ack(mid, qos)`` queues for each of ``acks``, in order, as one write (nothing
    for QoS 0, or when the client acknowledges by itself: no ``manual_ack``)."""
    if not client._manual_ack:
        return
    wire = b"".join([_ACK.pack(_ACK_COMMAND[q], 2, m) for m, q in acks if q > 0])
    if wire:
        client._packet_queue(_ACK_COMMAND[1], wire, 0, 1)
