"""Model selection by validation with Optuna: a small space, a fixed number of trials, a time cap.

The space is what matters on real series and is cheap to try on two cores: the cell (LSTM or
GRU), one or two layers, 16-64 units, the learning rate, and which of the best closed-form lag
sets the network sits on. Every trial trains with early stopping and the best-epoch checkpoint
(epoch 0, the linear path alone, included), and is scored by the same robust validation loss.
Giving any of ``--cell``, ``--layers``, ``--hidden`` or ``--lr`` turns the search off (that model is
trained, defaults filling the rest, on the best closed-form lag set).

Determinism: the sampler is seeded and the number of trials is fixed (``--trials``), so the same
data, seed and machine give the same choice; ``--budget`` (seconds) is only a cap, and the report
says when it cut the search short (then the result depends on the machine's speed).
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable
from dataclasses import replace
from typing import Any

import numpy as np
import optuna
import torch

from forecaster.evaluation.unroll import unroll
from forecaster.training import linear
from forecaster.training.config import TrainConfig
from forecaster.training.loop import Fit
from forecaster.training.nn import RNNForecaster
from forecaster.training.stateful import (
    MONITOR_WARMUP,
    Prepared,
    torch_predictor,
    train_one,
    validation_errors,
)

#: How many of the best closed-form lag sets a trial may choose from.
LINEAR_CHOICES = 3
HIDDEN = (16, 32, 64)
#: The network is kept only where its validation gain over its linear path alone exceeds this
#: many standard errors of the mean paired difference of per-reading losses.
GAIN_SE = 2.0


def search(
    prep: Prepared,
    cfg: TrainConfig,
    progress: bool,
    log: Callable[[str], None],
    started: float | None = None,
) -> tuple[RNNForecaster, Fit, TrainConfig, dict[str, Any]]:
    """Run the trials; return the best trial's model, its fit, its options and the record.

    ``started`` (``time.monotonic()``): when training began; ``--budget`` counts from there, so
    the time spent preparing (the linear and smoothing fits) is inside it."""
    deadline = (time.monotonic() if started is None else started) + cfg.budget
    choices = prep.candidates[:LINEAR_CHOICES]
    best: tuple[float, RNNForecaster, Fit, TrainConfig] | None = None
    trials: list[dict[str, Any]] = []

    def objective(trial: optuna.Trial) -> float:
        nonlocal best
        chosen: dict[str, Any] = {
            "cell": trial.suggest_categorical("cell", ["lstm", "gru"]),
            "layers": trial.suggest_int("layers", 1, 2),
            "hidden": trial.suggest_categorical("hidden", list(HIDDEN)),
            "lr": trial.suggest_float("lr", 3e-4, 3e-3, log=True),
        }
        pick = trial.suggest_int("linear", 0, len(choices) - 1) if len(choices) > 1 else 0
        trial_cfg = cfg.resolved(**chosen)
        t0 = time.perf_counter()
        model, result = train_one(
            prep,
            trial_cfg,
            choices[pick].ar,
            progress=False,
            # without a bar (a pipe), every trial's epochs are plain lines too; with one, the
            # trial's summary line below is its report
            log=(lambda _t: None) if progress else (lambda t: log(f"trial {trial.number}: {t}")),
            deadline=deadline,
        )
        loss = -result.best_merit
        rows = result.history
        best_row = next(r for r in rows if r["epoch"] == result.best_epoch)
        record = {
            "trial": trial.number,
            **chosen,
            "lags": list(choices[pick].ar.lags),
            "linear_loss": choices[pick].ar.loss,
            "val_loss": loss,
            "val_rmse": best_row["val_rmse"],
            "val_naive_rmse": best_row["val_naive_rmse"],
            "best_epoch": result.best_epoch,
            "epochs_run": rows[-1]["epoch"],
            "seconds": time.perf_counter() - t0,
        }
        trials.append(record)
        log(
            f"trial {trial.number}: {chosen} lags {len(record['lags'])}, val RMSE "
            f"{record['val_rmse']:.4g} (persistence {record['val_naive_rmse']:.4g}), best epoch "
            f"{result.best_epoch}/{record['epochs_run']}, {record['seconds']:.0f} s"
        )
        if best is None or loss < best[0]:
            best = (loss, model, result, trial_cfg)
        return loss

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(
        direction="minimize", sampler=optuna.samplers.TPESampler(seed=cfg.seed)
    )
    study.optimize(objective, n_trials=cfg.trials, timeout=max(deadline - time.monotonic(), 1.0))
    if best is None:  # trials >= 1 and a trial always completes
        raise RuntimeError("the search ran no trial")
    _, model, result, final_cfg = best
    model, result, network = significant(prep, model, result, log)
    hit = len(trials) < cfg.trials or time.monotonic() > deadline
    record = {
        "library": f"optuna {optuna.__version__}",
        "sampler": "TPESampler",
        "seed": cfg.seed,
        "trials_asked": cfg.trials,
        "budget_seconds": cfg.budget,
        "budget_hit": hit,
        "searched": [*cfg.searched(), "linear"],
        "best_trial": int(study.best_trial.number),
        "network_gain": network,
        "trials": trials,
    }
    if hit:
        log(f"time budget of {cfg.budget:g} s cut the search short: the choice depends on speed")
    return model, result, final_cfg, record


def significant(
    prep: Prepared, model: RNNForecaster, result: Fit, log: Callable[[str], None]
) -> tuple[RNNForecaster, Fit, dict[str, Any] | None]:
    """The network on its line, or the line alone when the network's validation gain is noise.

    The best epoch and trial are picked on the validation part, so a network that does nothing
    but fit that part's noise still looks a little better than its line (on a monthly series of
    28 validation readings, several trials and epochs are enough). Per validation reading, the
    robust loss of the line alone minus that of the hybrid is a paired difference; the network is
    kept when the mean difference exceeds :data:`GAIN_SE` standard errors, otherwise its head is
    set to zero (the untrained hybrid: exactly the line) and the fit reports epoch 0."""
    if result.best_epoch == 0 or model.spec.head != "delta":
        return model, result, None
    losses = []
    for m in (alone(model, None), model):
        u = unroll(prep.series, torch_predictor(m), MONITOR_WARMUP, prep.cuts)
        losses.append(linear.robust_losses(validation_errors(u), prep.delta))
    d = losses[0] - losses[1]
    d = d[np.isfinite(d)]
    gain = float(d.mean()) if d.size else 0.0
    se = float(d.std(ddof=1) / math.sqrt(d.size)) if d.size > 1 else math.inf
    record: dict[str, Any] = {
        "rule": f"keep the network if its validation gain > {GAIN_SE:g} standard errors",
        "gain": gain,
        "standard_error": se,
        "readings": int(d.size),
        "kept": gain > GAIN_SE * se,
    }
    if record["kept"]:
        return model, result, record
    # The network is noise: ship the best line alone (it may be another lag set than the one
    # this trial's network sat on, which was chosen for the network's sake).
    best = prep.candidates[0].ar
    line = alone(model, best)
    u = unroll(prep.series, torch_predictor(line), MONITOR_WARMUP, prep.cuts)
    merit = -linear.robust_loss(validation_errors(u), prep.delta)
    log(
        f"the network's validation gain over its linear path ({gain:.4g} +- {se:.3g} per "
        f"reading) is not above {GAIN_SE:g} standard errors: shipping the best linear path "
        f"alone ({best.loss or 'persistence'}, {best.size} lags)"
    )
    record["shipped"] = {"lags": list(best.lags), "loss": best.loss}
    return line, replace(result, best_epoch=0, best_merit=merit), record


def alone(model: RNNForecaster, ar: linear.LinearAR | None) -> RNNForecaster:
    """The model with its head at zero (its output is exactly its line), on ``ar`` if given (a
    fresh network, seeded: its weights do not change the output, but they are in the bundle)."""
    if ar is None:
        out = copy.deepcopy(model)
        with torch.no_grad():
            out.head.weight.zero_()
            out.head.bias.zero_()
    else:
        spec = replace(
            model.spec,
            ar_coef=ar.coef,
            ar_bias=ar.bias,
            ar_lags=ar.lags,
            ar_loss=ar.loss if ar.size else "",
        )
        torch.manual_seed(0)
        out = RNNForecaster(spec)
        with torch.no_grad():
            out.head.weight.zero_()
            out.head.bias.zero_()
    out.eval()
    return out
