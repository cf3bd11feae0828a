"""Pictures of an unroll; matplotlib comes with the ``train`` extra, not the serving install.

One picture should answer "is the model any good where it was scored?" at a glance, so it is
built around the scored (held-out) part rather than the whole series, whose outages and level
shifts would squeeze the interesting region into a flat line:

- a thin overview strip of the whole series, with the scored part shaded;
- the scored part, zoomed: actual, the model's one-step forecast, persistence ("the next value
  equals the last one", the baseline every score is compared with) and the prediction interval
  when the bundle has one;
- the residuals of both on the same axis, where a better model is the visibly tighter band;
- the score in the title: RMSE of the model and of persistence, skill and n.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from forecaster.errors import DataError
from forecaster.evaluation.unroll import Unroll

MODEL = "tab:blue"
NAIVE = "tab:orange"
CONTEXT = 0.15  # share of the zoomed window shown before the first scored target


def _with_breaks(x: np.ndarray, rows: np.ndarray, *ys: np.ndarray) -> list[np.ndarray]:
    """NaN between non-consecutive rows, so a line is not drawn across a gap in the data."""
    gap = np.flatnonzero(np.diff(rows) > 1) + 1
    return [np.insert(v.astype(np.float64), gap, np.nan) for v in (x, *ys)]


def _score_text(result: Unroll) -> str:
    try:
        sc = result.score().as_dict()
    except DataError:
        return "nothing scored"
    text = (
        f"RMSE {sc['rmse']:.4g} vs persistence {sc['naive_rmse']:.4g} · skill "
        f"{sc['skill']:+.3f} · n={sc['n']}"
    )
    iv = result.interval_score()
    if iv is not None:
        text += (
            f" · interval coverage {iv['interval_coverage']:.1%} "
            f"(target {iv['interval_target']:.0%})"
        )
    return text


def plot_predictions(result: Unroll, path: Path, title: str) -> None:
    """Overview, zoomed scored part and residuals of the first stream; needs matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise DataError("--plot needs matplotlib: pip install 'forecaster[train]'") from None
    names = list(dict.fromkeys(result.stream))
    first = names[0]
    m = np.array([s == first for s in result.stream])
    rows = result.row[m]
    x = rows.astype(np.float64)
    actual, pred, naive = result.actual[m], result.predicted[m], result.naive[m]
    scored = result.scored[m]
    lower = None if result.lower is None else result.lower[m]
    upper = None if result.upper is None else result.upper[m]

    # The zoom: the scored targets plus a little context before them (everything if none).
    if scored.any():
        lo, hi = float(x[scored].min()), float(x[scored].max())
        lo = max(float(x.min()), lo - CONTEXT * max(hi - lo, 1.0))
    else:
        lo, hi = float(x.min()), float(x.max())
    z = (x >= lo) & (x <= hi)

    fig, (ax0, ax1, ax2) = plt.subplots(
        3, 1, figsize=(11, 7.5), gridspec_kw={"height_ratios": [1, 3, 1.4]}
    )
    # 1. overview
    ox, oa = _with_breaks(x, rows, actual)
    ax0.plot(ox, oa, lw=0.7, color="black")
    ax0.axvspan(lo, hi, color="tab:green", alpha=0.12)
    ax0.set_title("whole series (shaded: the part below)", fontsize=9, loc="left")
    ax0.tick_params(labelsize=8)

    # 2. zoomed scored part
    zx, za, zp, zn = _with_breaks(x[z], rows[z], actual[z], pred[z], naive[z])
    if lower is not None and upper is not None:
        _, zl, zu = _with_breaks(x[z], rows[z], lower[z], upper[z])
        ax1.fill_between(zx, zl, zu, color=MODEL, alpha=0.15, lw=0, label="prediction interval")
    ax1.plot(zx, za, color="black", lw=1.3, label="actual")
    ax1.plot(zx, zp, color=MODEL, lw=1.1, label="model, one step ahead")
    ax1.plot(zx, zn, color=NAIVE, lw=0.9, ls="--", label="persistence (last value)")
    if scored.any() and lo < float(x[scored].min()):
        ax1.axvline(float(x[scored].min()), color="grey", lw=0.8, ls=":")
        ax1.text(
            float(x[scored].min()),
            0.02,
            " scored from here",
            transform=ax1.get_xaxis_transform(),
            va="bottom",
            fontsize=8,
            color="grey",
        )
    ax1.legend(loc="upper left", fontsize=8, ncols=4, frameon=False)
    ax1.margins(y=0.15)  # room for the legend above the lines
    ax1.set_ylabel("value")

    # 3. residuals
    _, rm, rn = _with_breaks(x[z], rows[z], (actual - pred)[z], (actual - naive)[z])
    ax2.axhline(0, color="black", lw=0.6)
    ax2.plot(zx, rn, color=NAIVE, lw=0.8, alpha=0.8, label="persistence error")
    ax2.plot(zx, rm, color=MODEL, lw=0.9, label="model error")
    ax2.margins(y=0.2)
    ax2.legend(loc="upper left", fontsize=8, ncols=2, frameon=False)
    ax2.set_ylabel("actual − forecast")
    ax2.set_xlabel("row")
    for ax in (ax1, ax2):
        ax.set_xlim(lo, hi)
        ax.grid(alpha=0.25)

    more = f" · stream {first} (1 of {len(names)})" if len(names) > 1 else ""
    fig.suptitle(f"{title}{more}\n{_score_text(_only(result, m))}", fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _only(result: Unroll, m: np.ndarray) -> Unroll:
    """The unroll restricted to one stream, so the title's score matches the picture."""
    if m.all():
        return result
    fields: dict[str, Any] = {}
    for name in ("row", "time", "actual", "predicted", "naive", "warm", "scored", "segment_start"):
        fields[name] = getattr(result, name)[m]
    return Unroll(
        stream=[s for s, keep in zip(result.stream, m, strict=True) if keep],
        scale_diffs=result.scale_diffs,
        lower=None if result.lower is None else result.lower[m],
        upper=None if result.upper is None else result.upper[m],
        coverage=result.coverage,
        **fields,
    )
