"""Every training option in one frozen record, checked once and written verbatim to the report."""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, Literal

from forecaster.errors import DataError


@dataclass(frozen=True)
class TrainConfig:
    """Every training option; recorded verbatim in ``report.json``."""

    #: None = chosen by the search (stateful regression) or the mode's default (see resolved()).
    cell: Literal["lstm", "gru"] | None = None
    layers: int | None = None
    hidden: int | None = None
    dropout: float = 0.0
    head: Literal["delta", "level"] = "delta"
    loss: Literal["mse", "huber"] = "huber"
    lr: float | None = None
    batch_size: int = 32
    epochs: int | None = None
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
    linear: bool = True
    trials: int = 4
    budget: float = 240.0
    coverage: float = 0.9

    def resolved(self, **chosen: Any) -> TrainConfig:
        """Every option set: ``chosen`` (a search trial's values) over the given ones, then the
        mode's defaults (stateful: LSTM 1x64, 30 epochs; window: the seed example, LSTM(128),
        10 epochs)."""
        window = self.mode == "window"
        defaults: dict[str, Any] = {
            "cell": "lstm",
            "layers": 1,
            "hidden": 128 if window else 64,
            "lr": 1e-3,
            "epochs": 10 if window else 30,
        }
        given = {k: getattr(self, k) for k in defaults if getattr(self, k) is not None}
        return replace(self, **{**defaults, **given, **chosen})

    def searched(self) -> tuple[str, ...]:
        """The options the search chooses (stateful regression, ``trials`` > 1): all of cell,
        layers, hidden and lr, or none once any of them is given — an option on the command line
        means "this model", with the defaults for the rest, exactly as before the search."""
        arch = ("cell", "layers", "hidden", "lr")
        if self.trials <= 1 or self.mode != "stateful" or self.task != "regress":
            return ()
        if any(getattr(self, k) is not None for k in arch):
            return ()
        return arch

    def check(self) -> None:
        problems = [
            (self.layers is not None and self.layers < 1, "--layers must be at least 1"),
            (self.hidden is not None and self.hidden < 1, "--hidden must be at least 1"),
            (not 0.0 <= self.dropout < 1.0, "--dropout must be in [0, 1)"),
            (self.lr is not None and self.lr <= 0, "--lr must be positive"),
            (self.batch_size < 1, "--batch-size must be at least 1"),
            (self.epochs is not None and self.epochs < 1, "--epochs must be at least 1"),
            (self.trials < 1, "--trials must be at least 1"),
            (self.budget <= 0, "--budget must be positive (seconds)"),
            (not 0.0 < self.coverage < 1.0, "--coverage must be in (0, 1)"),
            (
                self.cell is not None and self.cell not in ("lstm", "gru"),
                "--cell must be lstm or gru",
            ),
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
