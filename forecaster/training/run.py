"""``forecaster train``: one entry point that runs the mode's training and writes the run directory.

Stateful regression: prepare the data and the linear path, search (or train the given model),
then guard, calibrate and write (:mod:`forecaster.training.stateful`). Window mode (regression or
event classification): :mod:`forecaster.training.window`. Both share the epoch loop of
:mod:`forecaster.training.loop`.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from forecaster.data import Dataset
from forecaster.training import linear
from forecaster.training.config import TrainConfig
from forecaster.training.search import search
from forecaster.training.stateful import Prepared, finish, prepare, train_one
from forecaster.training.tape import train_segments, validation_runs
from forecaster.training.window import train_window

#: Intra-op threads while training. One thread makes every run bit-for-bit repeatable on a
#: machine (same seed, same weights, same ``model.onnx``) and costs little at these sizes.
TRAIN_THREADS = 1


def train(
    data: Dataset,
    cfg: TrainConfig,
    out_dir: Path,
    progress: bool = True,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Fit a model, keep the best validation epoch (and trial), write the run directory."""
    cfg.check()
    threads = torch.get_num_threads()
    torch.set_num_threads(TRAIN_THREADS)
    torch.use_deterministic_algorithms(True)
    try:
        if cfg.mode == "window":
            return train_window(data, cfg.resolved(), out_dir, progress, log)
        started = time.perf_counter()
        clock = time.monotonic()
        prep = prepare(data, cfg, log)
        if cfg.linear and cfg.head == "delta":
            with_smoothing(prep, log)
        if cfg.searched():
            model, result, chosen, record = search(prep, cfg, progress, log, started=clock)
        else:
            chosen, record = cfg.resolved(), None
            model, result = train_one(prep, chosen, prep.candidates[0].ar, progress, log)
        return finish(prep, chosen, model, result, record, out_dir, log, started)
    finally:
        torch.set_num_threads(threads)


def with_smoothing(prep: Prepared, log: Callable[[str], None]) -> None:
    """Add exponential smoothing filters and forecast combinations to the linear candidates
    (:func:`forecaster.training.linear.extend`), ranked with the least-squares lines."""
    t0 = time.perf_counter()
    prep.candidates = linear.extend(
        prep.candidates,
        train_segments(prep.series, prep.cuts),
        validation_runs(prep.series, prep.cuts),
        prep.periods,
        len(prep.tape.x),
        prep.delta,
    )
    best = prep.candidates[0]
    log(
        f"with exponential smoothing and combinations: best linear path {best.ar.loss} over "
        f"{best.ar.size} readings, validation RMSE {best.val_rmse:.4g} of "
        f"{len(prep.candidates)} candidates ({time.perf_counter() - t0:.1f} s)"
    )
