"""The seed's event classifier (a window LSTM) served over a real mosquitto, equal to evaluate."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import numpy as np

from forecaster.replay import connect

from .conftest import ROOT, Collector

YAHOO_MODEL = ROOT / "models" / "yahoo-anomaly"
YAHOO = ROOT / "data" / "yahoo.csv"


def evaluate_predictions(tmp_path: Path) -> dict[int, tuple[float, int, int]]:
    """``forecaster evaluate --predictions``: reading row -> (probability, event, label)."""
    out = tmp_path / "p.csv"
    subprocess.run(
        [
            *(sys.executable, "-m", "forecaster", "evaluate", str(YAHOO_MODEL), str(YAHOO)),
            *("--predictions", str(out)),
        ],
        check=True,
        capture_output=True,
        cwd=ROOT,
    )
    with out.open() as fh:
        return {
            int(r["made_row"]): (float(r["probability"]), int(r["event"]), int(r["label"]))
            for r in csv.DictReader(fh)
        }


def test_classifier_served_equals_evaluate(broker, daemon_factory, tmp_path: Path) -> None:
    manifest = json.loads((YAHOO_MODEL / "model.json").read_text())
    window, threshold = manifest["window"], manifest["threshold"]
    reference = evaluate_predictions(tmp_path)
    d = daemon_factory(bundle=YAHOO_MODEL)
    d.start()
    sub = Collector(broker.port)
    rows = np.loadtxt(YAHOO, delimiter=",", skiprows=1)
    client = connect("127.0.0.1", broker.port)
    for i, (value, label) in enumerate(rows):
        # the row index is the event time; every reading carries its label
        payload = {"value": float(value), "ts": float(i), "label": int(label)}
        client.publish("sensors/s0/flow", json.dumps(payload), qos=1)
    client.loop_stop()
    client.disconnect()
    n = len(rows) - (window - 1)  # the first W-1 readings only fill the window
    msgs = sub.wait_for(n)
    preds = [json.loads(p) for _, p in msgs]
    assert len(preds) == n == len(reference)
    got_rows = [int(p["ts"]) for p in preds]
    assert got_rows == list(range(window - 1, len(rows)))
    for p in preds:
        prob, event, _ = reference[int(p["ts"])]
        assert p["probability"] == p["value"]
        assert abs(p["probability"] - prob) <= 1e-5
        assert p["event"] is (p["probability"] >= threshold)
        assert int(p["event"]) == event
        assert p["warm"] is True
    # labels in the payloads: every prediction judged once, as evaluate counts them
    assert d.wait_metric("forecaster_predictions_total", n, route="water") == n
    want = {"tp": 0, "fp": 0, "tn": 0, "fn": 0}
    for _prob, event, label in reference.values():
        want[("t" if bool(event) == bool(label) else "f") + ("p" if event else "n")] += 1
    for outcome, count in want.items():
        got = d.metric("forecaster_events_total", default=0.0, route="water", outcome=outcome)
        assert got == count, outcome
    assert want["tp"] >= 1  # the held-out spike is caught
    # classify skips the regression error histograms; nothing was dropped
    assert d.metric("forecaster_prediction_abs_error_count", default=0.0) == 0
    assert d.metric("forecaster_readings_rejected_total", default=0.0) == 0
    assert d.stop() == 0
    sub.close()
