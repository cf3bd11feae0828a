"""Buffered socket reads for paho (``forecaster.serve.sockbuf``), on a real socket pair.

The wrapper must behave like a non-blocking socket to paho: short reads allowed, ``BlockingIOError``
only when nothing at all is readable, ``b""`` only after the peer closed and the buffer is empty,
and ``pending()`` counting what waits in the buffer. Random packet sizes and split points are
seeded (the seed is printed on failure).
"""

from __future__ import annotations

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
    """The wrapper rides on paho's private ``_create_socket`` and ``_loop_rc_handle``: fail
    loudly if they go away."""
    assert callable(getattr(paho.Client, "_create_socket", None))
    assert callable(getattr(paho.Client, "_loop_rc_handle", None))
    assert BufferedClient._create_socket is not paho.Client._create_socket
