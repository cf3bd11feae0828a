"""``python -m forecaster.demo`` (``make demo``): the whole product on one screen.

A private mosquitto on a free loopback port, the real daemon (``forecaster serve``) as a
subprocess with the bundled ``models/water-flow`` model, and the real water-flow series replayed
as ``--streams`` copies: first the rows the model was trained on, as fast as possible, so every
stream's recurrent state is warm, then the held-out rows at ``--rate`` readings per second per
stream. A subscriber on ``forecast/#`` joins each prediction (made at reading *t*) with the
actual reading *t+1* and scores it against persistence; latency is measured here, from publishing
a reading to receiving its prediction. Everything started is stopped on Ctrl-C, on SIGTERM,
after ``--seconds``, or when the held-out rows run out, and a summary is printed.

The pieces are small: :class:`Scoreboard` is the pure core (no I/O, a clock passed in),
:func:`render` and :func:`status_line` draw a :class:`Snapshot`, and the rest is process plumbing.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import math
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import IO, Any

import numpy as np
import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion

from forecaster.data import Dataset, load_csv
from forecaster.errors import ForecasterError
from forecaster.model.bundle import Manifest, read_manifest
from forecaster.replay import ReplayItem, connect, plan, replay

ROOT = Path(__file__).resolve().parents[1]
MODEL_DIR = ROOT / "models" / "water-flow"
DATA_CSV = ROOT / "data" / "water-flow.csv"
READING_TOPIC = "sensors/{stream}/flow"
READING_FILTER = "sensors/+/flow"
FORECAST_PREFIX = "forecast/"
ROUTE = "water"
SPARK_WIDTH = 48  # most targets a sparkline shows; fewer on narrow terminals
SPARK_CHARS = "▁▂▃▄▅▆▇█"
READY_TIMEOUT = 60.0
WARM_TIMEOUT = 120.0
STOP_TIMEOUT = 30.0
MOSQUITTO_HINT = (
    "mosquitto is not installed: install the 'mosquitto' package "
    "(Debian/Ubuntu: sudo apt-get install mosquitto; Fedora: sudo dnf install mosquitto; "
    "macOS: brew install mosquitto)"
)


class DemoError(ForecasterError):
    """The demo cannot run or could not stop cleanly; the message is one line for the user."""


# --------------------------------------------------------------------------- options


@dataclass(frozen=True)
class Options:
    seconds: float = 60.0
    streams: int = 4
    rate: float = 8.0
    plain: bool = False


def parse_args(argv: Sequence[str] | None = None) -> Options:
    p = argparse.ArgumentParser(
        prog="python -m forecaster.demo",
        description="Run a private broker, the forecaster daemon and a replay of the real "
        "water-flow data, and watch the one-step forecasts live.",
    )
    p.add_argument(
        "--seconds",
        type=float,
        default=60.0,
        help="stop after this many seconds of replay (default 60; 0 = until Ctrl-C); the demo "
        "also ends when the held-out rows run out, unless --seconds is 0",
    )
    p.add_argument(
        "--streams", type=int, default=4, help="copies of the series, as separate streams (4)"
    )
    p.add_argument(
        "--rate",
        type=float,
        default=8.0,
        help="held-out readings per second per stream (default 8; 0 = as fast as possible)",
    )
    p.add_argument(
        "--plain",
        action="store_true",
        help="no full-screen view: one status line a second (automatic when stdout is no TTY)",
    )
    a = p.parse_args(argv)
    if a.seconds < 0 or not math.isfinite(a.seconds):
        p.error("--seconds must be 0 or more")
    if not 1 <= a.streams <= 1000:
        p.error("--streams must be between 1 and 1000")
    if a.rate < 0 or not math.isfinite(a.rate):
        p.error("--rate must be 0 or more")
    return Options(a.seconds, a.streams, a.rate, a.plain or not sys.stdout.isatty())


# --------------------------------------------------------------------------- scoring (pure)


@dataclass
class _Stream:
    """What the scoreboard knows about one stream (one reading topic)."""

    name: str
    values: dict[int, float]  # row -> actual
    row_of_ts: dict[float, int]
    ts_of_row: dict[int, float]
    next_row: dict[int, int]
    prev_row: dict[int, int]
    published: set[int] = field(default_factory=set)
    predicted: dict[int, float] = field(default_factory=dict)  # row of the reading -> prediction
    scored: set[int] = field(default_factory=set)  # rows of scored targets
    n: int = 0
    abs_err: float = 0.0
    naive_abs_err: float = 0.0
    sq_err: float = 0.0
    naive_sq_err: float = 0.0
    last: tuple[float, float, float] | None = None  # (ts, actual, predicted) of the last target
    recent: deque[tuple[float, float]] = field(default_factory=lambda: deque(maxlen=SPARK_WIDTH))


@dataclass(frozen=True)
class StreamView:
    name: str
    n: int
    last_ts: float | None
    actual: float | None
    predicted: float | None
    mae: float
    naive_mae: float
    skill: float
    recent_actual: tuple[float, ...]
    recent_predicted: tuple[float, ...]


@dataclass(frozen=True)
class Snapshot:
    """Everything the view shows, copied out under the scoreboard's lock."""

    phase: str
    sent_warm: int
    total_warm: int
    sent_live: int
    total_live: int
    received: int
    scored: int
    rmse: float
    naive_rmse: float
    skill: float
    latency_ms: tuple[float, float]  # p50, p99; NaN while there is none
    latency_n: int
    streams: tuple[StreamView, ...]


def skill_of(sq_err: float, naive_sq_err: float) -> float:
    """1 - RMSE_model / RMSE_persistence over the same targets; NaN while undefined."""
    if naive_sq_err <= 0:
        return math.nan
    return 1.0 - math.sqrt(sq_err / naive_sq_err)


class Scoreboard:
    """Joins published readings and received predictions; thread-safe, no I/O.

    A prediction made at reading *t* is scored against the actual *t+1* once both the prediction
    has arrived and reading *t+1* has been published (in either order), and only when *t+1* is a
    held-out row. Latency pairs the publish time of a held-out reading with the receive time of
    its prediction, keyed by (topic, ts), whichever is recorded first.
    """

    def __init__(self, warm_items: Sequence[ReplayItem], live_items: Sequence[ReplayItem]) -> None:
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)
        self.total_warm = len(warm_items)
        self.total_live = len(live_items)
        self.first_live_row = min((it.row for it in live_items), default=math.inf)
        self._streams: dict[str, _Stream] = {}
        for it in (*warm_items, *live_items):
            s = self._streams.get(it.topic)
            if s is None:
                s = self._streams[it.topic] = _Stream(it.stream, {}, {}, {}, {}, {})
            if s.values:
                last = next(reversed(s.values))
                s.next_row[last] = it.row
                s.prev_row[it.row] = last
            s.values[it.row] = it.value
            if it.ts is not None:
                s.row_of_ts[it.ts] = it.row
                s.ts_of_row[it.row] = it.ts
        self._last_warm_row = {it.topic: it.row for it in warm_items}
        self.phase = "starting"
        self.sent_warm = 0
        self.sent_live = 0
        self.received = 0
        self.scored = 0
        self._sq = 0.0
        self._naive_sq = 0.0
        self._sent_at: dict[tuple[str, float], float] = {}
        self._received_at: dict[tuple[str, float], float] = {}
        self._latencies: list[float] = []

    # -- events ----------------------------------------------------------------------------

    def set_phase(self, phase: str) -> None:
        with self._changed:
            self.phase = phase
            self._changed.notify_all()

    def on_sent(self, item: ReplayItem, now: float) -> None:
        """Reading ``item`` was handed to the MQTT client at wall time ``now``."""
        with self._lock:
            s = self._streams[item.topic]
            s.published.add(item.row)
            live = item.row >= self.first_live_row
            if live:
                self.sent_live += 1
                if item.ts is not None:
                    key = (item.topic, item.ts)
                    got = self._received_at.pop(key, None)
                    if got is None:
                        self._sent_at[key] = now
                    else:
                        self._latencies.append(got - now)
            else:
                self.sent_warm += 1
            prev = s.prev_row.get(item.row)
            if prev is not None:
                self._score(s, prev)

    def on_prediction(self, topic: str, ts: float | None, value: float | None, now: float) -> None:
        """A prediction for the reading on ``topic`` at data time ``ts`` arrived at ``now``."""
        with self._changed:
            self.received += 1
            s = self._streams.get(topic)
            row = None if s is None or ts is None else s.row_of_ts.get(ts)
            if s is None or ts is None or row is None:
                return
            if row >= self.first_live_row:
                key = (topic, ts)
                sent = self._sent_at.pop(key, None)
                if sent is None:
                    self._received_at[key] = now
                else:
                    self._latencies.append(now - sent)
            if value is not None and math.isfinite(value):
                s.predicted[row] = value
                self._score(s, row)
            if row == self._last_warm_row.get(topic):
                self._changed.notify_all()

    def _score(self, s: _Stream, row: int) -> None:
        target = s.next_row.get(row)
        if (
            target is None
            or target < self.first_live_row
            or target in s.scored
            or target not in s.published
            or row not in s.predicted
        ):
            return
        s.scored.add(target)
        actual, pred, before = s.values[target], s.predicted.pop(row), s.values[row]
        err, naive = actual - pred, actual - before
        s.n += 1
        s.abs_err += abs(err)
        s.naive_abs_err += abs(naive)
        s.sq_err += err * err
        s.naive_sq_err += naive * naive
        s.last = (s.ts_of_row.get(target, math.nan), actual, pred)
        s.recent.append((actual, pred))
        self.scored += 1
        self._sq += err * err
        self._naive_sq += naive * naive

    # -- waiting and reading ---------------------------------------------------------------

    def wait_warm(self, timeout: float, stop: threading.Event) -> bool:
        """Wait until every stream's prediction for its last training reading has arrived."""
        deadline = time.monotonic() + timeout
        with self._changed:
            while not all(
                row in s.predicted or s.next_row.get(row) in s.scored
                for topic, row in self._last_warm_row.items()
                for s in (self._streams[topic],)
            ):
                left = deadline - time.monotonic()
                if left <= 0 or stop.is_set():
                    return False
                self._changed.wait(min(left, 0.2))
        return True

    def snapshot(self) -> Snapshot:
        with self._lock:
            lat = np.asarray(self._latencies, dtype=np.float64) * 1e3
            streams = tuple(
                StreamView(
                    name=s.name,
                    n=s.n,
                    last_ts=None if s.last is None else s.last[0],
                    actual=None if s.last is None else s.last[1],
                    predicted=None if s.last is None else s.last[2],
                    mae=s.abs_err / s.n if s.n else math.nan,
                    naive_mae=s.naive_abs_err / s.n if s.n else math.nan,
                    skill=skill_of(s.sq_err, s.naive_sq_err),
                    recent_actual=tuple(a for a, _ in s.recent),
                    recent_predicted=tuple(p for _, p in s.recent),
                )
                for s in self._streams.values()
            )
            n = self.scored
            return Snapshot(
                phase=self.phase,
                sent_warm=self.sent_warm,
                total_warm=self.total_warm,
                sent_live=self.sent_live,
                total_live=self.total_live,
                received=self.received,
                scored=n,
                rmse=math.sqrt(self._sq / n) if n else math.nan,
                naive_rmse=math.sqrt(self._naive_sq / n) if n else math.nan,
                skill=skill_of(self._sq, self._naive_sq),
                latency_ms=(
                    (float(np.percentile(lat, 50)), float(np.percentile(lat, 99)))
                    if lat.size
                    else (math.nan, math.nan)
                ),
                latency_n=int(lat.size),
                streams=streams,
            )


class RateMeter:
    """Events per second over a sliding window of (time, running count) samples."""

    def __init__(self, window: float = 2.0) -> None:
        self._window = window
        self._samples: deque[tuple[float, int]] = deque()

    def update(self, now: float, count: int) -> float:
        self._samples.append((now, count))
        while len(self._samples) > 2 and now - self._samples[0][0] > self._window:
            self._samples.popleft()
        t0, c0 = self._samples[0]
        return (count - c0) / (now - t0) if now > t0 else 0.0


# --------------------------------------------------------------------------- drawing (pure)


@dataclass(frozen=True)
class Frame:
    """One screen: the scoreboard's snapshot plus what the loop measured around it."""

    snap: Snapshot
    elapsed: float
    readings_per_s: float
    predictions_per_s: float
    daemon: dict[str, float] | None
    offline_skill: float | None
    seconds: float


def _num(x: float | None, fmt: str = ".2f", missing: str = "–") -> str:
    return missing if x is None or not math.isfinite(x) else format(x, fmt)


def _progress(s: Snapshot) -> str:
    if s.phase == "warm-up":
        return f"warm-up: training rows {s.sent_warm}/{s.total_warm} readings"
    return f"held-out rows: {s.sent_live}/{s.total_live} readings"


def status_line(f: Frame) -> str:
    """The ``--plain`` view: one line, every second."""
    s, d = f.snap, f.daemon
    p50, p99 = s.latency_ms
    daemon = (
        f"daemon predictions {d['predictions']:.0f} rejected {d['rejected']:.0f}"
        if d
        else "daemon metrics n/a"
    )
    return (
        f"[{f.elapsed:6.1f}s] {s.phase:<8} {_progress(s)} · {f.readings_per_s:5.0f} readings/s · "
        f"{s.received} predictions · latency p50 {_num(p50, '.1f')} ms p99 {_num(p99, '.1f')} ms "
        f"· skill {_num(s.skill, '+.3f')} (n={s.scored}) · {daemon}"
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
    return max(8, min(SPARK_WIDTH, terminal_columns - 100))


def render(f: Frame, spark: int = SPARK_WIDTH) -> Any:
    """The full-screen view: a header grid and one table row per stream (a rich renderable)."""
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
    offline = "" if f.offline_skill is None else f" · offline evaluate {f.offline_skill:+.3f}"
    head.add_row(
        "skill vs persistence",
        f"[{skill_style}]{_num(s.skill, '+.3f')}[/] over {s.scored} held-out targets "
        f"(RMSE {_num(s.rmse, '.4f')} vs {_num(s.naive_rmse, '.4f')}){offline}",
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
    table.add_column("data time (UTC)", no_wrap=True)
    table.add_column("actual", justify="right", no_wrap=True)
    table.add_column("predicted", justify="right", no_wrap=True)
    table.add_column("MAE", justify="right", no_wrap=True)
    table.add_column("MAE naive", justify="right", no_wrap=True)
    table.add_column("skill", justify="right", no_wrap=True)
    table.add_column(f"last {spark} targets", no_wrap=True)
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
        table.add_row(
            v.name,
            _when(v.last_ts),
            _num(v.actual),
            _num(v.predicted),
            Text(_num(v.mae, ".3f"), style="green" if better else ""),
            _num(v.naive_mae, ".3f"),
            _num(v.skill, "+.3f"),
            line,
        )
    title = "forecaster demo · water-flow LSTM · one-step forecasts of l/s"
    hint = "Ctrl-C to stop" if s.phase in ("warm-up", "live", "done") else ""
    return Group(Panel(head, title=title, border_style="blue"), table, Text(hint))


# --------------------------------------------------------------------------- processes


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_port(port: int, proc: subprocess.Popen[bytes], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise DemoError(f"mosquitto exited with code {proc.returncode} at start-up")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.05)
    raise DemoError(f"mosquitto does not listen on port {port} after {timeout:g} s")


def is_root() -> bool:
    return hasattr(os, "geteuid") and os.geteuid() == 0


def find_mosquitto(install: bool = True) -> str:
    """The mosquitto binary; installed with apt-get when missing and we are root."""
    path = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
    if os.access(path, os.X_OK):
        return path
    apt = shutil.which("apt-get")
    if not (install and is_root() and apt):
        raise DemoError(MOSQUITTO_HINT)
    print("mosquitto not found: installing it with apt-get", file=sys.stderr, flush=True)
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for cmd in ([apt, "update"], [apt, "install", "-y", "--no-install-recommends", "mosquitto"]):
        if subprocess.run(cmd, env=env, check=False).returncode != 0:
            raise DemoError(f"'{' '.join(cmd)}' failed; {MOSQUITTO_HINT}")
    return find_mosquitto(install=False)


def _die_with_parent() -> None:
    """Child side of fork: get SIGTERM if the demo itself dies (Linux), so nothing is orphaned."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass  # not Linux: the demo's own finally blocks are the only guard


def spawn(
    cmd: list[str], log: IO[bytes], env: dict[str, str] | None = None
) -> subprocess.Popen[bytes]:
    # A session of its own: Ctrl-C in the terminal reaches the demo only, which then stops
    # the children in order (daemon before broker) instead of all of them at once.
    return subprocess.Popen(
        cmd,
        stdout=log,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        env=env,
        cwd=ROOT,
        start_new_session=True,
        preexec_fn=_die_with_parent if sys.platform == "linux" else None,
    )


def stop_process(proc: subprocess.Popen[bytes] | None, timeout: float) -> int | None:
    """SIGTERM, wait, then SIGKILL; returns the exit code of a clean stop, else None."""
    if proc is None:
        return None
    if proc.poll() is not None:
        return proc.returncode
    proc.terminate()
    try:
        return proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        return None


def tail(path: Path, lines: int = 25) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def broker_config(port: int, root: bool) -> str:
    return (
        f"listener {port} 127.0.0.1\nallow_anonymous true\npersistence false\n"
        "max_queued_messages 100000\nmax_inflight_messages 0\n" + ("user root\n" if root else "")
    )


def daemon_config(broker_port: int, metrics_port: int, state_dir: Path, bundle: Path) -> str:
    q = json.dumps  # a JSON string is a valid TOML basic string
    return f"""\
[mqtt]
host = "127.0.0.1"
port = {broker_port}
client_id = "forecaster-demo-{broker_port}"
reconnect_min_delay = 0.2
reconnect_max_delay = 1.0

[daemon]
state_dir = {q(str(state_dir))}

[metrics]
bind = "127.0.0.1"
port = {metrics_port}

[[routes]]
name = "{ROUTE}"
subscribe = ["{READING_FILTER}"]
bundle = {q(str(bundle))}
"""


def http_get(url: str, timeout: float = 1.0) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:  # noqa: S310 (http://127.0.0.1)
            return int(r.status), r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode(errors="replace")


def scrape(metrics_url: str) -> dict[str, float] | None:
    """The daemon's counters the view shows, summed over labels; None when unreachable."""
    from prometheus_client.parser import text_string_to_metric_families

    try:
        status, text = http_get(metrics_url)
    except OSError:
        return None
    if status != 200:
        return None
    wanted = {
        "forecaster_predictions_total": "predictions",
        "forecaster_readings_total": "readings",
        "forecaster_readings_rejected_total": "rejected",
        "forecaster_queue_depth": "queue",
    }
    out = dict.fromkeys(wanted.values(), 0.0)
    for fam in text_string_to_metric_families(text):
        for sample in fam.samples:
            key = wanted.get(sample.name)
            if key is not None:
                out[key] += sample.value
    return out


@dataclass
class Stack:
    """Everything the demo starts, so one ``close`` stops it all, in order."""

    workdir: Path
    broker: subprocess.Popen[bytes] | None = None
    daemon: subprocess.Popen[bytes] | None = None
    subscriber: paho.Client | None = None
    broker_port: int = 0
    metrics_url: str = ""
    logs: list[IO[bytes]] = field(default_factory=list)

    def log(self, name: str) -> IO[bytes]:
        fh = (self.workdir / name).open("ab")
        self.logs.append(fh)
        return fh

    def stop_daemon(self) -> int | None:
        return stop_process(self.daemon, STOP_TIMEOUT)

    def close(self) -> None:
        if self.daemon is not None and self.daemon.poll() is None:
            stop_process(self.daemon, STOP_TIMEOUT)
        if self.subscriber is not None:
            self.subscriber.loop_stop()
            self.subscriber.disconnect()
            self.subscriber = None
        stop_process(self.broker, 10.0)
        for fh in self.logs:
            fh.close()
        shutil.rmtree(self.workdir, ignore_errors=True)


def start_broker(stack: Stack) -> None:
    binary = find_mosquitto()
    stack.broker_port = free_port()
    conf = stack.workdir / "mosquitto.conf"
    conf.write_text(broker_config(stack.broker_port, is_root()))
    stack.broker = spawn([binary, "-c", str(conf)], stack.log("mosquitto.log"))
    try:
        wait_port(stack.broker_port, stack.broker, 10.0)
    except DemoError as exc:
        raise DemoError(f"{exc}: {tail(stack.workdir / 'mosquitto.log', 5)}") from None


def start_daemon(stack: Stack, bundle: Path) -> None:
    metrics_port = free_port()
    cfg = stack.workdir / "forecaster.toml"
    cfg.write_text(daemon_config(stack.broker_port, metrics_port, stack.workdir / "state", bundle))
    # The user's FORECASTER_* settings must not leak into a self-contained demo.
    env = {k: v for k, v in os.environ.items() if not k.upper().startswith("FORECASTER_")}
    log_path = stack.workdir / "daemon.log"
    stack.daemon = spawn(
        [sys.executable, "-m", "forecaster", "serve", "--config", str(cfg)],
        stack.log("daemon.log"),
        env,
    )
    stack.metrics_url = f"http://127.0.0.1:{metrics_port}/metrics"
    deadline = time.monotonic() + READY_TIMEOUT
    while time.monotonic() < deadline:
        if stack.daemon.poll() is not None:
            raise DemoError(
                f"the daemon exited with code {stack.daemon.returncode} at start-up:\n"
                f"{tail(log_path)}"
            )
        try:
            if http_get(f"http://127.0.0.1:{metrics_port}/readyz", 0.5)[0] == 200:
                return
        except OSError:
            pass
        time.sleep(0.1)
    raise DemoError(f"the daemon was not ready after {READY_TIMEOUT:g} s:\n{tail(log_path)}")


def subscribe(stack: Stack, board: Scoreboard) -> None:
    client = paho.Client(
        callback_api_version=CallbackAPIVersion.VERSION2,
        client_id=f"forecaster-demo-view-{os.getpid()}",
        protocol=paho.MQTTv5,
    )

    def on_message(_c: paho.Client, _u: object, msg: paho.MQTTMessage) -> None:
        now = time.time()
        reading_topic = msg.topic.removeprefix(FORECAST_PREFIX)
        try:
            doc = json.loads(msg.payload)
        except ValueError:
            return  # not a prediction; the view only counts what it can read
        for p in doc if isinstance(doc, list) else [doc]:
            if isinstance(p, dict):
                ts, value = p.get("ts"), p.get("value")
                board.on_prediction(
                    reading_topic,
                    float(ts) if isinstance(ts, int | float) else None,
                    float(value) if isinstance(value, int | float) else None,
                    now,
                )

    subscribed = threading.Event()
    client.on_message = on_message
    client.on_subscribe = lambda *_: subscribed.set()
    client.connect("127.0.0.1", stack.broker_port)
    client.loop_start()
    stack.subscriber = client
    client.subscribe(FORECAST_PREFIX + "#", qos=1)
    if not subscribed.wait(10):
        raise DemoError("the broker did not acknowledge the forecast/# subscription")


class Feeder(threading.Thread):
    """Replays the training rows as fast as possible, waits until every stream is warm, then
    replays the held-out rows at the chosen rate, through :mod:`forecaster.replay`."""

    def __init__(
        self,
        port: int,
        board: Scoreboard,
        warm_items: list[ReplayItem],
        live_items: list[ReplayItem],
        rate: float,
    ) -> None:
        super().__init__(name="demo-replay", daemon=True)
        self._port = port
        self._board = board
        self._warm = warm_items
        self._live = live_items
        self._rate = rate
        self.stop_event = threading.Event()
        self.error: BaseException | None = None

    def _sent(self, items: list[ReplayItem]) -> Callable[[int], None]:
        return lambda n: self._board.on_sent(items[n - 1], time.time())

    def run(self) -> None:
        try:
            client = connect(
                "127.0.0.1", self._port, client_id=f"forecaster-demo-replay-{os.getpid()}"
            )
        except BaseException as exc:
            self.error = exc
            return
        try:
            stop = self.stop_event.is_set
            self._board.set_phase("warm-up")
            replay(
                client, self._warm, "json", 1, 0.0, should_stop=stop, on_sent=self._sent(self._warm)
            )
            if not stop() and not self._board.wait_warm(WARM_TIMEOUT, self.stop_event):
                if not stop():
                    raise DemoError(
                        f"no prediction for the last training reading after {WARM_TIMEOUT:g} s"
                    )
            if stop():
                return
            self._board.set_phase("live")
            replay(
                client,
                self._live,
                "json",
                1,
                self._rate,
                should_stop=stop,
                on_sent=self._sent(self._live),
            )
            if not stop():
                self._board.set_phase("done")
        except BaseException as exc:
            self.error = exc
        finally:
            client.loop_stop()
            client.disconnect()


@contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """SIGTERM stops the demo the way Ctrl-C does: through the same finally blocks."""

    def handler(_signum: int, _frame: FrameType | None) -> None:
        raise KeyboardInterrupt

    old = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, old)


# --------------------------------------------------------------------------- the demo


def load_inputs(streams: int) -> tuple[Manifest, list[ReplayItem], list[ReplayItem]]:
    """The bundle's manifest and the replay plan: training rows, then held-out rows."""
    manifest = read_manifest(MODEL_DIR)
    td = manifest.training_data
    if td.until is None:
        raise DemoError(f"{MODEL_DIR} records no training cut (until): no held-out part to show")
    dataset: Dataset = load_csv(DATA_CSV, td.column, td.time_column, td.stream_column)
    warm = plan(dataset, READING_TOPIC, streams, None, td.until)
    live = plan(dataset, READING_TOPIC, streams, td.until, None)
    if not live:
        raise DemoError(f"{DATA_CSV.name} has no rows at or after {td.until}: nothing held out")
    return manifest, warm, live


def offline_skill(until: str) -> float | None:
    """What ``forecaster evaluate --from <until>`` says on the same rows: the live skill of a full
    run should match it (same model, same readings, same zero start)."""
    try:
        from forecaster.evaluation.unroll import evaluate_bundle
        from forecaster.model.bundle import Bundle

        b = Bundle.load(MODEL_DIR)
        td = b.manifest.training_data
        data = load_csv(DATA_CSV, td.column, td.time_column, td.stream_column)
        return float(evaluate_bundle(b, data, None, until).score().as_dict()["skill"])
    except (ForecasterError, ImportError, ValueError):
        return None


def summary(
    snap: Snapshot, daemon: dict[str, float] | None, rc: int | None, offline: float | None
) -> str:
    p50, p99 = snap.latency_ms
    d = daemon or {}
    offline_text = (
        "" if offline is None else f" (offline evaluate on all held-out rows: {offline:+.3f})"
    )
    lines = [
        "demo summary",
        f"  readings     {snap.sent_warm + snap.sent_live} published "
        f"({snap.sent_warm} training rows + {snap.sent_live} held-out rows)",
        f"  predictions  {snap.received} received; daemon counted "
        f"{d.get('predictions', math.nan):.0f} predictions, {d.get('rejected', math.nan):.0f} "
        "rejected readings",
        f"  scored       {snap.scored} held-out one-step predictions",
        f"  RMSE         model {_num(snap.rmse, '.4f', 'n/a')}, persistence "
        f"{_num(snap.naive_rmse, '.4f', 'n/a')}",
        f"  skill        {_num(snap.skill, '+.3f', 'n/a')} vs persistence{offline_text}",
        f"  latency      p50 {_num(p50, '.1f', 'n/a')} ms, p99 {_num(p99, '.1f', 'n/a')} ms "
        f"(n={snap.latency_n}, reading published -> prediction received)",
        f"  daemon exit  {'killed (did not stop in time)' if rc is None else rc}",
    ]
    return "\n".join(lines)


def run(opts: Options) -> int:
    manifest, warm_items, live_items = load_inputs(opts.streams)
    offline = offline_skill(manifest.training_data.until or "")
    board = Scoreboard(warm_items, live_items)
    workdir = Path(tempfile.mkdtemp(prefix="forecaster-demo-"))
    stack = Stack(workdir)
    feeder: Feeder | None = None
    daemon_rc: int | None = None
    final_metrics: dict[str, float] | None = None
    try:
        with sigterm_as_interrupt():
            try:
                start_broker(stack)
                start_daemon(stack, MODEL_DIR)
                print(
                    f"demo: workdir {workdir}; mosquitto pid {_pid(stack.broker)} on "
                    f"127.0.0.1:{stack.broker_port}; daemon pid {_pid(stack.daemon)}, metrics "
                    f"{stack.metrics_url}; {opts.streams} streams of {DATA_CSV.name}",
                    flush=True,
                )
                subscribe(stack, board)
                feeder = Feeder(
                    stack.broker_port,
                    board,
                    warm_items,
                    live_items,
                    opts.rate * opts.streams,
                )
                feeder.start()
                watch(opts, board, feeder, stack, offline)
            except KeyboardInterrupt:
                pass
            finally:
                if feeder is not None:
                    feeder.stop_event.set()
                    feeder.join(timeout=10)
                    _drain(board)
                board.set_phase("stopping")
                final_metrics = scrape(stack.metrics_url) if stack.metrics_url else None
                if stack.daemon is not None:
                    daemon_rc = stack.stop_daemon()
    finally:
        daemon_log = tail(workdir / "daemon.log")
        stack.close()
    if (
        feeder is not None
        and feeder.error is not None
        and not isinstance(feeder.error, KeyboardInterrupt)
    ):
        raise DemoError(f"the replay failed: {feeder.error}")
    print(summary(board.snapshot(), final_metrics, daemon_rc, offline), flush=True)
    if daemon_rc != 0:
        print(f"error: the daemon did not exit cleanly:\n{daemon_log}", file=sys.stderr)
        return 1
    return 0


def _pid(proc: subprocess.Popen[bytes] | None) -> str:
    return "-" if proc is None else str(proc.pid)


def _drain(board: Scoreboard, quiet: float = 0.5, limit: float = 3.0) -> None:
    """Wait until predictions stop arriving (quiet for ``quiet`` s), at most ``limit`` s."""
    deadline = time.monotonic() + limit
    last, since = board.snapshot().received, time.monotonic()
    while time.monotonic() < deadline and time.monotonic() - since < quiet:
        time.sleep(0.1)
        now = board.snapshot().received
        if now != last:
            last, since = now, time.monotonic()


def watch(
    opts: Options, board: Scoreboard, feeder: Feeder, stack: Stack, offline: float | None
) -> None:
    """Show the live view until --seconds, the end of the data, Ctrl-C or a failure."""
    started = time.monotonic()
    sent_rate, pred_rate = RateMeter(), RateMeter()
    daemon: dict[str, float] | None = None
    last_scrape = 0.0
    done_at: float | None = None

    def frame() -> Frame:
        nonlocal daemon, last_scrape
        now = time.monotonic()
        if now - last_scrape >= 1.0:
            daemon, last_scrape = scrape(stack.metrics_url), now
        snap = board.snapshot()
        return Frame(
            snap=snap,
            elapsed=now - started,
            readings_per_s=sent_rate.update(now, snap.sent_warm + snap.sent_live),
            predictions_per_s=pred_rate.update(now, snap.received),
            daemon=daemon,
            offline_skill=offline,
            seconds=opts.seconds,
        )

    def finished() -> bool:
        nonlocal done_at
        now = time.monotonic()
        if stack.daemon is not None and stack.daemon.poll() is not None:
            raise DemoError(f"the daemon exited unexpectedly with code {stack.daemon.returncode}")
        if feeder.error is not None:
            return True
        if opts.seconds and now - started >= opts.seconds:
            return True
        if not feeder.is_alive() and opts.seconds:
            # Data ran out: give the last predictions a moment, then end.
            done_at = done_at or now
            return now - done_at >= 1.0
        return False

    if opts.plain:
        while not finished():
            print(status_line(frame()), flush=True)
            _sleep_until_next(started, 1.0)
        return

    from rich.console import Console
    from rich.live import Live

    console = Console()

    def draw() -> Any:
        return render(frame(), spark_width(console.width))

    with Live(draw(), console=console, auto_refresh=False, transient=False) as live:
        try:
            while not finished():
                time.sleep(0.25)
                live.update(draw(), refresh=True)
        finally:
            board.set_phase("stopping")
            live.update(draw(), refresh=True)


def _sleep_until_next(started: float, period: float) -> None:
    elapsed = time.monotonic() - started
    time.sleep(period - elapsed % period)


def main(argv: Sequence[str] | None = None) -> int:
    opts = parse_args(argv)
    try:
        return run(opts)
    except ForecasterError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
