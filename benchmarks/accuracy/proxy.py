"""``python -m benchmarks.accuracy.proxy [--statsmodels] [--data DIR]``: the linear path alone.

A quick check of the training's candidate family and selection on more series than ``data/``
holds, in seconds rather than minutes: for each series, the protocol's split (first 80 %), the
candidates of :func:`forecaster.training.stateful.prepare` and
:func:`forecaster.training.run.with_smoothing` ranked on the validation part, the best one
refitted on the whole training part, scored one step ahead on the last 20 % against the same
references as the full benchmark. No network is trained: this is what ships whenever the
network's validation gain is not significant (most series here), not the full benchmark. The
clip limit (readings far from their prediction enter the line clipped, :mod:`forecaster.model.clip`)
is chosen on validation by training's rule (:func:`forecaster.training.stateful.pick_clip`).

``--statsmodels`` first writes fifteen public-domain series that statsmodels ships offline into
``--data`` (default: a temporary folder), then runs on them: weekly CO2 at Mauna Loa, monthly
Euro-area electrical equipment orders, monthly El Niño sea surface temperature, yearly sunspots,
yearly Nile flow; from the quarterly US macro data, unemployment, inflation, the 3-month bill
rate and the real interest rate as levels, and real GDP, real investment, M1 and the CPI as
quarterly growth (100 × log change); and Danish quarterly inflation and interest rate. Short,
shifting macro series are where selection on a small validation part goes wrong (the Danish
interest rate: 17 validation readings, and a line that mean-reverts to the training level).

``--candidates`` also prints, for each series, every candidate's validation RMSE and the
held-out skill it would have had refitted and shipped: whether a loss comes from the selection
(a better candidate was there) or from the family (none was).

Each row also gives the held-out coverage of the shipped line's 90 % interval calibrated on its
validation residuals both ways: as constant offsets (what training shipped before 2026-12-02)
and scaled by each stream's spread, as training now does (:mod:`forecaster.model.spread`).
"""

from __future__ import annotations

import argparse
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from benchmarks.accuracy.discover import SeriesSpec, discover
from benchmarks.accuracy.references import is_random_walk, references, rmse, skill
from benchmarks.accuracy.run import ROOT, TRAIN_FRACTION
from forecaster.data import cut_index, load_csv
from forecaster.model import clip, spread
from forecaster.model.bundle import Interval
from forecaster.training import linear
from forecaster.training.config import TrainConfig
from forecaster.training.intervals import conformal, scaled
from forecaster.training.run import with_smoothing
from forecaster.training.seasonality import detect_periods
from forecaster.training.stateful import CLIP_LIMITS, pick_clip, prepare
from forecaster.training.tape import raw_train_segments, train_segments, validation_runs

#: Coverage of the intervals checked.
COVERAGE = 0.9


def write_statsmodels_series(folder: Path) -> None:
    """The fifteen statsmodels series as CSVs (``time,value`` where they have dates)."""
    import pandas as pd
    from statsmodels import datasets
    from statsmodels.datasets import elec_equip

    folder.mkdir(parents=True, exist_ok=True)

    def dated(name: str, index: pd.Index, values: np.ndarray) -> None:
        frame = pd.DataFrame({"time": pd.DatetimeIndex(index).strftime("%Y-%m-%d"), name: values})
        frame.to_csv(folder / f"{name}.csv", index=False)

    co2 = datasets.co2.load_pandas().data["co2"].interpolate()  # 59 missing weeks
    dated("co2", co2.index, co2.to_numpy())
    equip = elec_equip.load().data.iloc[:, 0]
    dated("elec_equip", equip.index, equip.to_numpy())
    nino = datasets.elnino.load_pandas().data.iloc[:, 1:13].to_numpy().ravel()
    dated("elnino", pd.date_range("1950-01-01", periods=nino.size, freq="MS"), nino)
    macro = datasets.macrodata.load_pandas().data
    quarters = pd.period_range("1959Q1", periods=len(macro), freq="Q").to_timestamp()
    for column in ("unemp", "infl"):
        dated(column, quarters, macro[column].to_numpy())
    for column in ("tbilrate", "realint"):
        dated(column, quarters, macro[column].to_numpy())
    for column in ("realgdp", "realinv", "m1", "cpi"):
        growth = 100.0 * np.diff(np.log(macro[column].to_numpy()))
        dated(f"{column}_growth", quarters[1:], growth)
    danish = datasets.interest_inflation.load_pandas().data
    danish_quarters = pd.period_range("1972Q2", periods=len(danish), freq="Q").to_timestamp()
    dated("dk_inflation", danish_quarters, danish["Dp"].to_numpy())
    dated("dk_interest", danish_quarters, danish["R"].to_numpy())
    sun = datasets.sunspots.load_pandas().data["SUNACTIVITY"].to_numpy()
    pd.DataFrame({"sunactivity": sun}).to_csv(folder / "sunspots.csv", index=False)
    nile = datasets.nile.load_pandas().data["volume"].to_numpy()
    pd.DataFrame({"nile": nile}).to_csv(folder / "nile.csv", index=False)


@dataclass(frozen=True)
class Row:
    """One series: the shipped line's held-out skill and the best reference's."""

    series: str
    line: str
    skill: float
    best_reference: str
    best_reference_skill: float
    random_walk: bool
    #: Held-out coverage of the 90 % interval: constant offsets, and scaled by the spread.
    coverage: float = float("nan")
    coverage_scaled: float = float("nan")
    #: With ``--candidates``: each candidate's label, validation RMSE and held-out skill.
    candidates: tuple[tuple[str, float, float], ...] = ()

    @property
    def beats(self) -> bool:
        return self.skill >= self.best_reference_skill


def coverages(
    valid: list[tuple[np.ndarray, np.ndarray, np.ndarray]],
    held: tuple[np.ndarray, np.ndarray, np.ndarray],
    start: float,
) -> tuple[float, float]:
    """Held-out coverage of intervals calibrated on ``valid``, constant and spread-scaled.

    Each part is ``(actual, predicted, the stream's spread at the prediction)``, aligned;
    ``start``: a new stream's spread."""
    residuals = np.concatenate([a - p for a, p, _ in valid])
    at = np.concatenate([s for _, _, s in valid])
    a, p, s = held
    ok = np.isfinite(a) & np.isfinite(p)
    out = []
    for fitted, where in (
        (conformal(residuals, COVERAGE), None),
        (scaled(residuals, at, start, COVERAGE), s[ok]),
    ):
        if fitted is None or not ok.any():
            out.append(float("nan"))
            continue
        lower, upper = Interval.model_validate(fitted).bounds(p[ok], where)
        out.append(float(np.mean((a[ok] >= lower) & (a[ok] <= upper))))
    return out[0], out[1]


def line_run(ar: linear.LinearAR) -> clip.Rows:
    """The line over the rows of a padded batch (:data:`clip.Rows`), its state ``[1, R, P]``:
    a "filled" flag and the ``P - 1`` readings its buffer still needs (a new stream's buffer is
    filled with its first reading, as the graph's is)."""
    keep = max(ar.size - 1, 0)

    def run(
        x: np.ndarray, lens: np.ndarray, state: list[np.ndarray]
    ) -> tuple[np.ndarray, list[np.ndarray]]:
        out = np.empty(x.shape[:2], dtype=np.float64)
        ends = np.empty((1, x.shape[0], keep + 1))
        for r, n in enumerate(np.asarray(lens).tolist()):
            v = x[r, :n, 0]
            filled, buf = state[0][0, r, 0], state[0][0, r, 1:]
            full = np.concatenate([buf if filled else np.full(keep, v[0]), v])
            out[r, :n] = linear.ar_segment(full, ar)[keep:]
            ends[0, r] = np.concatenate([[1.0], full[len(full) - keep :]])
        return out, [ends]

    return run


def predictions(
    values: np.ndarray, ar: linear.LinearAR, start: float, k: float | None
) -> np.ndarray:
    """The line's one-step predictions over a segment, readings clipped at ``k`` spreads."""
    if k is None:
        return linear.ar_segment(values, ar)
    zero = [np.zeros((1, 1, max(ar.size - 1, 0) + 1))]
    return clip.segment(values, line_run(ar), zero, start, spread.WEIGHT, k)


def described(ar: linear.LinearAR) -> str:
    """``huber [1-12]``, or ``persistence`` for no line at all."""
    return f"{ar.loss} [{linear.lags_text(ar.lags)}]" if ar.size else "persistence"


def linear_only(spec: SeriesSpec, every: bool = False) -> Row:
    """The best validated line, refitted on the training part, and the references' skills
    (``every``: and what each other candidate would have scored held out)."""
    data = load_csv(spec.path, [spec.column], spec.time_column, header=spec.header)
    series = data.series[0]
    values = series.values
    until = str(int(TRAIN_FRACTION * spec.rows))
    cut = cut_index(series, until)
    prep = prepare(data, TrainConfig(until=until), lambda _m: None)
    with_smoothing(prep, lambda _m: None)
    whole = train_segments(prep.series, [len(s) for s in prep.series])
    targets = np.arange(cut, len(values))
    naive = rmse(values[targets], values[targets - 1])

    start = spread.typical(raw_train_segments(prep.series, prep.cuts))

    def held_out(ar: linear.LinearAR, k: float | None = None) -> tuple[linear.LinearAR, float]:
        """The line refitted on the whole training part, and its held-out skill."""
        refit = linear.fit(whole, ar.lags, ar.loss) if ar.size else ar
        pred = predictions(values, refit, start, k)[cut - 1 : -1]
        return refit, skill(rmse(values[targets], pred), naive)

    def validated(k: float | None) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
        """(actual, predicted, spread at the prediction) over each validation run."""
        out = []
        for seg, first in validation_runs(prep.series, prep.cuts):
            pred = predictions(seg, chosen, start, k)[:-1]  # pred[i] is for seg[i + 1]
            at = spread.along(seg, start, spread.WEIGHT)[first - 1 : -1]
            out.append((seg[first:], pred[first - 1 :], at))
        return out

    def val_rmse(parts: list[tuple[np.ndarray, np.ndarray, np.ndarray]]) -> float:
        return float(np.sqrt(np.mean(np.concatenate([(a - p) ** 2 for a, p, _ in parts]))))

    chosen = prep.candidates[0].ar
    valid = validated(None)
    # The same clip choice as training's (stateful.choose_clip), on the line alone.
    by_limit = {k: val_rmse(validated(k)) for k in CLIP_LIMITS} if chosen.size else {}
    limit = pick_clip(val_rmse(valid), by_limit)
    if limit is not None:
        valid = validated(limit)
    best, best_skill = held_out(chosen, limit)
    shipped = predictions(values, best, start, limit)
    at = spread.along(values, start, spread.WEIGHT)[targets - 1]
    coverage = coverages(valid, (values[targets], shipped[targets - 1], at), start)
    others = tuple(
        (described(c.ar), c.val_rmse, held_out(c.ar)[1]) for c in (prep.candidates if every else [])
    )
    times = None if series.times is None else series.times[:cut]
    refs = {
        r.name: skill(rmse(values[targets], r.predicted), naive)
        for r in references(values, cut, targets, detect_periods(values[:cut], times))
        if r.predicted is not None
    }
    name = max((k for k in refs if k != "persistence"), key=lambda k: refs[k])
    return Row(
        spec.name,
        ("" if limit is None else f"clipped at {limit:g}: ") + described(best),
        best_skill,
        name,
        refs[name],
        is_random_walk(refs),
        *coverage,
        others,
    )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.accuracy.proxy", description=__doc__)
    p.add_argument("--data", type=Path, default=None, help="folder of CSV series")
    p.add_argument("--statsmodels", action="store_true", help="write statsmodels' series first")
    p.add_argument(
        "--candidates",
        action="store_true",
        help="also print every candidate's validation RMSE and held-out skill",
    )
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="proxy-") as tmp:
        folder = args.data or (Path(tmp) if args.statsmodels else ROOT / "data")
        if args.statsmodels:
            write_statsmodels_series(folder)
        rows = [linear_only(spec, args.candidates) for spec in discover(folder)]
    counted = [r for r in rows if not r.random_walk]
    for r in rows:
        print(
            f"{r.series:<28} {r.skill:+.4f}  {r.best_reference} {r.best_reference_skill:+.4f}  "
            f"{'beats' if r.beats else 'loses'}{'  (random walk)' if r.random_walk else ''}  "
            f"coverage {r.coverage:.3f} / scaled {r.coverage_scaled:.3f}  {r.line[:60]}"
        )
        for label, val_rmse, held in r.candidates:
            print(f"    validation RMSE {val_rmse:<10.5g} held out {held:+.4f}  {label[:70]}")
    wins = sum(r.beats for r in counted)
    print(f"≥ the best reference on {wins} of {len(counted)} non-random-walk series")
    for name, cov in (
        ("constant", [r.coverage for r in rows]),
        ("scaled by the spread", [r.coverage_scaled for r in rows]),
    ):
        miss = np.abs(np.asarray(cov) - COVERAGE)
        print(
            f"{COVERAGE:.0%} interval, {name}: mean |coverage - {COVERAGE:g}| "
            f"{np.nanmean(miss):.3f}, lowest {np.nanmin(cov):.3f}, "
            f"{sum(c < COVERAGE - 0.05 for c in cov)} series below {COVERAGE - 0.05:.2f}"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
