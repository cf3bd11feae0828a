"""Reference tables for the docs, generated from the code so they cannot drift from it.

``python -m forecaster.reference`` rewrites ``docs/configuration.md`` and ``docs/metrics.md``; a
test fails when the committed files differ from what the code would generate.
"""

from __future__ import annotations

import sys
from pathlib import Path

from prometheus_client import CollectorRegistry
from prometheus_client.metrics import MetricWrapperBase
from pydantic import BaseModel
from pydantic_core import PydanticUndefined

from forecaster.serve.config import DaemonConfig, MetricsConfig, MQTTConfig, RouteConfig, TLSConfig
from forecaster.serve.histogram import BulkHistogram
from forecaster.serve.metrics import Metrics
from forecaster.serve.nats.metrics import NatsMetrics

SECTIONS: list[tuple[str, type[BaseModel], str]] = [
    ("mqtt", MQTTConfig, "FORECASTER_MQTT__"),
    ("mqtt.tls", TLSConfig, "FORECASTER_MQTT__TLS__"),
    ("daemon", DaemonConfig, "FORECASTER_DAEMON__"),
    ("metrics", MetricsConfig, "FORECASTER_METRICS__"),
    ("[[routes]]", RouteConfig, "(FORECASTER_ROUTES, JSON list)"),
]


def _default(field: object) -> str:
    value = getattr(field, "default", PydanticUndefined)
    if value is PydanticUndefined:
        return "required"
    if isinstance(value, BaseModel):
        return "(section)"
    if value is None:
        return "none"
    return f"`{value}`"


def configuration_md() -> str:
    lines = [
        "# Configuration reference",
        "",
        "Generated from `forecaster/serve/config.py` by `python -m forecaster.reference`; "
        "do not edit.",
        "One model serves the TOML file (`forecaster serve --config FILE`), the environment",
        "(`FORECASTER_<SECTION>__<KEY>`, case-insensitive) and the command-line flags; later",
        "layers win: defaults < file < environment < flags. Unknown keys and unknown",
        "`FORECASTER_*` variables are errors, reported with their key path. Validate a file",
        "without connecting: `forecaster check-config FILE`. A commented example:",
        "[`deploy/forecaster.toml`](../deploy/forecaster.toml).",
        "",
    ]
    for name, model, env in SECTIONS:
        lines += [
            f"## `{name}`",
            "",
            (model.__doc__ or "").strip().splitlines()[0],
            "",
            "| key | default | environment | meaning |",
            "|---|---|---|---|",
        ]
        for key, field in model.model_fields.items():
            if field.default_factory is not None:
                continue  # a nested section, listed under its own heading
            env_name = f"`{env}{key.upper()}`" if env.startswith("FORECASTER") else "—"
            desc = (field.description or "").replace("|", "\\|")
            lines.append(f"| `{key}` | {_default(field)} | {env_name} | {desc} |")
        lines.append("")
    return "\n".join(lines)


def _metric_rows(metrics: object) -> list[str]:
    """One table row per Prometheus metric held as an attribute of ``metrics``, sorted."""
    rows = []
    for value in vars(metrics).values():
        if isinstance(value, BulkHistogram):
            labels = ", ".join(f"`{k}`" for k in value.labelnames) or "—"
            doc = value.documentation.replace("|", "\\|")
            rows.append(f"| `{value.name}` | histogram | {labels} | {doc} |")
            continue
        if not isinstance(value, MetricWrapperBase):
            continue
        kind = value._type  # prometheus_client keeps name, type and labels on the wrapper
        name = value._name + ("_total" if kind == "counter" else "")
        labels = ", ".join(f"`{k}`" for k in value._labelnames) or "—"
        doc = value._documentation.replace("|", "\\|")
        rows.append(f"| `{name}` | {kind} | {labels} | {doc} |")
    return sorted(rows)


def metrics_md() -> str:
    header = ["| metric | type | labels | meaning |", "|---|---|---|---|"]
    lines = [
        "# Metrics reference",
        "",
        "Generated from `forecaster/serve/metrics.py` and `forecaster/serve/nats/metrics.py` by "
        "`python -m forecaster.reference`; do not edit.",
        "Served at `http://127.0.0.1:18090/metrics` by default (`metrics.bind`, `metrics.port`).",
        "No metric carries a stream id: a flood of new topics must not become a flood of series.",
        "",
        *header,
        *_metric_rows(Metrics(CollectorRegistry())),
        "",
        "## With the NATS transport",
        "",
        'A process with `transport.kind = "nats"` (docs/scale-out.md) exports these as well, '
        "beside the ones above:",
        "",
        *header,
        *_metric_rows(NatsMetrics(CollectorRegistry())),
        "",
        "Process metrics (`process_resident_memory_bytes`, `process_cpu_seconds_total`, …) and",
        "`python_info` are exported too.",
        "",
    ]
    return "\n".join(lines)


def main() -> None:
    root = Path(__file__).resolve().parents[1] / "docs"
    root.mkdir(exist_ok=True)
    (root / "configuration.md").write_text(configuration_md(), encoding="utf-8")
    (root / "metrics.md").write_text(metrics_md(), encoding="utf-8")
    sys.stdout.write(f"wrote {root}/configuration.md and {root}/metrics.md\n")


if __name__ == "__main__":
    main()
