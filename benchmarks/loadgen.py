"""The two load-generator processes: ``pub`` sends readings, ``sub`` receives predictions.

Run as ``python -m benchmarks.loadgen pub|sub ...`` by the harness, one process each, so
neither competes with the other for a GIL. Every reading carries its publish time as ``ts``
(epoch seconds, microsecond steps, strictly increasing so no stream ever sees a duplicate time);
the contenders echo it in their replies and the subscriber's latency is receive time - ts.

``pub`` is open-loop (a fixed offered rate) or closed-loop (at most ``--window`` readings not yet
seen by ``sub``, read from a shared counter file), which finds the saturation rate without
piling up a backlog at the broker.
"""

from __future__ import annotations

import argparse
import json
import mmap
import os
import re
import socket
import struct
import threading
import time
from array import array
from pathlib import Path

import numpy as np

from benchmarks.rawmqtt import (
    PacketReader,
    open_connection,
    parse_publish,
    puback_packet,
    publish_packet,
    subscribe_packet,
    topic_prefix,
)

_TS = re.compile(rb'"ts":\s*([0-9.eE+-]+)')
_VALUES = [b"%.3f" % (10.0 + 5.0 * np.sin(k / 7.0)) for k in range(97)]
BATCH_TOPIC = "gateway/batch"


class Counter:
    """An 8-byte counter in a file both processes map: sub writes, pub reads."""

    def __init__(self, path: Path, create: bool = False) -> None:
        if create:
            path.write_bytes(b"\0" * 8)
        self._fd = os.open(path, os.O_RDWR)
        self._map = mmap.mmap(self._fd, 8)

    def get(self) -> int:
        return int(struct.unpack_from("<Q", self._map, 0)[0])

    def set(self, value: int) -> None:
        struct.pack_into("<Q", self._map, 0, value)

    def close(self) -> None:
        self._map.close()
        os.close(self._fd)


def single_topic(i: int) -> str:
    return f"sensors/s{i}/flow"


# ---------------------------------------------------------------------------------- publisher


class _Stamp:
    """Strictly increasing microsecond timestamps close to the wall clock."""

    def __init__(self) -> None:
        self.last = 0

    def next(self, now_us: int) -> bytes:
        us = now_us if now_us > self.last else self.last + 1
        self.last = us
        return b"%d.%06d" % divmod(us, 1_000_000)


def run_pub(a: argparse.Namespace) -> None:
    sock = open_connection(a.port, f"bench-pub-{os.getpid()}")
    sock.settimeout(None)
    acked = [0]

    def drain() -> None:  # PUBACKs (QoS 1): read and count, so the TCP window stays open
        try:
            while True:
                data = sock.recv(1 << 16)
                if not data:
                    return
                acked[0] += len(data) // 4
        except OSError:
            return

    threading.Thread(target=drain, daemon=True).start()
    counter = Counter(Path(a.counter)) if a.counter else None
    per_msg = a.batch if a.mode == "batch" else 1
    streams = a.streams
    topics = (
        [topic_prefix(single_topic(i)) for i in range(streams)]
        if a.mode == "single"
        else [topic_prefix(BATCH_TOPIC)]
    )
    stamp = _Stamp()
    qos = a.qos
    mid = 0
    sent_msgs = 0
    sent = 0
    k = 0  # reading index: stream k % streams
    limit = a.count if a.count > 0 else None
    msg_rate = a.rate / per_msg if a.rate > 0 else 0.0
    started = time.time()
    end = started + a.duration
    behind = 0
    while True:
        now = time.time()
        if limit is None and now >= end:
            break
        if limit is not None and sent >= limit:
            break
        if msg_rate > 0:
            due = int((now - started) * msg_rate) - sent_msgs
        else:
            due = 256
        if counter is not None:
            room = (a.window - (sent - counter.get())) // per_msg
            due = min(due, room)
        if limit is not None:
            due = min(due, -(-(limit - sent) // per_msg))
        if due <= 0:
            time.sleep(0.0003)
            continue
        if due > 400:
            behind += 1
            due = 400
        now_us = int(now * 1e6)
        chunks: list[bytes] = []
        for _ in range(due):
            mid = mid % 65535 + 1
            if per_msg == 1:
                i = k % streams
                payload = b'{"value":%s,"ts":%s}' % (_VALUES[k % 97], stamp.next(now_us))
                chunks.append(publish_packet(topics[i], payload, qos, mid))
                k += 1
            else:
                items = []
                for _j in range(per_msg):
                    items.append(
                        b'{"stream":"s%d","value":%s,"ts":%s}'
                        % (k % streams, _VALUES[k % 97], stamp.next(now_us))
                    )
                    k += 1
                chunks.append(publish_packet(topics[0], b"[" + b",".join(items) + b"]", qos, mid))
        sock.sendall(b"".join(chunks))
        sent_msgs += due
        sent += due * per_msg
    finished = time.time()
    # Let the last PUBACKs arrive (QoS 1) so the broker has everything before we leave.
    if qos:
        deadline = time.time() + 5
        while acked[0] < sent_msgs and time.time() < deadline:
            time.sleep(0.01)
    Path(a.done).write_text(
        json.dumps(
            {
                "sent": sent,
                "sent_msgs": sent_msgs,
                "t_start": started,
                "t_end": finished,
                "ticks_behind": behind,
            }
        )
    )
    try:
        sock.sendall(b"\xe0\x00")
    finally:
        sock.close()


# ---------------------------------------------------------------------------------- subscriber


class Tally:
    """What a prediction subscriber records and when it stops; shared by the MQTT subscriber here
    and the NATS one (``benchmarks.nats sub``), so both write the same record.

    It counts answers to readings published after it started (``floor``: replies to an earlier
    trial's readings are not counted), their latency (receive time − echoed ``ts``) and arrivals
    per received chunk. It stops once every reading the publisher reports (``--done`` file) is
    answered, ``grace`` seconds after publishing ended, ``quiet`` seconds without an answer after
    publishing ended, or at ``--timeout``.
    """

    def __init__(self, a: argparse.Namespace, quiet: float) -> None:
        self.counter = Counter(Path(a.counter)) if a.counter else None
        self.done_path = Path(a.done)
        self.grace = a.grace
        self.quiet = quiet
        self.chunk_t, self.chunk_n = array("d"), array("q")
        self.lat_t, self.lat = array("d"), array("d")
        self.received = 0
        self.messages = 0
        self.sent: int | None = None
        self.t_end_pub = 0.0
        self.hard_deadline = time.time() + a.timeout
        self.floor = time.time()
        self.last_recv = self.floor
        self.last_check = 0.0

    def answer(self, now: float, ts: float) -> bool:
        """One answered reading; False when it answers a reading of an earlier trial."""
        if ts < self.floor:
            return False
        self.lat_t.append(now)
        self.lat.append(now - ts)
        return True

    def chunk(self, now: float, readings: int, messages: int) -> None:
        """What one received chunk answered."""
        if not readings:
            return
        self.last_recv = now
        self.received += readings
        self.messages += messages
        self.chunk_t.append(now)
        self.chunk_n.append(readings)
        if self.counter is not None:
            self.counter.set(self.received)

    def finished(self, now: float) -> bool:
        """Time to stop (checked every 50 ms at most)."""
        if now - self.last_check <= 0.05:
            return False
        self.last_check = now
        if self.sent is None and self.done_path.exists():
            try:
                info = json.loads(self.done_path.read_text())
            except ValueError:
                info = None  # being written; read again next time
            if info is not None:
                self.sent = int(info["sent"])
                self.t_end_pub = float(info["t_end"])
        if self.sent is not None and (
            self.received >= self.sent
            or now > self.t_end_pub + self.grace
            or (now > self.t_end_pub + 1.5 and now - self.last_recv > self.quiet)
        ):
            return True
        return now > self.hard_deadline

    def save(self, out: str, **extra: np.ndarray) -> None:
        np.savez(
            out,
            chunk_t=np.frombuffer(self.chunk_t, dtype=np.float64),
            chunk_n=np.frombuffer(self.chunk_n, dtype=np.int64),
            lat_t=np.frombuffer(self.lat_t, dtype=np.float64),
            lat=np.frombuffer(self.lat, dtype=np.float64),
            received=np.array(self.received),
            messages=np.array(self.messages),
            **extra,
        )


def run_sub(a: argparse.Namespace) -> None:
    sock = open_connection(a.port, f"bench-sub-{os.getpid()}")
    sock.sendall(subscribe_packet("forecast/#", 1))
    reader = PacketReader()
    sock.settimeout(0.05)
    subscribed = False
    ready = Path(a.ready)
    tally = Tally(a, quiet=1.5)
    while True:
        try:
            data = sock.recv(1 << 20)
        except TimeoutError:
            data = b""
        except OSError:
            break
        now = time.time()
        if data:
            acks: list[bytes] = []
            n = messages = 0
            for header, body in reader.feed(data):
                kind = header >> 4
                if kind == 3:
                    _topic, mid, payload = parse_publish(header, body)
                    if mid is not None:
                        acks.append(puback_packet(mid))
                    fresh = sum(tally.answer(now, float(t)) for t in _TS.findall(payload))
                    if fresh:
                        n += fresh
                        messages += 1
                elif kind == 9 and not subscribed:
                    subscribed = True
                    ready.write_text("ready")
            if acks:
                sock.sendall(b"".join(acks))
            tally.chunk(now, n, messages)
        if tally.finished(now):
            break
    sock.close()
    tally.save(a.out)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m benchmarks.loadgen")
    sp = p.add_subparsers(dest="cmd", required=True)
    pub = sp.add_parser("pub")
    pub.add_argument("--port", type=int, required=True)
    pub.add_argument("--mode", choices=["single", "batch"], default="single")
    pub.add_argument("--batch", type=int, default=100)
    pub.add_argument("--qos", type=int, choices=[0, 1], default=1)
    pub.add_argument("--streams", type=int, default=1000)
    pub.add_argument("--rate", type=float, default=0.0, help="readings/s; 0 = closed loop")
    pub.add_argument("--duration", type=float, default=4.0)
    pub.add_argument("--count", type=int, default=0, help="send exactly this many readings")
    pub.add_argument("--window", type=int, default=2000, help="closed loop: readings in flight")
    pub.add_argument("--counter", default="", help="file shared with sub (closed loop)")
    pub.add_argument("--done", required=True)
    sub = sp.add_parser("sub")
    sub.add_argument("--port", type=int, required=True)
    sub.add_argument("--out", required=True)
    sub.add_argument("--done", required=True)
    sub.add_argument("--ready", required=True)
    sub.add_argument("--counter", default="")
    sub.add_argument("--grace", type=float, default=3.0)
    sub.add_argument("--timeout", type=float, default=120.0)
    a = p.parse_args(argv)
    if a.cmd == "pub":
        run_pub(a)
    else:
        run_sub(a)


if __name__ == "__main__":
    socket.setdefaulttimeout(30)
    main()
