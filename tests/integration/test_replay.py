"""``forecaster replay`` against a real daemon: progress, per-stream rate, the rejected-replay
warning and ``--timestamps now``."""

from __future__ import annotations

import re
import subprocess
import sys
from collections.abc import Callable

import pytest

from .conftest import ROOT, Broker, DaemonProcess

WATER = ROOT / "data" / "water-flow.csv"


def replay(port: int, *extra: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "forecaster",
            "replay",
            str(WATER),
            *("--time-column", "Time", "--port", str(port), "--streams", "2"),
            *("--from", "1000", "--until", "1050"),
            *extra,
        ],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
        check=False,
    )


def counts(res: subprocess.CompletedProcess[str]) -> tuple[int, int]:
    m = re.search(r"published (\d+) readings .*; (\d+) predictions came back", res.stdout)
    assert m, res.stdout + res.stderr
    return int(m.group(1)), int(m.group(2))


@pytest.mark.broker
def test_a_second_replay_is_rejected_and_said_so(
    broker: Broker, daemon_factory: Callable[..., DaemonProcess]
) -> None:
    # No recent-predictions cache: with one, a repeated (stream, ts) is taken for a broker's
    # redelivery and answered with its original prediction instead of being dropped.
    daemon = daemon_factory(route={"recent_predictions": 0}).start()

    first = replay(broker.port, "--rate", "100")
    assert first.returncode == 0, first.stderr
    assert counts(first) == (100, 100)
    # The rate is per stream: 2 streams at 100/s = 200/s in total, said before it starts.
    assert "100/s per stream = 200/s in total" in first.stderr, first.stderr
    assert "warning" not in first.stderr

    # Same timestamps again: the daemon's states have passed them; every reading is dropped.
    again = replay(broker.port)
    assert again.returncode == 0, again.stderr
    assert counts(again) == (100, 0)
    assert "warning: only 0 of 100 readings were answered" in again.stderr
    assert "--timestamps now" in again.stderr
    rejected = daemon.wait_metric("forecaster_readings_rejected_total", 100, reason="out_of_order")
    assert rejected >= 98  # the first reading of each stream may count as a duplicate instead

    # Publish times instead of the file's: accepted again.
    now = replay(broker.port, "--timestamps", "now")
    assert now.returncode == 0, now.stderr
    assert counts(now) == (100, 100)
    assert "warning" not in now.stderr


@pytest.mark.broker
def test_replay_without_a_daemon_warns(broker: Broker) -> None:
    res = replay(broker.port, "--timestamps", "now")
    assert res.returncode == 0, res.stderr
    assert counts(res) == (100, 0)
    assert "no daemon serves" in res.stderr, res.stderr


def test_replay_refuses_bad_options() -> None:
    res = replay(1, "--timestamps", "yesterday")
    assert res.returncode == 2
    assert res.stderr.strip().splitlines() == [
        "error: --timestamps must be file or now, not 'yesterday'"
    ]
