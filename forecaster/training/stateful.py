"""Training: truncated BPTT over long contiguous sequences, the way the daemon will run the model.

The daemon starts every stream from a zero state and then steps it forever. Training on short
zero-state windows would teach a model that never sees a long-carried state, so by default the
training data is laid out as ``batch_size`` *lanes*: each lane walks the whole training tape from
its own random starting point (wrapping around), the state is carried from one ``bptt``-step
chunk to the next (detached), and it is zeroed only where a segment starts (a gap in the data),
exactly where the daemon would reset it. An epoch is one walk of every lane over the tape.
"""

from __future__ import annotations

import itertools
import json
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from forecaster import __version__
from forecaster.data import Dataset, Series, cut_index
from forecaster.errors import DataError
from forecaster.evaluation.unroll import unroll
from forecaster.training.nn import ModelSpec, RNNForecaster

WEIGHTS_FILE = "weights.npz"
REPORT_FILE = "report.json"
#: Warm-up used while monitoring epochs; the final figures use the measured warm-up.
MONITOR_WARMUP = 10


@dataclass(frozen=True)
class TrainConfig:
    """Every training option; recorded verbatim in ``report.json``."""

    cell: Literal["lstm", "gru"] = "lstm"
    layers: int = 1
    hidden: int = 128
    dropout: float = 0.0
    head: Literal["delta", "level"] = "delta"
    loss: Literal["mse", "huber"] = "huber"
    lr: float = 1e-3
    batch_size: int = 32
    epochs: int = 10
    bptt: int = 64
    clip_norm: float = 1.0
    val_fraction: float = 0.2
    patience: int = 5
    seed: int = 0
    until: str | None = None
    name: str = "model"
    version: str = "1.0.0"
    warmup: int | None = None
    mode: Literal["stateful", "window"] = "stateful"
    window: int | None = None
    bidirectional: bool = False
    task: Literal["regress", "classify"] = "regress"
    label_column: str | None = None
    horizon: int = 0
    window_input: Literal["level", "diff"] | None = None

    def check(self) -> None:
        problems = [
            (self.layers < 1, "--layers must be at least 1"),
            (self.hidden < 1, "--hidden must be at least 1"),
            (not 0.0 <= self.dropout < 1.0, "--dropout must be in [0, 1)"),
            (self.lr <= 0, "--lr must be positive"),
            (self.batch_size < 1, "--batch-size must be at least 1"),
            (self.epochs < 1, "--epochs must be at least 1"),
            (self.bptt < 2, "--bptt must be at least 2"),
            (self.clip_norm <= 0, "--clip-norm must be positive"),
            (not 0.0 < self.val_fraction < 1.0, "--val-fraction must be in (0, 1)"),
            (self.patience < 1, "--patience must be at least 1"),
            (self.mode not in ("stateful", "window"), "--mode must be stateful or window"),
            (self.task not in ("regress", "classify"), "--task must be regress or classify"),
            (self.mode == "window" and self.window is None, "--mode window needs --window W"),
            (self.window is not None and self.window < 1, "--window must be at least 1"),
            (self.mode == "stateful" and self.window is not None, "--window needs --mode window"),
            (
                self.mode == "stateful" and self.bidirectional,
                "--bidirectional needs --mode window: in stateful mode its backward direction "
                "would need readings that have not arrived yet",
            ),
            (
                self.task == "classify" and self.mode != "window",
                "--task classify needs --mode window (stateful classification is not supported)",
            ),
            (
                self.task == "classify" and not self.label_column,
                "--task classify needs --label-column NAME",
            ),
            (
                self.task == "regress" and self.label_column is not None,
                "--label-column needs --task classify",
            ),
            (self.horizon not in (0, 1), "--horizon must be 0 or 1"),
            (
                self.window_input not in (None, "level", "diff"),
                "--window-input must be level or diff",
            ),
            (
                self.mode == "stateful" and self.window_input is not None,
                "--window-input needs --mode window",
            ),
            (
                self.task == "regress" and self.horizon != 0,
                "--horizon is for --task classify (regression always predicts the next reading)",
            ),
            (
                self.mode == "window" and self.warmup is not None,
                "--warmup is for stateful mode (a window model is warm after W readings)",
            ),
        ]
        for bad, message in problems:
            if bad:
                raise DataError(message)


@dataclass
class Tape:
    """The training readings laid end to end, with where each segment starts."""

    x: np.ndarray  # [N, F] raw
    nxt: np.ndarray  # [N] next raw value of feature 0, NaN at a segment's last reading
    reset: np.ndarray  # [N] True at a segment's first reading


def split(data: Dataset, cfg: TrainConfig) -> tuple[list[Series], list[int]]:
    """Cut every series at ``until`` and find where its validation part starts."""
    kept: list[Series] = []
    cuts: list[int] = []
    for s in data.series:
        end = cut_index(s, cfg.until) if cfg.until is not None else len(s)
        part = s.head(end)
        if len(part) == 0:
            continue
        kept.append(part)
        cuts.append(round(len(part) * (1.0 - cfg.val_fraction)))
    if not kept:
        raise DataError("no readings before --until")
    return kept, cuts


def build_tape(series: list[Series], cuts: list[int]) -> Tape:
    xs: list[np.ndarray] = []
    nxt: list[np.ndarray] = []
    reset: list[np.ndarray] = []
    for s, cut in zip(series, cuts, strict=True):
        for a, b in s.segments():
            b = min(b, cut)
            if b - a < 2:
                continue
            v = s.values[a:b]
            xs.append(v[:, None])
            nxt.append(np.append(v[1:], np.nan))
            r = np.zeros(b - a, dtype=bool)
            r[0] = True
            reset.append(r)
    if not xs:
        raise DataError("no training segment has two consecutive readings")
    return Tape(np.concatenate(xs), np.concatenate(nxt), np.concatenate(reset))


def fit_scaling(tape: Tape) -> tuple[tuple[float, ...], tuple[float, ...], float]:
    mean = tape.x.mean(axis=0)
    std = tape.x.std(axis=0)
    std = np.where(std > 1e-12, std, 1.0)
    steps = tape.nxt - tape.x[:, 0]
    steps = steps[np.isfinite(steps)]
    # A robust spread (MAD): sensor data has outages whose steps would otherwise set the scale
    # and leave every ordinary step a tiny fraction of one unit.
    mad = float(np.median(np.abs(steps - np.median(steps)))) * 1.4826 if steps.size else 0.0
    delta = mad if mad > 1e-12 else (float(np.std(steps)) if steps.size else 1.0)
    return tuple(float(m) for m in mean), tuple(float(s) for s in std), max(delta, 1e-12)


def save_weights(model: RNNForecaster, path: Path) -> None:
    """Plain arrays in an ``.npz``: loads with ``allow_pickle=False``, nothing executable inside."""
    arrays = {k: v.detach().cpu().numpy() for k, v in model.state_dict().items()}
    np.savez(path, **arrays)


def load_run(run_dir: Path) -> tuple[RNNForecaster, dict[str, Any]]:
    """Rebuild a trained model from a run directory, without unpickling anything."""
    run_dir = Path(run_dir)
    try:
        report = json.loads((run_dir / REPORT_FILE).read_text(encoding="utf-8"))
        spec = ModelSpec(
            **{
                **report["model"],
                "mean": tuple(report["model"]["mean"]),
                "std": tuple(report["model"]["std"]),
            }
        )
    except FileNotFoundError:
        raise DataError(f"{run_dir}: not a training run (no {REPORT_FILE})") from None
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise DataError(f"{run_dir}/{REPORT_FILE}: unreadable ({exc})") from None
    model = RNNForecaster(spec)
    try:
        with np.load(run_dir / WEIGHTS_FILE, allow_pickle=False) as npz:
            state = {k: torch.from_numpy(npz[k]) for k in npz.files}
        model.load_state_dict(state)
    except FileNotFoundError:
        raise DataError(f"{run_dir}: no {WEIGHTS_FILE}") from None
    except (OSError, ValueError, RuntimeError, KeyError) as exc:
        raise DataError(f"{run_dir}/{WEIGHTS_FILE}: cannot load weights ({exc})") from None
    model.eval()
    return model, report


def torch_predictor(model: RNNForecaster) -> Callable[[np.ndarray], np.ndarray]:
    """A full-sequence unroll from a zero state: the reference the ONNX stepping must match."""

    def predict(values: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            x = torch.as_tensor(values, dtype=torch.float32).reshape(-1, 1, 1)
            _, y, _ = model.forward_seq(x, model.zero_state(1))
        return y[:, 0].double().numpy()

    return predict


def measure_warmup(model: RNNForecaster, tape: Tape, horizon: int = 200) -> int:
    """Readings a stream started from zero needs before its predictions track a long-running one.

    Runs the model from a zero state at several points inside the longest training segment and
    compares with the same model that has been running since the segment's start; the warm-up
    is the step after which every cold run stays within 10 % of a typical one-step change.
    """
    starts = np.flatnonzero(tape.reset)
    ends = np.append(starts[1:], len(tape.x))
    longest = int(np.argmax(ends - starts))
    a, b = int(starts[longest]), int(ends[longest])
    seg = tape.x[a:b, 0]
    horizon = min(horizon, max(1, (b - a) // 2))
    predict = torch_predictor(model)
    reference = predict(seg)
    offsets = np.linspace(1, len(seg) - horizon, num=8).astype(int)
    worst = np.zeros(horizon)
    for off in np.unique(offsets):
        cold = predict(seg[off : off + horizon])
        worst = np.maximum(worst, np.abs(cold - reference[off : off + horizon]))
    tol = 0.1 * float(model.delta_scale)
    above = np.flatnonzero(worst > tol)
    return int(above[-1] + 2) if above.size else 1


def _chunks(tape: Tape, lanes: np.ndarray, bptt: int) -> list[np.ndarray]:
    n = len(tape.x)
    steps = np.arange(n)
    out = []
    for t0 in range(0, n, bptt):
        t = steps[t0 : t0 + bptt]
        out.append((lanes[None, :] + t[:, None]) % n)
    return out


def _train_chunk(
    model: RNNForecaster,
    tape_t: dict[str, torch.Tensor],
    idx: np.ndarray,
    state: tuple[torch.Tensor, ...],
    loss_kind: str,
) -> tuple[torch.Tensor, int, tuple[torch.Tensor, ...]]:
    """Forward one chunk, zeroing lanes' states where their segment restarts."""
    index = torch.from_numpy(idx)
    x = tape_t["x"][index]  # [T, B, F]
    nxt = tape_t["nxt"][index]  # [T, B]
    reset = tape_t["reset"][index]  # [T, B]
    bounds = [0, *[int(t) for t in torch.nonzero(reset.any(dim=1)).flatten() if t > 0], len(idx)]
    outs: list[torch.Tensor] = []
    for lo, hi in itertools.pairwise(bounds):
        keep = (~reset[lo]).float()[None, :, None]
        state = tuple(s * keep for s in state)
        o, _, state = model.forward_seq(x[lo:hi], state)
        outs.append(o)
    o = torch.cat(outs)
    valid = torch.isfinite(nxt)
    target = model.target(torch.where(valid, nxt, x[..., 0]), x[..., 0])
    err = (o - target)[valid]
    if not err.numel():
        return o.sum() * 0.0, 0, state
    if loss_kind == "huber":
        # Outages and jumps are tens of typical steps: Huber keeps them from dominating.
        loss = torch.nn.functional.huber_loss(err, torch.zeros_like(err), delta=1.0)
    else:
        loss = (err**2).mean()
    return loss, int(valid.sum()), state


def report_header(cfg: Any, spec: ModelSpec, data: Dataset, train_readings: int) -> dict[str, Any]:
    """What every ``report.json`` starts with: versions, the options, the model, the data."""
    return {
        "package_version": __version__,
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "config": asdict(cfg),
        "model": spec.as_dict(),
        "data": {
            "sha256": data.sha256,
            "source": data.source,
            "rows": data.rows,
            "series": len(data.series),
            "column": data.columns,
            "time_column": data.time_column,
            "stream_column": data.stream_column,
            "until": cfg.until,
            "train_readings": train_readings,
        },
    }


def train(
    data: Dataset,
    cfg: TrainConfig,
    out_dir: Path,
    progress: bool = True,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Fit a model, keep the epoch with the best validation RMSE, write the run directory."""
    cfg.check()
    if cfg.mode == "window":
        from forecaster.training.window import train_window

        return train_window(data, cfg, out_dir, progress, log)
    series, cuts = split(data, cfg)
    tape = build_tape(series, cuts)
    min_len = 2 * cfg.bptt
    if len(tape.x) < min_len:
        raise DataError(
            f"only {len(tape.x)} training readings; training needs at least {min_len} "
            f"(2 x --bptt {cfg.bptt})"
        )
    if sum(len(s) - c for s, c in zip(series, cuts, strict=True)) < 2:
        raise DataError("the validation part is empty: raise --val-fraction or give more data")

    torch.manual_seed(cfg.seed)
    torch.use_deterministic_algorithms(True)
    rng = np.random.default_rng(cfg.seed)
    mean, std, delta = fit_scaling(tape)
    spec = ModelSpec(
        cfg.cell, cfg.layers, cfg.hidden, tape.x.shape[1], cfg.head, cfg.dropout, mean, std, delta
    )
    model = RNNForecaster(spec)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    tape_t = {
        "x": torch.as_tensor(tape.x, dtype=torch.float32),
        "nxt": torch.as_tensor(tape.nxt, dtype=torch.float32),
        "reset": torch.as_tensor(tape.reset),
    }

    def validate() -> dict[str, float]:
        model.eval()
        sc = unroll(series, torch_predictor(model), MONITOR_WARMUP, cuts).score()
        return {"val_rmse": sc.rmse, "val_naive_rmse": sc.naive_rmse, "val_mae": sc.mae}

    history: list[dict[str, float]] = []
    best: tuple[float, int, dict[str, torch.Tensor]] | None = None
    n_chunks = math.ceil(len(tape.x) / cfg.bptt)
    bar = _Progress(cfg.epochs, n_chunks, enabled=progress)
    stale = 0
    with bar:
        for epoch in range(1, cfg.epochs + 1):
            model.train()
            started = time.perf_counter()
            lanes = rng.integers(0, len(tape.x), size=cfg.batch_size)
            state = model.zero_state(cfg.batch_size)
            total, count = 0.0, 0
            for idx in _chunks(tape, lanes, cfg.bptt):
                loss, n, state = _train_chunk(model, tape_t, idx, state, cfg.loss)
                state = tuple(s.detach() for s in state)
                opt.zero_grad()
                loss.backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.clip_norm)
                opt.step()
                total += float(loss.detach()) * n
                count += n
                bar.batch(epoch, total / max(count, 1))
            row = {
                "epoch": epoch,
                "train_loss": total / max(count, 1),
                **validate(),
                "seconds": time.perf_counter() - started,
            }
            history.append(row)
            bar.epoch(epoch, row)
            if best is None or row["val_rmse"] < best[0]:
                best = (
                    row["val_rmse"],
                    epoch,
                    {k: v.clone() for k, v in model.state_dict().items()},
                )
                stale = 0
            else:
                stale += 1
                if stale >= cfg.patience:
                    log(
                        f"early stop after epoch {epoch}: no better validation RMSE for "
                        f"{cfg.patience} epochs"
                    )
                    break
    if best is None:  # epochs >= 1 is checked, so the loop ran at least once
        raise DataError("training ran no epoch")
    model.load_state_dict(best[2])
    model.eval()
    warmup = cfg.warmup if cfg.warmup is not None else measure_warmup(model, tape)
    final = unroll(series, torch_predictor(model), warmup, cuts).score()

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    save_weights(model, out_dir / WEIGHTS_FILE)
    report: dict[str, Any] = {
        **report_header(cfg, spec, data, len(tape.x)),
        "epochs": history,
        "best_epoch": best[1],
        "warmup": warmup,
        "validation": {k: v for k, v in final.as_dict().items() if k not in ("mase", "skill")},
        "validation_skill": final.as_dict()["skill"],
    }
    (out_dir / REPORT_FILE).write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    _plot_losses(history, out_dir / "loss.png", log)
    return report


def pyplot(log: Callable[[str], None]) -> Any:
    """matplotlib's pyplot on a file-only backend, or None (logged) when it is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log("matplotlib is not installed (pip install 'forecaster[train]'): no loss.png")
        return None
    return plt


def _plot_losses(history: list[dict[str, float]], path: Path, log: Callable[[str], None]) -> None:
    plt = pyplot(log)
    if plt is None:
        return
    epochs = [h["epoch"] for h in history]
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 3.6))
    a1.plot(epochs, [h["train_loss"] for h in history], marker="o")
    a1.set_title("training loss (MSE, scaled)")
    a1.set_xlabel("epoch")
    a2.plot(epochs, [h["val_rmse"] for h in history], marker="o", label="model")
    a2.plot(epochs, [h["val_naive_rmse"] for h in history], ls="--", label="persistence")
    a2.set_title("validation RMSE (raw units)")
    a2.set_xlabel("epoch")
    a2.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


class _Progress:
    """A rich progress bar over epochs and batches; silent when disabled (tests, pipes)."""

    def __init__(self, epochs: int, batches: int, enabled: bool) -> None:
        self.enabled = enabled
        self.batches = batches
        self.epochs = epochs
        if enabled:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

            self._p = Progress(
                TextColumn("[bold]{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("{task.fields[info]}"),
            )

    def __enter__(self) -> _Progress:
        if self.enabled:
            self._p.start()
            self._task = self._p.add_task("epoch 1", total=self.batches, info="")
        return self

    def __exit__(self, *exc: object) -> None:
        if self.enabled:
            self._p.stop()

    def batch(self, epoch: int, loss: float) -> None:
        if self.enabled:
            self._p.update(
                self._task,
                advance=1,
                description=f"epoch {epoch}/{self.epochs}",
                info=f"train loss {loss:.4f}",
            )

    def line(self, text: str) -> None:
        """Print a line above the bar and start the bar over for the next epoch."""
        if self.enabled:
            self._p.console.print(text)
            self._p.reset(self._task, total=self.batches)

    def epoch(self, epoch: int, row: dict[str, float]) -> None:
        if self.enabled:
            self._p.console.print(
                f"epoch {epoch:3d}  train loss {row['train_loss']:.4f}  val RMSE "
                f"{row['val_rmse']:.4f}  persistence {row['val_naive_rmse']:.4f}"
            )
            self._p.reset(self._task, total=self.batches)
