"""The generated reference docs match the code (regenerate: python -m forecaster.reference)."""

from __future__ import annotations

from pathlib import Path

from forecaster.reference import configuration_md, metrics_md

DOCS = Path(__file__).resolve().parents[2] / "docs"


def test_configuration_reference_is_current() -> None:
    assert (DOCS / "configuration.md").read_text() == configuration_md(), (
        "docs/configuration.md is stale: run python -m forecaster.reference"
    )


def test_metrics_reference_is_current() -> None:
    text = metrics_md()
    assert (DOCS / "metrics.md").read_text() == text, (
        "docs/metrics.md is stale: run python -m forecaster.reference"
    )
    for name in (
        "forecaster_readings_total",
        "forecaster_prediction_abs_error",
        "forecaster_end_to_end_seconds",
        "forecaster_model_info",
    ):
        assert f"`{name}`" in text
