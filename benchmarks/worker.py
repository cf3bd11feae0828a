"""``python -m benchmarks.worker``: the inference worker's own cost per reading, without a broker.

The end-to-end benchmark (``benchmarks.run``) measures the daemon through mosquitto, where the
MQTT client's threads share the CPU with the worker. This one times only what the worker does
with a micro-batch, in one thread: decode each message (the codec's fast path or the reference),
step the engine, encode and hand the predictions to a publisher that only counts them. It prints
CPU microseconds per reading for each phase, so a change to one phase can be judged on its own.

The route is built as the daemon builds it: the recent-predictions cache at its default size, and
the journal (in a scratch folder; ``--no-journal`` leaves it out), so their costs are counted.

Scenarios: gateway batches of 100 readings over 1,000 streams (``batch``); single-reading
messages over 1,000 streams (``single``); one stream whose every micro-batch holds only its
readings (``one-stream``). Micro-batches are cut at ``--per-batch`` readings (the daemon's
``max_batch``, 512), never splitting a message. Every scenario runs the same number of readings.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
from prometheus_client import CollectorRegistry

from forecaster.model.bundle import Bundle
from forecaster.serve import codec, fastcodec
from forecaster.serve.config import DaemonConfig, RouteConfig
from forecaster.serve.engine import Engine
from forecaster.serve.intake import Work
from forecaster.serve.metrics import Metrics
from forecaster.serve.mqtt import Ack, Delivery, PublishResult
from forecaster.serve.responder import Responder
from forecaster.serve.routes import Route, new_store

ROOT = Path(__file__).resolve().parents[1]
MODEL = ROOT / "models" / "water-flow"
T0 = 1_700_000_000.0


class CountingPublisher:
    """Takes every publish at once, as a broker that never pushes back would."""

    def __init__(self) -> None:
        self.messages = 0

    def publish(
        self, out: Delivery, payload: bytes, qos: int, retain: bool, acks: list[Ack]
    ) -> PublishResult:
        self.messages += 1
        return PublishResult.SENT

    def ack(self, mid: int, qos: int) -> None:
        pass


def _messages(kind: str, readings: int) -> list[tuple[str, bytes]]:
    rng = np.random.default_rng(0)
    values = 10.0 + rng.standard_normal(readings)
    if kind == "batch":
        out = []
        for start in range(0, readings, 100):
            items = [
                {
                    "stream": f"s{(start + i) % 1000}",
                    "value": round(float(values[start + i]), 3),
                    "ts": T0 + start + i,
                }
                for i in range(100)
            ]
            out.append(("gateway/batch", json.dumps(items).encode()))
        return out
    streams = 1 if kind == "one-stream" else 1000
    return [
        (f"sensors/s{i % streams}/flow", b'{"value": %.3f, "ts": %.6f}' % (values[i], T0 + i))
        for i in range(readings)
    ]


def run(
    kind: str,
    decode_fn: Callable[..., codec.Decoded],
    readings: int,
    per_batch: int = 512,
    journal: Path | None = None,
) -> dict[str, float]:
    bundle = Bundle.load(MODEL)
    rc = RouteConfig.model_validate(
        {"name": "bench", "subscribe": ["sensors/+/flow", "gateway/batch"], "bundle": str(MODEL)}
    )
    # As the daemon builds a route: its recent-predictions cache, and its journal (in a
    # scratch folder; the append is timed, the snapshots its bound forces are too).
    engine = Engine(bundle, new_store(rc, bundle.state_shapes), recent=rc.recent_predictions)
    defaults = DaemonConfig()
    if journal is not None:
        engine.recover(
            journal / "bench.snapshot",
            journal / "bench.journal",
            now=T0,
            max_journal_bytes=defaults.journal_max_bytes,
        )
    route = Route(rc, engine)
    responder = Responder(CountingPublisher(), Metrics(CollectorRegistry()))
    messages = _messages(kind, readings)
    # What the run leaves for the garbage collector: collections during it, and the objects
    # still tracked after it (the recent cache's chunks, mostly), as the daemon's settings
    # (serve/gcsettings.py) would see them.
    gc.collect()
    tracked_before = len(gc.get_objects())
    collections_before = sum(g["collections"] for g in gc.get_stats())
    decode_s = respond_s = 0.0
    works: list[Work] = []
    n = pending = 0
    for mid, (topic, payload) in enumerate(messages):
        t = time.process_time()
        d = decode_fn(payload, topic, route.spec, T0 + readings)
        decode_s += time.process_time() - t
        works.append(Work(route, d.readings, d.batch, topic, mid, 1))
        n += len(d.readings)
        pending += len(d.readings)
        if pending >= per_batch:
            t = time.process_time()
            responder.respond(works)
            respond_s += time.process_time() - t
            works = []
            pending = 0
    if works:
        t = time.process_time()
        responder.respond(works)
        respond_s += time.process_time() - t
    collections = sum(g["collections"] for g in gc.get_stats()) - collections_before
    gc.collect()
    tracked = len(gc.get_objects()) - tracked_before
    return {
        "readings": n,
        "gc_collections": collections,
        "tracked_objects_left": tracked,
        "decode_us_per_reading": decode_s / n * 1e6,
        "step_and_answer_us_per_reading": respond_s / n * 1e6,
        "total_us_per_reading": (decode_s + respond_s) / n * 1e6,
    }


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--readings", type=int, default=200_000)
    p.add_argument(
        "--per-batch",
        type=int,
        default=512,
        help="readings per micro-batch (the daemon's max_batch; a message is never split)",
    )
    p.add_argument("--no-journal", action="store_true", help="step without the journal")
    p.add_argument("--out", type=Path, help="write the results as JSON here")
    a = p.parse_args(argv)
    results: dict[str, dict[str, float]] = {}
    for kind in ("batch", "single", "one-stream"):
        for name, fn in (("reference codec", codec.decode), ("fast codec", fastcodec.decode)):
            with tempfile.TemporaryDirectory(prefix="bench-worker-") as tmp:
                r = run(kind, fn, a.readings, a.per_batch, None if a.no_journal else Path(tmp))
            results[f"{kind} / {name}"] = r
            print(
                f"{kind:10s} {name:15s} decode {r['decode_us_per_reading']:6.1f}  "
                f"step+answer {r['step_and_answer_us_per_reading']:6.1f}  "
                f"total {r['total_us_per_reading']:6.1f} µs CPU per reading; "
                f"{r['gc_collections']} collections, {r['tracked_objects_left']:,} objects left "
                "tracked",
                flush=True,
            )
    load = os.getloadavg()[0]
    print(f"load average {load:.2f}")
    if a.out:
        a.out.write_text(json.dumps({"load_average": load, "results": results}, indent=1))


if __name__ == "__main__":
    main()
