"""Buffered socket reads for paho (``forecaster.serve.sockbuf``), on a real socket pair.

The wrapper must behave like a non-blocking socket to paho: short reads allowed, ``BlockingIOError``
only when nothing at all is readable, ``b""`` only after the peer closed and the buffer is empty,
and ``pending()`` counting what waits in the buffer. Random packet sizes and split points are
seeded (the seed is printed on failure).
"""

from __future__ import annotations

import contextlib
import random
import socket
from collections.abc import Iterator

import paho.mqtt.client as paho
import pytest

from forecaster.serve.sockbuf import BufferedClient, BufferedSocket


@pytest.fixture
def pair() -> Iterator[tuple[socket.socket, socket.socket]]:
    a, b = socket.socketpair()
    a.setblocking(False)
    yield a, b
    a.close()
    b.close()


def test_small_reads_come_from_one_large_read(pair: tuple[socket.socket, socket.socket]) -> None:
    a, b = pair
    sock = BufferedSocket(a)
    b.sendall(b"\x30\x05hello\x40\x02\x00\x01")
    assert sock.recv(1) == b"\x30"
    # the rest is now buffered: paho sees it as pending and skips select
    assert sock.pending() == 10
    assert sock.recv(1) == b"\x05"
    assert sock.recv(5) == b"hello"
    assert sock.recv(1) == b"\x40"
    assert sock.recv(3) == b"\x02\x00\x01"
    assert sock.pending() == 0
    with pytest.raises(BlockingIOError):
        sock.recv(1)


def test_short_read_when_the_rest_has_not_arrived(
    pair: tuple[socket.socket, socket.socket],
) -> None:
    a, b = pair
    sock = BufferedSocket(a)
    b.sendall(b"abc")
    assert sock.recv(10) == b"abc"  # what there is, not a BlockingIOError
    with pytest.raises(BlockingIOError):
        sock.recv(10)
    b.sendall(b"def")
    assert sock.recv(10) == b"def"


def test_close_reads_the_buffer_first_then_eof(pair: tuple[socket.socket, socket.socket]) -> None:
    a, b = pair
    sock = BufferedSocket(a)
    b.sendall(b"xyz")
    b.close()
    assert sock.recv(1) == b"x"
    assert sock.recv(1) == b"y"
    assert sock.recv(5) == b"z"
    assert sock.recv(1) == b""
    assert sock.recv(1) == b""


def test_other_socket_calls_pass_through(pair: tuple[socket.socket, socket.socket]) -> None:
    a, _b = pair
    sock = BufferedSocket(a)
    assert sock.fileno() == a.fileno()
    assert sock.getsockname() == a.getsockname()


def test_writes_are_gathered_until_flushed(pair: tuple[socket.socket, socket.socket]) -> None:
    a, b = pair
    b.setblocking(False)
    sock = BufferedSocket(a)
    for packet in (b"\x40\x02\x00\x01", b"\x40\x02\x00\x02", b"\x40\x02\x00\x03"):
        assert sock.send(packet) == len(packet)  # taken whole, as paho expects
    with pytest.raises(BlockingIOError):
        b.recv(100)  # nothing on the wire yet
    assert sock.unsent() == 12
    sock.flush()
    assert sock.unsent() == 0
    assert b.recv(100) == b"\x40\x02\x00\x01\x40\x02\x00\x02\x40\x02\x00\x03"


def test_what_the_kernel_does_not_take_stays_buffered_in_order(
    pair: tuple[socket.socket, socket.socket],
) -> None:
    a, b = pair
    sock = BufferedSocket(a)
    # a counter, 4 bytes a step: any byte lost, doubled or moved shows; 3 MB is beyond any
    # socket buffer
    data = b"".join(i.to_bytes(4, "big") for i in range(750_000))
    for i in range(0, len(data), 10_000):
        sock.send(data[i : i + 10_000])
    sock.flush()  # must not block: the peer is not reading yet
    assert 0 < sock.unsent() < len(data)
    got = bytearray()
    b.settimeout(10)
    while len(got) < len(data):
        got += b.recv(1 << 20)
        sock.flush()
    assert bytes(got) == data and sock.unsent() == 0


def test_close_writes_what_is_buffered_first(pair: tuple[socket.socket, socket.socket]) -> None:
    a, b = pair
    sock = BufferedSocket(a)
    sock.send(b"\xe0\x00")  # a DISCONNECT paho "wrote" just before closing
    sock.close()
    assert b.recv(10) == b"\xe0\x00"
    assert b.recv(10) == b""


def test_any_split_of_a_stream_reads_back_whole(
    pair: tuple[socket.socket, socket.socket], seed: int
) -> None:
    rng = random.Random(seed)
    a, b = pair
    sock = BufferedSocket(a, read_size=rng.randint(1, 64))
    data = rng.randbytes(5000)
    b.sendall(data)
    got = bytearray()
    while len(got) < len(data):
        try:
            got += sock.recv(rng.randint(1, 40))
        except BlockingIOError:  # pragma: no cover - the pair holds all 5,000 bytes already
            pytest.fail(f"blocked with {len(got)} of {len(data)} bytes read (seed {seed})")
    assert bytes(got) == data, f"seed {seed}"


def test_paho_hook_still_exists() -> None:
    """The wrapper rides on paho's private ``_create_socket``, ``_loop_rc_handle``, its packet
    read and the record it keeps of the packet being read: fail loudly if they go away."""
    for name in ("_create_socket", "_loop_rc_handle", "_packet_read", "_packet_handle"):
        assert callable(getattr(paho.Client, name, None)), name
    client = paho.Client(paho.CallbackAPIVersion.VERSION2)
    assert set(client._in_packet) == {
        "command",
        "have_remaining",
        "remaining_count",
        "remaining_mult",
        "remaining_length",
        "packet",
        "to_process",
        "pos",
    }
    assert hasattr(client, "_msgtime_mutex") and hasattr(client, "_last_bytes_received")
    assert BufferedClient._create_socket is not paho.Client._create_socket


def mqtt_packets(rng: random.Random, count: int) -> list[tuple[int, bytes]]:
    """Random packets: header byte and body, bodies long enough for 1-3 length bytes."""
    sizes = [0, 2, 5, 127, 128, 300, 16383, 16384, 20000]
    return [
        (rng.choice((0x30, 0x32, 0x40, 0x90, 0xD0)), rng.randbytes(rng.choice(sizes)))
        for _ in range(count)
    ]


def wire(packets: list[tuple[int, bytes]]) -> bytes:
    out = bytearray()
    for command, body in packets:
        out.append(command)
        n = len(body)
        while True:
            byte, n = n & 0x7F, n >> 7
            out.append(byte | (0x80 if n else 0))
            if not n:
                break
        out += body
    return bytes(out)


def test_whole_packets_come_out_of_any_split(
    pair: tuple[socket.socket, socket.socket], seed: int
) -> None:
    """``packet()`` hands out each packet once it is whole, whatever the split of the stream
    and the read size, and takes nothing while it is not."""
    rng = random.Random(seed)
    a, b = pair
    sock = BufferedSocket(a, read_size=rng.choice((1, 7, 64, 4096, 256 * 1024)))
    sent = mqtt_packets(rng, 60)
    data = wire(sent)
    got: list[tuple[int, bytes]] = []
    b.setblocking(False)
    at = tries = 0
    while len(got) < len(sent):
        whole = sock.packet()
        if whole is None:
            # once all is sent, each call reads at least a byte more (read_size) or a packet
            tries += at == len(data)
            assert tries <= len(data), f"stuck at packet {len(got)} (seed {seed})"
            with contextlib.suppress(BlockingIOError):
                at += b.send(data[at : at + rng.randint(1, 3000)])
            continue
        got.append((whole[0], bytes(whole[1])))
    assert got == sent, f"seed {seed}"
    assert sock.pending() == 0


def test_a_malformed_remaining_length_is_left_to_paho(
    pair: tuple[socket.socket, socket.socket],
) -> None:
    a, b = pair
    sock = BufferedSocket(a)
    b.sendall(b"\x30\x80\x80\x80\x80\x00")  # five length bytes (for 0): MQTT allows four
    assert sock.packet() is None
    assert sock.recv(1) == b"\x30"  # nothing was taken


class Recording(BufferedClient):
    """A client that records the packets it would handle instead of handling them."""

    handled: list[tuple[int, bytes]]

    def _packet_handle(self) -> paho.MQTTErrorCode:
        self.handled.append((self._in_packet["command"], bytes(self._in_packet["packet"])))
        return paho.MQTTErrorCode.MQTT_ERR_SUCCESS


def test_the_whole_packet_read_hands_paho_what_its_own_read_does(
    pair: tuple[socket.socket, socket.socket], seed: int
) -> None:
    """The same stream, split at random, read by ``BufferedClient.loop_read`` (whole packets
    at once) and by paho's own byte-by-byte read on the same buffered socket: the same packets
    reach ``_packet_handle``, and ``_in_packet`` is left fresh after each."""
    rng = random.Random(seed)
    sent = mqtt_packets(rng, 40)
    data = wire(sent)
    results = []
    for own_read in (False, True):
        a, b = socket.socketpair()
        a.setblocking(False)
        client = Recording(paho.CallbackAPIVersion.VERSION2)
        client.handled = []
        sock = BufferedSocket(a, read_size=rng.choice((5, 512, 256 * 1024)))
        client._sock = sock
        if own_read:  # paho's read of every packet, as without the whole-packet path
            client._packet_read = lambda c=client: paho.Client._packet_read(c)  # type: ignore[method-assign]
        b.setblocking(False)  # what the kernel takes now: the reader is never left behind
        at = 0
        while len(client.handled) < len(sent):
            if at < len(data):
                with contextlib.suppress(BlockingIOError):
                    at += b.send(data[at : at + rng.randint(1, 5000)])
            assert client.loop_read() == paho.MQTTErrorCode.MQTT_ERR_SUCCESS, f"seed {seed}"
        assert client._in_packet["command"] == 0 and not client._in_packet["packet"]
        results.append(client.handled)
        client._sock = None
        a.close()
        b.close()
    assert results[0] == results[1] == sent, f"seed {seed}"


def test_the_read_done_hook_follows_every_packet_of_the_read(
    pair: tuple[socket.socket, socket.socket],
) -> None:
    """``on_read_done`` runs once per ``loop_read``, after every whole packet in the buffer
    was handled (the transport hands their messages over together then)."""
    a, b = pair
    a.setblocking(False)
    client = Recording(paho.CallbackAPIVersion.VERSION2)
    client.handled = []
    calls: list[int] = []
    client.on_read_done = lambda: calls.append(len(client.handled))
    client._sock = BufferedSocket(a)
    b.sendall(wire([(0x30, b"x" * 20)] * 5))
    assert client.loop_read() == paho.MQTTErrorCode.MQTT_ERR_SUCCESS
    assert calls == [5]
    b.sendall(wire([(0x30, b"y")]))
    client.loop_read()
    assert calls == [5, 6]
    client._sock = None
