"""CSV files of an unroll: one row per prediction, for dashboards and notebooks."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np

from forecaster.evaluation.unroll import EventUnroll, Unroll


def write_event_predictions(result: EventUnroll, path: Path) -> None:
    """Every probability, one CSV row each, with the event at the threshold and the label."""
    with Path(path).open("w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh)
        w.writerow(
            ["row", "timestamp", "stream", "made_row", "label", "probability", "event", "scored"]
        )
        for i in range(len(result.stream)):
            t = result.made_time[i]
            lab = result.label[i]
            w.writerow(
                [
                    int(result.row[i]),
                    "" if np.isnan(t) else repr(float(t)),
                    result.stream[i],
                    int(result.made_row[i]),
                    "" if np.isnan(lab) else int(lab),
                    repr(float(result.probability[i])),
                    int(result.probability[i] >= result.threshold),
                    int(result.scored[i]),
                ]
            )


def write_predictions(result: Unroll, path: Path) -> None:
    """Every prediction, one CSV row each: what a dashboard or a notebook would join on.

    ``lower``/``upper`` are the prediction interval's bounds, empty when the bundle has none."""
    lower, upper = result.lower, result.upper
    with Path(path).open("w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh)
        w.writerow(
            [
                *("row", "timestamp", "stream", "actual", "predicted", "naive", "warm", "scored"),
                *("lower", "upper"),
            ]
        )
        for i in range(len(result.stream)):
            t = result.time[i]
            w.writerow(
                [
                    int(result.row[i]),
                    "" if np.isnan(t) else repr(float(t)),
                    result.stream[i],
                    repr(float(result.actual[i])),
                    repr(float(result.predicted[i])),
                    repr(float(result.naive[i])),
                    int(result.warm[i]),
                    int(result.scored[i]),
                    "" if lower is None else repr(float(lower[i])),
                    "" if upper is None else repr(float(upper[i])),
                ]
            )
