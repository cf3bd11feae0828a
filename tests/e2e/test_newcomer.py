"""A newcomer's first commands: each answers in one line and says what to do next."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import forecaster

ROOT = Path(__file__).resolve().parents[2]


def cli(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("FORECASTER_")}
    return subprocess.run(
        [sys.executable, "-m", "forecaster", *args],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=cwd,
        env=env,
        check=False,
    )


def test_version() -> None:
    res = cli("--version")
    assert res.returncode == 0
    assert res.stdout.strip() == f"forecaster {forecaster.__version__}"


def test_serve_without_a_config_says_to_pass_one(tmp_path: Path) -> None:
    res = cli("serve", cwd=tmp_path)
    assert res.returncode == 2
    assert res.stderr.strip().splitlines() == [
        "error: no routes configured: pass --config FILE (the README's quick start writes one; "
        "deploy/forecaster.toml is the installed layout's) or set FORECASTER_ROUTES"
    ]


def test_an_ambiguous_time_column_is_refused_with_the_fix(tmp_path: Path) -> None:
    data = tmp_path / "d.csv"
    data.write_text("day,v\n" + "".join(f"195803{d:02d},{d}\n" for d in range(1, 29)))
    res = cli("train", str(data), "--time-column", "day", "--epochs", "1", "-q")
    assert res.returncode == 2
    (line,) = res.stderr.strip().splitlines()
    assert "'19580301' is ambiguous" in line and "--time-format" in line, line
