"""Hostile input against the real daemon: every class of bad reading is refused and counted per
reading under its own reason, nothing reaches the model, no traceback or numpy warning reaches
the log, and a stream publishing beside it keeps exactly its uninterrupted predictions.

The classes (docs/reliability.md, "Input limits"): lengths (stream ids near MQTT's topic limit),
ranges (1e308, 5,000-digit integers), encodings (invalid UTF-8, NUL), nesting, clocks (the year
2999, before 1970), sizes (a batch of 20,000 readings), types (booleans as numbers), repeated
keys, and batches whose bad items must cost only themselves.
"""

from __future__ import annotations

import json
import time
from collections import Counter

from .conftest import MODEL, Sink, log_text, mqtt_client, predictions, wait_until, water_items

TOL = 1e-5


def hostile(now: float) -> list[tuple[str, bytes, Counter[str]]]:
    """(topic, payload, readings refused by reason) for each hostile message."""
    long_topic = "sensors/" + "x" * 300 + "/flow"
    huge_topic = "sensors/" + "y" * 65_000 + "/flow"
    items = [
        json.dumps({"stream": "b/good1", "value": 1.0, "ts": now}),
        '{"stream": "b/nan", "value": NaN}',
        json.dumps({"stream": "b/future", "value": 1.0, "ts": 32472144000}),
        '{"stream": "b/huge", "value": 1e308}',
        json.dumps({"stream": "b/good2", "value": 2.0, "ts": now}),
        '{"stream": "b/dup", "value": 1.0, "value": 2.0}',
        json.dumps({"stream": "z" * 300, "value": 1.0}),
        '{"stream": "b/bool", "value": true}',
    ]
    batch_text = "[" + ", ".join(items) + "]"
    big = json.dumps([{"stream": f"s{i}", "value": 1.0} for i in range(20_000)]).encode()
    return [
        (long_topic, b"1.0", Counter(bad_stream=1)),
        (huge_topic, b"1.0", Counter(bad_stream=1)),
        ("sensors/enc/flow", b"\xff\xfe1", Counter(not_utf8=1)),
        ("sensors/nul/flow", b"1\x00", Counter(wrong_type=1)),
        (
            "sensors/2999/flow",
            b'{"value": 1, "ts": "2999-01-01T00:00:00Z"}',
            Counter(future_timestamp=1),
        ),
        ("sensors/1969/flow", b'{"value": 1, "ts": -5}', Counter(bad_timestamp=1)),
        ("sensors/big/flow", b'{"value": 1e308}', Counter(out_of_range=1)),
        ("sensors/big/flow", b"1e308", Counter(out_of_range=1)),
        ("sensors/digits/flow", b'{"value": ' + b"9" * 5000 + b"}", Counter(out_of_range=1)),
        ("sensors/nan/flow", b'{"value": NaN}', Counter(not_finite=1)),
        ("sensors/bool/flow", b'{"value": true}', Counter(wrong_type=1)),
        ("sensors/dup/flow", b'{"value": 1, "value": 2}', Counter(duplicate_key=1)),
        ("sensors/deep/flow", b"[" * 5000 + b"]" * 5000, Counter(too_deep=1)),
        ("sensors/empty/flow", b"", Counter(empty=1)),
        (
            "gw/a",
            batch_text.encode(),
            Counter(
                not_finite=1,
                future_timestamp=1,
                out_of_range=1,
                duplicate_key=1,
                bad_stream=1,
                wrong_type=1,
            ),
        ),
        ("gw/b", big, Counter(too_large=20_000)),
    ]


def test_hostile_input_is_counted_per_reading_and_harms_no_one(broker, daemon, reference) -> None:
    d = daemon(
        routes=[
            {"name": "water", "subscribe": ["sensors/+/flow"], "bundle": str(MODEL)},
            {"name": "gw", "subscribe": ["gw/+"], "bundle": str(MODEL), "payload": "batch"},
        ]
    )
    d.start()
    sink = Sink(broker.port)
    pub = mqtt_client(broker.port, "hostile-pub")
    pub.loop_start()
    assert wait_until(pub.is_connected, 30)
    good = water_items(streams=1)[:300]
    now = time.time()
    bad = hostile(now)
    # interleave: the bystander's readings in order, hostile messages between them
    every = len(good) // len(bad)
    infos = []
    for k, it in enumerate(good):
        topic = "sensors/good/flow"
        infos.append(pub.publish(topic, json.dumps({"value": it.value, "ts": it.ts}), qos=1))
        if k % every == 0 and k // every < len(bad):
            t, payload, _ = bad[k // every]
            infos.append(pub.publish(t, payload, qos=1))
    for info in infos:
        info.wait_for_publish(60)
    want = Counter[str]()
    for _t, _p, c in bad:
        want.update(c)
    total = sum(want.values())
    assert wait_until(
        lambda: (
            d.metric("forecaster_readings_rejected_total", default=0.0) >= total
            and len(predictions(sink.snapshot()).get("sensors/good/flow", [])) >= len(good)
        ),
        120,
    ), log_text(d)[-3000:]
    messages = sink.wait_quiet(1.0)
    for reason, n in want.items():
        got = d.metric("forecaster_readings_rejected_total", default=0.0, reason=reason)
        assert got == n, (reason, got, n)
    assert d.metric("forecaster_readings_rejected_total") == total
    # the bystander: every reading predicted exactly as without the hostile traffic
    preds = predictions(messages)
    mine = preds["sensors/good/flow"]
    assert len(mine) == len(good)
    for p in mine:
        assert abs(float(p["value"]) - reference[float(p["ts"])]) <= TOL
    # the good items of the hostile batch were predicted, and nothing else was
    assert set(preds) == {"sensors/good/flow", "b/good1", "b/good2"}
    # a stream whose first reading claimed the year 2999 is not poisoned
    pub.publish("sensors/2999/flow", json.dumps({"value": 1.0, "ts": time.time()}), qos=1)
    assert wait_until(lambda: "sensors/2999/flow" in predictions(sink.snapshot()), 60)
    log = log_text(d)
    assert "Traceback" not in log and "RuntimeWarning" not in log, log[-3000:]
    assert d.http("/healthz")[0] == 200
    pub.loop_stop()
    pub.disconnect()
    sink.close()
    assert d.stop() == 0
