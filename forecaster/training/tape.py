"""The training readings: cut at ``--until``, split into training and validation parts, laid end to
end as one tape with segment starts marked, and the scaling statistics taken from it."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from forecaster.data import Dataset, Series, cut_index
from forecaster.errors import DataError
from forecaster.training import glitches
from forecaster.training.config import TrainConfig


@dataclass
class Tape:
    """The training readings laid end to end, with where each segment starts."""

    x: np.ndarray  # [N, F] raw
    nxt: np.ndarray  # [N] next raw value of feature 0, NaN at a segment's last reading
    reset: np.ndarray  # [N] True at a segment's first reading


def split(
    data: Dataset, cfg: TrainConfig, log: Callable[[str], None] | None = None
) -> tuple[list[Series], list[int]]:
    """Cut every series at ``until`` and find where its validation part starts. An ``until``
    past the end of every series is allowed (it cuts nothing) and said through ``log``: it is
    usually a row count mistaken for a row index, and nothing is left for a held-out score."""
    kept: list[Series] = []
    cuts: list[int] = []
    whole = 0
    for s in data.series:
        end = cut_index(s, cfg.until) if cfg.until is not None else len(s)
        whole += end == len(s)
        part = s.head(end)
        if len(part) == 0:
            continue
        kept.append(part)
        cuts.append(round(len(part) * (1.0 - cfg.val_fraction)))
    if not kept:
        raise DataError("no readings before --until")
    if cfg.until is not None and log is not None and whole == len(data.series):
        log(
            f"note: --until {cfg.until} is at or past the end of the data: training on every "
            "reading, nothing held out for evaluate --from"
        )
    return kept, cuts


def build_tape(series: list[Series], cuts: list[int]) -> Tape:
    xs: list[np.ndarray] = []
    nxt: list[np.ndarray] = []
    reset: list[np.ndarray] = []
    for s, cut in zip(series, cuts, strict=True):
        for a, b in s.segments():
            b = min(b, cut)
            if b - a < 2:
                continue
            v = s.values[a:b]
            xs.append(v[:, None])
            nxt.append(np.append(v[1:], np.nan))
            r = np.zeros(b - a, dtype=bool)
            r[0] = True
            reset.append(r)
    if not xs:
        raise DataError("no training segment has two consecutive readings")
    return Tape(np.concatenate(xs), np.concatenate(nxt), np.concatenate(reset))


def fit_scaling(tape: Tape) -> tuple[tuple[float, ...], tuple[float, ...], float]:
    mean = tape.x.mean(axis=0)
    std = tape.x.std(axis=0)
    std = np.where(std > 1e-12, std, 1.0)
    steps = tape.nxt - tape.x[:, 0]
    steps = steps[np.isfinite(steps)]
    # A robust spread (MAD): sensor data has outages whose steps would otherwise set the scale
    # and leave every ordinary step a tiny fraction of one unit.
    mad = float(np.median(np.abs(steps - np.median(steps)))) * 1.4826 if steps.size else 0.0
    delta = mad if mad > 1e-12 else (float(np.std(steps)) if steps.size else 1.0)
    return tuple(float(m) for m in mean), tuple(float(s) for s in std), max(delta, 1e-12)


def train_segments(series: list[Series], cuts: list[int]) -> list[np.ndarray]:
    """The training part's runs of consecutive readings (what the linear path is fitted on),
    gross glitches replaced by their neighbourhood's median (:mod:`glitches`)."""
    return glitches.cleaned(raw_train_segments(series, cuts))[0]


def raw_train_segments(series: list[Series], cuts: list[int]) -> list[np.ndarray]:
    """The training part's runs of consecutive readings, as read."""
    out = []
    for s, cut in zip(series, cuts, strict=True):
        for a, b in s.segments():
            if min(b, cut) - a >= 2:
                out.append(s.values[a : min(b, cut)])
    return out


def validation_runs(series: list[Series], cuts: list[int]) -> list[tuple[np.ndarray, int]]:
    """Segments reaching into the validation part, whole (a stream's buffer fills from its start,
    as in the daemon), with the index of their first validation reading."""
    out = []
    for s, cut in zip(series, cuts, strict=True):
        for a, b in s.segments():
            if b > cut and b - a >= 2:
                out.append((s.values[a:b], max(cut - a, 1)))
    return out
