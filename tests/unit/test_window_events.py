"""Event scores (ROC AUC against hand-worked examples), the window buffers and the window Engine."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from prometheus_client import CollectorRegistry

from forecaster.errors import DataError
from forecaster.model.bundle import Bundle
from forecaster.model.classify import choose_threshold, positive_weight, roc_auc, score_events
from forecaster.model.windows import windows
from forecaster.serve.codec import PayloadSpec, Prediction, Reading, decode, encode_predictions
from forecaster.serve.engine import Engine
from forecaster.serve.metrics import Metrics
from forecaster.serve.state import StateStore
from forecaster.serve.window import as_batch, push, window_store

ROOT = Path(__file__).resolve().parents[2]
YAHOO_MODEL = ROOT / "models" / "yahoo-anomaly"


def test_roc_auc_hand_computed() -> None:
    # 2 positives x 2 negatives = 4 pairs; positive 0.35 is below negative 0.4: 3/4 ranked right.
    assert roc_auc(np.array([0, 0, 1, 1]), np.array([0.1, 0.4, 0.35, 0.8])) == 0.75
    # A tie between a positive and a negative counts one half: pairs (0.5 vs 0.5) = 0.5,
    # (0.5 vs 0.2) = 1, (0.9 vs 0.5) = 1, (0.9 vs 0.2) = 1 -> 3.5 / 4.
    assert roc_auc(np.array([1, 0, 1, 0]), np.array([0.5, 0.5, 0.9, 0.2])) == 0.875
    assert roc_auc(np.array([0, 1]), np.array([0.9, 0.1])) == 0.0
    assert roc_auc(np.array([1, 1, 0]), np.array([0.3, 0.3, 0.3])) == 0.5
    assert math.isnan(roc_auc(np.array([0, 0]), np.array([0.1, 0.2])))


def test_scores_at_a_threshold() -> None:
    labels = np.array([1, 1, 0, 0, 0, 1])
    probs = np.array([0.9, 0.4, 0.6, 0.1, 0.2, 0.7])
    sc = score_events(labels, probs, 0.5)  # flagged: 0.9 (tp), 0.6 (fp), 0.7 (tp); 0.4 is a fn
    assert (sc.accuracy, sc.precision, sc.recall) == (4 / 6, 2 / 3, 2 / 3)
    assert sc.f1 == pytest.approx(2 / 3) and sc.n == 6 and sc.positives == 3
    assert sc.roc_auc == pytest.approx(8 / 9)  # only 0.4 < 0.6 is mis-ordered among 9 pairs
    nothing = score_events(np.array([0, 1]), np.array([0.1, 0.2]), 0.5)
    assert (nothing.precision, nothing.recall, nothing.f1) == (0.0, 0.0, 0.0)
    with pytest.raises(DataError):
        score_events(np.array([]), np.array([]), 0.5)


def test_threshold_best_f1_between_probabilities() -> None:
    labels = np.array([0, 1, 0, 1, 0])
    probs = np.array([0.1, 0.8, 0.3, 0.6, 0.5])
    t = choose_threshold(labels, probs)
    assert t == pytest.approx(0.55)  # flags exactly the two positives (F1 = 1)
    assert choose_threshold(np.array([0, 0]), np.array([0.2, 0.4])) == 0.5  # no positive
    assert positive_weight(np.array([0, 0, 0, 1])) == 3.0
    with pytest.raises(DataError, match="no positive"):
        positive_weight(np.array([0, 0]))


def test_windows_and_rolling_buffer() -> None:
    v = np.arange(5.0)
    w = windows(v, 3)
    assert w.shape == (3, 3, 1) and w[:, :, 0].tolist() == [[0, 1, 2], [1, 2, 3], [2, 3, 4]]
    assert windows(v, 6).shape == (0, 6, 1)
    buf = np.zeros((3, 2, 1), dtype=np.float32)  # [W, B, F]
    for x in (1.0, 2.0, 3.0, 4.0):
        buf = push(buf, np.array([[x], [10 * x]], dtype=np.float32))
    assert as_batch(buf)[:, :, 0].tolist() == [[2, 3, 4], [20, 30, 40]]
    assert as_batch(buf).flags.c_contiguous


def test_window_store_is_a_state_store(tmp_path: Path) -> None:
    store = window_store(4, 1, max_streams=2)
    assert store.shapes == ((4, 1),)
    slot, _ = store.acquire("a", 0.0)
    slots = np.array([slot])
    (buf,) = store.gather(slots)
    store.scatter(slots, [push(buf, np.array([[7.0]], dtype=np.float32))])
    store.record(slots, np.array([1.0]), np.array([7.0]), np.array([np.nan]), 0.0)
    path = tmp_path / "w.npz"
    store.snapshot(path, "sha")
    back = StateStore.restore(path, "sha", [(4, 1)], 2)
    assert back.gather(np.array([back.slot_of("a")]))[0][:, 0, 0].tolist() == [0, 0, 0, 7]
    store.acquire("b", 1.0)
    _, evicted = store.acquire("c", 2.0)
    assert evicted == "a"  # LRU cap applies to buffers as to states


def reading(i: int, value: float, stream: str = "s", label: float | None = None) -> Reading:
    return Reading(stream, value, float(i), 0.0, "t", label)


def test_engine_window_path_matches_the_graph() -> None:
    bundle = Bundle.load(YAHOO_MODEL)
    m = bundle.manifest
    w = bundle.window
    store = StateStore(bundle.state_shapes, 100)
    engine = Engine(bundle, store)
    values = np.loadtxt(ROOT / "data" / "yahoo.csv", delimiter=",", skiprows=1)[:, 0][:30]
    got: list[Prediction | None] = []
    for i in range(0, 30, 7):  # several readings of one stream per call: one wave each
        batch = [reading(k, values[k], label=0.0) for k in range(i, min(i + 7, 30))]
        batch += [reading(k, values[k], "other") for k in range(i, min(i + 7, 30))]
        out = engine.step(batch, float(i))
        assert not any(out.drops.values()) and not out.abs_err
        got += out.predictions[: len(batch) // 2]
    assert got[: w - 1] == [None] * (w - 1)  # filling the buffer: no prediction, no error
    want = bundle.predict_windows(windows(values.astype(np.float32), w))
    probs = [p.probability for p in got[w - 1 :] if p is not None]
    np.testing.assert_allclose(probs, want, rtol=0, atol=1e-6)
    for p in got[w - 1 :]:
        assert p is not None and p.warm and p.value == p.probability
        assert p.event == (p.value >= (m.threshold or 0))
    # a gap reset empties the buffer: W-1 more readings before the next prediction
    store2 = StateStore(bundle.state_shapes, 10, reset_after=5.0)
    e2 = Engine(bundle, store2)
    for k in range(w):
        e2.step([reading(k, values[k])], 0.0)
    out = e2.step([reading(100, values[w])], 0.0)
    assert out.resets["gap"] == 1 and out.predictions == [None]


def test_engine_counts_labelled_events() -> None:
    bundle = Bundle.load(YAHOO_MODEL)
    engine = Engine(bundle, StateStore(bundle.state_shapes, 10))
    values = np.loadtxt(ROOT / "data" / "yahoo.csv", delimiter=",", skiprows=1)[:, 0]
    threshold = bundle.manifest.threshold or 0
    out = engine.step([reading(k, values[k], label=1.0) for k in range(12)], 0.0)
    events = [p.event for p in out.predictions if p is not None]
    assert len(events) == 3
    assert out.events["tp"] == sum(events) and out.events["fn"] == 3 - sum(events)
    assert all(isinstance(e, bool) for e in events) and threshold > 0
    registry = CollectorRegistry()
    metrics = Metrics(registry)
    metrics.count_events("r", dict(out.events))
    total = sum(
        registry.get_sample_value("forecaster_events_total", {"route": "r", "outcome": o}) or 0
        for o in ("tp", "fp", "tn", "fn")
    )
    assert total == 3
    with pytest.raises(ValueError, match="outcome"):
        metrics.count_events("r", {"maybe": 1})


def test_codec_label_and_event_fields() -> None:
    spec = PayloadSpec()
    d = decode(b'{"value": 1.5, "ts": 3, "label": 1}', "t", spec, 0.0)
    assert d.readings[0].label == 1.0
    assert decode(b'{"value": 1.5}', "t", spec, 0.0).readings[0].label is None
    for bad in (
        b'{"value": 1, "label": 2}',
        b'{"value": 1, "label": true}',
        b'{"value": 1, "label": "1"}',
    ):
        assert decode(bad, "t", spec, 0.0).rejects[0][0].value == "wrong_type"
    plain = json.loads(encode_predictions([Prediction("s", 1.0, 2.0, True)], "m", "1", False))
    assert "probability" not in plain and "event" not in plain
    ev = json.loads(
        encode_predictions([Prediction("s", 1.0, 0.75, True, 0.75, True)], "m", "1", False)
    )
    assert ev["probability"] == 0.75 and ev["event"] is True
