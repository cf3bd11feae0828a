"""Window models and event classification through the real CLI: train → export → evaluate."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np

from forecaster.model.bundle import Bundle

ROOT = Path(__file__).resolve().parents[2]
WATER = ROOT / "data" / "water-flow.csv"
YAHOO = ROOT / "data" / "yahoo.csv"
SEED_COMMAND = (
    "--mode window --window 10 --cell lstm --hidden 128 --task classify --label-column label "
    "--batch-size 32"
).split()


def one_line_error(proc) -> str:
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    return lines[0]


def test_window_regression(cli, tmp_path: Path) -> None:
    run, bundle, preds = tmp_path / "run", tmp_path / "bundle", tmp_path / "p.csv"
    cli(
        *("train", WATER, "--time-column", "Time", "--until", "1014", "--mode", "window"),
        *("--window", "8", "--cell", "gru", "--hidden", "12", "--epochs", "2", "--out", run, "-q"),
        check=True,
    )
    report = json.loads((run / "report.json").read_text())
    assert report["model"]["mode"] == "window" and report["warmup"] == 8
    exp = cli("export", run, "--out", bundle, check=True)
    assert "parity over 1000 windows x 8 streams" in exp.stdout
    b = Bundle.load(bundle)
    m = b.manifest
    assert (m.mode, m.window, m.task, m.window_input) == ("window", 8, "regress", "level")
    assert m.parity_max_abs_diff <= 1e-4 and m.validation is not None
    assert [i.shape for i in b.session.get_inputs()] == [["B", 8, 1]]
    ev = cli("evaluate", bundle, WATER, "--from", "1014", "--json", "--predictions", preds)
    scores = json.loads(ev.stdout)
    assert scores["n"] == 1268 - 1014
    with preds.open() as fh:
        rows = list(csv.DictReader(fh))
    # the first W-1 readings give no prediction: the first one is for row W (made on row W-1)
    assert [int(r["row"]) for r in rows] == list(range(8, 1268))
    # the graph run on one window by hand gives the same prediction
    values = np.loadtxt(WATER, delimiter=",", skiprows=1, usecols=1)
    y = b.predict_windows(values[100:108].reshape(1, 8, 1))
    assert abs(float(y[0]) - float(rows[100]["predicted"])) <= 1e-5


def test_window_classifier_bidirectional_gru(cli, tmp_path: Path) -> None:
    run, bundle = tmp_path / "run", tmp_path / "bundle"
    out = cli(
        *("train", YAHOO, "--mode", "window", "--window", "6", "--cell", "gru", "--layers", "2"),
        *("--hidden", "8", "--bidirectional", "--task", "classify", "--label-column", "label"),
        *("--horizon", "1", "--epochs", "2", "--out", run, "-q"),
        check=True,
    )
    assert "positive-class weight" in out.stdout and "ROC AUC" in out.stdout
    report = json.loads((run / "report.json").read_text())
    assert {"val_accuracy", "val_precision", "val_recall", "val_f1", "val_roc_auc"} <= set(
        report["epochs"][0]
    )
    assert report["pos_weight"] == (794 - 6) / 6  # training windows: targets at rows 6..799
    cli("export", run, "--out", bundle, check=True)
    m = Bundle.load(bundle).manifest
    assert m.bidirectional and m.horizon == 1 and m.label_column == "label"
    assert m.threshold is not None and m.validation_classification is not None
    assert m.validation is None and m.parity_max_abs_diff <= 1e-4
    scores = json.loads(cli("evaluate", bundle, YAHOO, "--json", check=True).stdout)
    assert {"accuracy", "precision", "recall", "f1", "roc_auc", "n"} <= scores.keys()
    assert scores["n"] == 1000 - 6  # windows ending at rows 5..998, each labelled by the next row


def test_seed_command_beats_majority_class(cli, tmp_path: Path) -> None:
    """The seed's configuration, fewer epochs for speed (seed 1 learns within 3)."""
    run, bundle = tmp_path / "run", tmp_path / "bundle"
    cli(
        "train",
        YAHOO,
        *SEED_COMMAND,
        "--epochs",
        "3",
        "--seed",
        "1",
        "--out",
        run,
        "-q",
        check=True,
    )
    cli("export", run, "--out", bundle, check=True)
    held_out = json.loads(cli("evaluate", bundle, YAHOO, "--from", "800", "--json").stdout)
    assert held_out["n"] == 200 and held_out["positives"] == 1
    assert held_out["roc_auc"] > 0.5  # the majority class scores every window alike: AUC 0.5


def test_bidirectional_and_classify_need_window_mode(cli) -> None:
    line = one_line_error(cli("train", WATER, "--time-column", "Time", "--bidirectional", "-q"))
    assert "--mode window" in line and "not arrived" in line
    line = one_line_error(cli("train", YAHOO, "--task", "classify", "--label-column", "label"))
    assert "--mode window" in line
