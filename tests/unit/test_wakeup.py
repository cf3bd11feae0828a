"""paho's wake-up byte coalesced (``forecaster.serve.wakeup``), on a real socket pair."""

from __future__ import annotations

import socket
from collections.abc import Iterator

import paho.mqtt.client as paho
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from forecaster.serve import wakeup


@pytest.fixture
def pair() -> Iterator[tuple[wakeup.WakeReader, wakeup.WakeWriter, socket.socket]]:
    r, w = socket.socketpair()
    r.setblocking(False)
    mark = wakeup._Mark()
    yield wakeup.WakeReader(r, mark), wakeup.WakeWriter(w, mark), r
    r.close()
    w.close()


def _waiting(sock: socket.socket) -> bytes:
    try:
        return sock.recv(1000, socket.MSG_PEEK)
    except BlockingIOError:
        return b""


def test_one_byte_per_wake_up_however_many_packets(
    pair: tuple[wakeup.WakeReader, wakeup.WakeWriter, socket.socket],
) -> None:
    reader, writer, raw = pair
    for _ in range(50):  # a micro-batch of publishes before the network thread runs
        assert writer.send(b"0") == 1
    assert _waiting(raw) == b"0"
    assert reader.recv(10000) == b"0"  # the network thread drains, then writes every packet
    assert _waiting(raw) == b""
    writer.send(b"0")  # a packet queued after the drain wakes the thread again
    assert _waiting(raw) == b"0"


def test_a_drain_that_finds_nothing_still_leaves_the_next_packet_a_wake_up(
    pair: tuple[wakeup.WakeReader, wakeup.WakeWriter, socket.socket],
) -> None:
    reader, writer, raw = pair
    with pytest.raises(BlockingIOError):
        reader.recv(10000)
    writer.send(b"0")
    assert _waiting(raw) == b"0"


def test_installed_at_the_start_of_the_network_thread() -> None:
    client = paho.Client(callback_api_version=CallbackAPIVersion.VERSION2)
    wakeup.install(client)
    seen: list[object] = []
    client.loop_forever = lambda **_kw: seen.append(client._sockpairW)  # type: ignore[method-assign]
    client.loop_start()
    thread = client._thread
    if thread is not None:
        thread.join(timeout=30)
    assert len(seen) == 1 and isinstance(seen[0], wakeup.WakeWriter)
    assert isinstance(client._sockpairR, wakeup.WakeReader)


def test_paho_hooks_still_exist() -> None:
    """The wrapper rides on paho's private thread body and socket pair: fail if they go."""
    client = paho.Client(callback_api_version=CallbackAPIVersion.VERSION2)
    assert callable(getattr(client, "_thread_main", None))
    assert hasattr(client, "_sockpairR") and hasattr(client, "_sockpairW")
