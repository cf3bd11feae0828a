"""Buffered reads for paho: one ``recv`` for many MQTT packets instead of three per packet.

paho reads every packet with separate ``recv`` calls (the fixed header byte, each byte of the
remaining length, then the body) and goes back through ``select`` after each packet when nothing
else is in flight. With the daemon's semantics (QoS 1 in and out, one PUBACK per reading and one
per prediction) that is about a dozen system calls and a ``select`` per reading, and profiles of
the daemon showed paho's network threads spending most of their samples in ``_sock_recv``.

:class:`BufferedSocket` wraps the connected socket (plain or TLS): ``recv(n)`` is served from a
user-space buffer that is refilled with one large non-blocking read. It reports the buffered
bytes through ``pending()``, the hook paho already uses for TLS sockets, so paho skips ``select``
while whole packets wait in the buffer. :class:`BufferedClient` installs the wrapper and drains
the buffer in one ``loop_read``. Nothing else about paho changes: packets, acknowledgements and
reconnects are paho's own; writes go straight through.

The wrapper relies on paho's private ``_create_socket`` (paho-mqtt 2.x, pinned below 3 in
pyproject.toml); ``tests/unit/test_sockbuf.py`` fails if that hook disappears.
"""

from __future__ import annotations

import socket
import ssl
from typing import Any

import paho.mqtt.client as paho

#: Bytes asked of the kernel per refill: many small packets, or one large gateway batch in a few.
READ_SIZE = 256 * 1024


class BufferedSocket:
    """A connected socket whose reads come from a user-space buffer (see the module doc)."""

    def __init__(self, sock: Any, read_size: int = READ_SIZE) -> None:
        self._sock = sock
        self._buf = bytearray()
        self._pos = 0
        self._read_size = read_size
        self._eof = False

    def pending(self) -> int:
        """Bytes readable without waiting: buffered here, plus what a TLS layer holds."""
        inner = self._sock.pending() if hasattr(self._sock, "pending") else 0
        return len(self._buf) - self._pos + int(inner)

    def _fill(self) -> None:
        """One non-blocking read into the buffer; raises BlockingIOError when nothing is there."""
        try:
            data = self._sock.recv(self._read_size)
        except ssl.SSLWantReadError as err:
            raise BlockingIOError() from err
        if not data:
            self._eof = True
            return
        if self._pos:
            del self._buf[: self._pos]
            self._pos = 0
        self._buf += data

    def recv(self, bufsize: int) -> bytes:
        """Up to ``bufsize`` bytes: from the buffer, refilled when it cannot serve the request.

        A short read is fine (paho accumulates a body over several reads); ``b""`` means the
        peer closed the connection, as with a plain socket, once the buffer is exhausted."""
        have = len(self._buf) - self._pos
        if have < bufsize and not self._eof:
            try:
                self._fill()
            except BlockingIOError:
                if not have:
                    raise
            have = len(self._buf) - self._pos
        if not have:
            return b""
        n = min(bufsize, have)
        out = bytes(self._buf[self._pos : self._pos + n])
        self._pos += n
        if self._pos == len(self._buf):
            self._buf.clear()
            self._pos = 0
        return out

    def __getattr__(self, name: str) -> Any:
        # send, fileno (for select), setblocking, close, shutdown, getpeername...: the socket's.
        return getattr(self._sock, name)


class BufferedClient(paho.Client):
    """A paho client whose socket reads are buffered (:class:`BufferedSocket`)."""

    def _create_socket(self) -> Any:
        sock = super()._create_socket()  # paho's private hook, see the module doc
        if isinstance(sock, (socket.socket, ssl.SSLSocket)):
            return BufferedSocket(sock)
        return sock  # websockets and the like keep paho's own handling

    def loop_read(self, max_packets: int = 1) -> paho.MQTTErrorCode:
        """paho's read step, repeated while whole packets wait in the buffer."""
        rc = super().loop_read(max_packets)
        sock = self._sock
        while rc == paho.MQTTErrorCode.MQTT_ERR_SUCCESS and isinstance(sock, BufferedSocket):
            if sock.pending() <= 0 or self._sock is not sock:
                break
            rc = super().loop_read(max_packets)
        return rc
