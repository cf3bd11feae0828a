"""Issue 12 on one real series: the default command beats the seasonal baselines it contains.

wine-sales (monthly, 176 points, a yearly cycle): the network alone scored +0.015 on such a series
where AR on levels scored +0.87. The default recipe must find the period (12), put a seasonal
linear path under the network and, held out, beat seasonal naive and a least-squares AR(13) on
levels, both computed here independently with plain numpy on the same training rows.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
WINE = ROOT / "data" / "wine-sales.csv"
CUT = 141  # the first 80 % of 176 rows


def skill(actual: np.ndarray, pred: np.ndarray, naive: np.ndarray) -> float:
    return 1 - np.sqrt(np.mean((pred - actual) ** 2)) / np.sqrt(np.mean((naive - actual) ** 2))


def test_default_recipe_beats_seasonal_references_on_wine(cli, tmp_path: Path) -> None:
    run, bundle = tmp_path / "run", tmp_path / "bundle"
    cli(
        *("train", WINE, "--time-column", "month", "--until", str(CUT), "--trials", "2"),
        *("--out", run, "-q"),
        check=True,
    )
    cli("export", run, "--out", bundle, check=True)
    got = json.loads(cli("evaluate", bundle, WINE, "--from", str(CUT), "--json", check=True).stdout)
    manifest = json.loads(cli("inspect", bundle, "--json", check=True).stdout)
    assert manifest["seasonality"] == [12] and manifest["format_version"] == 3
    assert manifest["linear"] is not None and 12 in manifest["linear"]["lags"]
    assert 0 < got["interval_coverage"] <= 1 and got["interval_width"] > 0

    x = np.loadtxt(WINE, delimiter=",", skiprows=1, usecols=1)
    t = np.arange(CUT, len(x))
    actual, naive = x[t], x[t - 1]
    seasonal_naive = x[t - 12]
    rows = np.arange(13, CUT)
    design = np.column_stack([np.ones(len(rows)), *(x[rows - k] for k in range(1, 14))])
    coef, *_ = np.linalg.lstsq(design, x[rows], rcond=None)
    ar13 = np.column_stack([np.ones(len(t)), *(x[t - k] for k in range(1, 14))]) @ coef
    refs = {
        "seasonal naive": skill(actual, seasonal_naive, naive),
        "AR(13)": skill(actual, ar13, naive),
    }
    assert got["n"] == len(t)
    assert all(got["skill"] > v for v in refs.values()), (got["skill"], refs)
