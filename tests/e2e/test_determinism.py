"""Same data, seed and machine: the same ``model.onnx`` bytes, search included (issue 12)."""

from __future__ import annotations

import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
WATER = ROOT / "data" / "water-flow.csv"


def test_same_seed_same_onnx_bytes_through_the_search(cli, tmp_path: Path) -> None:
    def bundle(name: str) -> tuple[bytes, dict]:
        run, out = tmp_path / f"run-{name}", tmp_path / f"bundle-{name}"
        cli(
            *("train", WATER, "--time-column", "Time", "--until", "500"),
            *("--trials", "2", "--epochs", "2", "--seed", "3", "--out", run, "-q"),
            check=True,
        )
        cli("export", run, "--out", out, check=True)
        return (out / "model.onnx").read_bytes(), json.loads((run / "report.json").read_text())

    (a, ra), (b, rb) = bundle("a"), bundle("b")
    assert ra["search"]["trials_asked"] == 2 and len(ra["search"]["trials"]) == 2
    assert not ra["search"]["budget_hit"]
    assert [t["val_rmse"] for t in ra["search"]["trials"]] == [
        t["val_rmse"] for t in rb["search"]["trials"]
    ]
    assert a == b, "two identical training runs gave different model.onnx bytes"
