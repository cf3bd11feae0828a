"""The accuracy benchmark's references and file discovery on short synthetic data (fast).

The full benchmark (``python -m benchmarks.accuracy``) trains models and is not run here. Every
randomized case names its seed in its failure message.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

from benchmarks.accuracy.discover import discover
from benchmarks.accuracy.references import (
    ar_differences,
    fit_ar,
    is_random_walk,
    references,
    rmse,
    seasonal_naive,
    skill,
)
from benchmarks.accuracy.run import summary

SEEDS = range(4)


def seasonal_series(seed: int, n: int = 240, period: int = 12) -> np.ndarray:
    rng = np.random.default_rng(seed)
    t = np.arange(n)
    return 50 + 0.05 * t + 10 * np.sin(2 * np.pi * t / period) + rng.normal(0, 1.0, size=n)


@pytest.mark.parametrize("seed", SEEDS)
def test_every_reference_forecasts_every_target_and_the_seasonal_ones_win(seed: int) -> None:
    x = seasonal_series(seed)
    cut = 192
    targets = np.arange(cut, x.size)
    refs = {r.name: r for r in references(x, cut, targets, [12])}
    assert set(refs) == {
        "persistence",
        "seasonal naive (12)",
        "AR(24) levels",
        "AR(13) levels",
        "AR(2) differences",
        "ETS(A,Ad,A 12)",
    }, f"seed={seed}"
    actual = x[targets]
    naive = rmse(actual, refs["persistence"].predicted)  # type: ignore[arg-type]
    skills = {}
    for name, r in refs.items():
        assert r.error is None and r.predicted is not None, f"seed={seed} {name}: {r.error}"
        assert r.predicted.shape == targets.shape and np.isfinite(r.predicted).all()
        skills[name] = skill(rmse(actual, r.predicted), naive)
    assert skills["persistence"] == 0.0
    # A sine of amplitude 10 under noise 1: knowing the season cuts the error a lot.
    for name in ("seasonal naive (12)", "AR(13) levels", "ETS(A,Ad,A 12)"):
        assert skills[name] > 0.4, f"seed={seed} {name}: {skills[name]:.3f}"
    assert not is_random_walk(skills), f"seed={seed}"


@pytest.mark.parametrize("seed", SEEDS)
def test_least_squares_ar_recovers_known_coefficients(seed: int) -> None:
    rng = np.random.default_rng(seed)
    n = 5000
    x = np.zeros(n)
    e = rng.normal(size=n)
    for t in range(2, n):
        x[t] = 1.0 + 0.6 * x[t - 1] - 0.3 * x[t - 2] + e[t]
    coef = fit_ar(x, 2)
    np.testing.assert_allclose(coef, [1.0, 0.6, -0.3], atol=0.06, err_msg=f"seed={seed}")


def test_forecasts_use_only_earlier_readings() -> None:
    """Changing a target's own value must not change any forecast of it (no peeking)."""
    x = seasonal_series(0)
    cut = 192
    targets = np.arange(cut, x.size)
    base = {r.name: r.predicted for r in references(x, cut, targets, [12])}
    y = x.copy()
    y[-1] += 1000.0
    moved = {r.name: r.predicted for r in references(y, cut, targets, [12])}
    for name, pred in base.items():
        after = moved[name]
        assert pred is not None and after is not None
        np.testing.assert_allclose(after[-1], pred[-1], err_msg=name)


def test_missing_readings_fall_back_to_persistence() -> None:
    x = seasonal_series(1)
    x[200] = np.nan
    targets = np.array([201, 213])  # 201's previous is present; 213 - 12 = 201 present
    x[189] = np.nan  # 201 - 12 = 189 missing: seasonal naive falls back to x[200]...
    x[200] = 7.0  # ...which is present again
    pred = seasonal_naive(x, targets, 12)
    assert pred[0] == 7.0 and pred[1] == x[201]
    assert np.isfinite(ar_differences(x, 150, targets)).all()


@pytest.mark.parametrize("seed", SEEDS)
def test_a_random_walk_is_marked(seed: int) -> None:
    rng = np.random.default_rng(seed)
    x = np.cumsum(rng.normal(size=600))
    cut = 480
    targets = np.arange(cut, x.size)
    refs = references(x, cut, targets, [])
    naive = rmse(x[targets], refs[0].predicted)  # type: ignore[arg-type]
    skills = {
        r.name: skill(rmse(x[targets], r.predicted), naive) for r in refs if r.predicted is not None
    }
    assert is_random_walk(skills), f"seed={seed}: {skills}"


def test_discovery_reads_files_as_the_cli_needs(tmp_path: Path) -> None:
    (tmp_path / "a.csv").write_text(
        "time,flow,label\n" + "".join(f"2024-01-01T{h:02d}:00:00Z,{h * 1.5},0\n" for h in range(20))
    )
    (tmp_path / "b.csv").write_text("".join(f"{i},{(-1) ** i * 0.1 + i}\n" for i in range(1, 30)))
    specs = discover(tmp_path)
    assert [(s.path.name, s.column, s.rows) for s in specs] == [
        ("a.csv", "flow", 20),
        ("b.csv", "1", 29),
    ]
    assert specs[0].read_flags() == ["--column", "flow", "--time-column", "time"]
    assert specs[1].read_flags() == ["--column", "1", "--no-header"]


def test_summary_counts_targets_over_non_random_walks() -> None:
    rows: list[dict[str, Any]] = [
        {"model_skill": 0.5, "random_walk": False, "beats_best": True, "train_seconds": 10.0},
        {"model_skill": -0.1, "random_walk": False, "beats_best": False, "train_seconds": 30.0},
        {"model_skill": 0.0, "random_walk": True, "beats_best": True, "train_seconds": 5.0},
        {"error": "train exited 2", "random_walk": False},
    ]
    s = summary(rows)
    assert s["failed"] == 1 and s["random_walks"] == 1 and s["skill_nonnegative"] == 2
    assert s["not_random_walk"] == 3 and s["beats_best_reference"] == 1
    assert s["max_train_seconds"] == 30.0


def test_the_proxy_ships_its_first_candidate_and_scores_every_other(tmp_path: Path) -> None:
    """``proxy --candidates``: the shipped line is the best validated one, and every candidate
    has a finite held-out skill (persistence exactly 0)."""
    from benchmarks.accuracy.proxy import linear_only

    x = seasonal_series(0, n=300)
    (tmp_path / "s.csv").write_text("value\n" + "\n".join(f"{v:.6f}" for v in x) + "\n")
    (spec,) = discover(tmp_path)
    row = linear_only(spec, every=True)
    assert row.candidates, "no candidates listed (seed 0)"
    label, _, held = row.candidates[0]
    assert label == row.line and held == row.skill, (row.line, label, held, row.skill)
    assert all(np.isfinite(h) for _, _, h in row.candidates)
    assert [h for lab, _, h in row.candidates if lab.startswith("persistence")] == [0.0]
    assert row.skill > 0.5, f"seasonal series (seed 0): shipped line skill {row.skill:+.3f}"
    assert linear_only(spec).candidates == ()
    assert 0.5 < row.coverage <= 1 and 0.5 < row.coverage_scaled <= 1, row


def test_the_proxy_writes_every_statsmodels_series(tmp_path: Path) -> None:
    from benchmarks.accuracy.proxy import write_statsmodels_series

    write_statsmodels_series(tmp_path)
    specs = discover(tmp_path)
    assert len(specs) == 15, [s.name for s in specs]
    assert all(s.rows >= 50 for s in specs), [(s.name, s.rows) for s in specs]
