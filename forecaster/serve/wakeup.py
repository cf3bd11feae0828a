"""paho's wake-up byte, written once per wake-up instead of once per queued packet.

paho's network thread sleeps in ``select`` on its socket and on one end of a socket pair; every
packet another thread queues (each ``publish()``, each ``ack()``) writes a byte to the other end
so the thread wakes and writes it. The inference worker publishes a whole micro-batch of
predictions at once and the publisher's thread acknowledges a burst of PUBACKs at once, so most
of those bytes wake a thread that is already awake: one ``send`` system call per packet, and
profiles of the daemon with single-reading messages put about a tenth of its samples there.

:func:`install` wraps the pair so that a byte is written only when none is waiting: the writer
side marks the pair *pending* when it writes, the network thread clears the mark when it drains
the pair, right before it writes out every queued packet. A packet queued while the mark is set
was queued before that drain, so the write that follows it sends it; a packet queued after the
drain finds the mark clear and writes a byte. Nothing is ever left waiting for ``select``'s
timeout.

It relies on paho's private ``_thread_main``, ``_sockpairR`` and ``_sockpairW`` (paho-mqtt 2.x,
pinned below 3 in pyproject.toml); ``tests/unit/test_wakeup.py`` fails if they disappear.
"""

from __future__ import annotations

from typing import Any

import paho.mqtt.client as paho


class _Mark:
    __slots__ = ("pending",)

    def __init__(self) -> None:
        self.pending = False


class WakeWriter:
    """The writing end: ``send`` writes only when no byte is waiting to be drained."""

    def __init__(self, sock: Any, mark: _Mark) -> None:
        self._sock = sock
        self._mark = mark

    def send(self, data: bytes) -> int:
        if self._mark.pending:
            return len(data)
        self._mark.pending = True
        return int(self._sock.send(data))

    def __getattr__(self, name: str) -> Any:
        return getattr(self._sock, name)  # close, fileno...


class WakeReader:
    """The reading end: draining it clears the mark, after the bytes are consumed."""

    def __init__(self, sock: Any, mark: _Mark) -> None:
        self._sock = sock
        self._mark = mark

    def recv(self, bufsize: int) -> bytes:
        try:
            return bytes(self._sock.recv(bufsize))
        finally:
            self._mark.pending = False

    def __getattr__(self, name: str) -> Any:
        return getattr(self._sock, name)  # fileno (for select), close...


def install(client: paho.Client) -> None:
    """Coalesce ``client``'s wake-ups once ``loop_start()`` has made its socket pair: the pair is
    wrapped at the start of the network thread, before its first ``select``."""
    original = client._thread_main  # paho's private thread body, see the module doc

    def thread_main() -> None:
        r, w = client._sockpairR, client._sockpairW
        if r is not None and w is not None and not isinstance(w, WakeWriter):
            mark = _Mark()
            client._sockpairR = WakeReader(r, mark)  # type: ignore[assignment]
            client._sockpairW = WakeWriter(w, mark)  # type: ignore[assignment]
        original()

    client._thread_main = thread_main  # type: ignore[method-assign]
