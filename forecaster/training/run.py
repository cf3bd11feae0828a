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
from forecaster.training.config import TrainConfig
from forecaster.training.search import search
from forecaster.training.stateful import finish, prepare, train_one
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
        prep = prepare(data, cfg, log)
        if cfg.searched():
            model, result, chosen, record = search(prep, cfg, progress, log)
        else:
            chosen, record = cfg.resolved(), None
            model, result = train_one(prep, chosen, prep.candidates[0].ar, progress, log)
        return finish(prep, chosen, model, result, record, out_dir, log, started)
    finally:
        torch.set_num_threads(threads)
