"""Drawing the demo: a rich full-screen view, or one plain status line a second.

Pure functions of a :class:`Frame` (the scoreboard's snapshot plus what the loop measured), so
they are tested without a terminal. ``rich`` is imported inside :func:`render` only.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from forecaster.demo.scoreboard import SPARK_WIDTH, Anomaly, Snapshot, StreamView

SPARK_CHARS = "▁▂▃▄▅▆▇█"


@dataclass(frozen=True)
class Frame:
    """One screen: the scoreboard's snapshot plus what the loop measured around it."""

    snap: Snapshot
    elapsed: float
    readings_per_s: float
    predictions_per_s: float
    daemon: dict[str, float] | None
    seconds: float
    #: what ``forecaster evaluate`` says offline on each stream's held-out rows, by stream name
    offline_skill: dict[str, float] = field(default_factory=dict)
    title: str = "forecaster demo"
    #: rows where the demo injected a burst, by stream name, so the view can say which flags
    #: are the planted ones and which are real surprises
    injected: dict[str, tuple[int, ...]] = field(default_factory=dict)


def _num(x: float | None, fmt: str = ".2f", missing: str = "–") -> str:
    return missing if x is None or not math.isfinite(x) else format(x, fmt)


def _progress(s: Snapshot) -> str:
    if s.phase == "warm-up":
        return f"warm-up: training rows {s.sent_warm}/{s.total_warm} readings"
    return f"held-out rows: {s.sent_live}/{s.total_live} readings"


def anomaly_text(a: Anomaly) -> str:
    return (
        f"{_when(a.ts)}: {a.actual:.6g} vs {a.predicted:.6g} predicted "
        f"({a.factor:.0f}× the usual error)"
    )


def status_line(f: Frame) -> str:
    """The ``--plain`` view: one line, every second."""
    s, d = f.snap, f.daemon
    p50, p99 = s.latency_ms
    daemon = (
        f"daemon predictions {d['predictions']:.0f} rejected {d['rejected']:.0f}"
        if d
        else "daemon metrics n/a"
    )
    flagged = sum(len(v.anomalies) for v in s.streams)
    return (
        f"[{f.elapsed:6.1f}s] {s.phase:<8} {_progress(s)} · {f.readings_per_s:5.0f} readings/s · "
        f"{s.received} predictions · latency p50 {_num(p50, '.1f')} ms p99 {_num(p99, '.1f')} ms "
        f"· skill {_num(s.skill, '+.3f')} (n={s.scored}) · anomalies {flagged} · {daemon}"
    )


def sparkline(values: Sequence[float], lo: float, hi: float) -> str:
    if not values:
        return ""
    span = hi - lo
    top = len(SPARK_CHARS) - 1
    if span <= 0:
        return SPARK_CHARS[top // 2] * len(values)
    return "".join(SPARK_CHARS[round((v - lo) / span * top)] for v in values)


def _when(ts: float | None) -> str:
    if ts is None or not math.isfinite(ts):
        return "–"
    return time.strftime("%Y-%m-%d %H:%M", time.gmtime(ts))


def spark_width(terminal_columns: int) -> int:
    """Sparkline length that leaves the other columns readable at this terminal width."""
    return max(8, min(SPARK_WIDTH, terminal_columns - 150))


def _skill_cell(v: StreamView, offline: float | None) -> str:
    live = _num(v.skill, "+.3f")
    return live if offline is None else f"{live} ({offline:+.3f})"


def render(f: Frame, spark: int = SPARK_WIDTH) -> Any:
    """The full-screen view: a header grid, one table row per stream, the flagged anomalies."""
    from rich.console import Group
    from rich.panel import Panel
    from rich.table import Table
    from rich.text import Text

    s, d = f.snap, f.daemon
    p50, p99 = s.latency_ms
    head = Table.grid(padding=(0, 2))
    head.add_column(style="bold", no_wrap=True)
    head.add_column()
    limit = "no limit" if f.seconds == 0 else f"limit {f.seconds:g} s"
    head.add_row("phase", f"[cyan]{s.phase}[/] · {_progress(s)} · {f.elapsed:.1f} s ({limit})")
    head.add_row(
        "throughput",
        f"{f.readings_per_s:.0f} readings/s in · {f.predictions_per_s:.0f} predictions/s out · "
        f"{s.received} predictions received",
    )
    skill_style = "green" if math.isfinite(s.skill) and s.skill > 0 else "red"
    head.add_row(
        "skill vs persistence",
        f"[{skill_style}]{_num(s.skill, '+.3f')}[/] over {s.scored} held-out targets, all "
        "streams (1 − RMSE ratio; per stream below, offline evaluate in brackets)",
    )
    head.add_row(
        "latency",
        f"p50 {_num(p50, '.1f')} ms · p99 {_num(p99, '.1f')} ms "
        f"(n={s.latency_n}; reading published → prediction received)",
    )
    head.add_row(
        "daemon /metrics",
        f"predictions_total {d['predictions']:.0f} · readings_total {d['readings']:.0f} · "
        f"rejected {d['rejected']:.0f} · queue {d['queue']:.0f}"
        if d
        else "[red]not reachable[/]",
    )

    table = Table(expand=True, header_style="bold")
    table.add_column("stream", no_wrap=True)
    table.add_column("route", no_wrap=True)
    table.add_column("data time (UTC)", no_wrap=True)
    table.add_column("actual", justify="right", no_wrap=True)
    table.add_column("predicted", justify="right", no_wrap=True)
    table.add_column("MAE", justify="right", no_wrap=True)
    table.add_column("MAE naive", justify="right", no_wrap=True)
    table.add_column("skill (offline)", justify="right", no_wrap=True)
    table.add_column("flagged", justify="right", no_wrap=True)
    table.add_column(f"last {spark} targets", no_wrap=True)
    flagged: list[tuple[str, Anomaly]] = []
    for v in s.streams:
        actual, predicted = v.recent_actual[-spark:], v.recent_predicted[-spark:]
        both = (*actual, *predicted)
        lo, hi = (min(both), max(both)) if both else (0.0, 0.0)
        line = Text()
        line.append(sparkline(actual, lo, hi), style="cyan")
        line.append(" actual\n")
        line.append(sparkline(predicted, lo, hi), style="magenta")
        line.append(" predicted")
        better = math.isfinite(v.mae) and v.mae < v.naive_mae
        flagged += [(v.name, a) for a in v.anomalies]
        table.add_row(
            v.name,
            v.route,
            _when(v.last_ts),
            _num(v.actual, ".6g"),
            _num(v.predicted, ".6g"),
            Text(_num(v.mae, ".4g"), style="green" if better else ""),
            _num(v.naive_mae, ".4g"),
            _skill_cell(v, f.offline_skill.get(v.name)),
            Text(str(len(v.anomalies)), style="bold red" if v.anomalies else ""),
            line,
        )
    alerts = Text()
    for name, a in flagged[-6:]:
        alerts.append("⚠ anomaly ", style="bold red")
        planted = " (the injected burst)" if a.row in f.injected.get(name, ()) else ""
        alerts.append(f"{name} at {anomaly_text(a)}{planted}\n")
    hint = "Ctrl-C to stop" if s.phase in ("warm-up", "live", "done") else ""
    return Group(
        Panel(head, title=f.title, border_style="blue"), table, alerts, Text(hint, style="dim")
    )
