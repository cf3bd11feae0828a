"""Turn a result JSON into the README's tables and the load-curve plot.

``python -m benchmarks.report benchmarks/results/run-….json`` rewrites the part of
``benchmarks/README.md`` between the ``results:start``/``results:end`` markers and
``benchmarks/results/load-curve.png``; everything else in the README is prose kept by hand.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "benchmarks" / "README.md"
PLOT = ROOT / "benchmarks" / "results" / "load-curve.png"
START, END = "<!-- results:start -->", "<!-- results:end -->"
PLOT_SCENARIO = "single-q1-1k"


def _n(x: Any, digits: int = 0) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "–"
    return f"{x:,.{digits}f}"


def tables(report: dict[str, Any], source: str) -> str:
    m = report["machine"]
    v = m["versions"]
    lines = [
        f"Run `{report['started']}` ({source}), {report.get('elapsed_s', 0) / 60:.1f} min. "
        f"Machine: {m['cores']} cores, {m['cpu_model']}, Linux {m['kernel']}, shared with other "
        f"work (load average {m['load_average_start'][0]:.2f} at start, "
        f"{m.get('load_average_end', [float('nan')])[0]:.2f} at end). Python {m['python']}, "
        f"{m['mosquitto']}, paho-mqtt {v.get('paho-mqtt')}, onnxruntime {v.get('onnxruntime')}, "
        f"numpy {v.get('numpy')}, gmqtt {v.get('gmqtt')}.",
        "",
        f"Reproduce: `{report['command']}`",
        "",
        "| scenario | contender | sustained readings/s | p50 / p99 / max ms at 50 % | "
        "p50 / p99 / max ms at 90 % | CPU s per 1M readings | peak RSS MiB |",
        "|---|---|---:|---|---|---:|---:|",
    ]
    for name, sc in report["scenarios"].items():
        for kind, c in sc.get("contenders", {}).items():
            if "error" in c:
                lines.append(f"| {name} | {kind} | failed: {c['error'][:60]} | | | | |")
                continue
            lat = c.get("latency_ms", {})

            def pt(key: str, lat: dict[str, Any] = lat) -> str:
                p = lat.get(key)
                if not p:
                    return "–"
                return f"{_n(p.get('p50'), 1)} / {_n(p.get('p99'), 1)} / {_n(p.get('max'), 1)}"

            lines.append(
                f"| {name} | {kind} | {_n(c.get('sustained_readings_per_s'))} | {pt('50%')} | "
                f"{pt('90%')} | {_n(c.get('cpu_s_per_million'), 1)} | "
                f"{_n(c.get('peak_rss_kb', 0) / 1024, 0)} |"
            )
    lines += ["", "Ratios, measured in the same run on the same broker:", ""]
    lines += ["| scenario | ratio | value |", "|---|---|---:|"]
    for name, sc in report["scenarios"].items():
        for key, val in sc.get("ratios", {}).items():
            lines.append(f"| {name} | {key} | {_n(val, 2)} |")
    mem = (report["scenarios"].get("batch-q1-1M", {}).get("contenders", {}).get("forecaster")) or {}
    if mem.get("memory"):
        mm = mem["memory"]
        lines += [
            "",
            f"State at 1M streams (LSTM 2×64): `StateStore.bytes_per_stream` = "
            f"{mm['state_store_bytes_per_stream']:,} B (arrays only); measured RSS delta over "
            f"{mm['streams_added']:,} added streams = {_n(mm['rss_bytes_per_stream'])} B/stream "
            f"({_n(mm['rss_kb_before'] / 1024)} → {_n(mm['rss_kb_after'] / 1024)} MiB).",
        ]
    lines += ["", "Targets (issue 13):", "", "| target | measured | met |", "|---|---:|---|"]
    for t in report.get("targets", []):
        met = {True: "yes", False: "**no**", None: "–"}[t.get("met")]
        if t.get("missed_by_pct") is not None:
            met += f" (missed by {t['missed_by_pct']:.0f} %)"
        lines.append(f"| {t['target']} | {_n(t.get('value'), 2)} | {met} |")
    return "\n".join(lines)


def plot(report: dict[str, Any], path: Path = PLOT) -> Path | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    sc = report["scenarios"].get(PLOT_SCENARIO)
    if not sc:
        return None
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
    for kind, c in sc.get("contenders", {}).items():
        pts = sorted(p for p in c.get("curve", []) if p[0] > 0)
        if not pts:
            continue
        xs = [p[0] for p in pts]
        ax1.plot(xs, [p[1] for p in pts], "o-", label=kind)
        ax2.plot(xs, [p[2] for p in pts], "o-", label=kind)
    lim = max((p[0] for c in sc["contenders"].values() for p in c.get("curve", [])), default=1)
    ax1.plot([0, lim], [0, lim], ":", color="grey", label="offered = delivered")
    ax1.set(xlabel="offered readings/s", ylabel="delivered readings/s", title="throughput")
    ax2.set(xlabel="offered readings/s", ylabel="p99 latency, ms", title="p99 latency")
    ax2.set_yscale("log")
    for ax in (ax1, ax2):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f"{PLOT_SCENARIO}: single-reading messages, QoS 1, 1,000 streams, LSTM 2×64")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_report(report: dict[str, Any], source: Path) -> None:
    rel = source.resolve().relative_to(ROOT) if source.resolve().is_relative_to(ROOT) else source
    block = f"{START}\n{tables(report, str(rel))}\n{END}"
    text = README.read_text() if README.exists() else f"# Benchmarks\n\n{START}\n{END}\n"
    if START in text and END in text:
        head, rest = text.split(START, 1)
        _, tail = rest.split(END, 1)
        text = head + block + tail
    else:
        text += "\n" + block + "\n"
    README.write_text(text)
    png = plot(report)
    print(f"README: {README}" + (f", plot: {png}" if png else ""))


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m benchmarks.report RESULT.json", file=sys.stderr)
        return 2
    path = Path(args[0])
    write_report(json.loads(path.read_text()), path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
