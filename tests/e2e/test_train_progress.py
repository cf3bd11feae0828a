"""``forecaster train`` through a pipe (issue 15 item 6): without a terminal the rich bar is off,
so every epoch (and every search trial's epoch) is one plain line on stderr as it happens;
``-q`` keeps it silent."""

from __future__ import annotations

import re
import subprocess
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
WATER = ROOT / "data" / "water-flow.csv"
Cli = Callable[..., subprocess.CompletedProcess[str]]
TINY = ("--time-column", "Time", "--until", "1014", "--no-linear", "--bptt", "32")
EPOCH = re.compile(
    r"^(trial \d+: )?epoch (\d+)/(\d+)  (untrained|train \d+\.\d{4})  val \d+\.\d{4}  "
    r"persistence \d+\.\d{4}  best epoch \d+ by robust loss \(val \d+\.\d{4}\)  \d+\.\d s$"
)


def epoch_lines(stderr: str) -> list[re.Match[str]]:
    return [m for line in stderr.splitlines() if (m := EPOCH.match(line))]


def test_piped_train_prints_one_line_per_epoch(cli: Cli, tmp_path: Path) -> None:
    proc = cli("train", WATER, *TINY, "--hidden", "8", "--epochs", "2", "--out", tmp_path / "r")
    assert proc.returncode == 0, proc.stderr
    lines = epoch_lines(proc.stderr)
    # epoch 0 is the untrained model (the delta head starts at persistence), then epochs 1 and 2
    assert [(m[1], m[2], m[3]) for m in lines] == [
        (None, "0", "2"),
        (None, "1", "2"),
        (None, "2", "2"),
    ]
    assert lines[0][4] == "untrained" and lines[1][4].startswith("train ")
    assert "\x1b[" not in proc.stderr  # no terminal control codes in a pipe


def test_piped_search_prints_every_trials_epochs(cli: Cli, tmp_path: Path) -> None:
    out = tmp_path / "r"
    proc = cli(
        "train", WATER, *TINY, "--trials", "2", "--epochs", "1", "--budget", "600", "--out", out
    )
    assert proc.returncode == 0, proc.stderr
    lines = epoch_lines(proc.stderr)
    assert [(m[1], m[2]) for m in lines] == [
        ("trial 0: ", "0"),
        ("trial 0: ", "1"),
        ("trial 1: ", "0"),
        ("trial 1: ", "1"),
    ]
    # each trial's summary still follows its epochs
    assert (
        sum(line.startswith("trial ") and "val RMSE" in line for line in proc.stderr.splitlines())
        == 2
    )


def test_quiet_train_prints_no_epoch_line(cli: Cli, tmp_path: Path) -> None:
    proc = cli(
        "train", WATER, *TINY, "--hidden", "8", "--epochs", "1", "-q", "--out", tmp_path / "r"
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == ""
    assert epoch_lines(proc.stdout) == [] and len(proc.stdout.splitlines()) == 1
