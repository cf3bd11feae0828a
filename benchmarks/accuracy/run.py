"""``python -m benchmarks.accuracy [--quick]``: the accuracy benchmark of issue 12.

For every series in ``data/`` (see :mod:`benchmarks.accuracy.discover`): train on the first
80 % of the rows with ``forecaster train FILE --column COL --until CUT`` (plus only the flags
that say how to read the file: ``--time-column``, ``--no-header``), export, and score one step
ahead on the last 20 % with ``forecaster evaluate BUNDLE FILE --column COL --from CUT --json``,
exactly as a user would, through the CLI in subprocesses. The references of
:mod:`benchmarks.accuracy.references` are fitted on the same training part in the same run and
scored on exactly the targets that ``evaluate`` scored (read back from its ``--predictions``
file). skill = 1 − RMSE / RMSE(persistence).

The CLI runs with the ``forecaster`` package that ``PYTHONPATH`` or the install resolves (the
subprocesses start in a temporary directory, not in the repository), so an older tree can be
measured with ``PYTHONPATH=/path/to/old/tree``; the results record which package ran.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import subprocess
import sys
import tempfile
import time
import warnings
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.accuracy.discover import SeriesSpec, discover
from benchmarks.accuracy.references import (
    Reference,
    is_random_walk,
    references,
    rmse,
    skill,
)
from benchmarks.procstat import host_info
from forecaster.data import cut_index, load_csv
from forecaster.training.seasonality import detect_periods

ROOT = Path(__file__).resolve().parents[2]
RESULTS = ROOT / "benchmarks" / "results"
TRAIN_FRACTION = 0.8
QUICK_EPOCHS = "1"
QUICK_BUDGET = "5"


def machine() -> dict[str, Any]:
    """What ran the benchmark: training time depends on it and on what else was running."""
    return host_info(("forecaster", "torch", "onnxruntime", "numpy", "statsmodels", "optuna"))


def cli(
    args: list[str], workdir: Path, timeout: float
) -> tuple[subprocess.CompletedProcess[str], float]:
    """Run ``python -m forecaster ARGS`` from ``workdir``; the result and its wall time."""
    start = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-m", "forecaster", *args],
        cwd=workdir,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    return done, time.perf_counter() - start


def forecaster_source(workdir: Path) -> str:
    """The ``forecaster`` package the CLI subprocesses import (``PYTHONPATH`` or the install)."""
    done = subprocess.run(
        [sys.executable, "-c", "import forecaster; print(forecaster.__file__)"],
        cwd=workdir,
        capture_output=True,
        text=True,
        check=False,
    )
    return done.stdout.strip() or done.stderr.strip()[-200:]


def git_revision() -> str:
    """HEAD and whether the working tree differs from it (the benchmark may run on either)."""
    head = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True
    ).stdout.strip()
    dirty = subprocess.run(
        ["git", "status", "--porcelain", "--untracked-files=no"],
        cwd=ROOT,
        capture_output=True,
        text=True,
    ).stdout.strip()
    return f"{head}{' + uncommitted changes' if dirty else ''}" if head else "unknown"


def quick_flags(workdir: Path) -> list[str]:
    """The tiny training budget of ``--quick``: ``--budget`` where train has it, else 1 epoch."""
    done, _ = cli(["train", "--help"], workdir, 60)
    if "--budget" in done.stdout:
        return ["--budget", QUICK_BUDGET]
    return ["--epochs", QUICK_EPOCHS]


def scored_targets(predictions: Path, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Indices (into the series) of the targets ``evaluate`` scored, and its predictions there."""
    where = {int(r): i for i, r in enumerate(rows)}
    idx: list[int] = []
    pred: list[float] = []
    with predictions.open(newline="") as fh:
        for rec in csv.DictReader(fh):
            if rec["scored"].strip().lower() in ("1", "true"):
                idx.append(where[int(rec["row"])])
                pred.append(float(rec["predicted"]))
    return np.asarray(idx, dtype=np.int64), np.asarray(pred, dtype=np.float64)


def adf_pvalue(train: np.ndarray) -> float | None:
    """Augmented Dickey-Fuller p-value on the training levels (a unit root is not rejected
    above 0.05): recorded beside the random-walk rule, not used by it."""
    from statsmodels.tsa.stattools import adfuller

    x = train[np.isfinite(train)]
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # the tuple form, kept for 0.14
            return float(adfuller(x, autolag="AIC")[1])
    except (ValueError, np.linalg.LinAlgError):
        return None


def run_series(spec: SeriesSpec, workdir: Path, extra: list[str], timeout: float) -> dict[str, Any]:
    """The protocol for one series: train, export, evaluate through the CLI; the references."""
    data = spec.path.resolve()
    series = load_csv(data, [spec.column], spec.time_column, header=spec.header).series[0]
    cut = int(TRAIN_FRACTION * spec.rows)
    cut_at = cut_index(series, str(cut))
    train_times = None if series.times is None else series.times[:cut_at]
    periods = detect_periods(series.values[:cut_at], train_times)
    out: dict[str, Any] = {
        "file": spec.path.name,
        "column": spec.column,
        "rows": spec.rows,
        "cut_row": cut,
        "periods": periods,
    }
    run_dir = workdir / f"run-{spec.path.stem}"
    bundle = workdir / f"bundle-{spec.path.stem}"
    preds = workdir / f"predictions-{spec.path.stem}.csv"
    train = ["train", str(data), *spec.read_flags(), "--until", str(cut), *extra]
    train += ["--out", str(run_dir), "--quiet"]
    evaluate = ["evaluate", str(bundle), str(data), *spec.read_flags(), "--from", str(cut)]
    evaluate += ["--json", "--predictions", str(preds)]
    out["commands"] = {
        "train": "forecaster " + " ".join(train),
        "export": f"forecaster export {run_dir} --out {bundle}",
        "evaluate": "forecaster " + " ".join(evaluate),
    }
    steps: list[tuple[str, list[str]]] = [
        ("train", train),
        ("export", ["export", str(run_dir), "--out", str(bundle)]),
        ("evaluate", evaluate),
    ]
    for step, args in steps:
        done, seconds = cli(args, workdir, timeout)
        out[f"{step}_seconds"] = round(seconds, 2)
        if done.returncode != 0:
            out["error"] = f"{step} exited {done.returncode}: {done.stderr.strip()[-800:]}"
            break
        if step == "evaluate":
            out["model"] = json.loads(done.stdout)
    manifest = bundle / "model.json"
    if manifest.exists():
        out["manifest"] = json.loads(manifest.read_text())

    model_pred: np.ndarray | None = None
    if "model" in out:
        targets, model_pred = scored_targets(preds, series.rows)
    else:
        # No model: the references still run, on the targets evaluate would have scored
        # (every held-out reading whose previous reading exists).
        x = series.values
        idx = np.arange(max(cut_at, 1), x.size)
        targets = idx[np.isfinite(x[idx]) & np.isfinite(x[idx - 1])]
    actual = series.values[targets]
    refs = references(series.values, cut_at, targets, periods)
    naive = rmse(actual, refs[0].predicted) if refs[0].predicted is not None else math.nan
    out["n_scored"] = int(targets.size)
    out["references"] = {r.name: _ref_result(r, actual, naive) for r in refs}
    skills = {k: v["skill"] for k, v in out["references"].items() if v.get("skill") is not None}
    best = max(skills, key=lambda k: skills[k])
    out["best_reference"] = best
    out["best_reference_skill"] = skills[best]
    out["random_walk"] = is_random_walk(skills)
    out["adf_pvalue"] = adf_pvalue(series.values[:cut_at])
    if model_pred is not None:
        out["model_skill"] = skill(rmse(actual, model_pred), naive)
        # The references are scored on evaluate's own targets: its persistence must agree.
        out["naive_rmse_check"] = abs(naive - float(out["model"]["naive_rmse"]))
        out["beats_best"] = out["model_skill"] >= skills[best]
    return out


def _ref_result(ref: Reference, actual: np.ndarray, naive: float) -> dict[str, Any]:
    if ref.predicted is None:
        return {"error": ref.error}
    error = rmse(actual, ref.predicted)
    return {"rmse": error, "skill": skill(error, naive)}


def summary(results: list[dict[str, Any]]) -> dict[str, Any]:
    """The issue's targets over the series that ran."""
    ok = [r for r in results if "model_skill" in r]
    structured = [r for r in results if "random_walk" in r and not r["random_walk"]]
    beats = sum(1 for r in structured if r.get("beats_best"))
    return {
        "series": len(results),
        "failed": len(results) - len(ok),
        "random_walks": sum(1 for r in results if r.get("random_walk")),
        "skill_nonnegative": sum(1 for r in ok if r["model_skill"] >= 0),
        "beats_best_reference": beats,
        "not_random_walk": len(structured),
        "beats_best_share": beats / len(structured) if structured else None,
        "max_train_seconds": max((r["train_seconds"] for r in ok), default=None),
    }


def markdown(report: dict[str, Any]) -> str:
    """The README block: one row per series, then the targets."""
    m = report["machine"]
    source = Path(report.get("forecaster_source", "")).parent
    package = (
        f"forecaster {report['revision']}"
        if source == ROOT / "forecaster"
        else f"forecaster package from {source}"
    )
    lines = [
        f"Accuracy run `{report['stamp']}` ({report['label']}, {package}), "
        f"{report['elapsed_s'] / 60:.1f} min. Machine: {m['cores']} cores, {m['cpu_model']}, "
        f"load average {m['load_average_start'][0]:.2f} at start, "
        f"{m['load_average_end'][0]:.2f} at end. torch {m['versions']['torch']}, "
        f"statsmodels {m['versions']['statsmodels']}.",
        "",
        f"Reproduce: `{report['command']}`",
        "",
        "| series | train / test rows | periods | model skill | best reference (skill) "
        "| AR(24) | AR(2) diff | random walk | beats best | train s |",
        "|---|---|---|---:|---|---:|---:|---|---|---:|",
    ]
    for r in report["series"]:
        name = f"{r['file']}"
        if "references" not in r:
            lines.append(f"| {name} | | | error: {r['error'][:80]} | | | | | | |")
            continue
        refs = r["references"]
        model = "**failed**" if "model_skill" not in r else f"**{r['model_skill']:+.3f}**"
        beats = "yes" if r.get("beats_best") else "**no**"
        train_s = f"{r['train_seconds']:.0f}" if "train_seconds" in r else "—"

        def sk(key: str, refs: dict[str, Any] = refs) -> str:
            v = refs.get(key, {}).get("skill")
            return "—" if v is None else f"{v:+.3f}"

        test_rows = r["rows"] - r["cut_row"]
        lines.append(
            f"| {name} | {r['cut_row']:,} / {test_rows:,} | "
            f"{', '.join(map(str, r['periods'])) or 'none'} | {model} | "
            f"{r['best_reference']} ({r['best_reference_skill']:+.3f}) | {sk('AR(24) levels')} | "
            f"{sk('AR(2) differences')} | {'yes' if r['random_walk'] else 'no'} | "
            f"{beats} | {train_s} |"
        )
    covered = [r for r in report["series"] if "interval_coverage" in r.get("model", {})]
    if covered:
        parts = [
            f"{r['file']} {r['model']['interval_coverage']:.3f} "
            f"(width {r['model']['interval_width']:.4g})"
            for r in covered
        ]
        target = covered[0]["model"]["interval_target"]
        lines += ["", f"Held-out coverage of the {target:.0%} intervals: " + "; ".join(parts) + "."]
    failures = [r for r in report["series"] if "error" in r]
    if failures:
        lines.append("")
        lines += [f"- {r['file']}: {r['error'].splitlines()[-1][:160]}" for r in failures]
    s = report["summary"]
    lines += [
        "",
        f"Skill ≥ 0 on {s['skill_nonnegative']} of {s['series']} series "
        f"({s['failed']} failed to train or evaluate); "
        f"≥ the best reference on {s['beats_best_reference']} of {s['not_random_walk']} "
        f"non-random-walk series (target: 75 %); longest training {s['max_train_seconds']} s "
        "(target: 300 s). Random walk = no reference beats persistence by 0.02 skill on the "
        "held-out part.",
    ]
    return "\n".join(lines) + "\n"


def compare(before: dict[str, Any], after: dict[str, Any]) -> str:
    """A before/after table of two result files (the README's block)."""

    def cell(r: dict[str, Any] | None) -> tuple[str, str, str]:
        if r is None:
            return "—", "—", "—"
        if "model_skill" not in r:
            return "failed", "**no**", "—"
        beats = "yes" if r.get("beats_best") else "**no**"
        return f"{r['model_skill']:+.3f}", beats, f"{r['train_seconds']:.0f}"

    def label(report: dict[str, Any]) -> str:
        m = report["machine"]
        return (
            f"`{report['stamp']}` ({report['label']}; load average "
            f"{m['load_average_start'][0]:.1f}–{m['load_average_end'][0]:.1f})"
        )

    old = {r["file"]: r for r in before["series"]}
    lines = [
        f"Before: {label(before)}. After: {label(after)}. Machine: "
        f"{after['machine']['cores']} cores, {after['machine']['cpu_model']}.",
        "",
        "| series | periods | best reference (skill) | skill before | skill after "
        "| after − best | beats best before / after | train s before / after |",
        "|---|---|---|---:|---:|---:|---|---:|",
    ]
    for r in after["series"]:
        b = cell(old.get(r["file"]))
        a = cell(r)
        best = (
            f"{r['best_reference']} ({r['best_reference_skill']:+.3f})"
            if "best_reference" in r
            else "—"
        )
        periods = ", ".join(map(str, r.get("periods", []))) or "none"
        gap = (
            f"{r['model_skill'] - r['best_reference_skill']:+.3f}"
            if "model_skill" in r and "best_reference_skill" in r
            else "—"
        )
        lines.append(
            f"| {r['file']} | {periods} | {best} | {b[0]} | **{a[0]}** | {gap} | {b[1]} / {a[1]} "
            f"| {b[2]} / {a[2]} |"
        )
    sb, sa = before["summary"], after["summary"]
    lines += [
        "",
        f"Beats the best reference: {sb['beats_best_reference']} of {sb['not_random_walk']} "
        f"before, {sa['beats_best_reference']} of {sa['not_random_walk']} after; skill ≥ 0: "
        f"{sb['skill_nonnegative']} of {sb['series']} before, {sa['skill_nonnegative']} of "
        f"{sa['series']} after.",
    ]
    return "\n".join(lines) + "\n"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.accuracy", description=__doc__)
    p.add_argument("--quick", action="store_true", help="tiny training budget (a smoke test)")
    p.add_argument("--data", type=Path, default=ROOT / "data", help="folder of CSV series")
    p.add_argument(
        "--series", action="append", default=[], help="only files whose name contains this"
    )
    p.add_argument("--label", default=None, help="what this run measures (e.g. before, after)")
    p.add_argument("--out", type=Path, default=None, help="results JSON (default: results/)")
    p.add_argument("--timeout", type=float, default=1800.0, help="per CLI step, seconds")
    p.add_argument(
        "--compare",
        nargs=2,
        type=Path,
        metavar=("BEFORE", "AFTER"),
        help="print a before/after table of two result files and exit",
    )
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.compare:
        before, after = (json.loads(p.read_text()) for p in args.compare)
        print(compare(before, after), end="")
        return 0
    started = time.perf_counter()
    stamp = datetime.now(UTC).strftime("%Y%m%d-%H%M%S")
    specs = [
        s
        for s in discover(args.data)
        if not args.series or any(k in s.path.name for k in args.series)
    ]
    if not specs:
        print(f"no series found in {args.data}", file=sys.stderr)
        return 2
    report: dict[str, Any] = {
        "stamp": stamp,
        "label": args.label or ("quick" if args.quick else "defaults"),
        "command": "python -m benchmarks.accuracy" + (" --quick" if args.quick else ""),
        "revision": git_revision(),
        "machine": machine(),
        "protocol": {
            "train_fraction": TRAIN_FRACTION,
            "train": "forecaster train FILE --column COL [--time-column T] [--no-header] "
            "--until CUT",
            "evaluate": "forecaster evaluate BUNDLE FILE --column COL --from CUT --json",
        },
    }
    results: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="accuracy-") as tmp:
        workdir = Path(tmp)
        report["forecaster_source"] = forecaster_source(workdir)
        extra = quick_flags(workdir) if args.quick else []
        report["protocol"]["extra_train_flags"] = extra
        for spec in specs:
            print(f"{spec.name}: {spec.rows:,} rows ...", flush=True)
            result = run_series(spec, workdir, extra, args.timeout)
            results.append(result)
            if "error" in result:
                print(f"  {result['error']}", flush=True)
            if "references" in result:
                print(
                    f"  periods {result['periods']}, model skill "
                    f"{result.get('model_skill', math.nan):+.3f}, "
                    f"best reference {result['best_reference']} "
                    f"{result['best_reference_skill']:+.3f}, "
                    f"train {result.get('train_seconds', math.nan):.0f} s",
                    flush=True,
                )
    report["series"] = results
    report["summary"] = summary(results)
    report["machine"]["load_average_end"] = list(os.getloadavg())
    report["elapsed_s"] = round(time.perf_counter() - started, 1)
    kind = "accuracy-quick" if args.quick else "accuracy"
    out = args.out or RESULTS / f"{kind}-{stamp}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    table = markdown(report)
    out.with_suffix(".md").write_text(table)
    print(table)
    print(f"results: {out}")
    return 0
