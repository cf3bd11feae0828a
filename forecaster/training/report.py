"""The run directory: ``weights.npz`` (plain arrays) and ``report.json`` (options, model, data,
history), written by training and read back by export without unpickling anything."""

from __future__ import annotations

import json
from dataclasses import asdict
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch

from forecaster import __version__
from forecaster.data import Dataset
from forecaster.errors import DataError
from forecaster.training.nn import ModelSpec, RNNForecaster

WEIGHTS_FILE = "weights.npz"
REPORT_FILE = "report.json"


def save_weights(model: RNNForecaster, path: Path) -> None:
    """Plain arrays in an ``.npz``: loads with ``allow_pickle=False``, nothing executable inside."""
    arrays = {k: v.detach().cpu().numpy() for k, v in model.state_dict().items()}
    np.savez(path, **arrays)


def load_run(run_dir: Path) -> tuple[RNNForecaster, dict[str, Any]]:
    """Rebuild a trained model from a run directory, without unpickling anything."""
    run_dir = Path(run_dir)
    try:
        report = json.loads((run_dir / REPORT_FILE).read_text(encoding="utf-8"))
        raw = report["model"]
        tuples = ("mean", "std", "ar_coef", "ar_lags")
        spec = ModelSpec(**{**raw, **{k: tuple(raw[k]) for k in tuples if k in raw}})
    except FileNotFoundError:
        raise DataError(f"{run_dir}: not a training run (no {REPORT_FILE})") from None
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise DataError(f"{run_dir}/{REPORT_FILE}: unreadable ({exc})") from None
    model = RNNForecaster(spec)
    try:
        with np.load(run_dir / WEIGHTS_FILE, allow_pickle=False) as npz:
            state = {k: torch.from_numpy(npz[k]) for k in npz.files}
        model.load_state_dict(state)
    except FileNotFoundError:
        raise DataError(f"{run_dir}: no {WEIGHTS_FILE}") from None
    except (OSError, ValueError, RuntimeError, KeyError) as exc:
        raise DataError(f"{run_dir}/{WEIGHTS_FILE}: cannot load weights ({exc})") from None
    model.eval()
    return model, report


def report_header(cfg: Any, spec: ModelSpec, data: Dataset, train_readings: int) -> dict[str, Any]:
    """What every ``report.json`` starts with: versions, the options, the model, the data."""
    return {
        "package_version": __version__,
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "config": asdict(cfg),
        "model": spec.as_dict(),
        "data": {
            "sha256": data.sha256,
            "source": data.source,
            "rows": data.rows,
            "series": len(data.series),
            "column": data.columns,
            "time_column": data.time_column,
            "stream_column": data.stream_column,
            "until": cfg.until,
            "train_readings": train_readings,
        },
    }


def write_report(report: dict[str, Any], out_dir: Path) -> None:
    (Path(out_dir) / REPORT_FILE).write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
