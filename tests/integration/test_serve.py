"""The daemon against a real mosquitto: parity with evaluate, restarts, hostile input, reload."""

from __future__ import annotations

import json
import shutil
import signal
import time
from pathlib import Path

import numpy as np

from forecaster.data import load_csv
from forecaster.replay import connect, plan, replay

from .conftest import MODEL, ROOT, Collector

WATER = ROOT / "data" / "water-flow.csv"
HOLDOUT = 1014


def publish(
    port: int,
    fmt: str = "json",
    streams: int = 1,
    start: str | None = None,
    stop: str | None = None,
    qos: int = 1,
) -> int:
    data = load_csv(WATER, time_column="Time")
    items = plan(data, "sensors/{stream}/flow", streams, start, stop)
    client = connect("127.0.0.1", port)
    try:
        return replay(client, items, fmt, qos, rate=0)  # type: ignore[arg-type]
    finally:
        client.loop_stop()
        client.disconnect()


def by_stream(messages: list[tuple[str, bytes]]) -> dict[str, list[dict]]:
    out: dict[str, list[dict]] = {}
    for _topic, payload in messages:
        doc = json.loads(payload)
        for p in doc if isinstance(doc, list) else [doc]:
            out.setdefault(p["stream"], []).append(p)
    return out


def assert_matches(preds: list[dict], reference: dict[float, float], n: int) -> None:
    """Every one of the ``n`` predictions equals the reference made on the same reading."""
    assert len(preds) == n, f"{len(preds)} predictions for {n} readings"
    ts = [p["ts"] for p in preds]
    assert ts == sorted(ts), "predictions out of order"
    unmatched = [t for t in ts if t not in reference]
    assert unmatched == [], f"{len(unmatched)} predictions with no reference: {unmatched[:5]}"
    got = np.array([p["value"] for p in preds])
    want = np.array([reference[t] for t in ts])
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-5)


def test_daemon_equals_evaluate(broker, daemon_factory, reference) -> None:
    d = daemon_factory()
    d.start()
    sub = Collector(broker.port)
    n = publish(broker.port)
    msgs = sub.wait_for(n)
    streams = by_stream(msgs)
    assert list(streams) == ["sensors/s0/flow"]
    assert_matches(streams["sensors/s0/flow"], reference, n)
    warm = [p["warm"] for p in streams["sensors/s0/flow"]]
    manifest = json.loads((MODEL / "model.json").read_text())
    assert warm.index(True) == manifest["warmup"] - 1
    assert d.wait_metric("forecaster_predictions_total", n, route="water") == n
    assert d.metric("forecaster_readings_total", route="water") == n
    assert d.stop() == 0
    sub.close()


def test_100_interleaved_streams_and_batches(broker, daemon_factory, reference) -> None:
    d = daemon_factory(max_batch=512)
    d.start()
    sub = Collector(broker.port)
    n = publish(broker.port, streams=100, stop="300")
    msgs = sub.wait_for(n)
    streams = by_stream(msgs)
    assert len(streams) == 100
    for preds in streams.values():
        assert_matches(preds, reference, 300)
    assert d.metric("forecaster_batch_size_count") < n  # readings were batched
    # gateway batches: a batch in gives a batch out; the stream ids come from the payload
    # ("s0".."s9"), so these are new streams, starting from a zero state like the reference
    before = len(sub)
    m = publish(broker.port, fmt="batch", streams=10, stop="100")
    msgs = sub.wait_for(before + m // 100)[before:]
    assert all(isinstance(json.loads(p), list) for _, p in msgs)
    got = by_stream(msgs)
    assert sorted(got) == [f"s{i}" for i in range(10)]
    assert sum(len(v) for v in got.values()) == m
    for preds in got.values():
        np.testing.assert_allclose(
            [p["value"] for p in preds], [reference[p["ts"]] for p in preds], rtol=0, atol=1e-5
        )
    assert d.stop() == 0
    sub.close()


def test_restart_loses_nothing_and_duplicates_nothing(broker, daemon_factory, reference) -> None:
    d = daemon_factory()
    d.start()
    sub = Collector(broker.port)
    n1 = publish(broker.port, stop="500")
    sub.wait_for(n1)
    t0 = time.monotonic()
    assert d.stop(signal.SIGTERM) == 0
    # promptly, well inside systemd's stop timeout, even on a busy machine
    assert time.monotonic() - t0 < 30
    # readings published while the daemon is down are queued by the broker (persistent session)
    n2 = publish(broker.port, start="500")
    d.start()
    sub.wait_for(n1 + n2)
    msgs = sub.wait_quiet(1.0)  # a duplicate, if any, would arrive meanwhile
    streams = by_stream(msgs)
    assert_matches(streams["sensors/s0/flow"], reference, n1 + n2)
    assert d.metric("forecaster_snapshot_restores_total", result="ok") == 1
    assert d.stop() == 0
    sub.close()


def test_hostile_input_leaves_valid_streams_unchanged(broker, daemon_factory, reference) -> None:
    d = daemon_factory()
    d.start()
    sub = Collector(broker.port)
    bad = [
        ("sensors/evil/flow", b"NaN"),
        ("sensors/evil/flow", b'{"value": NaN}'),
        ("sensors/evil/flow", b'{"value": Infinity}'),
        ("sensors/evil/flow", b"\xff\xfe"),
        ("sensors/evil/flow", b"[" * 5000 + b"]" * 5000),
        ("sensors/evil/flow", b'{"v": 1}'),
        ("sensors/evil/flow", b'{"value": "12"}'),
        ("sensors/evil/flow", b"x" * 70000),
        ("sensors/evil/flow", b'{"value": 1, "ts": "yesterday"}'),
        ("sensors/evil/flow", b""),
        ("gateway/batch", b'[{"value": 1}]'),
        ("sensors/evil/flow", b"1" * 5000),
    ]
    client = connect("127.0.0.1", broker.port)
    data = load_csv(WATER, time_column="Time")
    items = plan(data, "sensors/{stream}/flow", 1, None, "400")
    for k, it in enumerate(items):
        client.publish(it.topic, json.dumps({"value": it.value, "ts": it.ts}), qos=1)
        if k % 30 == 0:
            topic, payload = bad[(k // 30) % len(bad)]
            client.publish(topic, payload, qos=1).wait_for_publish(5)
    client.loop_stop()
    client.disconnect()
    sub.wait_for(len(items))
    # anything extra (a prediction for a bad reading) would arrive meanwhile
    streams = by_stream(sub.wait_quiet(1.0))
    assert list(streams) == ["sensors/s0/flow"]
    assert_matches(streams["sensors/s0/flow"], reference, len(items))
    rejected = d.wait_metric("forecaster_readings_rejected_total", 12)
    assert rejected >= 12
    for reason in (
        "not_finite",
        "not_utf8",
        "too_deep",
        "missing_key",
        "wrong_type",
        "too_large",
        "bad_timestamp",
        "empty",
    ):
        assert d.metric("forecaster_readings_rejected_total", reason=reason) >= 1, reason
    assert d.http("/healthz")[0] == 200
    assert d.stop() == 0
    sub.close()


def test_reload_with_corrupt_bundle_keeps_serving(broker, daemon_factory, tmp_path: Path) -> None:
    live = tmp_path / "live-bundle"
    shutil.copytree(MODEL, live)
    d = daemon_factory(bundle=live)
    d.start()
    sub = Collector(broker.port)
    (live / "model.onnx").write_bytes(b"corrupt")
    assert d.proc is not None
    d.proc.send_signal(signal.SIGHUP)
    assert d.wait_metric("forecaster_reloads_total", 1, result="failed") == 1
    n = publish(broker.port, stop="50")
    assert len(sub.wait_for(n)) == n
    assert d.metric("forecaster_model_info", route="water", name="water-flow") == 1
    assert d.stop() == 0
    sub.close()
