"""Scoring a model exactly as the daemon runs it: one step at a time, from a zero state.

The unroll here is shared by training (validation, with PyTorch) and ``forecaster evaluate``
(ONNX Runtime), so the figures in ``report.json``, ``model.json`` and ``evaluate`` mean the same.
"""

from __future__ import annotations

import csv
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from forecaster.bundle import Bundle
from forecaster.data import Dataset, Score, Series, cut_index, score
from forecaster.errors import DataError

#: Maps the readings of one segment (``[T]`` raw values, zero state at its start) to the
#: one-step predictions made after each reading (``[T]``: ``out[k]`` predicts ``values[k+1]``).
SegmentPredictor = Callable[[np.ndarray], np.ndarray]


@dataclass
class Unroll:
    """Every one-step prediction over a dataset, aligned with the reading it predicts."""

    stream: list[str]
    row: np.ndarray
    time: np.ndarray
    actual: np.ndarray
    predicted: np.ndarray
    naive: np.ndarray
    warm: np.ndarray
    scored: np.ndarray
    scale_diffs: np.ndarray

    def score(self) -> Score:
        m = self.scored
        return score(self.actual[m], self.predicted[m], self.naive[m], self.scale_diffs)


def unroll(
    series: Sequence[Series],
    predict: SegmentPredictor,
    warmup: int,
    cuts: Sequence[int] | None = None,
) -> Unroll:
    """Run ``predict`` over every segment and line predictions up with their targets.

    A prediction is *warm* once its stream has seen ``warmup`` readings since the last reset
    (the daemon's ``warm`` flag); it is *scored* when warm and its target's index in its series
    is at or after that series' cut (``None``: score everything warm).
    """
    cols: dict[str, list[np.ndarray]] = {
        k: [] for k in ("row", "time", "actual", "predicted", "naive", "warm", "scored")
    }
    names: list[str] = []
    diffs: list[np.ndarray] = []
    for i, s in enumerate(series):
        cut = cuts[i] if cuts is not None else 0
        for a, b in s.segments():
            vals = s.values[a:b]
            if b - a < 2:
                continue
            preds = np.asarray(predict(vals), dtype=np.float64)
            if preds.shape != vals.shape:
                raise DataError(f"predictor returned {preds.shape} for {vals.shape} readings")
            target = np.arange(a + 1, b)
            warm = np.arange(1, b - a) >= warmup
            cols["row"].append(s.rows[target])
            cols["time"].append(
                s.times[target] if s.times is not None else np.full(b - a - 1, np.nan)
            )
            cols["actual"].append(vals[1:])
            cols["predicted"].append(preds[:-1])
            cols["naive"].append(vals[:-1])
            cols["warm"].append(warm)
            cols["scored"].append(warm & (target >= cut))
            names.extend([s.name] * (b - a - 1))
            before = target < cut
            diffs.append(np.diff(vals)[before])
    if not names:
        raise DataError("no segment has two consecutive readings to predict")
    cat = {k: np.concatenate(v) for k, v in cols.items()}
    return Unroll(
        stream=names,
        row=cat["row"],
        time=cat["time"],
        actual=cat["actual"],
        predicted=cat["predicted"],
        naive=cat["naive"],
        warm=cat["warm"].astype(bool),
        scored=cat["scored"].astype(bool),
        scale_diffs=np.concatenate(diffs),
    )


def bundle_predictor(bundle: Bundle) -> SegmentPredictor:
    """Step the ONNX graph one reading at a time with the state carried, as the daemon does."""

    def predict(values: np.ndarray) -> np.ndarray:
        state = bundle.zero_state(1)
        out = np.empty(len(values), dtype=np.float64)
        x = np.empty((1, bundle.n_features), dtype=np.float32)
        for k, v in enumerate(values):
            x[0, 0] = v
            y, state = bundle.step(x, state)
            out[k] = float(y[0])
        return out

    return predict


def write_predictions(result: Unroll, path: Path) -> None:
    """Every prediction, one CSV row each: what a dashboard or a notebook would join on."""
    with Path(path).open("w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh)
        w.writerow(["row", "timestamp", "stream", "actual", "predicted", "naive", "warm", "scored"])
        for i in range(len(result.stream)):
            t = result.time[i]
            w.writerow(
                [
                    int(result.row[i]),
                    "" if np.isnan(t) else repr(float(t)),
                    result.stream[i],
                    repr(float(result.actual[i])),
                    repr(float(result.predicted[i])),
                    repr(float(result.naive[i])),
                    int(result.warm[i]),
                    int(result.scored[i]),
                ]
            )


def plot_predictions(result: Unroll, path: Path, title: str) -> None:
    """Actual vs predicted for the first stream; needs matplotlib (the ``train`` extra)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise DataError("--plot needs matplotlib: pip install 'forecaster[train]'") from None
    first = result.stream[0]
    m = np.array([s == first for s in result.stream])
    x = result.row[m]
    fig, ax = plt.subplots(figsize=(11, 4))
    ax.plot(x, result.actual[m], label="actual", lw=1.0, color="black")
    ax.plot(x, result.predicted[m], label="predicted (one step ahead)", lw=1.0, color="tab:blue")
    scored_rows = x[result.scored[m]]
    if len(scored_rows):
        ax.axvspan(
            scored_rows.min(), scored_rows.max(), color="tab:green", alpha=0.08, label="scored"
        )
    ax.set_xlabel("row")
    ax.set_title(title)
    ax.legend(loc="best")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def evaluate_bundle(bundle: Bundle, data: Dataset, warmup: int | None, start: str | None) -> Unroll:
    w = bundle.manifest.warmup if warmup is None else warmup
    if w < 0:
        raise DataError("--warmup must be 0 or more")
    cuts = [cut_index(s, start) for s in data.series] if start is not None else None
    return unroll(data.series, bundle_predictor(bundle), w, cuts)
