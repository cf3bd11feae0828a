"""The bundle contract's version: format 3 (the sequence graph) is what export writes; format 2
(the one-step graph) and format 1 (2 without the lag state) still load and run, one reading per
call; an unknown version is refused with one line that says what this build reads."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from forecaster.model.bundle import FORMAT_VERSION, READABLE_VERSIONS, Bundle
from forecaster.serve.codec import Reading
from forecaster.serve.engine import Engine
from forecaster.serve.state import StateStore
from forecaster.training.export import export

ROOT = Path(__file__).resolve().parents[2]
WATER = ROOT / "data" / "water-flow.csv"
V2_ONLY = ("lag_buffer", "linear", "seasonality", "interval", "fallback", "selection")


def test_old_versions_load_and_unknown_versions_are_refused(cli, tmp_path: Path) -> None:
    run, bundle, step = tmp_path / "run", tmp_path / "bundle", tmp_path / "step"
    cli(
        *("train", WATER, "--time-column", "Time", "--until", "600", "--no-linear"),
        *("--hidden", "4", "--epochs", "1", "--out", run, "-q"),
        check=True,
    )
    cli("export", run, "--out", bundle, check=True)
    v3 = Bundle.load(bundle)
    assert v3.manifest.format_version == FORMAT_VERSION == 3 and READABLE_VERSIONS == (1, 2, 3)
    assert v3.sequence and v3.manifest.graph == "sequence"
    x = np.full((3, 1), 100.0, dtype=np.float32)
    y3, _ = v3.step(x, v3.zero_state(3))

    # The one-step graph under format 2, as this build exported it before format 3.
    manifest, _ = export(run, step, graph="step")
    assert manifest.format_version == 2 and manifest.graph is None
    v2 = Bundle.load(step)
    assert not v2.sequence and v2.manifest.graph_kind == "step"
    y2, _ = v2.step(x, v2.zero_state(3))
    np.testing.assert_allclose(y2, y3, rtol=0, atol=1e-5)
    # The daemon serves it in waves, as before, with the same predictions.
    readings = [Reading("a", 100.0 + k, float(k), 0.0, "a") for k in range(5)]
    got = []
    for b in (v2, v3):
        out = Engine(b, StateStore(b.state_shapes, 10)).step(readings, now=0.0)
        got.append([p.value for p in out.predictions if p is not None])
        assert len(out.calls) == (5 if b is v2 else 1)
    np.testing.assert_allclose(got[0], got[1], rtol=0, atol=1e-5)

    # The same one-step graph under a version-1 manifest (none of the format-2 fields).
    path = step / "model.json"
    raw = json.loads(path.read_text())
    v1 = {k: v for k, v in raw.items() if k not in V2_ONLY} | {"format_version": 1}
    path.write_text(json.dumps(v1))
    old = Bundle.load(step)
    assert old.manifest.format_version == 1 and old.interval is None
    y1, _ = old.step(x, old.zero_state(3))
    np.testing.assert_array_equal(y1, y2)

    path.write_text(json.dumps(v1 | {"format_version": 4}))
    proc = cli("inspect", step)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr
    assert "format_version 4 is not supported (this build reads 1, 2 and 3)" in lines[0]
