"""Shared fixtures: paths, a CLI run through a real subprocess, a tiny trained bundle."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "data"
WATER = DATA / "water-flow.csv"


@pytest.fixture(scope="session")
def root() -> Path:
    return ROOT


def run_cli(
    *args: str | Path, check: bool = False, timeout: float = 300, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """Run ``python -m forecaster`` as a user would, capturing both streams."""
    proc = subprocess.run(
        [sys.executable, "-m", "forecaster", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=ROOT,
        env={**os.environ, **(env or {})},
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"forecaster {args} failed ({proc.returncode}):\n{proc.stderr}")
    return proc


@pytest.fixture(scope="session")
def cli() -> Callable[..., subprocess.CompletedProcess[str]]:
    return run_cli


@pytest.fixture(scope="session")
def tiny_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small LSTM trained on the water-flow series, exported: fast enough for every test run."""
    base = tmp_path_factory.mktemp("tiny")
    run_cli(
        "train",
        WATER,
        "--time-column",
        "Time",
        "--until",
        "1014",
        "--hidden",
        "16",
        "--epochs",
        "2",
        "--out",
        base / "run",
        "--name",
        "tiny",
        "-q",
        check=True,
    )
    run_cli("export", base / "run", "--out", base / "bundle", check=True)
    return base / "bundle"
