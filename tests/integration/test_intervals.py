"""Prediction intervals end to end: the daemon's MQTT bounds equal ``evaluate``'s (≤ 1e-5), and
its live coverage counters agree with evaluate's own predictions reading for reading.

The bundle is the shipped water-flow model with an interval in its manifest: the one training
calibrated, or, for a bundle exported before intervals existed, fixed offsets written in (the
manifest's sha256 covers the ONNX file only, and the offsets are what the daemon must apply).
Asymmetric offsets, so a swapped or negated bound cannot pass. The same bundle runs a second time
with an interval that follows each stream's spread (offsets in spread units): its bounds change
width from reading to reading, and must still equal evaluate's; and a third time with readings
far from their prediction clipped (model/clip.py: water-flow's outage and spikes are), where
every prediction after a clipped reading depends on it.
"""

from __future__ import annotations

import csv
import json
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from forecaster.data import load_csv
from tests.conftest import run_cli

from .conftest import MODEL, ROOT, Broker, Collector, DaemonProcess
from .test_serve import by_stream, publish

WATER = ROOT / "data" / "water-flow.csv"
OFFSETS = {"coverage": 0.9, "lower": -0.3, "upper": 0.45, "n": 203}
#: Offsets in units of the stream's spread (water-flow's typical change is about 1 l/s).
SCALED = {**OFFSETS, "lower": -1.1, "upper": 1.6, "spread_weight": 2 / 9, "spread_start": 0.7}


@pytest.fixture(scope="module", params=["constant", "scaled", "clipped"])
def interval_bundle(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Path:
    out = tmp_path_factory.mktemp("interval") / "water-flow"
    shutil.copytree(MODEL, out)
    manifest = json.loads((out / "model.json").read_text())
    if request.param in ("scaled", "clipped"):
        manifest["interval"] = SCALED
        manifest["clip"] = 3.0 if request.param == "clipped" else None
    elif manifest.get("interval") is None:
        manifest["interval"] = OFFSETS
    (out / "model.json").write_text(json.dumps(manifest, indent=2))
    return out


@pytest.fixture(scope="module")
def evaluated(interval_bundle: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[float, dict]:
    """evaluate's prediction for each reading (keyed by the time of the reading it was made on),
    with its bounds, the actual value it predicts and its warm flag."""
    out = tmp_path_factory.mktemp("interval-ref") / "p.csv"
    run_cli("evaluate", interval_bundle, WATER, "--predictions", out, check=True)
    times = load_csv(WATER, time_column="Time").series[0].times
    assert times is not None
    with out.open() as fh:
        rows = list(csv.DictReader(fh))
    assert rows and rows[0]["lower"] != "", "evaluate wrote no bounds for a bundle with an interval"
    return {
        float(times[int(r["row"]) - 1]): {
            k: float(r[k]) for k in ("predicted", "lower", "upper", "actual", "warm")
        }
        for r in rows
    }


def test_daemon_bounds_equal_evaluate_and_live_coverage_counts_match(
    broker: Broker,
    daemon_factory: Callable[..., DaemonProcess],
    interval_bundle: Path,
    evaluated: dict[float, dict],
) -> None:
    interval = json.loads((interval_bundle / "model.json").read_text())["interval"]
    d = daemon_factory(interval_bundle)
    d.start()
    sub = Collector(broker.port)
    n = publish(broker.port)
    preds = by_stream(sub.wait_for(n))["sensors/s0/flow"]
    assert len(preds) == n
    assert all("lower" in p and "upper" in p for p in preds), preds[0]

    listed = [p for p in preds if p["ts"] in evaluated]
    # The prediction made on the last reading predicts a row that does not exist: evaluate
    # cannot list it. Every other one is listed.
    assert len(listed) == n - 1
    for key, column in (("value", "predicted"), ("lower", "lower"), ("upper", "upper")):
        got = np.array([p[key] for p in listed])
        want = np.array([evaluated[p["ts"]][column] for p in listed])
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-5, err_msg=key)
    last = preds[-1]
    width = np.array([p["upper"] - p["lower"] for p in preds])
    if "spread_weight" not in interval:
        assert last["lower"] == pytest.approx(last["value"] + interval["lower"], abs=1e-9)
        assert last["upper"] == pytest.approx(last["value"] + interval["upper"], abs=1e-9)
        assert np.ptp(width) < 1e-6
    else:
        # The width follows the stream: at least the floor, and far from constant.
        unit = width / (interval["upper"] - interval["lower"])
        assert unit.min() >= 0.1 * interval["spread_start"] - 1e-9, unit.min()
        assert unit.max() > 2 * unit.min(), (unit.min(), unit.max())

    # Live coverage: each reading that resolved a warm prediction is inside or outside its
    # bounds, exactly as evaluate's listing says.
    warm = [e for e in evaluated.values() if e["warm"] == 1]
    inside = sum(1 for e in warm if e["lower"] <= e["actual"] <= e["upper"])
    assert 0 < inside < len(warm), "the offsets should leave readings on both sides"
    total = d.wait_metric("forecaster_interval_checks_total", len(warm), route="water")
    assert total == len(warm)
    assert d.metric("forecaster_interval_checks_total", route="water", outcome="inside") == inside
    target = d.metric("forecaster_interval_coverage_target", route="water")
    assert target == pytest.approx(interval["coverage"])
    clipped = d.metric("forecaster_readings_clipped_total", default=0.0, route="water")
    if json.loads((interval_bundle / "model.json").read_text()).get("clip") is None:
        assert not clipped
    else:
        assert clipped and clipped > 5, clipped
    assert d.stop() == 0
    sub.close()
