"""train → export → evaluate on the real water-flow series, through the real CLI."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest

from forecaster.model.bundle import Bundle

ROOT = Path(__file__).resolve().parents[2]
WATER = ROOT / "data" / "water-flow.csv"


def sigmoid(z: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-z))


def reference_line(coef: np.ndarray, bias: float, values: np.ndarray) -> np.ndarray:
    """The linear path written from its documented formula with a plain Python buffer: the
    buffer starts full of the first reading, then each reading is pushed in front."""
    out = np.empty(len(values))
    buf = [float(values[0])] * len(coef)
    for t, v in enumerate(values):
        buf = [float(v), *buf[:-1]]
        out[t] = v + bias + coef[0] * v + sum(coef[k] * (buf[k] - v) for k in range(1, len(coef)))
    return out


def reference_unroll(run: Path, values: np.ndarray) -> np.ndarray:
    """An independent float64 numpy LSTM/GRU built from the saved weights and PyTorch's published
    gate equations, plus the linear path: it shares no code with forecaster's model or graph."""
    report = json.loads((run / "report.json").read_text())
    spec = report["model"]
    w = dict(np.load(run / "weights.npz", allow_pickle=False))
    line = (
        reference_line(w["ar_coef"].astype(np.float64), float(w["ar_bias"]), values)
        if spec["ar_coef"]
        else values
    )
    layers, hidden = spec["layers"], spec["hidden"]
    h = np.zeros((layers, hidden))
    c = np.zeros((layers, hidden))
    out = np.empty(len(values))
    for t, v in enumerate(values):
        inp = np.array([(v - spec["mean"][0]) / spec["std"][0]])
        for k in range(layers):
            gi = w[f"rnn.weight_ih_l{k}"] @ inp + w[f"rnn.bias_ih_l{k}"]
            gh = w[f"rnn.weight_hh_l{k}"] @ h[k] + w[f"rnn.bias_hh_l{k}"]
            if spec["cell"] == "lstm":
                i, f, g, o = np.split(gi + gh, 4)
                c[k] = sigmoid(f) * c[k] + sigmoid(i) * np.tanh(g)
                h[k] = sigmoid(o) * np.tanh(c[k])
            else:
                ir, iz, in_ = np.split(gi, 3)
                hr, hz, hn = np.split(gh, 3)
                r, z = sigmoid(ir + hr), sigmoid(iz + hz)
                n = np.tanh(in_ + r * hn)
                h[k] = (1 - z) * n + z * h[k]
            inp = h[k]
        o_ = float(w["head.weight"][0] @ h[-1] + w["head.bias"][0])
        out[t] = (
            line[t] + o_ * spec["delta_scale"]
            if spec["head"] == "delta"
            else (spec["mean"][0] + o_ * spec["std"][0])
        )
    return out


# Two of the four cell/depth pairs run by default (the bundled LSTM 2-layer and a 1-layer GRU);
# the other two under `make test-all`, to keep the default suite within CI's time.
@pytest.mark.parametrize(
    ("cell", "layers"),
    [
        pytest.param("lstm", 1, marks=pytest.mark.slow),
        ("lstm", 2),
        ("gru", 1),
        pytest.param("gru", 2, marks=pytest.mark.slow),
    ],
)
def test_train_export_evaluate(cli, tmp_path: Path, cell: str, layers: int) -> None:
    run, bundle, preds = tmp_path / "run", tmp_path / "bundle", tmp_path / "p.csv"
    cli(
        "train",
        WATER,
        "--time-column",
        "Time",
        "--until",
        "1014",
        "--cell",
        cell,
        "--layers",
        str(layers),
        "--hidden",
        "12",
        "--epochs",
        "2",
        "--bptt",
        "32",
        "--out",
        run,
        "-q",
        check=True,
    )
    report = json.loads((run / "report.json").read_text())
    # epoch 0 is the untrained hybrid (the linear path alone); then the two trained epochs
    assert [e["epoch"] for e in report["epochs"]] == [0, 1, 2] and report["model"]["cell"] == cell
    assert report["search"] is None  # --cell given: that model, no search
    assert (run / "loss.png").stat().st_size > 1000
    exp = cli("export", run, "--out", bundle, check=True)
    assert "parity over 1000 steps x 8 streams" in exp.stdout
    m = Bundle.load(bundle).manifest
    assert m.cell == cell and m.layers == layers and m.parity_max_abs_diff <= 1e-4
    assert m.format_version == 3 and m.lag_buffer == len(report["model"]["ar_coef"])
    assert m.graph == "sequence"
    assert m.interval is not None and m.interval.lower <= 0 <= m.interval.upper
    ev = cli(
        "evaluate", bundle, WATER, "--from", "1014", "--json", "--predictions", preds, check=True
    )
    scores = json.loads(ev.stdout)
    assert {"rmse", "mae", "mase", "naive_rmse", "n"} <= scores.keys()
    assert scores["n"] == 1268 - 1014
    # evaluate's ONNX stepping equals an independent full-sequence unroll of the same weights
    with preds.open() as fh:
        rows = list(csv.DictReader(fh))
    got = np.array([float(r["predicted"]) for r in rows])
    values = np.loadtxt(WATER, delimiter=",", skiprows=1, usecols=1)
    ref = reference_unroll(run, values)
    assert len(got) == len(values) - 1
    np.testing.assert_allclose(got, ref[:-1], rtol=0, atol=2e-4)
    assert [int(r["row"]) for r in rows] == list(range(1, 1268))


@pytest.mark.slow  # the default suite checks determinism through the search (test_determinism)
def test_same_seed_same_weights(cli, tmp_path: Path) -> None:
    def weights(seed: int, out: Path) -> dict[str, np.ndarray]:
        cli(
            "train",
            WATER,
            "--time-column",
            "Time",
            "--hidden",
            "8",
            "--epochs",
            "1",
            "--seed",
            str(seed),
            "--out",
            out,
            "-q",
            check=True,
        )
        return dict(np.load(out / "weights.npz"))

    a, b, c = weights(7, tmp_path / "a"), weights(7, tmp_path / "b"), weights(8, tmp_path / "c")
    assert a.keys() == b.keys()
    assert all(np.array_equal(a[k], b[k]) for k in a)
    assert not all(np.array_equal(a[k], c[k]) for k in a)


def test_evaluate_plot_and_inspect(cli, tiny_bundle: Path, tmp_path: Path) -> None:
    png = tmp_path / "p.png"
    cli(
        "evaluate",
        tiny_bundle,
        WATER,
        "--from",
        "2022-05-02T00:00:00+02:00",
        "--plot",
        png,
        check=True,
    )
    assert png.read_bytes()[:4] == b"\x89PNG"
    out = cli("inspect", tiny_bundle, check=True).stdout
    assert "verified" in out and "tiny" in out
    js = json.loads(cli("inspect", tiny_bundle, "--json", check=True).stdout)
    assert js["sha256_verified"] is True and js["cell"] == "lstm"


def one_line_error(proc) -> str:
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    return lines[0]


def test_bad_cli_input_is_one_line(cli, tiny_bundle: Path, tmp_path: Path) -> None:
    assert "no such file" in one_line_error(cli("train", tmp_path / "missing.csv", "-q"))
    assert "not found" in one_line_error(cli("train", WATER, "--column", "nope", "-q"))
    bad = tmp_path / "bad.csv"
    bad.write_text("t,v\n1,2\n2,abc\n")
    assert "not a number" in one_line_error(cli("train", bad, "--column", "v", "-q"))
    short = tmp_path / "short.csv"
    short.write_text("v\n" + "\n".join(str(i) for i in range(20)) + "\n")
    assert "at least" in one_line_error(cli("train", short, "-q"))
    assert "not a directory" in one_line_error(cli("inspect", tmp_path / "nobundle"))
    assert "cell" in one_line_error(cli("train", WATER, "--cell", "transformer", "-q"))


def test_corrupt_and_tampered_bundles_are_refused(cli, tiny_bundle: Path, tmp_path: Path) -> None:
    import shutil

    tampered = tmp_path / "tampered"
    shutil.copytree(tiny_bundle, tampered)
    blob = bytearray((tampered / "model.onnx").read_bytes())
    blob[-10] ^= 0xFF
    (tampered / "model.onnx").write_bytes(bytes(blob))
    assert "does not match" in one_line_error(cli("inspect", tampered))
    assert "does not match" in one_line_error(cli("evaluate", tampered, WATER))

    corrupt = tmp_path / "corrupt"
    shutil.copytree(tiny_bundle, corrupt)
    junk = b"not an onnx graph at all"
    (corrupt / "model.onnx").write_bytes(junk)
    manifest = json.loads((corrupt / "model.json").read_text())
    import hashlib

    manifest["onnx_sha256"] = hashlib.sha256(junk).hexdigest()
    (corrupt / "model.json").write_text(json.dumps(manifest))
    assert "cannot load" in one_line_error(cli("inspect", corrupt))

    (corrupt / "model.json").write_text("{not json")
    assert "manifest" in one_line_error(cli("inspect", corrupt))
