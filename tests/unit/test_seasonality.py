"""Seasonal periods from training data: synthetic series with known periods, and the real files.

Every randomized case draws from a fixed seed and names it in its failure message.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from forecaster.data import load_csv
from forecaster.training.seasonality import calendar_candidates, detect_periods

DATA = Path(__file__).resolve().parents[2] / "data"
SEEDS = range(8)
HALF_HOUR = 1800.0
DAY = 86_400.0


def seasonal(rng: np.random.Generator, n: int, period: int, noise: float = 0.3) -> np.ndarray:
    """A sine of the given period plus a second harmonic, a trend and Gaussian noise."""
    t = np.arange(n)
    phase = 2 * np.pi * t / period
    return np.sin(phase) + 0.4 * np.sin(2 * phase + 1.0) + 0.002 * t + rng.normal(0, noise, size=n)


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("period", [7, 12, 24, 50])
def test_known_period_is_found_without_timestamps(seed: int, period: int) -> None:
    rng = np.random.default_rng(seed)
    x = seasonal(rng, 40 * period, period)
    found = detect_periods(x)
    assert found[:1] == [period], f"seed={seed} period={period}: found {found}"


@pytest.mark.parametrize("seed", SEEDS)
def test_random_walk_and_white_noise_have_no_period(seed: int) -> None:
    rng = np.random.default_rng(seed)
    n = int(rng.integers(100, 6000))
    walk = np.cumsum(rng.normal(size=n)) + 0.05 * np.arange(n)
    assert detect_periods(walk) == [], f"seed={seed} n={n}: random walk"
    assert detect_periods(rng.normal(size=n)) == [], f"seed={seed} n={n}: white noise"
    ar = np.zeros(n)
    shocks = rng.normal(size=n)
    for i in range(1, n):
        ar[i] = 0.95 * ar[i - 1] + shocks[i]
    assert detect_periods(ar) == [], f"seed={seed} n={n}: AR(1) 0.95"


@pytest.mark.parametrize("seed", SEEDS)
def test_short_monthly_series_finds_the_year(seed: int) -> None:
    """176 monthly points (wine-sales' length) with a trend and a yearly cycle → 12."""
    rng = np.random.default_rng(seed)
    n = 176
    x = 100 + 0.3 * np.arange(n) + seasonal(rng, n, 12, noise=0.5) * 10
    # Month starts: irregular spacing (28-31 days) is still "monthly".
    months = np.array(
        [np.datetime64("1980-01") + np.timedelta64(i, "M") for i in range(n)], dtype="datetime64[s]"
    ).astype(np.float64)
    assert detect_periods(x, months) == [12], f"seed={seed}"
    assert detect_periods(x) == [12], f"seed={seed} without timestamps"


@pytest.mark.parametrize("seed", SEEDS)
def test_outages_and_missing_values_do_not_hide_the_day(seed: int) -> None:
    """Hourly data with outages (drops to a floor for hours) and missing readings."""
    rng = np.random.default_rng(seed)
    n = 24 * 60
    x = 100 + 10 * seasonal(rng, n, 24)
    for start in rng.integers(0, n - 30, size=6):
        x[start : start + int(rng.integers(3, 30))] = 24.0
    x[rng.integers(0, n, size=n // 20)] = np.nan
    times = 1_600_000_000 + 3600.0 * np.arange(n)
    assert detect_periods(x, times) == [24], f"seed={seed}"
    assert detect_periods(x)[:1] == [24], f"seed={seed} without timestamps"


@pytest.mark.parametrize("seed", SEEDS)
def test_weekly_cycle_on_top_of_the_daily_one_is_kept(seed: int) -> None:
    """Half-hourly data whose weekends differ: 48 and 336, as in electricity demand."""
    rng = np.random.default_rng(seed)
    n = 48 * 7 * 8
    t = np.arange(n)
    weekend = ((t // 48) % 7 >= 5).astype(np.float64)
    x = 10 * np.sin(2 * np.pi * t / 48) * (1 - 0.6 * weekend) - 8 * weekend
    x = x + rng.normal(0, 0.5, size=n)
    times = 959_990_400 + HALF_HOUR * t
    assert detect_periods(x, times) == [48, 336], f"seed={seed}"
    # A pure daily cycle does not earn a weekly period.
    daily = 10 * np.sin(2 * np.pi * t / 48) + rng.normal(0, 0.5, size=n)
    assert detect_periods(daily, times) == [48], f"seed={seed} pure daily"


def test_calendar_candidates_follow_the_cadence() -> None:
    def grid(step: float, n: int = 2000) -> np.ndarray:
        return 1e9 + step * np.arange(n)

    assert calendar_candidates(grid(HALF_HOUR), 5000) == [48, 336]
    assert calendar_candidates(grid(3600.0), 5000) == [24, 168]
    assert calendar_candidates(grid(DAY), 5000) == [7, 365]
    assert calendar_candidates(grid(7 * DAY), 500) == [52]
    assert calendar_candidates(grid(30.4 * DAY), 200) == [12]
    assert calendar_candidates(grid(91 * DAY), 200) == [4]
    # Too short for a weekly cycle twice over: only the day.
    assert calendar_candidates(grid(3600.0), 200) == [24]
    assert calendar_candidates(None, 5000) == []
    # An irregular clock (7 s) has no calendar cycle within 2 % of a whole step count below 10.
    assert calendar_candidates(grid(7.0), 5000) == []


def test_too_short_or_empty_series_give_nothing() -> None:
    assert detect_periods(np.arange(10.0)) == []
    assert detect_periods(np.full(500, np.nan)) == []
    assert detect_periods(np.ones(500)) == []
    assert detect_periods(np.sin(np.arange(500)), max_periods=0) == []


@pytest.mark.parametrize(
    ("name", "column", "kwargs", "expected"),
    [
        ("taylor-demand.csv", "demand_mw", {"time_column": "time"}, [48, 336]),
        ("wine-sales.csv", "litres", {"time_column": "month"}, [12]),
        ("water-flow.csv", "Water flow [l/s]", {"time_column": "Time"}, [24]),
        ("yahoo.csv", "data", {}, [12, 24]),
        ("electric-devices.csv", "1", {"header": False}, [3]),
    ],
)
def test_real_series_training_parts(
    name: str, column: str, kwargs: dict[str, object], expected: list[int]
) -> None:
    """The first 80 % of each shipped file (the accuracy benchmark's training part)."""
    s = load_csv(DATA / name, [column], **kwargs).series[0]  # type: ignore[arg-type]
    cut = int(0.8 * len(s))
    times = None if s.times is None else s.times[:cut]
    assert detect_periods(s.values[:cut], times) == expected
