"""The baselines the daemon is measured against, each run as its own process.

``python -m benchmarks.contenders KIND --config daemon.toml --ready FILE``

- ``ceiling``: the daemon's own MQTT layer (:class:`forecaster.serve.mqtt.Transport`, built from the
  same config file as ``forecaster serve``: two connections, MQTT 5, persistent session,
  ``manual_ack``, QoS 1, ack after the reply is acknowledged). Each message is republished
  unread to ``forecast/{topic}``: no decoding, no model. The reply echoes the incoming bytes (a
  fixed-size reply per message, so the subscriber can read the publish time back).
- ``naive``: what a user would write: one paho client with defaults, and per message
  ``json.loads``, one ONNX Runtime call with batch 1 and that stream's state, ``json.dumps``,
  publish (QoS 1).
- ``ceiling-plain`` / ``forecaster-plain``: the same with ``mqtt.buffered_reads = false``, paho
  reading the socket itself (three ``recv`` calls and a ``select`` per packet).
- ``gmqtt``: the ceiling with gmqtt instead of paho, with the daemon's semantics: MQTT 5,
  persistent session, QoS 1, the incoming PUBACK sent only after the broker acknowledged the
  reply (``optimistic_acknowledgement=False`` + an async ``on_message`` that awaits it).
- ``ceiling-raw``: what the transport could reach with another client *architecture*, not
  another library: one thread, both connections on one ``select``, every read as large as the
  kernel has, every packet that read produces answered in one write per connection. Same
  semantics (persistent session, QoS 1 in and out, a reading's PUBACK only after its reply's
  PUBACK, at most ``mqtt.max_inflight`` replies in flight), MQTT 3.1.1 through the benchmark's
  own packet helpers (:mod:`benchmarks.rawmqtt`): an upper bound to size a transport by, not
  a client to ship (no TLS, keep-alive or reconnects).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import threading
from pathlib import Path
from typing import Any

import numpy as np

from forecaster.serve.config import Config, load_config

REPLY_PREFIX = "forecast/"


def _filters(cfg: Config) -> list[str]:
    return [f for r in cfg.routes for f in r.subscribe]


def _wait_for_term() -> threading.Event:
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    return stop


# ---------------------------------------------------------------------------------- ceiling


def run_ceiling(cfg: Config, ready: Path) -> None:
    from forecaster.serve.mqtt import Delivery, Transport

    qos_out = cfg.routes[0].qos
    holder: list[Transport] = []

    def on_message(topic: str, payload: bytes, mid: int, qos: int) -> None:
        t = holder[0]
        out = Delivery("ceiling", 1, REPLY_PREFIX + topic)
        t.publish(out, payload, qos_out, False, [(mid, qos)] if qos else [])

    def on_error(name: str) -> None:
        print(f"callback error in {name}", flush=True)

    transport = Transport(cfg.mqtt, None, _filters(cfg), on_message, on_error)
    holder.append(transport)
    stop = _wait_for_term()
    transport.start()
    while not stop.wait(0.05):
        if transport.subscribed and not ready.exists():
            ready.write_text("ready")
    transport.stop()


# ---------------------------------------------------------------------------------- naive


def run_naive(cfg: Config, ready: Path) -> None:
    import onnxruntime as ort
    import paho.mqtt.client as paho
    from paho.mqtt.enums import CallbackAPIVersion

    route = cfg.routes[0]
    bundle_dir = Path(route.bundle)
    manifest = json.loads((bundle_dir / "model.json").read_text())
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    opts.inter_op_num_threads = 1
    session = ort.InferenceSession(
        str(bundle_dir / "model.onnx"), opts, providers=["CPUExecutionProvider"]
    )
    names = ["h", "c"] if manifest["cell"] == "lstm" else ["h"]
    layers, hidden = int(manifest["layers"]), int(manifest["hidden"])
    shapes = [(layers, 1, hidden)] * len(names)
    lag_buffer = int(manifest.get("lag_buffer") or 0)
    if lag_buffer:  # a model with lag inputs carries its stream's last readings as a state too
        names.append("lags")
        shapes.append((1, 1, lag_buffer + 1))
    outputs = ["y", *(f"{n}_out" for n in names)]
    sequence = manifest.get("graph") == "sequence"  # format 3: x [B, T, F] and lengths [B]
    one = np.ones(1, dtype=np.int64)
    states: dict[str, list[np.ndarray]] = {}
    model, version = manifest["name"], manifest["version"]

    def step(stream: str, value: float, ts: Any) -> dict[str, Any]:
        state = states.get(stream)
        if state is None:
            state = [np.zeros(shape, dtype=np.float32) for shape in shapes]
        if sequence:
            feeds = {"x": np.array([[[value]]], dtype=np.float32), "lengths": one}
        else:
            feeds = {"x": np.array([[value]], dtype=np.float32)}
        feeds.update(zip(names, state, strict=True))
        y, *new = session.run(outputs, feeds)
        states[stream] = new
        return {
            "stream": stream,
            "ts": ts,
            "value": float(y[0, 0]),
            "model": model,
            "version": version,
            "warm": True,
        }

    client = paho.Client(
        callback_api_version=CallbackAPIVersion.VERSION2,
        client_id=f"{cfg.mqtt.client_id}-naive",
        protocol=paho.MQTTv5,
    )

    def on_message(c: paho.Client, _u: Any, msg: paho.MQTTMessage) -> None:
        try:
            doc = json.loads(msg.payload)
            out: Any
            if isinstance(doc, list):
                out = [step(d["stream"], float(d["value"]), d.get("ts")) for d in doc]
            else:
                out = step(msg.topic, float(doc["value"]), doc.get("ts"))
            c.publish(REPLY_PREFIX + msg.topic, json.dumps(out), qos=route.qos)
        except Exception as exc:  # a naive loop still must not die on one bad message
            print(f"naive: {exc!r}", flush=True)

    def on_connect(c: paho.Client, *_a: Any) -> None:
        for f in _filters(cfg):
            c.subscribe(f, qos=1)

    client.on_message = on_message
    client.on_connect = on_connect
    client.on_subscribe = lambda *_a: ready.write_text("ready")
    stop = _wait_for_term()
    client.connect(cfg.mqtt.host, cfg.mqtt.port)
    client.loop_start()
    stop.wait()
    client.disconnect()
    client.loop_stop()


# ---------------------------------------------------------------------------------- ceiling-raw


def run_ceiling_raw(cfg: Config, ready: Path) -> None:
    import selectors

    from benchmarks import rawmqtt as raw

    m = cfg.mqtt
    qos_out = cfg.routes[0].qos
    sub = raw.open_connection(m.port, m.client_id, clean=False)
    pub = raw.open_connection(m.port, f"{m.client_id}-pub")
    for k, f in enumerate(_filters(cfg), start=1):
        sub.sendall(raw.subscribe_packet(f, 1, k))
    sub.setblocking(False)
    pub.setblocking(False)
    sel = selectors.DefaultSelector()
    sel.register(sub, selectors.EVENT_READ, "sub")
    sel.register(pub, selectors.EVENT_READ, "pub")
    sub_reader, pub_reader = raw.PacketReader(), raw.PacketReader()
    prefixes: dict[bytes, bytes] = {}
    waiting: dict[int, int] = {}  # reply mid -> reading mid (0: a QoS 0 reading)
    backlog: list[tuple[bytes, int | None, bytes]] = []  # readings beyond the window
    out_mid = 0
    unsent = {"sub": bytearray(), "pub": bytearray()}
    socks = {"sub": sub, "pub": pub}
    stop = _wait_for_term()
    subscribed = False

    def flush(name: str) -> None:
        buf = unsent[name]
        while buf:
            try:
                n = socks[name].send(buf)
            except BlockingIOError:
                select_writable(name, True)
                return
            del buf[:n]
        select_writable(name, False)

    def select_writable(name: str, on: bool) -> None:
        events = selectors.EVENT_READ | (selectors.EVENT_WRITE if on else 0)
        sel.modify(socks[name], events, name)

    def reply(topic: bytes, in_mid: int | None, payload: bytes) -> None:
        nonlocal out_mid
        out_mid = out_mid % 65535 + 1
        prefix = prefixes.get(topic)
        if prefix is None:
            prefix = prefixes[topic] = raw.topic_prefix(REPLY_PREFIX + topic.decode())
        unsent["pub"] += raw.publish_packet(prefix, payload, qos_out, out_mid)
        if qos_out:
            waiting[out_mid] = in_mid or 0
        elif in_mid:
            unsent["sub"] += raw.puback_packet(in_mid)

    while not stop.is_set():
        for key, events in sel.select(0.05):
            name = key.data
            if events & selectors.EVENT_WRITE:
                flush(name)
            if not events & selectors.EVENT_READ:
                continue
            try:
                data = socks[name].recv(1 << 20)
            except (BlockingIOError, InterruptedError):
                continue
            if not data:
                return
            if name == "sub":
                for header, body in sub_reader.feed(data):
                    kind = header >> 4
                    if kind == 3:
                        backlog.append(raw.parse_publish(header, body))
                    elif kind == 9:
                        subscribed = True
            else:
                for header, body in pub_reader.feed(data):
                    if header >> 4 == 4:
                        in_mid = waiting.pop(int.from_bytes(body[:2], "big"), 0)
                        if in_mid:
                            unsent["sub"] += raw.puback_packet(in_mid)
        room = m.max_inflight - len(waiting)
        if backlog and room > 0:
            take, backlog = backlog[:room], backlog[room:]
            for topic, in_mid, payload in take:
                reply(topic, in_mid, payload)
        for name in ("pub", "sub"):
            if unsent[name]:
                flush(name)
        if subscribed and not ready.exists():
            ready.write_text("ready")
    for s_ in (sub, pub):
        try:
            s_.setblocking(True)
            s_.sendall(b"\xe0\x00")  # DISCONNECT
            s_.close()
        except OSError:
            pass


# ---------------------------------------------------------------------------------- gmqtt


async def _gmqtt_main(cfg: Config, ready: Path) -> None:
    from gmqtt import Client, Message

    class PubClient(Client):  # type: ignore[misc]
        """Resolves a future per QoS 1 publish when its PUBACK arrives."""

        def __init__(self, *a: Any, **kw: Any) -> None:
            super().__init__(*a, **kw)
            self.waiters: dict[int, asyncio.Future[None]] = {}

        def publish_acked(self, topic: str, payload: bytes, qos: int) -> asyncio.Future[None]:
            message = Message(topic, payload, qos=qos)
            mid, package = self._connection.publish(message)
            fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            if qos > 0:
                self._persistent_storage.push_message(mid, package)
                self.waiters[mid] = fut
            else:
                fut.set_result(None)
            return fut

        def _remove_message_from_queue(self, mid: int) -> None:
            super()._remove_message_from_queue(mid)
            fut = self.waiters.pop(mid, None)
            if fut is not None and not fut.done():
                fut.set_result(None)

    m = cfg.mqtt
    qos_out = cfg.routes[0].qos
    window = asyncio.Semaphore(m.max_inflight)
    pub = PubClient(f"{m.client_id}-gmqtt-pub")
    sub = Client(
        f"{m.client_id}-gmqtt",
        clean_session=False,
        optimistic_acknowledgement=False,
        session_expiry_interval=m.session_expiry,
        receive_maximum=m.receive_maximum,
    )
    subscribed = asyncio.Event()

    async def on_message(_c: Any, topic: str, payload: bytes, qos: int, _p: Any) -> int:
        async with window:
            await pub.publish_acked(REPLY_PREFIX + topic, payload, qos_out)
        return 0  # PUBACK for the reading goes out now, after the reply's PUBACK

    def on_connect(c: Any, *_a: Any) -> None:
        for f in _filters(cfg):
            c.subscribe(f, qos=1)

    sub.on_message = on_message
    sub.on_connect = on_connect
    sub.on_subscribe = lambda *_a: subscribed.set()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGINT, stop.set)
    await pub.connect(m.host, m.port, keepalive=m.keepalive)
    await sub.connect(m.host, m.port, keepalive=m.keepalive)
    await subscribed.wait()
    ready.write_text("ready")
    await stop.wait()
    await sub.disconnect()
    await pub.disconnect()


def run_gmqtt(cfg: Config, ready: Path) -> None:
    asyncio.run(_gmqtt_main(cfg, ready))


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m benchmarks.contenders")
    p.add_argument("kind", choices=["ceiling", "ceiling-plain", "ceiling-raw", "naive", "gmqtt"])
    p.add_argument("--config", type=Path, required=True)
    p.add_argument("--ready", type=Path, required=True)
    a = p.parse_args(argv)
    cfg = load_config(a.config, env={})
    runs = {"ceiling": run_ceiling, "ceiling-plain": run_ceiling, "naive": run_naive}
    runs["gmqtt"] = run_gmqtt
    runs["ceiling-raw"] = run_ceiling_raw
    runs[a.kind](cfg, a.ready)  # ceiling-plain: the config says buffered_reads = false


if __name__ == "__main__":
    main()
