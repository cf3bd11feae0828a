"""Buffered socket I/O for paho: one ``recv`` for many MQTT packets instead of three per packet,
and one ``send`` per write-out instead of one per packet.

paho reads every packet with separate ``recv`` calls (the fixed header byte, each byte of the
remaining length, then the body) and goes back through ``select`` after each packet when nothing
else is in flight. With the daemon's semantics (QoS 1 in and out, one PUBACK per reading and one
per prediction) that is about a dozen system calls and a ``select`` per reading, and profiles of
the daemon showed paho's network threads spending most of their samples in ``_sock_recv``.

:class:`BufferedSocket` wraps the connected socket (plain or TLS): ``recv(n)`` is served from a
user-space buffer that is refilled with one large non-blocking read. It reports the buffered
bytes through ``pending()``, the hook paho already uses for TLS sockets, so paho skips ``select``
while whole packets wait in the buffer. :class:`BufferedClient` installs the wrapper and drains
the buffer in one ``loop_read``.

Writes are gathered the same way: paho writes each queued packet with its own ``send`` (with
``TCP_NODELAY``, its own TCP segment, which the broker then reads on its own), and the daemon
queues packets in bursts (a micro-batch of predictions, the acknowledgements of a burst of
readings). The wrapper's ``send`` takes the bytes into a buffer, and :class:`BufferedClient`
writes the buffer out with as few ``send`` calls as the kernel allows at the end of each
``loop_write``; what the kernel does not take yet stays buffered, and ``want_write()`` says so,
so paho's loop waits for the socket to become writable and writes the rest. Closing the socket
(paho's disconnect, or a dead connection) first tries to write what is buffered. A packet is
thus "written" for paho when it is in this buffer rather than in the kernel's: after a
connection drops, QoS 1 packets are sent again by paho as before, and a QoS 0 one is lost as one
in the kernel's buffer would be.

A packet whose bytes are all in the buffer is read whole (:meth:`BufferedSocket.packet`): its
header byte, remaining length and body taken in one step and handed to paho's packet handler,
where paho's own read takes three ``recv`` calls and its bookkeeping between them. A packet that
has not all arrived, or whose remaining length is malformed, is left to paho's read.

Nothing else about paho changes: packets, acknowledgements and reconnects are paho's own.

The wrapper relies on paho's private ``_create_socket``, ``_loop_rc_handle``, ``_packet_read``,
``_packet_handle``, ``_in_packet``, ``_msgtime_mutex`` and ``_last_bytes_received`` (paho-mqtt
2.x, pinned below 3 in pyproject.toml); ``tests/unit/test_sockbuf.py`` fails if they disappear,
and compares the whole-packet read with paho's on randomly split streams.
"""

from __future__ import annotations

import socket
import ssl
from collections.abc import Callable
from typing import Any

import paho.mqtt.client as paho
from paho.mqtt.client import MalformedPacket, time_func

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
        self._out = bytearray()

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

    def packet(self) -> tuple[int, bytearray] | None:
        """The next whole MQTT packet in the buffer, as ``(fixed header byte, rest)``, taken
        out of it; None, with nothing taken, when the buffer (refilled once if short) does not
        hold a whole one or its remaining length is malformed: paho's own read then goes on
        byte by byte, and reports what it finds."""
        packet = self._whole()
        if packet is None and not self._eof:
            try:
                self._fill()
            except BlockingIOError:
                return None
            packet = self._whole()
        return packet

    def _whole(self) -> tuple[int, bytearray] | None:
        buf, pos = self._buf, self._pos
        end = len(buf)
        at = pos + 1
        length = 0
        shift = 0
        while True:  # the remaining length: 7 bits a byte, at most 4 bytes
            if at >= end or shift > 21:
                return None
            byte = buf[at]
            at += 1
            length |= (byte & 0x7F) << shift
            shift += 7
            if byte < 0x80:
                break
        if end - at < length:
            return None
        command = buf[pos]
        body = buf[at : at + length]
        if at + length == end:
            buf.clear()
            self._pos = 0
        else:
            self._pos = at + length
        return command, body

    def send(self, data: bytes | bytearray | memoryview) -> int:
        """Take ``data`` whole into the write buffer (see :meth:`flush`)."""
        self._out += data
        return len(data)

    def unsent(self) -> int:
        """Bytes taken by :meth:`send` and not yet handed to the kernel."""
        return len(self._out)

    def flush(self) -> None:
        """Hand the write buffer to the kernel, as much as it takes without waiting; the rest
        stays buffered. Raises what the socket raises other than would-block (a dead link)."""
        out = self._out
        while out:
            try:
                n = self._sock.send(out)
            except (BlockingIOError, ssl.SSLWantWriteError, ssl.SSLWantReadError):
                return
            del out[:n]

    def close(self) -> None:
        """Try to write what is buffered (a disconnect's last packets), then close."""
        if self._out:
            try:
                self._sock.settimeout(1.0)
                self._sock.sendall(self._out)
            except OSError:
                pass  # a dead link: what is unsent is lost, as in the kernel's buffer
            self._out.clear()
        self._sock.close()

    def __getattr__(self, name: str) -> Any:
        # fileno (for select), setblocking, shutdown, getpeername...: the socket's.
        return getattr(self._sock, name)


class BufferedClient(paho.Client):
    """A paho client whose socket reads are buffered (:class:`BufferedSocket`)."""

    def _create_socket(self) -> Any:
        sock = super()._create_socket()  # paho's private hook, see the module doc
        if isinstance(sock, (socket.socket, ssl.SSLSocket)):
            return BufferedSocket(sock)
        return sock  # websockets and the like keep paho's own handling

    def _packet_read(self) -> paho.MQTTErrorCode:
        """A whole buffered packet handled at once; anything else is paho's own read.

        paho reads a packet in three ``recv`` calls (the header byte, the remaining length a
        byte at a time, the rest), with its bookkeeping between them: with every packet
        already in the buffer that was a fifth of the daemon's time under the GIL on
        single-reading messages. What paho's read leaves behind is the same: the packet
        handled through ``_packet_handle`` from ``_in_packet``, then a fresh ``_in_packet``
        and the time bytes were last received."""
        sock = self._sock
        if self._in_packet["command"] != 0 or not isinstance(sock, BufferedSocket):
            return super()._packet_read()  # a packet paho started, or not our socket
        try:
            whole = sock.packet()
        except OSError:
            whole = None  # paho's read meets the same error and reports it
        if whole is None:
            return super()._packet_read()
        command, body = whole
        # paho's record of the packet being read, filled in place (it is fresh: no packet is
        # started) and left fresh again: paho's read makes a new one per packet.
        record = self._in_packet
        record["command"] = command
        record["have_remaining"] = 1
        record["remaining_length"] = len(body)
        record["packet"] = body
        try:
            rc = self._packet_handle()
        except MalformedPacket as exc:
            self._easy_log(paho.MQTT_LOG_DEBUG, "Received malformed packet: %s", exc)
            rc = paho.MQTTErrorCode.MQTT_ERR_PROTOCOL
        record = self._in_packet
        record["command"] = 0
        record["have_remaining"] = 0
        record["remaining_length"] = 0
        record["packet"] = bytearray()
        with self._msgtime_mutex:
            self._last_bytes_received = time_func()
        return rc

    #: Called at the end of each :meth:`loop_read` (on the network thread): the transport
    #: hands over together what all the packets that read handled brought (messages, acks).
    on_read_done: Callable[[], None] | None = None
    #: True while :meth:`loop_read` runs, so a callback can tell a read step's call (which
    #: ``on_read_done`` follows) from a write step's.
    reading = False

    def loop_read(self, max_packets: int = 1) -> paho.MQTTErrorCode:
        """paho's read step, repeated while whole packets wait in the buffer."""
        self.reading = True
        try:
            rc = super().loop_read(max_packets)
            sock = self._sock
            while rc == paho.MQTTErrorCode.MQTT_ERR_SUCCESS and isinstance(sock, BufferedSocket):
                if sock.pending() <= 0 or self._sock is not sock:
                    break
                rc = super().loop_read(max_packets)
        finally:
            self.reading = False
            done = self.on_read_done
            if done is not None:
                done()
        return rc

    def loop_write(self) -> paho.MQTTErrorCode:
        """paho's write step (every queued packet into the buffer), then one write-out."""
        rc = super().loop_write()
        sock = self._sock
        if rc == paho.MQTTErrorCode.MQTT_ERR_SUCCESS and isinstance(sock, BufferedSocket):
            try:
                sock.flush()
            except OSError:
                # what paho does when one of its own sends fails
                return self._loop_rc_handle(paho.MQTTErrorCode.MQTT_ERR_CONN_LOST)
        return rc

    def want_write(self) -> bool:
        """Also while bytes wait in the write buffer (so paho selects for writability)."""
        sock = self._sock
        return super().want_write() or (isinstance(sock, BufferedSocket) and sock.unsent() > 0)
