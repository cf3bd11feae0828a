"""Pictures of an unroll; matplotlib comes with the ``train`` extra, not the serving install."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from forecaster.errors import DataError
from forecaster.evaluation.unroll import Unroll


def plot_predictions(result: Unroll, path: Path, title: str) -> None:
    """Actual vs predicted for the first stream; needs matplotlib (the ``train`` extra)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise DataError("--plot needs matplotlib: pip install 'forecaster[train]'") from None
    first = result.stream[0]
    m = np.array([s == first for s in result.stream])
    x = result.row[m]
    fig, ax = plt.subplots(figsize=(11, 4))
    ax.plot(x, result.actual[m], label="actual", lw=1.0, color="black")
    ax.plot(x, result.predicted[m], label="predicted (one step ahead)", lw=1.0, color="tab:blue")
    scored_rows = x[result.scored[m]]
    if len(scored_rows):
        ax.axvspan(
            scored_rows.min(), scored_rows.max(), color="tab:green", alpha=0.08, label="scored"
        )
    ax.set_xlabel("row")
    ax.set_title(title)
    ax.legend(loc="best")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
