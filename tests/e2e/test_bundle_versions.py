"""The bundle contract's version: format 1 bundles (no lag state) still load and run; an unknown
version is refused with one line that says what this build reads."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from forecaster.model.bundle import FORMAT_VERSION, READABLE_VERSIONS, Bundle

ROOT = Path(__file__).resolve().parents[2]
WATER = ROOT / "data" / "water-flow.csv"
V2_ONLY = ("lag_buffer", "linear", "seasonality", "interval", "fallback", "selection")


def test_version_1_loads_and_unknown_versions_are_refused(cli, tmp_path: Path) -> None:
    run, bundle = tmp_path / "run", tmp_path / "bundle"
    cli(
        *("train", WATER, "--time-column", "Time", "--until", "600", "--no-linear"),
        *("--hidden", "4", "--epochs", "1", "--out", run, "-q"),
        check=True,
    )
    cli("export", run, "--out", bundle, check=True)
    v2 = Bundle.load(bundle)
    assert v2.manifest.format_version == FORMAT_VERSION == 2 and v2.manifest.lag_buffer == 0
    x = np.full((3, 1), 100.0, dtype=np.float32)
    y2, _ = v2.step(x, v2.zero_state(3))

    # The same graph under a version-1 manifest (what format 1 wrote: none of the new fields).
    path = bundle / "model.json"
    manifest = json.loads(path.read_text())
    v1 = {k: v for k, v in manifest.items() if k not in V2_ONLY} | {"format_version": 1}
    path.write_text(json.dumps(v1))
    old = Bundle.load(bundle)
    assert 1 in READABLE_VERSIONS and old.manifest.format_version == 1 and old.interval is None
    y1, _ = old.step(x, old.zero_state(3))
    np.testing.assert_array_equal(y1, y2)

    path.write_text(json.dumps(v1 | {"format_version": 3}))
    proc = cli("inspect", bundle)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr
    assert "format_version 3 is not supported (this build reads 1 and 2)" in lines[0]
