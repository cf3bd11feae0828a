"""The ``forecaster`` command: thin wrappers that parse options and call the modules.

Every expected failure is a :class:`ForecasterError` and becomes ``error: …`` on one line with
exit code 2. Training and export import PyTorch lazily, so the serving install (no torch) can
run ``serve``, ``evaluate``, ``inspect`` and ``replay``.
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, NoReturn

import typer

from forecaster.errors import ForecasterError
from forecaster.model.bundle import TrainingData

if TYPE_CHECKING:
    from forecaster.data import Dataset
    from forecaster.model.bundle import Bundle

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="Streaming one-step-ahead forecasts for MQTT sensor streams.",
)

ColumnOpt = Annotated[
    list[str] | None,
    typer.Option(
        "--column", "-c", help="value column; repeat for several series (one global model)"
    ),
]
TimeOpt = Annotated[
    str | None,
    typer.Option(
        "--time-column", help="time column (ISO 8601, epoch seconds, or see --time-format)"
    ),
]
TimeFormatOpt = Annotated[
    str | None,
    typer.Option(
        "--time-format",
        help="how to read --time-column: a strptime pattern (%Y%m%d, %m/%d/%Y, …; naive = UTC), "
        "epoch or iso; default ISO 8601 or epoch seconds from 2001 on, ambiguous numbers refused",
    ),
]
StreamOpt = Annotated[
    str | None, typer.Option("--stream-column", help="long format: column holding the stream id")
]
NoHeaderOpt = Annotated[
    bool, typer.Option("--no-header", help="the CSV has no header row; columns are named 0, 1, …")
]


def _version(value: bool) -> None:
    """``--version``: the installed package's version, so a bug report can name it."""
    if value:
        from forecaster import __version__

        typer.echo(f"forecaster {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[
        bool,
        typer.Option(
            "--version", callback=_version, is_eager=True, help="print the version and exit"
        ),
    ] = False,
) -> None:
    """Streaming one-step-ahead forecasts for MQTT sensor streams."""


def _fail(message: str) -> NoReturn:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(2)


def _need_torch(command: str) -> None:
    try:
        import torch  # noqa: F401
    except ImportError:
        _fail(f"'forecaster {command}' needs PyTorch: pip install 'forecaster[train]'")


@app.command()
def train(
    data: Annotated[Path, typer.Argument(help="CSV file")],
    out: Annotated[Path, typer.Option("--out", "-o", help="run directory to write")] = Path(
        "runs/latest"
    ),
    column: ColumnOpt = None,
    time_column: TimeOpt = None,
    time_format: TimeFormatOpt = None,
    stream_column: StreamOpt = None,
    no_header: NoHeaderOpt = False,
    cell: Annotated[
        str | None, typer.Option(help="lstm or gru (default: searched; window mode lstm)")
    ] = None,
    layers: Annotated[
        int | None, typer.Option(help="stacked recurrent layers (default: searched, or 1)")
    ] = None,
    hidden: Annotated[
        int | None,
        typer.Option(help="hidden units per layer (default: searched; window mode 128)"),
    ] = None,
    dropout: Annotated[float, typer.Option(help="dropout between stacked layers")] = 0.0,
    head: Annotated[str, typer.Option(help="delta (change from last reading) or level")] = "delta",
    lr: Annotated[
        float | None, typer.Option(help="Adam learning rate (default: searched, or 1e-3)")
    ] = None,
    batch_size: Annotated[int, typer.Option(help="parallel lanes per gradient step")] = 32,
    epochs: Annotated[
        int | None, typer.Option(help="maximum epochs (default 30; window mode 10)")
    ] = None,
    bptt: Annotated[int, typer.Option(help="truncated-BPTT chunk length (steps)")] = 64,
    clip_norm: Annotated[float, typer.Option(help="gradient clipping: max global norm")] = 1.0,
    val_fraction: Annotated[
        float, typer.Option(help="last part of each series for validation")
    ] = 0.2,
    patience: Annotated[int, typer.Option(help="early stopping: epochs without improvement")] = 5,
    seed: Annotated[int, typer.Option(help="same seed, same weights")] = 0,
    until: Annotated[
        str | None, typer.Option(help="train only on rows before this row index or time")
    ] = None,
    warmup: Annotated[
        int | None,
        typer.Option(help="readings before predictions count as warm (default: measured)"),
    ] = None,
    name: Annotated[str, typer.Option(help="model name recorded in the bundle")] = "model",
    version: Annotated[str, typer.Option(help="model version recorded in the bundle")] = "1.0.0",
    mode: Annotated[
        str,
        typer.Option(
            help="stateful (state carried reading to reading) or window (last --window readings "
            "from a zero state each time)"
        ),
    ] = "stateful",
    window: Annotated[int | None, typer.Option(help="window mode: readings per window")] = None,
    bidirectional: Annotated[
        bool, typer.Option("--bidirectional", help="bidirectional layers (window mode only)")
    ] = False,
    task: Annotated[
        str, typer.Option(help="regress (next value) or classify (event probability)")
    ] = "regress",
    label_column: Annotated[
        str | None, typer.Option(help="classify: the 0/1 event label column")
    ] = None,
    horizon: Annotated[
        int,
        typer.Option(help="classify: 0 = label of the window's last reading, 1 = of the next one"),
    ] = 0,
    window_input: Annotated[
        str | None,
        typer.Option(
            help="window mode: level (standardised readings) or diff (step changes; default for "
            "classify)"
        ),
    ] = None,
    linear: Annotated[
        bool,
        typer.Option(
            "--linear/--no-linear",
            help="stateful: a linear path over recent and seasonal lags, fitted in closed form, "
            "under the network",
        ),
    ] = True,
    trials: Annotated[
        int,
        typer.Option(help="stateful: search trials (Optuna) over the options not given; 1 = none"),
    ] = 4,
    budget: Annotated[
        float,
        typer.Option(
            help="stateful: time cap of training (search included), seconds (recorded when hit)"
        ),
    ] = 240.0,
    coverage: Annotated[
        float, typer.Option(help="prediction interval coverage, from validation residuals")
    ] = 0.9,
    quiet: Annotated[
        bool, typer.Option("--quiet", "-q", help="no progress bar, no per-epoch lines")
    ] = False,
) -> None:
    """Fit a forecaster on CSV data: a linear path plus an LSTM/GRU on its residual, chosen by
    validation (stateful, as the daemon runs it), or a window model."""
    _need_torch("train")
    from forecaster.data import load_csv
    from forecaster.training.config import TrainConfig
    from forecaster.training.run import train as run_training

    if cell is not None and cell not in ("lstm", "gru"):
        _fail(f"--cell must be lstm or gru, not {cell!r}")
    if head not in ("delta", "level"):
        _fail(f"--head must be delta or level, not {head!r}")
    cfg = TrainConfig(
        cell=cell,  # type: ignore[arg-type]
        layers=layers,
        hidden=hidden,
        dropout=dropout,
        head=head,  # type: ignore[arg-type]
        lr=lr,
        batch_size=batch_size,
        epochs=epochs,
        bptt=bptt,
        clip_norm=clip_norm,
        val_fraction=val_fraction,
        patience=patience,
        seed=seed,
        until=until,
        name=name,
        version=version,
        warmup=warmup,
        mode=mode,  # type: ignore[arg-type]
        window=window,
        bidirectional=bidirectional,
        task=task,  # type: ignore[arg-type]
        label_column=label_column,
        horizon=horizon,
        window_input=window_input,  # type: ignore[arg-type]
        linear=linear,
        trials=trials,
        budget=budget,
        coverage=coverage,
    )
    cfg.check()
    dataset = load_csv(
        data,
        column,
        time_column,
        stream_column,
        header=not no_header,
        label_column=label_column,
        time_format=time_format,
    )
    report = run_training(
        dataset, cfg, out, progress=not quiet and sys.stderr.isatty(), log=_log_line(quiet)
    )
    if task == "classify":
        c = report["validation_classification"]
        auc = "n/a" if c["roc_auc"] is None else f"{c['roc_auc']:.3f}"
        typer.echo(
            f"run {out}: best epoch {report['best_epoch']}, validation ROC AUC {auc} (majority "
            f"class 0.5), F1 {c['f1']:.3f}, precision {c['precision']:.3f}, recall "
            f"{c['recall']:.3f}, accuracy {c['accuracy']:.3f} at threshold "
            f"{report['threshold']:.4g} (n={c['n']}, {c['positives']} positive); positive-class "
            f"weight {report['pos_weight']:.2f}"
        )
        return
    v = report["validation"]
    m = report["model"]
    lags = m.get("ar_lags") or []
    searched = report.get("search") or {}
    chosen = f"{m['cell']} {m['layers']}x{m['hidden']}" + (
        f" on a linear path over {len(lags)} lags (max {max(lags)})" if lags else ""
    )
    typer.echo(
        f"run {out}: {chosen}"
        + (f", best of {len(searched['trials'])} trials" if searched else "")
        + f", best epoch {report['best_epoch']}, validation RMSE {v['rmse']:.4f} "
        f"(persistence {v['naive_rmse']:.4f}, skill {report['validation_skill']:+.3f}, "
        f"n={v['n']}), warm-up {report['warmup']} readings"
        + (
            f" -- shipped as PERSISTENCE ({report['fallback']['reason']})"
            if report.get("fallback")
            else ""
        )
    )


@app.command()
def export(
    run: Annotated[Path, typer.Argument(help="training run directory")],
    out: Annotated[Path, typer.Option("--out", "-o", help="bundle directory to write")],
    name: Annotated[str | None, typer.Option(help="override the model name")] = None,
    version: Annotated[str | None, typer.Option(help="override the model version")] = None,
    tolerance: Annotated[float, typer.Option(help="parity limit, scaled units")] = 1e-4,
) -> None:
    """Write an ONNX bundle and prove ONNX Runtime steps it exactly like PyTorch unrolls it."""
    _need_torch("export")
    from forecaster.training.export import PARITY_STEPS, PARITY_STREAMS
    from forecaster.training.export import export as run_export

    manifest, parity = run_export(run, out, name=name, version=version, tolerance=tolerance)
    unit = "windows" if manifest.mode == "window" else "steps"
    typer.echo(
        f"bundle {out}: {manifest.name} {manifest.version} ({manifest.cell} "
        f"{manifest.layers}x{manifest.hidden}), sha256 {manifest.onnx_sha256[:12]}; parity over "
        f"{PARITY_STEPS} {unit} x {PARITY_STREAMS} streams: max |ORT - PyTorch| = {parity:.2e} "
        f"(limit {tolerance:g})"
    )


@app.command()
def evaluate(
    bundle: Annotated[Path, typer.Argument(help="bundle directory")],
    data: Annotated[Path, typer.Argument(help="CSV file")],
    column: ColumnOpt = None,
    time_column: TimeOpt = None,
    time_format: TimeFormatOpt = None,
    stream_column: StreamOpt = None,
    no_header: NoHeaderOpt = False,
    warmup: Annotated[
        int | None,
        typer.Option(help="skip each stream's first N predictions (default: the bundle's)"),
    ] = None,
    start: Annotated[
        str | None,
        typer.Option("--from", help="score only targets at/after this row index or time"),
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="one JSON object on stdout")] = False,
    predictions: Annotated[
        Path | None, typer.Option("--predictions", help="write every prediction to this CSV")
    ] = None,
    plot: Annotated[
        Path | None, typer.Option("--plot", help="draw actual vs predicted (PNG)")
    ] = None,
) -> None:
    """Score a bundle step by step from a zero state, exactly as the daemon runs it."""
    from forecaster.data import load_csv
    from forecaster.evaluation.output import write_predictions
    from forecaster.evaluation.plots import plot_predictions
    from forecaster.evaluation.unroll import evaluate_bundle
    from forecaster.model.bundle import Bundle

    b = Bundle.load(bundle)
    td = b.manifest.training_data
    label = b.manifest.label_column
    if not (column or time_column or stream_column) and _has_columns(data, td, no_header):
        # Same layout as the training data: read it the way training did.
        column, time_column, stream_column = td.column, td.time_column, td.stream_column
    dataset = load_csv(
        data,
        column,
        time_column,
        stream_column,
        header=not no_header,
        label_column=label,
        time_format=time_format,
    )
    if b.manifest.task == "classify":
        _evaluate_events(b, dataset, data, start, as_json, predictions)
        return
    result = evaluate_bundle(b, dataset, warmup, start)
    sc: dict[str, Any] = {**result.score().as_dict(), **(result.interval_score() or {})}
    if predictions is not None:
        write_predictions(result, predictions)
    if plot is not None:
        plot_predictions(result, plot, f"{b.manifest.name} {b.manifest.version} on {data.name}")
    if as_json:
        typer.echo(json.dumps({**sc, "model": b.manifest.name, "version": b.manifest.version}))
        return
    m = b.manifest
    typer.echo(f"{m.name} {m.version} on {data.name}: {sc['n']} one-step predictions scored")
    typer.echo(f"  {'':12}{'model':>12}{'persistence':>14}")
    typer.echo(f"  {'RMSE':12}{sc['rmse']:12.4f}{sc['naive_rmse']:14.4f}")
    typer.echo(f"  {'MAE':12}{sc['mae']:12.4f}{sc['naive_mae']:14.4f}")
    typer.echo(f"  {'MASE':12}{sc['mase']:12.4f}")
    typer.echo(f"  skill vs persistence (1 - RMSE ratio): {sc['skill']:+.3f}")
    if "interval_coverage" in sc:
        typer.echo(
            f"  {sc['interval_target']:.0%} interval: coverage {sc['interval_coverage']:.3f}, "
            f"mean width {sc['interval_width']:.4g}"
        )


def _evaluate_events(
    b: Bundle,
    dataset: Dataset,
    data: Path,
    start: str | None,
    as_json: bool,
    predictions: Path | None,
) -> None:
    from forecaster.evaluation.output import write_event_predictions
    from forecaster.evaluation.unroll import evaluate_events

    result = evaluate_events(b, dataset, start)
    sc = result.score().as_dict()
    if predictions is not None:
        write_event_predictions(result, predictions)
    m = b.manifest
    if as_json:
        typer.echo(json.dumps({**sc, "model": m.name, "version": m.version}))
        return
    auc = "n/a (one class)" if sc["roc_auc"] is None else f"{sc['roc_auc']:.4f}"
    typer.echo(
        f"{m.name} {m.version} on {data.name}: {sc['n']} labelled predictions scored "
        f"({sc['positives']} positive), event = probability >= {m.threshold:.4g}"
    )
    for key in ("accuracy", "precision", "recall", "f1"):
        typer.echo(f"  {key:12}{sc[key]:.4f}")
    typer.echo(f"  {'ROC AUC':12}{auc}  (majority class: 0.5)")


def _log_line(quiet: bool) -> Callable[[str], None]:
    """Training's remarks go to stderr (stdout holds the one-line result), unless --quiet."""
    return (lambda _text: None) if quiet else (lambda text: typer.echo(text, err=True))


def _has_columns(data: Path, td: TrainingData, no_header: bool) -> bool:
    """Whether the CSV's header holds the columns the bundle was trained on."""
    columns = [*td.column, *(c for c in (td.time_column, td.stream_column) if c)]
    if no_header:
        return all(c.isdigit() for c in columns)
    try:
        with data.open(encoding="utf-8-sig") as fh:
            first = fh.readline()
    except OSError:
        return False
    header = [c.strip() for c in first.strip().split(",")]
    return all(c in header for c in columns)


@app.command()
def inspect(
    bundle: Annotated[Path, typer.Argument(help="bundle directory")],
    as_json: Annotated[bool, typer.Option("--json", help="the manifest as JSON")] = False,
) -> None:
    """Show a bundle's manifest and verify its ONNX file's sha256."""
    from forecaster.model.bundle import Bundle

    b = Bundle.load(bundle)  # verifies the sha256 and the graph's signature
    m = b.manifest
    if as_json:
        typer.echo(json.dumps({**m.model_dump(), "sha256_verified": True}, indent=2))
        return
    bidir = ", bidirectional" if m.bidirectional else ""
    if m.task == "classify":
        which = "last reading" if m.horizon == 0 else "next reading"
        predicts = f"P(event) of the {which} ('{m.label_column}'), event at >= {m.threshold:.4g}"
    else:
        predicts = f"next {m.target} ({m.head} head)"
    held_out: tuple[str, Any]
    if m.validation_classification is not None:
        c = m.validation_classification
        auc = "n/a" if c.roc_auc is None else f"{c.roc_auc:.3f}"
        held_out = (
            "validation",
            f"ROC AUC {auc}, F1 {c.f1:.3f}, precision {c.precision:.3f}, recall {c.recall:.3f}, "
            f"accuracy {c.accuracy:.3f} (n={c.n}, {c.positives} positive)",
        )
    elif m.validation is not None:
        held_out = (
            "validation RMSE",
            f"{m.validation.rmse:.4f} (persistence {m.validation.naive_rmse:.4f}, "
            f"n={m.validation.n})",
        )
    else:
        held_out = ("validation", "none recorded")
    rows: list[tuple[str, Any]] = [
        ("name", m.name),
        ("version", m.version),
        ("mode", m.mode if m.window is None else f"{m.mode}, {m.window} readings"),
        ("task", m.task),
        ("cell", f"{m.cell}, {m.layers} layer(s) x {m.hidden}" + bidir),
        ("features", ", ".join(m.features)),
        ("predicts", predicts),
        ("warm-up", f"{m.warmup} readings"),
        ("scaler", f"mean {m.scaler.mean}, std {m.scaler.std}"),
        (
            "trained on",
            f"{m.training_data.source} ({m.training_data.rows} rows, "
            f"sha256 {m.training_data.sha256[:12]}…, until {m.training_data.until})",
        ),
        held_out,
        *_forecast_rows(m),
        ("parity", f"{m.parity_max_abs_diff:.2e} (scaled units)"),
        ("opset", m.opset),
        ("onnx sha256", f"{m.onnx_sha256} (verified)"),
        ("package", m.package_version),
        ("created", m.created),
    ]
    width = max(len(k) for k, _ in rows)
    for k, v in rows:
        typer.echo(f"{k:<{width}}  {v}")


def _forecast_rows(m: Any) -> list[tuple[str, Any]]:
    """``inspect`` lines for the format-2 fields: seasonality, linear path, interval, search."""
    if m.task != "regress":
        return []
    rows: list[tuple[str, Any]] = [
        ("format", f"{m.format_version} ({_GRAPHS[m.graph_kind]})"),
        ("seasonality", ", ".join(str(p) for p in m.seasonality) or "none found"),
    ]
    if m.linear is not None:
        lags = m.linear.lags
        rows.append(
            (
                "linear path",
                f"{len(lags)} lags ({', '.join(map(str, lags[:8]))}{', …' if len(lags) > 8 else ''}"
                f"), {_line_kind(m.linear.loss)}; lag state {m.lag_buffer} readings "
                f"({4 * (m.lag_buffer + 1)} bytes) per stream",
            )
        )
    else:
        rows.append(("linear path", "none"))
    if m.interval is not None:
        i = m.interval
        if i.spread_weight is None:
            text = f"{i.coverage:.0%}: [y {i.lower:+.4g}, y {i.upper:+.4g}]"
        else:
            text = (
                f"{i.coverage:.0%}: [y {i.lower:+.4g}·s, y {i.upper:+.4g}·s], s = the stream's "
                f"spread (weighted mean |change|, weight {i.spread_weight:.3g}, starting at "
                f"{i.spread_start:.4g})"
            )
        rows.append(("interval", f"{text} (split conformal, n={i.n})"))
    rows.append(
        (
            "clipping",
            "none"
            if m.clip is None
            else f"a reading farther than {m.clip:g}·s from its prediction enters the model "
            "clipped (not right after a clipped one)",
        )
    )
    if m.selection is not None:
        s = m.selection
        rows.append(
            (
                "selection",
                f"{s.get('library')}: best of {s.get('trials_run')} trials"
                + (" (time budget hit)" if s.get("budget_hit") else ""),
            )
        )
    if m.fallback:
        rows.append(("fallback", f"PERSISTENCE: {m.fallback}"))
    return rows


#: What ``inspect`` says each graph kind is.
_GRAPHS = {
    "sequence": "sequence graph: several readings per stream per ONNX call",
    "step": "one-step graph: one reading per stream per ONNX call",
    "window": "window graph",
}


def _line_kind(loss: str) -> str:
    """How ``inspect`` names the linear path: a fitted loss, or an ETS filter / combination."""
    return f"{loss} loss" if loss in ("squared", "huber") else loss


def main(argv: list[str] | None = None) -> Any:
    """Entry point: expected failures become one line on stderr and exit code 2."""
    try:
        return app(args=argv, prog_name="forecaster", standalone_mode=True)
    except ForecasterError as exc:
        typer.echo(f"error: {exc}", err=True)
        sys.exit(2)
    except KeyboardInterrupt:
        typer.echo("interrupted", err=True)
        sys.exit(130)


ConfigOpt = Annotated[
    Path | None,
    typer.Option("--config", envvar="FORECASTER_CONFIG", help="TOML config file"),
]


def _load_config(config: Path | None, overrides: dict[str, Any]) -> Any:
    from forecaster.serve.config import load_config

    return load_config(config, overrides=overrides)


@app.command("check-config")
def check_config(
    config: Annotated[Path, typer.Argument(help="TOML config file")],
    bundles: Annotated[bool, typer.Option(help="also load and verify every route's bundle")] = True,
) -> None:
    """Validate a daemon configuration without connecting to anything."""
    from forecaster.model.bundle import Bundle
    from forecaster.serve.config import config_summary

    cfg = _load_config(config, {})
    if bundles:
        for route in cfg.routes:
            Bundle.load(route.bundle)
    typer.echo(config_summary(cfg))
    typer.echo("configuration OK")


@app.command()
def serve(
    config: ConfigOpt = None,
    host: Annotated[str | None, typer.Option(help="broker host (mqtt.host)")] = None,
    port: Annotated[int | None, typer.Option(help="broker port (mqtt.port)")] = None,
    client_id: Annotated[str | None, typer.Option(help="MQTT client id (mqtt.client_id)")] = None,
    metrics_port: Annotated[
        int | None, typer.Option(help="metrics port (metrics.port; 0 = any free port)")
    ] = None,
    state_dir: Annotated[
        Path | None, typer.Option(help="snapshot directory (daemon.state_dir)")
    ] = None,
    log_level: Annotated[str | None, typer.Option(help="DEBUG, INFO, WARNING or ERROR")] = None,
    workers: Annotated[
        int,
        typer.Option(
            help="run N serve processes (worker ids 0..N-1) under a supervisor that forwards "
            "signals and restarts none; NATS transport only (docs/scale-out.md)"
        ),
    ] = 1,
    worker_id: Annotated[
        int | None,
        typer.Option(
            help="this process is worker I of a fleet: metrics port + I, state in "
            "STATE_DIR/worker-I (set by --workers and by systemd/forecaster@.service)"
        ),
    ] = None,
) -> None:
    """Run the daemon: MQTT readings in, one-step predictions out, metrics on HTTP."""
    import logging

    from forecaster.serve import workers as fleet

    overrides = {
        "mqtt.host": host,
        "mqtt.port": port,
        "mqtt.client_id": client_id,
        "metrics.port": metrics_port,
        "daemon.state_dir": state_dir,
        "daemon.log_level": log_level,
    }
    if config is None and not any(k.upper().startswith("FORECASTER_ROUTES") for k in os.environ):
        _fail(
            "no routes configured: pass --config FILE (the README's quick start writes one; "
            "deploy/forecaster.toml is the installed layout's) or set FORECASTER_ROUTES"
        )
    try:
        fleet.check_workers(workers)
    except ValueError as exc:
        _fail(str(exc))
    if workers > 1 and worker_id is not None:
        _fail("--workers and --worker-id do not go together (--workers sets each worker's id)")
    if worker_id is not None and worker_id < 0:
        _fail(f"--worker-id must be 0 or more, got {worker_id}")
    cfg = _load_config(config, overrides)
    transport = fleet.transport_of(cfg)
    if (workers > 1 or (worker_id or 0) > 0) and transport != "nats":
        what = f"--workers {workers}" if workers > 1 else f"--worker-id {worker_id}"
        _fail(
            f'{what} needs the NATS transport (transport.kind = "nats"); with {transport} '
            "every process would receive every stream, and a stream's state must live in "
            "exactly one process"
        )
    logging.basicConfig(
        level=cfg.daemon.log_level,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    if workers > 1:
        options = [
            f"--{name.replace('_', '-')}={value}"
            for name, value in (
                ("config", config),
                ("host", host),
                ("port", port),
                ("client_id", client_id),
                ("metrics_port", metrics_port),
                ("state_dir", state_dir),
                ("log_level", log_level),
            )
            if value is not None
        ]
        supervisor = fleet.Supervisor(workers, lambda i: fleet.serve_command(options, i))
        supervisor.install_signals()
        raise typer.Exit(supervisor.run())
    if worker_id is not None:
        try:
            fleet.apply_worker_id(cfg, worker_id)
        except ValueError as exc:
            _fail(str(exc))

    from forecaster.serve import gcsettings
    from forecaster.serve.daemon import Daemon

    daemon = Daemon(cfg, config_path=config)
    daemon.install_signals()
    if cfg.daemon.gc_tuning:  # a process setting, so here and not in Daemon (tests run many)
        gcsettings.settle()
    raise typer.Exit(daemon.run())


@app.command()
def demo(
    seconds: Annotated[
        float,
        typer.Option(
            help="stop after this many seconds (0 = until Ctrl-C); it also ends when the "
            "held-out rows run out, unless 0"
        ),
    ] = 60.0,
    rate: Annotated[
        float,
        typer.Option(
            help="held-out readings per second per stream, on average (streams with more "
            "held-out rows go faster, so all end together); 0 = as fast as possible"
        ),
    ] = 12.0,
    plain: Annotated[
        bool,
        typer.Option(
            "--plain",
            help="one status line a second instead of the full-screen view (automatic "
            "when stdout is not a terminal)",
        ),
    ] = False,
    root: Annotated[
        Path | None,
        typer.Option(help="folder holding models/ and data/ (default: found, see docs/demo.md)"),
    ] = None,
) -> None:
    """A private broker, the daemon with two models, three real streams replayed: watch it."""
    import math

    from forecaster.demo.run import Options
    from forecaster.demo.run import run as run_demo

    if seconds < 0 or not math.isfinite(seconds):
        _fail("--seconds must be 0 or more")
    if rate < 0 or not math.isfinite(rate):
        _fail("--rate must be 0 or more")
    opts = Options(seconds, rate, plain or not sys.stdout.isatty(), root)
    raise typer.Exit(run_demo(opts))


@app.command()
def replay(
    data: Annotated[Path, typer.Argument(help="CSV file")],
    host: Annotated[str, typer.Option(help="broker host")] = "localhost",
    port: Annotated[int, typer.Option(help="broker port")] = 1883,
    topic: Annotated[
        str, typer.Option(help="topic template; {stream} is the stream name")
    ] = "sensors/{stream}/flow",
    streams: Annotated[int, typer.Option(help="copies of each series, as separate streams")] = 1,
    rate: Annotated[
        float,
        typer.Option(help="readings per second PER STREAM; 0 = as fast as the broker takes them"),
    ] = 0.0,
    timestamps: Annotated[
        str,
        typer.Option(
            help="ts of each reading: file (the CSV's times; a daemon that already stepped them "
            "answers recent ones from its cache and drops older ones as out_of_order) or now "
            "(the publish time; always accepted)"
        ),
    ] = "file",
    fmt: Annotated[str, typer.Option("--format", help="number, json or batch")] = "json",
    batch_topic: Annotated[str, typer.Option(help="topic of batch payloads")] = "gateway/batch",
    batch_size: Annotated[int, typer.Option(help="readings per batch payload")] = 100,
    qos: Annotated[int, typer.Option(help="MQTT QoS 0, 1 or 2")] = 1,
    watch: Annotated[
        str,
        typer.Option(
            help="count the predictions that come back on this topic filter and warn when few "
            "do ('' = do not watch)"
        ),
    ] = "forecast/#",
    column: ColumnOpt = None,
    time_column: TimeOpt = None,
    time_format: TimeFormatOpt = None,
    stream_column: StreamOpt = None,
    no_header: NoHeaderOpt = False,
    start: Annotated[
        str | None, typer.Option("--from", help="first row index or time to send")
    ] = None,
    stop: Annotated[
        str | None, typer.Option("--until", help="stop before this row index or time")
    ] = None,
) -> None:
    """Publish a CSV to a broker as live readings, with progress on stderr."""
    from forecaster.data import load_csv
    from forecaster.replay import EchoCounter, connect, plan, stream_count
    from forecaster.replay import replay as run_replay

    if fmt not in ("number", "json", "batch"):
        _fail(f"--format must be number, json or batch, not {fmt!r}")
    if timestamps not in ("file", "now"):
        _fail(f"--timestamps must be file or now, not {timestamps!r}")
    if qos not in (0, 1, 2):
        _fail("--qos must be 0, 1 or 2")
    if rate < 0:
        _fail("--rate must be 0 or more")
    dataset = load_csv(
        data, column, time_column, stream_column, header=not no_header, time_format=time_format
    )
    items = plan(dataset, topic, streams, start, stop)
    n_streams = stream_count(items)
    total_rate = rate * n_streams
    pace = (
        f"{rate:g}/s per stream = {total_rate:g}/s in total, about {len(items) / total_rate:.0f} s"
        if rate > 0
        else "as fast as the broker takes them"
    )
    typer.echo(f"replay: {len(items)} readings of {n_streams} stream(s), {pace}", err=True)
    client = connect(host, port)
    try:
        echo = EchoCounter(client, watch) if watch else None
        if echo is not None and not echo.ready():
            echo = None
        progress = _ReplayProgress(len(items), echo)
        started = time.monotonic()
        sent = run_replay(
            client,
            items,
            fmt,  # type: ignore[arg-type]
            qos,
            total_rate,
            batch_topic,
            batch_size,
            on_sent=progress.update,
            timestamps=timestamps,  # type: ignore[arg-type]
        )
        took = time.monotonic() - started
        back = None if echo is None else echo.settle(sent)
    finally:
        client.loop_stop()
        client.disconnect()
    line = f"published {sent} readings in {took:.1f} s ({sent / max(took, 1e-9):.0f}/s)"
    if back is not None:
        line += f"; {back} predictions came back on {watch}"
    typer.echo(line)
    if back is not None and sent and back < sent // 2:
        why = (
            " or it had already seen these timestamps and dropped the readings as out_of_order/"
            "duplicate (forecaster_readings_rejected_total): replay again with --timestamps now"
            if fmt != "number" and timestamps == "file"
            else ""
        )
        typer.echo(
            f"warning: only {back} of {sent} readings were answered: no daemon serves {topic} "
            f"with predictions on {watch}{why}",
            err=True,
        )


class _ReplayProgress:
    """One stderr line every few seconds (a pipe gets it too), so a long replay is not silent."""

    def __init__(self, total: int, echo: Any, every: float = 2.0) -> None:
        self.total = total
        self.echo = echo
        self.every = every
        self.started = self.last = time.monotonic()

    def update(self, sent: int) -> None:
        now = time.monotonic()
        if now - self.last < self.every:
            return
        self.last = now
        took = now - self.started
        left = (self.total - sent) * took / max(sent, 1)
        back = "" if self.echo is None else f", {self.echo.count} predictions back"
        typer.echo(
            f"replay: {sent}/{self.total} readings ({100 * sent / max(self.total, 1):.0f} %), "
            f"{sent / took:.0f}/s{back}, about {left:.0f} s left",
            err=True,
        )
