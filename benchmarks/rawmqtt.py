"""A minimal MQTT 3.1.1 client on a raw socket, for the load generators only.

The publisher and the prediction subscriber must not be the bottleneck on a 2-core machine:
paho's per-message path (a ``select`` and three ``recv`` calls per packet) tops out near the
rate we want to measure. These helpers build packets as bytes and parse whatever a large
``recv`` returned, so a generator spends a few microseconds per message. Only what the
benchmark needs is here: CONNECT (keep-alive off), SUBSCRIBE, PUBLISH at QoS 0/1, PUBACK.
"""

from __future__ import annotations

import socket
import struct

from forecaster.serve.bulkpub import remaining_length as varint

HOST = "127.0.0.1"  # loopback only: benchmarks never talk to any other address


def _utf8(s: str) -> bytes:
    b = s.encode()
    return struct.pack("!H", len(b)) + b


def connect_packet(client_id: str, clean: bool = True) -> bytes:
    body = _utf8("MQTT") + bytes([4, 0x02 if clean else 0x00]) + struct.pack("!H", 0)
    body += _utf8(client_id)
    return b"\x10" + varint(len(body)) + body


def subscribe_packet(topic: str, qos: int, mid: int = 1) -> bytes:
    body = struct.pack("!H", mid) + _utf8(topic) + bytes([qos])
    return b"\x82" + varint(len(body)) + body


def publish_packet(topic_bytes: bytes, payload: bytes, qos: int, mid: int) -> bytes:
    """``topic_bytes`` is the length-prefixed topic (see :func:`topic_prefix`)."""
    if qos:
        body_len = len(topic_bytes) + 2 + len(payload)
        return b"\x32" + varint(body_len) + topic_bytes + struct.pack("!H", mid) + payload
    return b"\x30" + varint(len(topic_bytes) + len(payload)) + topic_bytes + payload


def topic_prefix(topic: str) -> bytes:
    return _utf8(topic)


def puback_packet(mid: int) -> bytes:
    return b"\x40\x02" + struct.pack("!H", mid)


def open_connection(port: int, client_id: str, clean: bool = True) -> socket.socket:
    """Connect and wait for CONNACK; raises ConnectionError if the broker refuses."""
    sock = socket.create_connection((HOST, port), timeout=10)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.sendall(connect_packet(client_id, clean))
    ack = _read_exact(sock, 4)
    if ack[0] != 0x20 or ack[3] != 0:
        raise ConnectionError(f"broker refused the connection: {ack!r}")
    return sock


def _read_exact(sock: socket.socket, n: int) -> bytes:
    buf = b""
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            raise ConnectionError("broker closed the connection")
        buf += chunk
    return buf


def purge_session(port: int, client_id: str) -> None:
    """Connect with a clean session under ``client_id`` and leave: the broker forgets the old
    persistent session, so it stops queueing readings for a contender that has gone."""
    sock = open_connection(port, client_id, clean=True)
    sock.sendall(b"\xe0\x00")  # DISCONNECT
    sock.close()


class PacketReader:
    """Splits a byte stream into MQTT packets ``(first byte, body)``; keeps partial ones."""

    def __init__(self) -> None:
        self._buf = bytearray()

    def feed(self, data: bytes) -> list[tuple[int, bytes]]:
        self._buf += data
        buf = self._buf
        out: list[tuple[int, bytes]] = []
        pos = 0
        end = len(buf)
        while pos + 2 <= end:
            header = buf[pos]
            mult = 1
            length = 0
            i = pos + 1
            complete = False
            while i < end:
                b = buf[i]
                length += (b & 0x7F) * mult
                mult *= 128
                i += 1
                if not b & 0x80:
                    complete = True
                    break
            if not complete or i + length > end:
                break
            out.append((header, bytes(buf[i : i + length])))
            pos = i + length
        del buf[:pos]
        return out


def parse_publish(header: int, body: bytes) -> tuple[bytes, int | None, bytes]:
    """``(topic, mid or None, payload)`` of a PUBLISH packet body."""
    (tlen,) = struct.unpack_from("!H", body, 0)
    topic = bytes(body[2 : 2 + tlen])
    pos = 2 + tlen
    mid = None
    if (header >> 1) & 0x03:
        (mid,) = struct.unpack_from("!H", body, pos)
        pos += 2
    return topic, mid, bytes(body[pos:])
