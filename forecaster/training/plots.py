"""Training figures (``loss.png``): matplotlib on a file-only backend, optional."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np


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


def plot_losses(history: list[dict[str, Any]], path: Path, log: Callable[[str], None]) -> None:
    """Training loss and validation RMSE (model vs persistence) per epoch."""
    plt = pyplot(log)
    if plt is None:
        return
    epochs = [h["epoch"] for h in history]
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 3.6))
    trained = [h for h in history if h.get("train_loss") is not None]
    a1.plot([h["epoch"] for h in trained], [h["train_loss"] for h in trained], marker="o")
    a1.set_title("training loss (Huber/MSE, scaled)")
    a1.set_xlabel("epoch")
    a2.plot(epochs, [h["val_rmse"] for h in history], marker="o", label="model")
    a2.plot(epochs, [h["val_naive_rmse"] for h in history], ls="--", label="persistence")
    a2.set_title("validation RMSE (raw units; epoch 0 = linear path alone)")
    a2.set_xlabel("epoch")
    a2.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_classify(history: list[dict[str, Any]], path: Path, log: Callable[[str], None]) -> None:
    """Weighted BCE (training and validation) and the validation metrics per epoch."""
    plt = pyplot(log)
    if plt is None:
        return
    epochs = [h["epoch"] for h in history]
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 3.6))
    a1.plot(epochs, [h["train_loss"] for h in history], marker="o", label="train")
    a1.plot(epochs, [h["val_loss"] for h in history], marker="o", label="validation")
    a1.set_title("weighted BCE")
    a1.set_xlabel("epoch")
    a1.legend()
    for key in ("roc_auc", "f1", "precision", "recall"):
        vals = [h[f"val_{key}"] for h in history]
        a2.plot(epochs, [np.nan if v is None else v for v in vals], marker="o", label=key)
    a2.set_title("validation")
    a2.set_xlabel("epoch")
    a2.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
