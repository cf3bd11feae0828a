"""``make demo``'s command run as a user runs it: exit 0, a real summary, nothing left behind."""

from __future__ import annotations

import math
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from forecaster.demo.scoreboard import Scoreboard
from forecaster.harness import wait_until
from forecaster.replay import ReplayItem

from .terminal import Terminal

ROOT = Path(__file__).resolve().parents[2]


def _running_with(text: str) -> list[str]:
    """Command lines of live processes that mention ``text`` (pgrep -f, or /proc without it)."""
    if shutil.which("pgrep"):
        out = subprocess.run(["pgrep", "-af", text], capture_output=True, text=True, check=False)
        return [line for line in out.stdout.splitlines() if line.strip()]
    found = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            cmd = cmdline.read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if text in cmd:
            found.append(cmd)
    return found


@pytest.mark.broker
def test_demo_runs_and_cleans_up() -> None:
    """A full run at a fast rate: every held-out row of every stream is scored, the clean streams'
    live skill equals offline evaluate's, the injected burst is flagged, nothing is left over."""
    mosquitto = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
    if not os.path.exists(mosquitto):
        pytest.fail("mosquitto is not installed: apt-get install mosquitto (make test does it)")
    env = {k: v for k, v in os.environ.items() if not k.startswith("FORECASTER_")}
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "forecaster.demo",
            *("--seconds", "150", "--plain", "--rate", "60"),
        ],
        capture_output=True,
        text=True,
        timeout=240,
        cwd=ROOT,
        env=env,
    )
    out = proc.stdout
    assert proc.returncode == 0, f"demo exited {proc.returncode}\n{out}\n{proc.stderr}"

    predictions = re.search(r"^\s+predictions\s+(\d+) received", out, re.M)
    published = re.search(r"^\s+readings\s+(\d+) published", out, re.M)
    assert predictions and published, out
    assert int(predictions.group(1)) == int(published.group(1)), out
    streams = {
        m.group(1): m
        for m in re.finditer(
            r"^\s+stream (\S+)\s+route (\S+)\s+skill ([+-]\d+\.\d+) live, offline evaluate "
            r"([+-]\d+\.\d+) \(n=(\d+)\); anomalies flagged (\d+)",
            out,
            re.M,
        )
    }
    assert set(streams) == {"pipe-1", "pipe-2", "england-wales"}, out
    assert {m.group(2) for m in streams.values()} == {"water", "demand"}, out
    for clean in ("pipe-1", "england-wales"):
        live, offline = streams[clean].group(3), streams[clean].group(4)
        assert live == offline, f"{clean}: live skill {live} != offline {offline}\n{out}"
    # The burst injected into pipe-2 is flagged at its first row, and costs it skill.
    burst = re.search(r"burst injected at rows (\d+)", out)
    assert burst, out
    assert re.search(rf"^\s+anomaly row {burst.group(1)}: ", out, re.M), out
    assert float(streams["pipe-2"].group(3)) < float(streams["pipe-1"].group(3)), out
    assert re.search(r"^\s+latency\s+p50 \d+\.\d ms, p99 \d+\.\d ms", out, re.M), out
    assert re.search(r"^\s+daemon exit\s+0$", out, re.M), out
    # One status line a second in --plain mode.
    assert len(re.findall(r"^\[\s*\d+\.\ds\]", out, re.M)) >= 3, out

    started = re.search(r"^demo: workdir (\S+); mosquitto pid (\d+) .* daemon pid (\d+)", out, re.M)
    assert started, out
    workdir = started.group(1)
    assert not Path(workdir).exists(), f"{workdir} was left behind"
    assert _running_with(workdir) == [], "a mosquitto or daemon child is still running"
    for pid in (int(started.group(2)), int(started.group(3))):
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)


def test_demo_refuses_bad_options() -> None:
    """One line on stderr, non-zero exit, before anything is started."""
    proc = subprocess.run(
        [sys.executable, "-m", "forecaster", "demo", "--rate", "-1"],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == ["error: --rate must be 0 or more"], proc.stderr


def _items(values: list[float], first_live: int) -> tuple[list[ReplayItem], list[ReplayItem]]:
    items = [
        ReplayItem("s0", "sensors/s0/flow", v, 3600.0 * i, seq=i, row=i)
        for i, v in enumerate(values)
    ]
    return items[:first_live], items[first_live:]


def test_scoreboard_joins_in_either_order() -> None:
    """Prediction at t is scored against the actual at t+1, whichever is seen first; only
    held-out targets count; skill is 1 - RMSE ratio, worked out by hand here."""
    values = [10.0, 11.0, 13.0, 12.0, 12.0]
    warm, live = _items(values, 2)
    board = Scoreboard(warm, live)
    topic = "sensors/s0/flow"
    for it in warm:
        board.on_sent(it, 100.0 + it.row)
    # Prediction made at row 0 targets row 1, a training row: never scored.
    board.on_prediction(topic, 0.0, 10.5, 100.1)
    # Prediction made at row 1 (targets row 2) arrives before row 2 is published.
    board.on_prediction(topic, 3600.0, 12.0, 101.1)
    assert board.snapshot().scored == 0
    board.on_sent(live[0], 102.0)  # row 2 = 13: error 1, persistence error 2
    assert board.snapshot().scored == 1
    # Row 3 is published first, the prediction made at row 2 (which targets it) after.
    board.on_sent(live[1], 103.0)  # row 3 = 12
    board.on_prediction(topic, 7200.0, 12.5, 102.004)  # error -0.5, persistence error -1
    # A prediction that arrives before its reading's publish time is recorded still counts.
    board.on_prediction(topic, 4 * 3600.0, 11.0, 104.003)
    board.on_sent(live[2], 104.0)

    snap = board.snapshot()
    assert snap.scored == 2
    assert snap.rmse == pytest.approx(math.sqrt((1.0 + 0.25) / 2))
    assert snap.naive_rmse == pytest.approx(math.sqrt((4.0 + 1.0) / 2))
    assert snap.skill == pytest.approx(1 - math.sqrt(1.25 / 5.0))
    # Latency of held-out readings only: rows 2 (4 ms) and 4 (3 ms; received first).
    assert snap.latency_n == 2
    assert snap.latency_ms[0] == pytest.approx(3.5, abs=1e-6)
    s0 = snap.streams[0]
    assert (s0.actual, s0.predicted) == (12.0, 12.5)
    assert s0.recent_actual == (13.0, 12.0)


def test_scoreboard_flags_a_reading_far_from_its_prediction() -> None:
    """Every prediction says 101 for a series at 100: error 1 each time. Once ANOMALY_MIN_N
    targets are scored, an error of 0.9 x ANOMALY_FACTOR is not flagged and one of 1.5 x (about
    11 x the mean error by then) is."""
    from forecaster.demo.scoreboard import ANOMALY_FACTOR, ANOMALY_MIN_N

    n = ANOMALY_MIN_N + 3
    values = [100.0] * (n + 1) + [101 + 0.9 * ANOMALY_FACTOR, 101 + 1.5 * ANOMALY_FACTOR]
    warm, live = _items(values, 1)
    board = Scoreboard(warm, live, {"sensors/s0/flow": "water"})
    for it in (*warm, *live):
        board.on_sent(it, 0.0)
        board.on_prediction("sensors/s0/flow", it.ts, 101.0, 0.0)
    (view,) = board.snapshot().streams
    assert view.route == "water"
    assert view.n == len(values) - 1
    assert [a.row for a in view.anomalies] == [len(values) - 1], view.anomalies
    assert view.anomalies[0].factor > ANOMALY_FACTOR


@pytest.mark.broker
def test_ctrl_c_stops_everything_cleanly() -> None:
    """Ctrl-C in the demo's terminal (SIGINT to its whole process group) reaches only the demo,
    which stops the replay, then the daemon (exit 0), then the broker, and prints its summary."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("FORECASTER_")}
    demo = Terminal(
        [sys.executable, "-m", "forecaster.demo", "--seconds", "0", "--plain", "--rate", "5"],
        env,
        ROOT,
    )
    try:
        assert wait_until(lambda: " live " in demo.output, 120), demo.output
        # Generous: on a loaded machine the feeder, the daemon (its own 8 s stop budget) and the
        # broker stop one after the other.
        assert demo.ctrl_c(timeout=180) == 0, demo.output
    finally:
        demo.kill()
    out = demo.output
    assert re.search(r"^\s+daemon exit\s+0$", out, re.M), out
    started = re.search(r"^demo: workdir (\S+); mosquitto pid (\d+) .* daemon pid (\d+)", out, re.M)
    assert started, out
    assert not Path(started.group(1)).exists()
    for pid in (int(started.group(2)), int(started.group(3))):
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)


def test_view_marks_the_injected_burst_and_shows_routes() -> None:
    """The rich view (rendered to text) and the plain line name what the scoreboard flagged."""
    from rich.console import Console

    from forecaster.demo.scoreboard import ANOMALY_FACTOR, ANOMALY_MIN_N
    from forecaster.demo.view import Frame, render, status_line

    values = [100.0] * (ANOMALY_MIN_N + 2) + [101 + 2 * ANOMALY_FACTOR]
    warm, live = _items(values, 1)
    board = Scoreboard(warm, live, {"sensors/s0/flow": "water"})
    for it in (*warm, *live):
        board.on_sent(it, 0.0)
        board.on_prediction("sensors/s0/flow", it.ts, 101.0, 0.0)
    frame = Frame(
        board.snapshot(),
        1.0,
        10.0,
        10.0,
        None,
        60.0,
        offline_skill={"s0": 0.135},
        injected={"s0": (len(values) - 1,)},
    )
    console = Console(width=160, record=True)
    console.print(render(frame))
    text = console.export_text()
    assert "water" in text and "(+0.135)" in text, text
    assert "⚠ anomaly s0 at" in text and "(the injected burst)" in text, text
    assert "anomalies 1" in status_line(frame)
