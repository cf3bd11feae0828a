"""Gross glitches in training data (``forecaster.training.glitches``): found where a sensor export
would have them, left alone where the series' own pattern only looks like them, and kept out of
the linear fits so that one of them no longer decides the shipped line."""

from __future__ import annotations

import numpy as np
import pytest

from forecaster.data import Series
from forecaster.training import glitches, linear
from forecaster.training.tape import raw_train_segments, train_segments, validation_runs

SEEDS = [0, 1, 2]


def noise(seed: int, n: int = 600) -> np.ndarray:
    return 10.0 + np.random.default_rng(seed).standard_normal(n)


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("bad", [1e6, 65535.0, -1e4, 0.0])
def test_a_glitch_is_found_and_replaced_by_its_neighbourhood(seed: int, bad: float) -> None:
    v = noise(seed) + 100.0  # levels around 110: a 0 is a glitch too
    v[250] = bad
    out, found = glitches.cleaned([v])
    assert found == 1, f"seed={seed}"
    assert out[0][250] == pytest.approx(np.median(v[247:254]))
    changed = np.nonzero(out[0] != v)[0]
    assert changed.tolist() == [250], f"seed={seed}"
    assert v[250] == bad  # the caller's data is not modified


@pytest.mark.parametrize("seed", SEEDS)
def test_a_short_run_of_glitches_is_found_too(seed: int) -> None:
    v = noise(seed, 2000)
    v[700:703] = 65535.0  # three bad frames in a row: the neighbourhood's median is still 10
    out, found = glitches.cleaned([v])
    assert found == 3 and np.all(np.abs(out[0][700:703] - 10.0) < 4), f"seed={seed}"


def _patterns(seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    t = np.arange(1200)
    eps = 0.01 * rng.standard_normal(t.size)
    pulses = np.zeros(t.size)
    pulses[::10] = 50.0  # a machine cycle: one reading in ten, far above the rest
    outage = 5.0 + eps
    outage[400:420] = 0.0  # an outage that lasts: the median follows it
    return {
        "square wave": np.where((t // 3) % 2 == 0, 0.0, 10.0) + eps,
        "sine": np.sin(t / 3.0) + eps,
        "level shift": np.where(t < 600, 0.0, 100.0) + eps,
        "outage": outage,
        "pulses": pulses + eps,
        "random walk": np.cumsum(rng.standard_normal(t.size)),
        "constant": np.full(t.size, 7.0),
        "short": np.array([1.0, 1e9, 1.0]),
    }


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize(
    "name",
    ["square wave", "sine", "level shift", "outage", "pulses", "random walk", "constant", "short"],
)
def test_a_pattern_of_the_series_is_not_a_glitch(seed: int, name: str) -> None:
    v = _patterns(seed)[name]
    out, found = glitches.cleaned([v])
    assert found == 0, f"seed={seed}: {name} lost {found} readings"
    assert out[0] is v


@pytest.mark.parametrize("seed", SEEDS)
def test_one_glitch_no_longer_sets_the_line(seed: int) -> None:
    # White noise around 10: the best line predicts the mean, skill ~ 1 - 1/sqrt(2) ~ 0.29 against
    # persistence. One reading of 1e6 among the training readings made the fitted lines
    # persistence-like (measured: skill +0.04 on the held-out part).
    v = noise(seed, 800)
    v[300] = 1e6
    s = Series("v", v, np.arange(v.size), None)
    train, held = [s.head(480)], v[480:]
    cuts = [400]  # validation: readings 400-479

    def held_out_skill(segments: list[np.ndarray]) -> float:
        best = linear.select(segments, validation_runs(train, cuts), [(1,), (1, 2, 3)], 1.0)[0]
        refit = linear.fit(segments, best.ar.lags, best.ar.loss) if best.ar.size else best.ar
        pred = linear.ar_segment(held, refit)[:-1]
        naive = np.sqrt(np.mean(np.diff(held) ** 2))
        return 1.0 - float(np.sqrt(np.mean((pred - held[1:]) ** 2))) / naive

    raw = held_out_skill(raw_train_segments(train, cuts))
    clean = held_out_skill(train_segments(train, cuts))
    assert clean > 0.2, f"seed={seed}: skill {clean:+.3f} with the glitch set aside"
    assert clean > raw + 0.1, f"seed={seed}: {raw:+.3f} raw, {clean:+.3f} cleaned"
