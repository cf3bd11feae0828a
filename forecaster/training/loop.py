"""The one epoch loop both training modes share: train an epoch, validate, keep the best epoch,
stop early, report progress. Each mode supplies only its step (``train_epoch``) and its figures
(``validate``); this module owns checkpointing, patience and the progress bar. Without the bar
(stderr not a terminal: a pipe, a log file, CI) each epoch is one plain line through ``log``
instead, so a long run is not silent until its end; ``log`` itself is silent under ``-q``.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

#: ``train_epoch(epoch, bar) -> (mean loss, samples)``: one pass over the training data.
EpochStep = Callable[[int, "Progress"], tuple[float, int]]
#: ``validate() -> (figures for the history row, merit)``; a higher merit is better.
Validate = Callable[[], tuple[dict[str, Any], float]]


@dataclass
class Fit:
    """What the loop did: every epoch's row, the best one (its weights are loaded back)."""

    history: list[dict[str, Any]]
    best_epoch: int
    best_merit: float
    stopped_early: bool
    seconds: float


def fit(
    model: torch.nn.Module,
    train_epoch: EpochStep,
    validate: Validate,
    *,
    epochs: int,
    patience: int,
    batches: int,
    progress: bool,
    log: Callable[[str], None],
    line: Callable[[Progress, int, dict[str, Any]], None] | None = None,
    include_initial: bool = False,
    deadline: float | None = None,
) -> Fit:
    """Run up to ``epochs`` epochs; keep the weights of the epoch with the best merit.

    ``progress`` shows the rich bar; without it every epoch is one plain line through ``log``
    (:func:`plain_line`). ``include_initial`` validates the untrained model first, as epoch 0,
    and lets it win: with a head that starts at zero the untrained model is the baseline
    (persistence, or the linear path), so the result is never worse than it on validation.
    ``deadline`` (``time.monotonic()``, a search's time budget) stops before an epoch expected
    to end past it (as long as the previous one) and after an epoch that passes it; the first
    epoch always runs.
    """
    started = time.perf_counter()
    show = line or (lambda bar, epoch, row: bar.epoch(epoch, row))
    history: list[dict[str, Any]] = []
    best: tuple[float, int, dict[str, torch.Tensor]] | None = None
    stale = 0
    stopped = False

    def consider(epoch: int, row: dict[str, Any], merit: float) -> bool:
        nonlocal best, stale
        history.append(row)
        if best is None or merit > best[0]:
            best = (merit, epoch, {k: v.clone() for k, v in model.state_dict().items()})
            stale = 0
            return False
        stale += 1
        return stale >= patience

    def best_row() -> dict[str, Any]:
        assert best is not None  # noqa: S101 - called after consider()
        return next(r for r in history if r["epoch"] == best[1])

    bar = Progress(epochs, batches, enabled=progress)
    with bar:
        if include_initial:
            model.eval()
            figures, merit = validate()
            row = {"epoch": 0, "train_loss": None, **figures, "seconds": 0.0}
            show(bar, 0, row)
            consider(0, row, merit)
            if not progress:
                log(plain_line(row, epochs, best_row()))
        last = 0.0  # seconds the previous epoch took (training and validation)
        for epoch in range(1, epochs + 1):
            if deadline is not None and epoch > 1 and time.monotonic() + last > deadline:
                # Stop before an epoch that would end past the budget rather than after it: on
                # a long series one epoch is a large part of the budget.
                log(f"time budget: epoch {epoch} would end past it; stopping after {epoch - 1}")
                stopped = True
                break
            model.train()
            t0 = time.perf_counter()
            loss, _ = train_epoch(epoch, bar)
            model.eval()
            figures, merit = validate()
            row = {
                "epoch": epoch,
                "train_loss": loss,
                **figures,
                "seconds": time.perf_counter() - t0,
            }
            last = time.perf_counter() - t0
            show(bar, epoch, row)
            stop = consider(epoch, row, merit)
            if not progress:
                log(plain_line(row, epochs, best_row()))
            if stop:
                log(f"early stop after epoch {epoch}: no better validation for {patience} epochs")
                stopped = True
                break
            if deadline is not None and time.monotonic() > deadline:
                log(f"time budget reached after epoch {epoch}")
                stopped = True
                break
    if best is None:  # epochs >= 1 is checked, so the loop ran at least once
        raise RuntimeError("training ran no epoch")
    model.load_state_dict(best[2])
    model.eval()
    return Fit(history, best[1], best[0], stopped, time.perf_counter() - started)


def plain_line(row: dict[str, Any], epochs: int, best: dict[str, Any]) -> str:
    """One epoch as a plain line, e.g. ``epoch 7/30  train 0.3121  val 0.2874  persistence
    0.2901  best epoch 7 by robust loss (val 0.2874)  12.3 s``: the training loss, the validation
    figure (RMSE for regression, weighted BCE for classification), the best epoch so far and the
    epoch's time. The best epoch is chosen on another figure than the one printed (a robust
    loss, so an outage's steps do not decide it; ROC AUC for classification), so a later epoch
    can print a lower ``val`` and still not be the best: the line says which figure decides."""
    key = "val_rmse" if "val_rmse" in row else "val_loss"
    loss = row.get("train_loss")
    parts = [f"epoch {row['epoch']}/{epochs}", "untrained" if loss is None else f"train {loss:.4f}"]
    parts.append(f"val {row[key]:.4f}")
    if row.get("val_naive_rmse") is not None:
        parts.append(f"persistence {row['val_naive_rmse']:.4f}")
    if "val_roc_auc" in row:
        auc = row["val_roc_auc"]
        parts.append(f"AUC {'n/a' if auc is None else f'{auc:.3f}'}")
    on = "ROC AUC" if "val_roc_auc" in row else "robust loss"
    parts.append(f"best epoch {best['epoch']} by {on} (val {best[key]:.4f})")
    parts.append(f"{row['seconds']:.1f} s")
    return "  ".join(parts)


class Progress:
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

    def __enter__(self) -> Progress:
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

    def epoch(self, epoch: int, row: dict[str, Any]) -> None:
        loss = row.get("train_loss")
        trained = "untrained" if loss is None else f"train loss {loss:.4f}"
        self.line(
            f"epoch {epoch:3d}  {trained}  val RMSE {row['val_rmse']:.4f}  persistence "
            f"{row['val_naive_rmse']:.4f}"
        )
