"""Shared fixtures: paths, a CLI run through a real subprocess, a tiny trained bundle, the
reference predictions for the water-flow series, and a random seed that is reported on failure.
"""

from __future__ import annotations

import csv
import os
import random
import subprocess
import sys
from collections.abc import Callable, Generator
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "data"
WATER = DATA / "water-flow.csv"
MODEL = ROOT / "models" / "water-flow"

#: Set to replay a randomized test with the seed its failure report printed.
SEED_ENV = "TEST_SEED"
_SEED_KEY = pytest.StashKey[int]()


@pytest.fixture
def seed(request: pytest.FixtureRequest) -> int:
    """This test's random seed: ``$TEST_SEED`` if set, else a fresh one. A failing test that
    used it gets a "random seed" section in its report with the command to replay it."""
    value = int(os.environ.get(SEED_ENV) or random.SystemRandom().randrange(1 << 31))
    request.node.stash[_SEED_KEY] = value
    return value


@pytest.fixture
def rng(seed: int) -> random.Random:
    """A ``random.Random`` seeded with :func:`seed` (so its draws are replayable)."""
    return random.Random(seed)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    report = yield
    seed = item.stash.get(_SEED_KEY, None)
    if seed is not None and report.failed:
        report.sections.append(
            ("random seed", f"seed {seed}: replay with {SEED_ENV}={seed} pytest '{item.nodeid}'")
        )
    return report


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


@pytest.fixture(scope="session")
def reference(tmp_path_factory: pytest.TempPathFactory) -> dict[float, float]:
    """The prediction the bundled model makes on each water-flow reading, keyed by its time.

    From ``forecaster evaluate --predictions`` (an independent path through the same model: it
    lists the prediction *for* row r, made on reading r-1). The prediction made on the last
    reading predicts a row that does not exist, so evaluate cannot list it; it comes from the
    same one-step ONNX unroll evaluate uses, checked against evaluate's on every other row. So
    every reading has a reference and a parity test can match every prediction it receives.
    """
    from forecaster.data import load_csv
    from forecaster.evaluation.unroll import bundle_predictor
    from forecaster.model.bundle import Bundle

    out = tmp_path_factory.mktemp("ref") / "p.csv"
    run_cli("evaluate", MODEL, WATER, "--predictions", out, check=True)
    series = load_csv(WATER, time_column="Time").series[0]
    assert series.times is not None
    with out.open() as fh:
        rows = list(csv.DictReader(fh))
    ref = {float(series.times[int(r["row"]) - 1]): float(r["predicted"]) for r in rows}
    unrolled = bundle_predictor(Bundle.load(MODEL))(series.values)
    listed = np.array([ref[float(t)] for t in series.times[:-1]])
    np.testing.assert_allclose(unrolled[:-1], listed, rtol=0, atol=1e-6)
    ref[float(series.times[-1])] = float(unrolled[-1])
    assert len(ref) == len(series)
    return ref
