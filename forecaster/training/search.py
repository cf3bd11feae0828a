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

import time
from collections.abc import Callable
from typing import Any

import optuna

from forecaster.training.config import TrainConfig
from forecaster.training.loop import Fit
from forecaster.training.nn import RNNForecaster
from forecaster.training.stateful import Prepared, train_one

#: How many of the best closed-form lag sets a trial may choose from.
LINEAR_CHOICES = 3
HIDDEN = (16, 32, 64)


def search(
    prep: Prepared, cfg: TrainConfig, progress: bool, log: Callable[[str], None]
) -> tuple[RNNForecaster, Fit, TrainConfig, dict[str, Any]]:
    """Run the trials; return the best trial's model, its fit, its options and the record."""
    deadline = time.monotonic() + cfg.budget
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
    study.optimize(objective, n_trials=cfg.trials, timeout=cfg.budget)
    if best is None:  # trials >= 1 and a trial always completes
        raise RuntimeError("the search ran no trial")
    _, model, result, final_cfg = best
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
        "trials": trials,
    }
    if hit:
        log(f"time budget of {cfg.budget:g} s cut the search short: the choice depends on speed")
    return model, result, final_cfg, record
