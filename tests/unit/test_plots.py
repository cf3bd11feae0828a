"""The evaluate picture: drawn around the scored part, with intervals when the bundle has them."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from forecaster.evaluation.unroll import Unroll

pytest.importorskip("matplotlib")

from forecaster.evaluation.plots import _score_text, plot_predictions


def _unroll(n: int = 200, streams: int = 1, interval: bool = False) -> Unroll:
    rng = np.random.default_rng(0)
    rows = np.tile(np.delete(np.arange(n + 5), [50, 51, 52, 53, 54]), streams)  # a gap
    actual = np.cumsum(rng.normal(size=rows.size))
    predicted = actual + rng.normal(scale=0.5, size=rows.size)
    naive = np.roll(actual, 1)
    scored = np.tile(np.arange(n) >= 150, streams)
    return Unroll(
        stream=[f"s{k}" for k in range(streams) for _ in range(n)],
        row=rows,
        time=np.full(rows.size, np.nan),
        actual=actual,
        predicted=predicted,
        naive=naive,
        warm=np.ones(rows.size, dtype=bool),
        scored=scored,
        scale_diffs=np.diff(actual[:150]),
        segment_start=np.tile(np.arange(n) == 0, streams),
        lower=predicted - 1.0 if interval else None,
        upper=predicted + 1.0 if interval else None,
        coverage=0.9 if interval else None,
    )


@pytest.mark.parametrize(("streams", "interval"), [(1, False), (2, True)])
def test_plot_is_written(tmp_path: Path, streams: int, interval: bool) -> None:
    out = tmp_path / "p.png"
    plot_predictions(_unroll(streams=streams, interval=interval), out, "t")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_title_carries_the_score_of_the_stream_drawn() -> None:
    u = _unroll(interval=True)
    text = _score_text(u)
    sc = u.score().as_dict()
    assert f"RMSE {sc['rmse']:.4g} vs persistence {sc['naive_rmse']:.4g}" in text
    assert f"n={sc['n']}" in text and "interval coverage" in text and "target 90%" in text
    u.scored[:] = False
    assert _score_text(u) == "nothing scored"
