"""The benchmark harness runs end to end (smallest scenario, forecaster only, ~15 s).

Checks the shape of the result file and that something flowed; never a speed target (those are
for benchmarks/, on a quiet machine, not for the test suite).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from forecaster.harness import mosquitto_binary

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.broker
def test_quick_scenario_writes_a_result(tmp_path: Path) -> None:
    mosquitto_binary()  # a one-line error saying how to install it when it is missing
    out = tmp_path / "result.json"
    cmd = [sys.executable, "-m", "benchmarks.run", "--scenarios", "single-q1-1k"]
    cmd += ["--contenders", "forecaster", "--duration", "1.5", "--max-trials", "1"]
    cmd += ["--no-latency", "--no-report", "--out", str(out)]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr

    report = json.loads(out.read_text())
    assert {"command", "machine", "settings", "scenarios", "targets"} <= set(report)
    assert report["machine"]["cores"] >= 1
    scenario = report["scenarios"]["single-q1-1k"]
    assert {"mode", "qos", "streams", "model", "contenders", "ratios"} <= set(scenario)
    fc = scenario["contenders"]["forecaster"]
    assert "error" not in fc, fc
    assert {
        "probe_readings_per_s",
        "sustained_readings_per_s",
        "cpu_s_per_million",
        "peak_rss_kb",
        "trials",
    } <= set(fc)
    assert fc["probe_readings_per_s"] > 0
    probe = fc["trials"][0]
    assert probe["kind"] == "probe"
    assert probe["received"] > 0
    assert probe["lost"] == 0
    assert fc["peak_rss_kb"] > 0
