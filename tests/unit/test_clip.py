"""Readings far from their prediction enter the model clipped (forecaster/model/clip.py): the
rule by hand, the whole-segment runner against a reading-by-reading loop, and the choice made
in training.

Every randomized case names its seed in its failure message.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from forecaster.model import clip, spread
from forecaster.model.bundle import Manifest

MODEL = Path(__file__).resolve().parents[2] / "models" / "water-flow"

SEEDS = range(6)


def test_inputs_by_hand() -> None:
    values = np.array([10.0, 10.0, 10.0, -10.0, 10.0])
    predicted = np.array([0.0, np.nan, 0.0, 0.0, 9.0])
    limit = np.full(5, 3.0)
    after = np.array([False, False, True, False, False])
    seen, clipped = clip.inputs(values, predicted, limit, after)
    # clipped to 0 + 3; no prediction (a new stream); right after a clip; clipped to 0 - 3;
    # within the limit.
    np.testing.assert_array_equal(seen, [3.0, 10.0, 10.0, -3.0, 10.0])
    np.testing.assert_array_equal(clipped, [True, False, False, True, False])


def test_limits_follow_the_floored_spread() -> None:
    np.testing.assert_array_equal(clip.limits(np.array([2.0, 0.0]), 5.0, 3.0), [6.0, 1.5])


class Line:
    """A two-lag line ``y = 1.5 x_t − 0.5 x_{t−1}`` (a constant predicts itself), its state
    ``[1, R, 1]`` the last reading seen: small, and with memory, so a clipped reading changes
    what follows it. Steps rows of a padded batch (:data:`clip.Rows`)."""

    @staticmethod
    def run(
        x: np.ndarray, lens: np.ndarray, state: list[np.ndarray]
    ) -> tuple[np.ndarray, list[np.ndarray]]:
        v = x[:, :, 0]
        prev = np.concatenate([state[0][0], v[:, :-1]], axis=1)
        end = v[np.arange(len(lens)), np.asarray(lens) - 1]
        return 1.5 * v - 0.5 * prev, [end[None, :, None]]

    @staticmethod
    def zero() -> list[np.ndarray]:
        return [np.zeros((1, 1, 1))]

    @staticmethod
    def plain(values: np.ndarray) -> np.ndarray:
        """The line over a whole series, nothing clipped."""
        return Line.run(values[None, :, None], np.array([len(values)]), Line.zero())[0][0]

    @staticmethod
    def reference(values: np.ndarray, start: float, weight: float, k: float) -> np.ndarray:
        """One reading at a time, as the daemon's waves step one stream."""
        out = np.empty(len(values))
        state, pred, sp, after = Line.zero(), np.nan, start, False
        prev_value = np.nan
        for t, v in enumerate(values.tolist()):
            limit = clip.limits(np.array([sp]), start, k)
            seen, was = clip.inputs(np.array([v]), np.array([pred]), limit, after)
            y, state = Line.run(seen[None, :, None], np.array([1]), state)
            y = y[0]
            out[t], pred, after = y[0], y[0], bool(was[0])
            sp = float(spread.advance(sp, prev_value, v, weight))
            prev_value = v
        return out


def spiky(rng: np.random.Generator, n: int) -> np.ndarray:
    """A wandering series with spikes (one and two readings), level shifts and flat runs."""
    v = np.cumsum(rng.normal(0, 1, n)) * 0.3 + 50
    for t in rng.choice(n, n // 25, replace=False):
        v[t : t + int(rng.integers(1, 3))] += rng.choice([-1, 1]) * rng.uniform(10, 60)
    for t in rng.choice(n, 2, replace=False):
        v[t:] += rng.uniform(-30, 30)
    t = int(rng.integers(0, n - 20))
    v[t : t + 20] = v[t]
    return v


@pytest.mark.parametrize("seed", SEEDS)
def test_segment_equals_the_reading_by_reading_rule(seed: int, monkeypatch: Any) -> None:
    """Chunks, reruns and the restart after each clip give exactly the one-at-a-time loop's
    predictions, with small chunks too (several clips per chunk, clips at chunk edges)."""
    rng = np.random.default_rng(seed)
    values = spiky(rng, int(rng.integers(50, 600)))
    start, weight, k = 1.0, spread.WEIGHT, float(rng.choice([2.0, 3.0, 5.0]))
    want = Line.reference(values, start, weight, k)
    for chunk in (clip.CHUNK, 7, 1):
        monkeypatch.setattr(clip, "CHUNK", chunk)
        got = clip.segment(values, Line.run, Line.zero(), start, weight, k)
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-9, err_msg=f"seed={seed} {chunk}")
    assert not np.allclose(want, Line.plain(values)), f"seed={seed}: nothing was clipped"


def test_a_spike_is_removed_and_a_level_shift_passes_after_one_reading() -> None:
    """Flat at 10, a one-reading spike to 100, back to 10, then a shift to 40 that stays."""
    values = np.array([10.0] * 20 + [100.0] + [10.0] * 10 + [40.0] * 10)
    got = clip.segment(values, Line.run, Line.zero(), 1.0, spread.WEIGHT, 3.0)
    plain = Line.plain(values)
    # The spike's echo (the prediction after the next reading, through the second lag) is gone.
    assert abs(plain[21] - 10.0) > 30 and abs(got[21] - 10.0) < 1
    # The shift: its first reading is clipped, the second passes, and the line catches up
    # within a few readings instead of being held back for as long as the shift lasts.
    assert got[31] < 30 < plain[31] and abs(got[33] - 40.0) < 1e-9 and abs(got[-1] - 40.0) < 1e-9


def test_no_clip_is_the_plain_run() -> None:
    values = np.linspace(0, 10, 50)
    got = clip.segment(values, Line.run, Line.zero(), 1.0, spread.WEIGHT, 1e6)
    np.testing.assert_array_equal(got, Line.plain(values))


def test_a_manifest_clips_only_with_a_spread_scaled_interval() -> None:
    """The limit is in spreads: a bundle without them cannot say how far is too far."""
    raw = json.loads((MODEL / "model.json").read_text())
    scaled = {"coverage": 0.9, "lower": -1.0, "upper": 1.0, "n": 50}
    scaled |= {"spread_weight": 0.2, "spread_start": 1.0}
    assert Manifest.model_validate({**raw, "interval": scaled, "clip": 3.0}).clip == 3.0
    for interval in (None, {"coverage": 0.9, "lower": -1.0, "upper": 1.0, "n": 50}):
        with pytest.raises(ValueError, match="clip"):
            Manifest.model_validate({**raw, "interval": interval, "clip": 3.0})
    with pytest.raises(ValueError, match="clip"):
        Manifest.model_validate({**raw, "interval": scaled, "clip": 0.0})
