"""What exact recovery costs: ``Engine.step`` with the journal off, on, and fsynced; replay speed;
memory of the recent-predictions cache.

Run: ``.venv/bin/python -m benchmarks.journal`` (the bundled LSTM 2×64, 1,000 streams). Figures
are quoted in docs/reliability.md ("Cost of the journal").
"""

from __future__ import annotations

import random
import tempfile
import time
import tracemalloc
from pathlib import Path

from forecaster.model.bundle import Bundle
from forecaster.serve.codec import Prediction, Reading
from forecaster.serve.engine import Engine, RecentPredictions
from forecaster.serve.state import StateStore

MODEL = Path(__file__).resolve().parents[1] / "models" / "water-flow"


def batches(rng: random.Random, n: int, size: int, streams: int) -> list[list[Reading]]:
    out = []
    for k in range(n):
        out.append(
            [
                Reading(
                    f"sensors/pump-{(k * size + i) % streams}/flow",
                    rng.gauss(100, 5),
                    1.6e9 + k * size + i,
                    0.0,
                    "t",
                )
                for i in range(size)
            ]
        )
    return out


def main() -> None:
    bundle = Bundle.load(MODEL)
    bundle.warm_up()
    rng = random.Random(0)
    for size, count in ((1, 2000), (256, 200)):
        work = batches(rng, count, size, 1000)
        readings = sum(len(b) for b in work)
        for mode in ("off", "never", "always"):
            state_dir = Path(tempfile.mkdtemp(prefix="journal-bench-"))
            e = Engine(bundle, StateStore(bundle.state_shapes, 10_000), recent=65_536)
            if mode != "off":
                e.recover(
                    state_dir / "r.npz",
                    state_dir / "r.journal",
                    now=0.0,
                    fsync=mode == "always",
                    max_journal_bytes=1 << 40,
                )
            started = time.perf_counter()
            for k, batch in enumerate(work):
                e.step(batch, float(k))
            took = time.perf_counter() - started
            size_b = e.journal.size if e.journal else 0
            print(
                f"batch {size:3d}, journal {mode:6s}: {took / len(work) * 1e3:.3f} ms/batch, "
                f"{readings / took:,.0f} readings/s, journal {size_b:,} bytes"
            )
            if mode == "never":
                again = Engine(bundle, StateStore(bundle.state_shapes, 10_000), recent=65_536)
                started = time.perf_counter()
                rec = again.recover(state_dir / "r.npz", state_dir / "r.journal", now=0.0)
                took = time.perf_counter() - started
                print(
                    f"    replay: {rec.replayed} records, {rec.readings} readings in {took:.2f} s "
                    f"({rec.readings / took:,.0f} readings/s)"
                )
    tracemalloc.start()
    cache = RecentPredictions(65_536)
    before = tracemalloc.take_snapshot()
    for i in range(65_536):
        cache.put(Prediction(f"sensors/pump-{i % 1000}/flow", 1.6e9 + i, float(i), True))
    grown = sum(s.size_diff for s in tracemalloc.take_snapshot().compare_to(before, "filename"))
    print(f"recent cache: {grown / 65_536:.0f} bytes per entry ({grown / 2**20:.1f} MiB)")


if __name__ == "__main__":
    main()
