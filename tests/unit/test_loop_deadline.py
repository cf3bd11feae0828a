"""The epoch loop's time budget: it stops before an epoch expected to end past the deadline."""

from __future__ import annotations

import time
from typing import Any

import torch

from forecaster.training.loop import Progress, fit

EPOCH_S = 0.5


def test_stops_before_an_epoch_that_would_end_past_the_deadline() -> None:
    model = torch.nn.Linear(1, 1)
    ran: list[int] = []

    def train_epoch(epoch: int, bar: Progress) -> tuple[float, int]:
        ran.append(epoch)
        time.sleep(EPOCH_S)
        return 0.0, 1

    def validate() -> tuple[dict[str, Any], float]:
        return {"val_rmse": 1.0, "val_naive_rmse": 1.0}, -float(len(ran))

    logged: list[str] = []
    start = time.monotonic()
    result = fit(
        model,
        train_epoch,
        validate,
        epochs=50,
        patience=50,
        batches=1,
        progress=False,
        log=logged.append,
        deadline=start + 2.5 * EPOCH_S,
    )
    # Epochs 1 and 2 end by ~1 s; epoch 3 would end at ~1.5 s > 1.25 s: not started.
    assert ran == [1, 2], ran
    assert result.stopped_early
    assert time.monotonic() - start < 3 * EPOCH_S + 2.0
    assert any("would end past" in line for line in logged)
