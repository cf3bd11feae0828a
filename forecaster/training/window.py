"""Training in window mode: shuffled mini-batches of W-reading windows, each from a zero state.

This is the classic setting (a Keras ``LSTM(128)`` over windows of 10 readings): the model never
carries a state between windows, so the daemon keeps each stream's last W readings instead of a
recurrent state and runs the same windows. A window's target is the next reading (regress) or
the 0/1 label of its last reading, or of the next one with ``--horizon 1`` (classify).

Training windows are those whose target lies before the series' validation cut; validation
windows those whose target lies at or after it (their readings may reach back before the cut,
as the daemon's would). Regression is scored by the same unroll ``evaluate`` uses; an event
classifier by accuracy, precision, recall, F1 and ROC AUC, at a threshold chosen for the best
F1 on the validation windows and recorded in the report (and then the manifest).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from forecaster.data import Dataset, Series
from forecaster.errors import DataError
from forecaster.evaluation.unroll import unroll, window_predictor
from forecaster.model.classify import choose_threshold, positive_weight, score_events
from forecaster.model.windows import windows
from forecaster.training.config import TrainConfig
from forecaster.training.intervals import conformal
from forecaster.training.loop import Progress, fit
from forecaster.training.nn import ModelSpec, RNNForecaster
from forecaster.training.plots import plot_classify, plot_losses
from forecaster.training.report import WEIGHTS_FILE, report_header, save_weights, write_report
from forecaster.training.tape import build_tape, fit_scaling, split

#: Windows per forward pass when predicting (validation); training uses --batch-size.
PREDICT_CHUNK = 4096


@dataclass
class Samples:
    """Windows ``x`` ``[N, W, F]`` with their target and whether it is a validation target."""

    x: np.ndarray
    target: np.ndarray  # next raw value (regress) or 0/1 label (classify)
    val: np.ndarray


def window_samples(series: list[Series], cuts: list[int], cfg: TrainConfig) -> Samples:
    """Every window inside a segment whose target is known, split at each series' cut."""
    w = int(cfg.window or 1)
    classify = cfg.task == "classify"
    shift = cfg.horizon if classify else 1
    xs: list[np.ndarray] = []
    targets: list[np.ndarray] = []
    val: list[np.ndarray] = []
    for s, cut in zip(series, cuts, strict=True):
        if classify and s.labels is None:
            raise DataError(f"series {s.name!r} has no labels")
        for a, b in s.segments():
            win = windows(s.values[a:b], w)
            ends = a + w - 1 + np.arange(len(win))
            target_at = ends + shift
            keep = target_at < b
            win, target_at = win[keep], target_at[keep]
            if classify and s.labels is not None:
                target = s.labels[target_at]
            else:
                target = s.values[target_at]
            known = np.isfinite(target)
            xs.append(win[known])
            targets.append(target[known])
            val.append(target_at[known] >= cut)
    if not xs or not sum(len(x) for x in xs):
        raise DataError(f"no segment holds a window of {w} readings with a known target")
    return Samples(
        np.concatenate(xs).astype(np.float32), np.concatenate(targets), np.concatenate(val)
    )


def torch_window_fn(model: RNNForecaster) -> Callable[[np.ndarray], np.ndarray]:
    """``[N, W, F]`` raw windows → ``y`` ``[N]`` with PyTorch, in eval mode, without gradients."""

    def run(x: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            _, y = model.forward_window(torch.as_tensor(x, dtype=torch.float32))
        return y.double().numpy()

    return run


def _predict(model: RNNForecaster, x: np.ndarray) -> np.ndarray:
    run = torch_window_fn(model)
    return np.concatenate(
        [run(x[lo : lo + PREDICT_CHUNK]) for lo in range(0, len(x), PREDICT_CHUNK)]
    )


def train_window(
    data: Dataset,
    cfg: TrainConfig,
    out_dir: Path,
    progress: bool = True,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Fit a window model (``cfg`` resolved), keep the best validation epoch, write the run."""
    assert cfg.cell is not None and cfg.layers and cfg.hidden and cfg.lr and cfg.epochs  # noqa: S101
    w = int(cfg.window or 1)
    classify = cfg.task == "classify"
    series, cuts = split(data, cfg, log)
    tape = build_tape(series, cuts)  # the training readings: scaling statistics
    samples = window_samples(series, cuts, cfg)
    train_x, train_t = samples.x[~samples.val], samples.target[~samples.val]
    val_x, val_t = samples.x[samples.val], samples.target[samples.val]
    if len(train_x) < 1:
        raise DataError(f"no training window of {w} readings before the validation part")
    if len(val_x) < 1:
        raise DataError(
            "the validation part holds no window: raise --val-fraction or lower --window"
        )

    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    mean, std, delta = fit_scaling(tape)
    spec = ModelSpec(
        cfg.cell,
        cfg.layers,
        cfg.hidden,
        tape.x.shape[1],
        "level" if classify else cfg.head,
        cfg.dropout,
        mean,
        std,
        delta,
        mode="window",
        window=w,
        bidirectional=cfg.bidirectional,
        task=cfg.task,
        window_input=cfg.window_input or ("diff" if classify else "level"),
    )
    model = RNNForecaster(spec)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    pos_weight = positive_weight(train_t) if classify else None
    if pos_weight is not None:
        log(
            f"class balance: {int((train_t == 1).sum())} positive of {len(train_t)} training "
            f"windows; positive-class weight {pos_weight:.2f}"
        )
    tx = torch.from_numpy(train_x)
    tt = torch.as_tensor(train_t, dtype=torch.float32)
    pw = torch.tensor(pos_weight if pos_weight is not None else 1.0)

    def loss_of(o: torch.Tensor, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        if classify:
            return torch.nn.functional.binary_cross_entropy_with_logits(o, t, pos_weight=pw)
        err = o - model.target(t, x[:, -1, 0])
        if cfg.loss == "huber":
            return torch.nn.functional.huber_loss(err, torch.zeros_like(err), delta=1.0)
        return (err**2).mean()

    def validate() -> tuple[dict[str, Any], float]:
        """Validation figures, and the figure to maximise when picking the best epoch."""
        model.eval()
        if classify:
            probs = _predict(model, val_x)
            p = np.clip(probs, 1e-7, 1 - 1e-7)
            weight = np.where(val_t == 1, float(pw), 1.0)
            bce = float(np.mean(-weight * (val_t * np.log(p) + (1 - val_t) * np.log(1 - p))))
            sc = score_events(val_t, probs, choose_threshold(val_t, probs))
            row = {"val_loss": bce, **{f"val_{k}": v for k, v in sc.as_dict().items()}}
            auc = sc.roc_auc
            # ROC AUC first (threshold-free); the loss breaks ties and decides without positives.
            return row, (auc if auc is not None else 0.0) - 1e-6 * bce
        sc_r = unroll(series, window_predictor(torch_window_fn(model), w), w, cuts, w - 1).score()
        return {
            "val_rmse": sc_r.rmse,
            "val_naive_rmse": sc_r.naive_rmse,
            "val_mae": sc_r.mae,
        }, -sc_r.rmse

    def train_epoch(epoch: int, bar: Progress) -> tuple[float, int]:
        order = rng.permutation(len(train_x))
        total, count = 0.0, 0
        for lo in range(0, len(order), cfg.batch_size):
            idx = torch.from_numpy(order[lo : lo + cfg.batch_size])
            x, t = tx[idx], tt[idx]
            o, _ = model.forward_window(x)
            loss = loss_of(o, x, t)
            opt.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.clip_norm)
            opt.step()
            total += float(loss.detach()) * len(idx)
            count += len(idx)
            bar.batch(epoch, total / count)
        return total / max(count, 1), count

    result = fit(
        model,
        train_epoch,
        validate,
        epochs=cfg.epochs,
        patience=cfg.patience,
        batches=-(-len(train_x) // cfg.batch_size),
        progress=progress,
        log=log,
        line=lambda bar, epoch, row: _epoch_line(bar, epoch, row, classify),
        include_initial=not classify and cfg.head == "delta",
    )
    history = result.history

    report: dict[str, Any] = report_header(cfg, spec, data, len(tape.x))
    report["data"].update(
        label_column=data.label_column, train_windows=len(train_x), validation_windows=len(val_x)
    )
    report |= {
        "epochs": history,
        "best_epoch": result.best_epoch,
        "warmup": w,
    }
    if classify:
        probs = _predict(model, val_x)
        threshold = choose_threshold(val_t, probs)
        sc = score_events(val_t, probs, threshold)
        report["threshold"] = threshold
        report["pos_weight"] = pos_weight
        report["validation_classification"] = {
            **{k: v for k, v in sc.as_dict().items() if k != "threshold"},
            "pos_weight": pos_weight,
        }
        report["validation_majority_baseline"] = {
            "accuracy": float(max(np.mean(val_t), 1 - np.mean(val_t))),
            "roc_auc": 0.5,
        }
    else:
        u = unroll(series, window_predictor(torch_window_fn(model), w), w, cuts, w - 1)
        final = u.score().as_dict()
        report["validation"] = {k: v for k, v in final.items() if k not in ("mase", "skill")}
        report["validation_skill"] = final["skill"]
        report["interval"] = conformal(u.actual[u.scored] - u.predicted[u.scored], cfg.coverage)

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    save_weights(model, out_dir / WEIGHTS_FILE)
    write_report(report, out_dir)
    if classify:
        plot_classify(history, out_dir / "loss.png", log)
    else:
        plot_losses(history, out_dir / "loss.png", log)
    return report


def _epoch_line(bar: Progress, epoch: int, row: dict[str, Any], classify: bool) -> None:
    if not classify:
        bar.epoch(epoch, row)
        return
    auc = row["val_roc_auc"]
    bar.line(
        f"epoch {epoch:3d}  train loss {row['train_loss']:.4f}  val loss {row['val_loss']:.4f}  "
        f"acc {row['val_accuracy']:.3f}  P {row['val_precision']:.3f}  R {row['val_recall']:.3f}  "
        f"F1 {row['val_f1']:.3f}  AUC {'n/a' if auc is None else f'{auc:.3f}'}"
    )
