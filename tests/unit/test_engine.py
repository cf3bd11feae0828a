"""Engine: waves, drops, evictions, resets, the recent-predictions cache, journal and recovery.

The model is a fake with an obvious closed form, so expected predictions come from plain
arithmetic and never from the engine: its one state is the running sum of a stream's readings
since its (re)start, and it predicts that sum. A reading whose magnitude is above 1e20 sends the
state to infinity (a model blowing up). The recovery tests at the end use the real bundled LSTM,
because bit-exact replay through ONNX Runtime is the point there.
"""

from __future__ import annotations

import random
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import numpy as np
import pytest

from forecaster.evaluation.unroll import bundle_run
from forecaster.model import clip, spread
from forecaster.model.bundle import Bundle, Interval
from forecaster.serve.codec import Prediction, Reading
from forecaster.serve.columns import PredictionColumns, ReadingColumns
from forecaster.serve.engine import (
    PAD_FACTOR,
    PAD_SLACK,
    Engine,
    Outcome,
    length_groups,
    waves,
)
from forecaster.serve.journal import encode_wave, journal_prev_path
from forecaster.serve.snapshot import load_snapshot
from forecaster.serve.state import StateStore

ROOT = Path(__file__).resolve().parents[2]
MODEL = ROOT / "models" / "water-flow"
BLOW_UP = 1e30


@dataclass
class FakeManifest:
    warmup: int = 2
    task: str = "regress"
    horizon: int = 0
    threshold: float | None = None
    interval: Interval | None = None
    clip: float | None = None
    name: str = "fake"
    version: str = "1"


@dataclass
class FakeBundle:
    """One state tensor [1, B, 1]: the running sum; y = the new sum."""

    sha256: str = "f" * 64
    mode: str = "stateful"
    window: int = 0
    manifest: FakeManifest = field(default_factory=FakeManifest)
    calls: list[int] = field(default_factory=list)

    @property
    def state_shapes(self) -> list[tuple[int, int]]:
        return [(1, 1)]

    def step(self, x: np.ndarray, state: tuple[np.ndarray, ...]) -> tuple[np.ndarray, list]:
        self.calls.append(len(x))
        (h,) = state
        new = h + x.reshape(1, -1, 1)
        new[:, np.abs(x[:, 0]) > 1e20, :] = np.inf
        return new[0, :, 0].copy(), [new]


def engine(
    max_streams: int = 100, reset_after: float = 0.0, recent: int = 0, **bundle: Any
) -> Engine:
    fake = FakeBundle(**bundle)
    return Engine(
        cast(Bundle, fake), StateStore(fake.state_shapes, max_streams, reset_after), recent=recent
    )


def r(stream: str, ts: float, value: float = 1.0) -> Reading:
    return Reading(stream, value, ts, 0.0, stream)


def values(preds: list[Prediction | None]) -> list[float | None]:
    return [None if p is None else p.value for p in preds]


# ------------------------------------------------------------------ waves


def test_waves_group_one_reading_per_stream_in_arrival_order() -> None:
    assert waves(["a", "b", "a", "c", "a", "b"]) == [[0, 1, 3], [2, 5], [4]]
    assert waves([]) == []
    assert waves(["x"] * 3) == [[0], [1], [2]]


def test_interleaved_batch_is_stepped_in_order_per_stream() -> None:
    e = engine()
    rs = [r("a", 1, 1), r("b", 1, 10), r("a", 2, 2), r("a", 3, 4), r("b", 2, 20)]
    out = e.step(rs, now=0.0)
    # running sums per stream, in each stream's own order
    assert values(out.predictions) == [1, 10, 3, 7, 30]
    assert [p.warm for p in out.predictions if p] == [False, False, True, True, True]
    assert cast(FakeBundle, e.bundle).calls == [2, 2, 1]  # three waves: one ONNX call each
    assert [c[0] for c in out.calls] == [2, 2, 1]
    assert not out.drops and not out.resets
    # the states carry over to the next micro-batch
    assert values(e.step([r("b", 3, 5)], now=1.0).predictions) == [35]


# ------------------------------------------------------------------ drops


def test_duplicates_and_out_of_order_are_dropped_and_counted_without_cache() -> None:
    e = engine(recent=0)
    e.step([r("a", 10, 1)], now=0.0)
    out = e.step([r("a", 10, 5), r("a", 9, 5), r("b", 1, 1)], now=1.0)
    assert values(out.predictions) == [None, None, 1]
    assert out.drops == {"duplicate": 1, "out_of_order": 1}
    assert values(e.step([r("a", 11, 2)], now=2.0).predictions) == [3]  # state untouched


def test_duplicate_within_one_batch_without_cache() -> None:
    e = engine(recent=0)
    out = e.step([r("a", 1, 1), r("a", 1, 1), r("a", 2, 1)], now=0.0)
    assert values(out.predictions) == [1, None, 2]
    assert out.drops == {"duplicate": 1}


def test_eviction_inside_a_wave_drops_the_evicted_reading() -> None:
    e = engine(max_streams=2)
    out = e.step([r("a", 1), r("b", 1), r("c", 1)], now=0.0)
    # "c" evicted "a" (least recently used) in the same wave: a has no state left
    assert out.evicted == ["a"]
    assert out.drops == {"evicted": 1}
    assert values(out.predictions) == [None, 1, 1]
    assert "a" not in e.store and len(e.store) == 2


def test_non_finite_state_is_dropped_reset_and_counted() -> None:
    e = engine()
    e.step([r("a", 1, 3), r("b", 1, 1)], now=0.0)
    out = e.step([r("a", 2, BLOW_UP), r("b", 2, 1)], now=1.0)
    assert values(out.predictions) == [None, 2]
    assert out.drops == {"non_finite_state": 1}
    assert out.resets == {"non_finite": 1}
    # a starts over from zero; b is untouched
    assert values(e.step([r("a", 3, 4), r("b", 3, 1)], now=2.0).predictions) == [4, 3]


def test_gap_resets_state() -> None:
    e = engine(reset_after=60)
    e.step([r("a", 0, 5)], now=0.0)
    out = e.step([r("a", 61, 1)], now=1.0)
    assert out.resets == {"gap": 1}
    assert values(out.predictions) == [1]
    assert out.predictions[0] is not None and out.predictions[0].warm is False


# ------------------------------------------------------------------ recent predictions


def test_redelivered_reading_gets_its_original_prediction() -> None:
    e = engine(recent=100)
    first = e.step([r("a", 1, 1), r("a", 2, 2), r("b", 1, 7)], now=0.0)
    again = e.step([r("a", 1, 999), r("b", 1, 999), r("a", 3, 1)], now=1.0)
    assert again.predictions[:2] == [first.predictions[0], first.predictions[2]]
    assert again.repeated == 2
    assert not again.drops
    assert values(again.predictions)[2] == 4  # the state was not stepped by the redeliveries


def test_cache_is_bounded_and_older_redeliveries_are_dropped() -> None:
    e = engine(recent=2)
    e.step([r("a", 1), r("a", 2), r("a", 3)], now=0.0)
    assert len(e.recent) == 2
    out = e.step([r("a", 1), r("a", 3)], now=1.0)
    assert values(out.predictions) == [None, 3]
    assert out.drops == {"out_of_order": 1} and out.repeated == 1


# ------------------------------------------------------------------ journal and recovery (fake)


def durable(tmp_path: Path, **kw: Any) -> tuple[Engine, Any]:
    e = engine(recent=1000, **kw)
    rec = e.recover(tmp_path / "r.npz", tmp_path / "r.journal", now=0.0)
    return e, rec


def test_first_start_snapshots_and_opens_a_journal(tmp_path: Path) -> None:
    e, rec = durable(tmp_path)
    assert rec.snapshot == "missing" and rec.snapshot_written
    assert (tmp_path / "r.npz").exists() and (tmp_path / "r.journal").exists()
    assert e.seq == 0


def test_recovery_replays_after_the_snapshot(tmp_path: Path) -> None:
    e, _ = durable(tmp_path)
    e.step([r("a", 1, 1), r("b", 1, 2)], now=0.0)
    e.snapshot()
    e.step([r("a", 2, 3)], now=1.0)
    e.step([r("b", 2, 4), r("c", 1, 5)], now=2.0)
    assert e.seq == 3
    # crash: a new engine from the same files
    e2, rec = durable(tmp_path)
    assert (rec.snapshot, rec.replayed, rec.readings, rec.refused) == ("ok", 2, 3, [])
    assert e2.seq == 3
    assert values(e2.step([r("a", 3, 1), r("b", 3, 1), r("c", 2, 1)], now=3.0).predictions) == [
        5,
        7,
        6,
    ]


def test_expiry_is_journaled(tmp_path: Path) -> None:
    fake = FakeBundle()
    e = Engine(cast(Bundle, fake), StateStore(fake.state_shapes, 100, idle_ttl=10), recent=10)
    e.recover(tmp_path / "r.npz", tmp_path / "r.journal", now=0.0)
    e.step([r("a", 1, 1)], now=0.0)
    e.step([r("b", 1, 1)], now=20.0)
    assert e.expire(now=20.0) == ["a"]
    e2 = Engine(cast(Bundle, FakeBundle()), StateStore(fake.state_shapes, 100, idle_ttl=10))
    rec = e2.recover(tmp_path / "r.npz", tmp_path / "r.journal", now=0.0)
    assert rec.replayed == 3
    assert "a" not in e2.store and "b" in e2.store


def test_journal_bound_forces_a_snapshot(tmp_path: Path) -> None:
    e = engine(recent=10)
    e.recover(tmp_path / "r.npz", tmp_path / "r.journal", now=0.0, max_journal_bytes=600)
    snapshots = 0
    for k in range(60):
        out = e.step([r("a", k), r("b", k)], now=float(k))
        snapshots += out.snapshot == "ok"
        cur = (tmp_path / "r.journal").stat().st_size
        prev = journal_prev_path(tmp_path / "r.journal")
        total = cur + (prev.stat().st_size if prev.exists() else 0)
        assert total <= 2 * 600 + 200, k  # two segments plus one record at most
    assert snapshots >= 5
    assert load_snapshot(tmp_path / "r.npz", e.bundle.sha256, [(1, 1)]).journal_seq == e.seq or (
        e.journal is not None and e.journal.size > 0
    )


def test_failed_journal_append_is_reported_and_covered_by_a_snapshot(tmp_path: Path) -> None:
    e, _ = durable(tmp_path)
    e.step([r("a", 1, 1)], now=0.0)
    journal = e.journal
    assert journal is not None
    real = journal.append

    def full(kind: int, payload: bytes) -> int:
        raise OSError(28, "No space left on device")

    journal.append = full  # type: ignore[method-assign]
    out = e.step([r("a", 2, 2)], now=1.0)
    assert values(out.predictions) == [3]  # answered anyway
    assert out.journal_error is not None and "No space" in out.journal_error
    assert out.snapshot == "ok"  # the unjournaled step is in a snapshot
    journal.append = real  # type: ignore[method-assign]
    again = e.step([r("a", 3, 4)], now=2.0)
    assert again.journal_error is None  # the snapshot resumed the journal
    e2, rec = durable(tmp_path)
    assert (rec.snapshot, rec.replayed) == ("ok", 1)
    assert values(e2.step([r("a", 4, 1)], now=3.0).predictions) == [8]


def test_journal_stays_suspended_until_a_snapshot_covers_the_gap(tmp_path: Path) -> None:
    clock = [0.0]
    fake = FakeBundle()
    e = Engine(cast(Bundle, fake), StateStore(fake.state_shapes, 100), lambda: clock[0], recent=10)
    e.recover(tmp_path / "r.npz", tmp_path / "r.journal", now=0.0)
    journal = e.journal
    assert journal is not None

    def full(kind: int, payload: bytes) -> int:
        raise OSError(28, "No space left on device")

    journal.append = full  # type: ignore[method-assign]
    blocked = tmp_path / "r.npz.tmp"
    blocked.mkdir()  # the snapshot cannot be written either
    out = e.step([r("a", 1, 1)], now=0.0)
    assert out.journal_error and out.snapshot == "failed"
    clock[0] = 1.0
    out = e.step([r("a", 2, 2)], now=1.0)
    assert out.journal_error and out.snapshot is None  # retried at most every few seconds
    blocked.rmdir()
    clock[0] = 10.0
    out = e.step([r("a", 3, 4)], now=2.0)
    assert out.snapshot == "ok"
    e2, rec = durable(tmp_path)
    assert rec.replayed == 0
    assert values(e2.step([r("a", 4, 1)], now=3.0).predictions) == [8]


def test_model_change_snapshots_under_the_new_sha(tmp_path: Path) -> None:
    e, _ = durable(tmp_path)
    e.step([r("a", 1, 1)], now=0.0)
    e.bundle = cast(Bundle, FakeBundle(sha256="e" * 64))
    assert load_snapshot(tmp_path / "r.npz", "e" * 64, [(1, 1)]).ids == ["a"]
    e.step([r("a", 2, 1)], now=1.0)
    e2 = engine(recent=10, sha256="e" * 64)
    rec = e2.recover(tmp_path / "r.npz", tmp_path / "r.journal", now=0.0)
    assert (rec.snapshot, rec.replayed, rec.refused) == ("ok", 1, [])
    assert values(e2.step([r("a", 3, 1)], now=2.0).predictions) == [3]


def test_unwritable_state_dir_keeps_serving(tmp_path: Path) -> None:
    gone = tmp_path / "no-such-dir"  # every write there fails
    e = engine(recent=10)
    rec = e.recover(gone / "r.npz", gone / "r.journal", now=0.0)
    assert rec.snapshot == "missing" and not rec.snapshot_written
    assert e.journal is None  # no journal without a snapshot to chain from
    assert values(e.step([r("a", 1, 2)], now=0.0).predictions) == [2]


# ------------------------------------------------------------------ bit-exact replay (real LSTM)


@pytest.fixture(scope="module")
def lstm() -> Bundle:
    return Bundle.load(MODEL)


def lstm_engine(bundle: Bundle, recent: int = 10_000) -> Engine:
    return Engine(bundle, StateStore(bundle.state_shapes, 1000), recent=recent)


def states_of(e: Engine) -> dict[str, list[np.ndarray]]:
    out: dict[str, list[np.ndarray]] = {}
    for stream, slot in e.store.streams():
        out[stream] = [s[:, 0, :] for s in e.store.gather(np.array([slot]))]
    return out


def random_batches(rng: random.Random, n: int) -> list[list[Reading]]:
    ts = {f"s{i}": 1_600_000_000.0 for i in range(6)}
    batches = []
    for _ in range(n):
        batch = []
        for _ in range(rng.randint(1, 12)):
            s = rng.choice(sorted(ts))
            ts[s] += rng.choice([0.0, 1.0, 1.0, 1.0, 2.0])  # some duplicates
            batch.append(Reading(s, rng.gauss(100, 5), ts[s], 0.0, s))
        batches.append(batch)
    return batches


def test_crash_at_any_byte_of_the_journal_recovers_exact_states(
    tmp_path: Path, lstm: Bundle, seed: int
) -> None:
    """Run, snapshot midway, run on; then for random cut points of the journal (a kill in the
    middle of a write), recover and compare with the states after the last whole record."""
    rng = random.Random(seed)
    batches = random_batches(rng, 40)
    work = tmp_path / "run"
    work.mkdir()
    live = lstm_engine(lstm)
    live.recover(work / "r.npz", work / "r.journal", now=0.0)
    after: dict[int, dict[str, list[np.ndarray]]] = {}
    preds: dict[tuple[str, float], float] = {}
    snap_at = rng.randrange(5, 30)
    for k, batch in enumerate(batches):
        out = live.step(batch, now=float(k))
        for p in out.predictions:
            if p is not None:
                preds.setdefault((p.stream, p.ts), p.value)
        after[live.seq] = states_of(live)
        if k == snap_at:
            live.snapshot()
    live.close()
    blob = (work / "r.journal").read_bytes()
    for cut in [*sorted(rng.sample(range(len(blob) + 1), 8)), len(blob)]:
        trial = tmp_path / f"cut{cut}"
        shutil.copytree(work, trial)
        (trial / "r.journal").write_bytes(blob[:cut])
        e = lstm_engine(lstm)
        rec = e.recover(trial / "r.npz", trial / "r.journal", now=0.0)
        got = states_of(e)
        want = after[e.seq]
        assert sorted(got) == sorted(want), f"seed={seed} cut={cut}"
        for s in want:
            for a, b in zip(got[s], want[s], strict=True):
                np.testing.assert_array_equal(a, b, err_msg=f"seed={seed} cut={cut} {s}")
        assert rec.mismatches == 0, f"seed={seed} cut={cut}"
        assert [why for why, _ in rec.refused] in ([], ["torn"]), f"seed={seed} {rec.refused}"
        # every reading the recovered state holds, redelivered, gets its original prediction
        held = [b for batch in batches[: e.seq] for b in batch]
        again = e.step(held, now=99.0)
        assert again.repeated == len(held), f"seed={seed} cut={cut}"
        for rd, p in zip(held, again.predictions, strict=True):
            assert p is not None and p.value == preds[(rd.stream, rd.ts)], f"seed={seed} {rd}"


def journal_records(e: Engine) -> list[bytes]:
    """Every record payload ``e`` appends to its journal from now on, in order."""
    journal = e.journal
    assert journal is not None
    records: list[bytes] = []
    real = journal.append

    def keep(kind: int, payload: bytes) -> int:
        records.append(payload)
        return real(kind, payload)

    journal.append = keep  # type: ignore[method-assign]
    return records


def test_a_gateway_batch_journals_the_record_its_objects_would(
    tmp_path: Path, lstm: Bundle, seed: int
) -> None:
    """A batch whose every reading is its own stream's only one, or one stream's readings all
    stepped, hands the journal its columns (``Outcome.wave``); the record must be what the
    readings and predictions encode to, and a batch that is neither (a duplicate, two readings
    of a stream beside others) goes without columns."""
    rng = random.Random(seed)
    e = lstm_engine(lstm, recent=0)
    e.recover(tmp_path / "r.npz", tmp_path / "r.journal", now=0.0)
    records = journal_records(e)
    for k in range(6):
        batch = [
            Reading(f"s{i}", rng.gauss(100, 5), 1_600_000_000.0 + k, 0.0, f"s{i}")
            for i in rng.sample(range(50), 20)
        ]
        out = e.step(batch, now=float(k))
        assert out.wave is not None, f"seed={seed} batch {k}"
        assert records[-1] == encode_wave(batch, out.predictions), f"seed={seed} batch {k}"
    for k in range(3):  # one busy stream's micro-batch: its readings, in order, all stepped
        busy = [
            Reading("busy", rng.gauss(100, 5), 1_600_000_100.0 + 10 * k + t, 0.0, "busy")
            for t in range(rng.randint(2, 9))
        ]
        out = e.step(busy, now=6.5)
        assert out.wave is not None, f"seed={seed} busy batch {k}"
        assert records[-1] == encode_wave(busy, list(out.predictions)), f"seed={seed} busy {k}"
    again = [batch[0], batch[0], Reading("new", 1.0, 1_600_000_010.0, 0.0, "new")]
    out = e.step(again, now=7.0)
    assert out.wave is None and out.drops["duplicate"] == 2, f"seed={seed}"
    assert records[-1] == encode_wave(again, out.predictions), f"seed={seed}"
    e.close()


def test_gateway_batches_as_columns_step_and_journal_as_their_objects(
    tmp_path: Path, lstm: Bundle, seed: int
) -> None:
    """The real LSTM with its journal, fed each batch as objects and as columns: the same
    predictions (bounds included), records, states and cache, and a batch every reading of
    which was stepped in order is answered with columns."""
    rng = random.Random(seed)
    engines, records = [], []
    for name in ("objects", "columns"):
        e = lstm_engine(lstm)
        e.recover(tmp_path / f"{name}.npz", tmp_path / f"{name}.journal", now=0.0)
        records.append(journal_records(e))
        engines.append(e)
    objects, cols = engines
    batches = [
        [
            Reading(f"s{i}", rng.gauss(100, 5), 1_600_000_000.0 + k, 0.5, "gw", rng.choice(labels))
            for i in rng.sample(range(40), rng.randint(1, 30))
        ]
        for k, labels in enumerate([[None]] * 8 + [[None, 0.0, 1.0]] * 4)
    ]
    batches += random_batches(rng, 20)  # duplicates, several readings of a stream
    answered_as_columns = 0
    for k, batch in enumerate(batches):
        where = f"seed={seed} batch={k}"
        a = objects.step(batch, now=float(k))
        b = cols.step(columns_of(batch), now=float(k))
        assert_same_outcome(objects, a, cols, b, where)
        answered_as_columns += isinstance(b.predictions, PredictionColumns)
        assert all(p is None or p.lower is not None for p in b.predictions), where
    for e in engines:
        e.close()
    assert records[0] == records[1] and len(records[0]) == len(batches), f"seed={seed}"
    assert answered_as_columns >= 12, f"seed={seed}: {answered_as_columns}"


def test_window_classifier_recovers_exactly_with_its_event_fields(tmp_path: Path) -> None:
    """A window model's buffers and a classifier's probability/event survive a crash too."""
    bundle = Bundle.load(ROOT / "models" / "yahoo-anomaly")
    rng = random.Random(5)
    rs = [Reading(f"w{i % 3}", rng.gauss(0, 1), 1000.0 + i, 0.0, "t") for i in range(60)]

    def fresh() -> Engine:
        return Engine(bundle, StateStore(bundle.state_shapes, 100), recent=1000)

    live = fresh()
    live.recover(tmp_path / "w.npz", tmp_path / "w.journal", now=0.0)
    first = [p for k in range(0, 40, 8) for p in live.step(rs[k : k + 8], now=float(k)).predictions]
    live.snapshot()
    first += [
        p for k in range(40, 60, 5) for p in live.step(rs[k : k + 5], now=float(k)).predictions
    ]
    assert sum(p is None for p in first) == 3 * 9  # each stream's first W-1 readings
    back = fresh()
    rec = back.recover(tmp_path / "w.npz", tmp_path / "w.journal", now=0.0)
    assert (rec.replayed, rec.mismatches, rec.refused) == (4, 0, [])
    again = back.step(rs, now=99.0)
    # every reading that had a prediction gets it back, probability and event included
    for p, q in zip(first, again.predictions, strict=True):
        if p is not None:
            assert q == p
    nxt = [Reading(f"w{i}", 0.5, 2000.0, 0.0, "t") for i in range(3)]
    assert values(back.step(nxt, 100.0).predictions) == values(live.step(nxt, 100.0).predictions)


# ------------------------------------------------------------------ prediction intervals

INTERVAL = Interval(coverage=0.9, lower=-2.0, upper=1.0, n=100)


def test_every_prediction_carries_its_bounds_and_readings_are_checked_against_them() -> None:
    e = engine(manifest=FakeManifest(interval=INTERVAL))
    # running sums 1, 3, 6, 13, 10; a stream is warm after 2 readings, so readings 3-5 are
    # checked against the previous prediction's [p - 2, p + 1]:
    #   3 in [1, 4] inside; 7 in [4, 7] inside (bounds are inclusive); -3 vs [11, 14] outside.
    vals = [1.0, 2.0, 3.0, 7.0, -3.0]
    out = e.step([r("a", float(i + 1), v) for i, v in enumerate(vals)], now=0.0)
    preds = [p for p in out.predictions if p is not None]
    assert [p.value for p in preds] == [1, 3, 6, 13, 10]
    assert [(p.lower, p.upper) for p in preds] == [(-1, 2), (1, 4), (4, 7), (11, 14), (8, 11)]
    assert (out.interval_inside, out.interval_outside) == (2, 1)
    assert out.interval_coverage == 0.9
    # A stream interleaved in the same batch is checked on its own predictions.
    out = e.step([r("b", 1, 5), r("a", 6, 9), r("b", 2, 5)], now=1.0)
    # a: previous prediction 10 -> [8, 11]; 9 inside. b is not warm yet: not checked.
    assert (out.interval_inside, out.interval_outside) == (1, 0)


SCALED = Interval(coverage=0.9, lower=-2.0, upper=1.0, n=100, spread_weight=0.5, spread_start=2.0)


def test_scaled_bounds_follow_each_streams_spread_and_are_checked_at_it() -> None:
    """Spread s = 0.5 s + 0.5 |change|, from 2.0; bounds [p - 2u, p + u] with u = max(s, 0.2)."""
    e = engine(manifest=FakeManifest(interval=SCALED))
    vals = [1.0, 2.0, 3.0, 7.0, -3.0]
    out = e.step([r("a", float(i + 1), v) for i, v in enumerate(vals)], now=0.0)
    preds = [p for p in out.predictions if p is not None]
    # spreads after each reading: 2 (no previous), 1.5, 1.25, 2.625, 6.3125
    spreads = [2.0, 1.5, 1.25, 2.625, 6.3125]
    sums = [1.0, 3.0, 6.0, 13.0, 10.0]
    assert [p.value for p in preds] == sums
    assert [(p.lower, p.upper) for p in preds] == [
        (v - 2 * u, v + u) for v, u in zip(sums, spreads, strict=True)
    ]
    # Warm after 2, so readings 3-5 meet the previous prediction's bounds, at its spread:
    # 3 vs [3 - 3, 3 + 1.5] inside; 7 vs [6 - 2.5, 6 + 1.25] inside; -3 vs [13 - 5.25, ...] not.
    assert (out.interval_inside, out.interval_outside) == (2, 1)
    assert e.store.spread[e.store.slot_of("a")] == 6.3125
    # A gap reset starts the spread over.
    e.store.reset(e.store.slot_of("a"))
    out = e.step([r("a", 9.0, 100.0)], now=1.0)
    (p,) = out.predictions
    assert p is not None and (p.lower, p.upper) == (100.0 - 4.0, 100.0 + 2.0)


@pytest.mark.parametrize("limit", [None, 0.5])
def test_scaled_bounds_survive_a_crash_exactly(tmp_path: Path, limit: float | None) -> None:
    """Spreads (and which readings were clipped) in the snapshot, the journal stepped again
    after it, and the recent cache's bounds as published: a redelivery after the crash gets its
    original bounds, and the next readings get the predictions and bounds an uninterrupted
    engine gives."""
    scaled = FakeManifest(interval=SCALED, clip=limit)
    for name in ("live", "crashed"):
        (tmp_path / name).mkdir()
    live, _ = durable(tmp_path / "live", manifest=scaled)
    crashed, _ = durable(tmp_path / "crashed", manifest=scaled)
    batches = [
        [r("a", 1, 1), r("b", 1, 2)],
        [r("a", 2, 5), r("b", 2, -4), r("a", 3, 2)],
        [r("c", 1, 3), r("b", 3, 9)],
        [r("a", 4, 0), r("c", 2, 30)],
    ]
    published: dict[tuple[str, float], Prediction] = {}
    for k, batch in enumerate(batches):
        live.step(batch, now=float(k))
        for p in crashed.step(batch, now=float(k)).predictions:
            assert p is not None
            published[(p.stream, p.ts)] = p
        if k == 1:
            crashed.snapshot()  # batches 2 and 3 are only in the journal
    back, rec = durable(tmp_path / "crashed", manifest=scaled)
    assert (rec.snapshot, rec.replayed, rec.mismatches) == ("ok", 2, 0)
    # Redeliveries of readings before and after the snapshot: the bounds they were sent with.
    for stream, ts in (("b", 2.0), ("a", 3.0), ("c", 2.0), ("a", 4.0)):
        (p,) = back.step([r(stream, ts, 0.0)], now=9.0).predictions
        assert p == published[(stream, ts)], (stream, ts)
    nxt = [r("a", 5, 7), r("b", 4, 1), r("c", 3, -2)]
    assert back.step(nxt, 10.0).predictions == live.step(nxt, 10.0).predictions
    flags = [[e.store.clipped[e.store.slot_of(s)] for s in ("a", "b", "c")] for e in (back, live)]
    np.testing.assert_array_equal(*flags)
    assert (np.nansum(flags[1]) > 0) == (limit is not None)


def test_without_an_interval_nothing_is_added_or_counted() -> None:
    out = engine().step([r("a", float(i + 1), 1.0) for i in range(5)], now=0.0)
    assert all(p is not None and p.lower is None and p.upper is None for p in out.predictions)
    assert (out.interval_inside, out.interval_outside, out.interval_coverage) == (0, 0, None)


# ------------------------------------------------------------------ sequence graph (format 3)


@dataclass
class FakeSeqBundle(FakeBundle):
    """The fake model as a sequence graph: ``run`` sums each row's readings up to its length;
    ``step`` (the waves' fallback) is the same model one reading at a time."""

    sequence: bool = True
    runs: list[tuple[int, int]] = field(default_factory=list)  # (rows, width) of each call

    def run(
        self, x: np.ndarray, lengths: np.ndarray, state: tuple[np.ndarray, ...]
    ) -> tuple[np.ndarray, list]:
        self.runs.append((x.shape[0], x.shape[1]))
        (h,) = state
        # The same arithmetic as ``step`` between waves: the float32 state plus the reading in
        # float64 (a clipped reading is not a float32 number), the state kept in float32.
        acc = h[0, :, 0].astype(np.float32)
        y = np.empty(x.shape[:2], dtype=np.float64)
        out = acc.copy()
        for t in range(x.shape[1]):
            total = acc.astype(np.float64) + x[:, t, 0]
            total[np.abs(x[:, t, 0]) > 1e20] = np.inf
            y[:, t] = total
            acc = total.astype(np.float32)
            out = np.where(lengths - 1 == t, acc, out)
        return y, [out.reshape(1, -1, 1)]


def seq_engine(
    max_streams: int = 100, reset_after: float = 0.0, recent: int = 0, **bundle: Any
) -> Engine:
    fake = FakeSeqBundle(**bundle)
    return Engine(
        cast(Bundle, fake), StateStore(fake.state_shapes, max_streams, reset_after), recent=recent
    )


def test_length_groups_one_call_unless_padding_dominates() -> None:
    assert [g.tolist() for g in length_groups(np.array([3, 1, 2]))] == [[0, 1, 2]]
    assert length_groups(np.array([], dtype=np.int64)) == []
    lens = np.array([1] * 500 + [100] + [1] * 499)
    groups = length_groups(lens)
    assert len(groups) == 2 and 500 in groups[0].tolist()
    assert sorted(np.concatenate(groups).tolist()) == list(range(1000))
    for g in groups:  # every group within the padding bound
        assert len(g) * lens[g].max() <= PAD_FACTOR * lens[g].sum() + PAD_SLACK


def test_one_call_per_micro_batch_whatever_the_mix() -> None:
    e = seq_engine()
    rs = [r("a", 1, 1), r("b", 1, 10), r("a", 2, 2), r("a", 3, 4), r("b", 2, 20)]
    out = e.step(rs, now=0.0)
    assert values(out.predictions) == [1, 10, 3, 7, 30]
    assert [p.warm for p in out.predictions if p] == [False, False, True, True, True]
    fake = cast(FakeSeqBundle, e.bundle)
    assert fake.runs == [(2, 3)] and fake.calls == []  # rows a, b padded to 3: one call
    assert out.calls[0][0] == 5
    busy = e.step([r("c", t, 1) for t in range(1, 101)], now=1.0)
    assert values(busy.predictions) == list(range(1, 101))
    assert fake.runs[-1] == (1, 100) and fake.calls == []


def test_gap_reset_mid_batch_splits_the_stream_into_rows_of_one_call() -> None:
    e = seq_engine(reset_after=60, manifest=FakeManifest(warmup=1))
    out = e.step([r("a", 0, 5), r("a", 1, 1), r("a", 100, 2), r("a", 101, 3)], now=0.0)
    assert values(out.predictions) == [5, 6, 2, 5]
    assert out.resets == {"gap": 1}
    assert [p.warm for p in out.predictions if p] == [True, True, True, True]
    assert cast(FakeSeqBundle, e.bundle).runs == [(2, 2)]
    # 1 against 5, 3 against 2; 2 is not judged against 6 across the reset
    assert out.abs_err[0].tolist() == [4.0, 1.0]
    assert values(e.step([r("a", 102, 1)], now=1.0).predictions) == [6]


def test_non_finite_batch_falls_back_to_waves() -> None:
    e = seq_engine()
    e.step([r("a", 1, 3), r("b", 1, 1)], now=0.0)
    out = e.step([r("a", 2, BLOW_UP), r("a", 3, 1), r("b", 2, 1)], now=1.0)
    assert values(out.predictions) == [None, 1, 2]
    assert out.drops == {"non_finite_state": 1} and out.resets == {"non_finite": 1}
    assert cast(FakeSeqBundle, e.bundle).calls == [2, 1]  # the waves, after the tried call


def random_mix(rng: random.Random, batches: int) -> list[list[Reading]]:
    """Batches with every rule: duplicates, out-of-order, gaps, blow-ups, redeliveries."""
    ts = {f"s{i}": 0.0 for i in range(12)}
    out: list[list[Reading]] = []
    for _ in range(batches):
        batch: list[Reading] = []
        names = sorted(ts)[: rng.randint(1, 12)]
        # A third of the batches are gateway-like: each stream at most once.
        singles = rng.random() < 0.35
        picks = (
            rng.sample(names, rng.randint(1, len(names)))
            if singles
            else [rng.choice(names) for _ in range(rng.randint(1, 30))]
        )
        for s in picks:
            ts[s] += rng.choice([0.0, 1.0, 1.0, 1.0, 2.0, 50.0, -1.0])
            v = BLOW_UP if rng.random() < 0.01 else float(rng.randint(-3, 9))
            label = rng.choice([None, 0.0, 1.0])
            batch.append(Reading(s, v, ts[s], 0.0, s, label))
        if out and rng.random() < 0.2:  # a redelivery of some of the previous batch
            batch = rng.sample(out[-1], min(4, len(out[-1]))) + batch
        if rng.random() < 0.1:
            batch += rng.sample(batch, min(3, len(batch)))
        out.append(batch)
    return out


@pytest.mark.parametrize("max_streams", [100, 5])
@pytest.mark.parametrize("recent", [0, 50, 5000])
@pytest.mark.parametrize("task", ["interval", "scaled", "clipped", "classify-0", "classify-1"])
def test_sequence_path_gives_exactly_the_waves_outcome(
    seed: int, max_streams: int, recent: int, task: str
) -> None:
    """Same readings through the wave path (format 2 fake) and the sequence path: every
    prediction, drop, reset, eviction, error, event count, cache entry and the LRU order must
    agree."""
    rng = random.Random(seed)
    if task == "interval":
        manifest = FakeManifest(interval=Interval(coverage=0.9, lower=-1.0, upper=2.0, n=10))
    elif task == "scaled":
        manifest = FakeManifest(interval=SCALED)
    elif task == "clipped":  # readings far from the running sum enter it clipped
        manifest = FakeManifest(interval=SCALED, clip=2.0)
    else:  # the fake's running sums as "probabilities": the threshold splits them
        manifest = FakeManifest(task="classify", horizon=int(task[-1]), threshold=4.0)
    waves_e = engine(max_streams, reset_after=20, recent=recent, manifest=manifest)
    seq_e = seq_engine(max_streams, reset_after=20, recent=recent, manifest=manifest)
    # The same again, every batch handed over as columns (a gateway batch from the fast codec).
    cols_e = seq_engine(max_streams, reset_after=20, recent=recent, manifest=manifest)
    clipped_total = columns_out = 0
    for k, batch in enumerate(random_mix(rng, 150)):
        a, b = waves_e.step(batch, now=float(k)), seq_e.step(batch, now=float(k))
        c = cols_e.step(columns_of(batch), now=float(k))
        where = f"seed={seed} batch={k}"
        assert_same_outcome(waves_e, a, seq_e, b, where)
        assert_same_outcome(seq_e, b, cols_e, c, f"{where} (columns)")
        clipped_total += b.clipped
        columns_out += isinstance(c.predictions, PredictionColumns)
    fake = cast(FakeSeqBundle, seq_e.bundle)
    # 5 streams: many batches evict their own; a full cache of 50: redeliveries go to waves
    least = 100 if max_streams == 100 and recent != 50 else 20
    assert len(fake.runs) >= least, f"seed={seed}: the sequence path was hardly used"
    assert (clipped_total > 0) == (task == "clipped"), f"seed={seed}: {clipped_total} clipped"
    assert columns_out, f"seed={seed}: no batch was answered as columns"


def columns_of(batch: list[Reading]) -> ReadingColumns:
    labels = [r.label for r in batch]
    return ReadingColumns(
        [r.stream for r in batch],
        [r.value for r in batch],
        [r.ts for r in batch],
        [r.received for r in batch],
        [r.topic for r in batch],
        None if labels.count(None) == len(labels) else labels,
    )


def assert_same_outcome(ea: Engine, a: Outcome, eb: Engine, b: Outcome, where: str) -> None:
    """Every prediction, drop, reset, eviction, error, event count, cache entry, stored
    column, state and the LRU order agree."""
    assert a.predictions == b.predictions, where
    assert (a.drops, a.resets, a.evicted, a.repeated, a.clipped) == (
        b.drops,
        b.resets,
        b.evicted,
        b.repeated,
        b.clipped,
    ), where
    for got, want in ((b.abs_err, a.abs_err), (b.naive_abs_err, a.naive_abs_err)):
        g = np.sort(np.concatenate(got)) if got else np.array([])
        w = np.sort(np.concatenate(want)) if want else np.array([])
        np.testing.assert_array_equal(g, w, err_msg=where)
    assert (a.interval_inside, a.interval_outside) == (b.interval_inside, b.interval_outside)
    assert a.events == b.events, where
    # The LRU order (slot numbers may differ: new streams can be acquired in another order)
    order = [s for s, _ in ea.store.streams()]
    assert order == [s for s, _ in eb.store.streams()], where
    slots_a = np.array([ea.store.slot_of(s) for s in order], dtype=np.intp)
    slots_b = np.array([eb.store.slot_of(s) for s in order], dtype=np.intp)
    for name in ("last_ts", "last_value", "last_pred", "seen", "last_used", "spread", "clipped"):
        np.testing.assert_array_equal(
            getattr(ea.store, name)[slots_a],
            getattr(eb.store, name)[slots_b],
            err_msg=f"{where} {name}",
        )
    assert states_of(ea).keys() == states_of(eb).keys(), where
    for s, st in states_of(ea).items():
        np.testing.assert_array_equal(st[0], states_of(eb)[s][0], err_msg=where)
    wa, wb = ea.recent.to_arrays(), eb.recent.to_arrays()
    assert wa[0] == wb[0], where
    for column in ("recent_value", "recent_lower", "recent_upper"):
        np.testing.assert_array_equal(wa[1][column], wb[1][column], err_msg=where)


def test_real_sequence_bundle_matches_its_one_step_stepping(lstm: Bundle, seed: int) -> None:
    """The shipped format-3 LSTM through the sequence path and through waves (``T = 1``
    calls of the same graph): the same predictions and states, to float rounding."""
    assert lstm.sequence
    rng = random.Random(seed)
    batches = random_batches(rng, 60)

    class Waves:
        def __getattr__(self, name: str) -> Any:
            return False if name == "sequence" else getattr(lstm, name)

    one = Engine(cast(Bundle, Waves()), StateStore(lstm.state_shapes, 1000), recent=10_000)
    seq = lstm_engine(lstm, recent=10_000)
    for k, batch in enumerate(batches):
        a, b = one.step(batch, now=float(k)), seq.step(batch, now=float(k))
        assert len(b.calls) <= 2, f"seed={seed} batch={k}"
        for p, q in zip(a.predictions, b.predictions, strict=True):
            assert (p is None) == (q is None), f"seed={seed} batch={k}"
            if p is not None and q is not None:
                assert p.warm == q.warm and abs(p.value - q.value) <= 1e-5, f"seed={seed} {k}"


@pytest.mark.parametrize("names", ["abc", "c"])
def test_real_bundle_clips_exactly_as_evaluate_does(lstm: Bundle, seed: int, names: str) -> None:
    """The shipped LSTM with a clip limit: three streams (or one) with spikes and a level
    shift, in random micro-batches, predicted as ``evaluate`` predicts each stream alone
    (``clip.segment`` over the graph), within 1e-5, in a few calls per clip, not one per
    reading."""
    rng = random.Random(seed)
    start = 0.5
    manifest = lstm.manifest.model_copy(
        update={
            "interval": Interval(
                coverage=0.9,
                lower=-3.0,
                upper=3.0,
                n=100,
                spread_weight=spread.WEIGHT,
                spread_start=start,
            ),
            "clip": 3.0,
        }
    )

    class Clipping:
        def __getattr__(self, name: str) -> Any:
            return manifest if name == "manifest" else getattr(lstm, name)

    series: dict[str, list[float]] = {}
    for s in names:
        level, values = rng.uniform(90, 110), []
        for t in range(300):
            level += rng.gauss(0, 0.3)
            if t == 150 and s == "c":
                level += 25.0  # a shift: one clipped reading, then followed
            spike = rng.choice([-40.0, 40.0]) if rng.random() < 0.03 else 0.0
            values.append(level + spike)
        series[s] = values
    queue = [(s, t) for t in range(300) for s in series]
    e = Engine(cast(Bundle, Clipping()), StateStore(lstm.state_shapes, 1000), recent=0)
    got: dict[str, list[float]] = {s: [] for s in series}
    clipped = sequence_batches = calls = batches = 0
    pos = 0
    while pos < len(queue):
        size = rng.randint(1, 40)
        batch = [Reading(s, series[s][t], 1e9 + t, 0.0, s) for s, t in queue[pos : pos + size]]
        pos += size
        out = e.step(batch, now=float(pos))
        clipped += out.clipped
        sequence_batches += len(out.calls) == 1 and len(batch) > 3
        calls += len(out.calls)
        batches += 1
        for p in out.predictions:
            assert p is not None, f"seed={seed}"
            got[p.stream].append(p.value)
    run = bundle_run(lstm)
    for s, values in series.items():
        zero = list(lstm.zero_state(1))
        want = clip.segment(np.array(values), run, zero, start, spread.WEIGHT, 3.0)
        np.testing.assert_allclose(got[s], want, rtol=0, atol=1e-5, err_msg=f"seed={seed} {s}")
    assert clipped >= 5, f"seed={seed}: {clipped} clipped"
    assert sequence_batches >= 3 or len(names) == 1, f"seed={seed}: {sequence_batches}"
    assert calls <= batches + 2 * clipped, f"seed={seed}: {calls} calls, {batches} batches"
    assert calls < len(queue) / 3, f"seed={seed}: {calls} calls for {len(queue)} readings"


def test_one_busy_stream_with_spikes_stays_on_the_sequence_path() -> None:
    """A one-stream batch with readings to clip after its first: each is clipped in the same
    micro-batch (the readings before it run again to reach the state there, then the rest from
    it), two calls per clip, never one call per reading; the outcome is the waves' own."""
    manifest = FakeManifest(interval=SCALED, clip=2.0)
    seq_e = seq_engine(manifest=manifest)
    waves_e = engine(manifest=manifest)
    first = [r("a", 1, 0.0), r("a", 2, 0.0)]
    zeros = [0.0] * 20
    busy = [*zeros, 50.0, *zeros, -50.0, *zeros]
    batch = [r("a", 3 + t, v) for t, v in enumerate(busy)]
    for e in (seq_e, waves_e):
        e.step(first, now=0.0)
    a, b = waves_e.step(batch, now=1.0), seq_e.step(batch, now=1.0)
    assert a.predictions == b.predictions and a.clipped == b.clipped >= 2
    spike = b.predictions[20]
    assert spike is not None and spike.value < 10  # clipped: the sum did not take the 50
    fake = cast(FakeSeqBundle, seq_e.bundle)
    assert fake.calls == []  # no wave
    # Per clip two calls (the readings before it, and what follows), not one per reading.
    assert len(b.calls) <= 2 * b.clipped + 1 < len(batch), (len(b.calls), b.clipped)


def test_one_stream_clipped_in_the_call_gives_exactly_the_waves_outcome(seed: int) -> None:
    """Batches of one stream (spikes, a shift, duplicates, out-of-order readings, gaps, cache
    hits) through the sequence path's clipping rounds and through waves: every prediction,
    count and stored field agrees, and no batch needs the waves."""
    rng = random.Random(seed)
    manifest = FakeManifest(interval=SCALED, clip=2.0)
    waves_e = engine(reset_after=20, recent=1000, manifest=manifest)
    seq_e = seq_engine(reset_after=20, recent=1000, manifest=manifest)
    ts, level, sent = 0.0, 0.0, []
    for k in range(60):
        batch = []
        for _ in range(rng.randint(1, 40)):
            ts += rng.choice([1.0, 1.0, 1.0, 1.0, 0.0, -1.0, 30.0])
            level = -level if rng.random() < 0.02 else level  # a shift (of the sum's input)
            v = level + rng.gauss(0, 1) + (rng.choice([-25, 25]) if rng.random() < 0.08 else 0)
            batch.append(Reading("s", v, ts, 0.0, "s"))
        if sent and rng.random() < 0.2:
            batch = rng.sample(sent, min(3, len(sent))) + batch  # redeliveries
        sent = batch
        a, b = waves_e.step(batch, now=float(k)), seq_e.step(batch, now=float(k))
        where = f"seed={seed} batch={k}"
        assert a.predictions == b.predictions, where
        assert (a.drops, a.resets, a.repeated, a.clipped) == (
            b.drops,
            b.resets,
            b.repeated,
            b.clipped,
        ), where
        assert (a.interval_inside, a.interval_outside) == (b.interval_inside, b.interval_outside)
        for name in ("last_ts", "last_value", "last_pred", "seen", "spread", "clipped"):
            got = getattr(seq_e.store, name)[seq_e.store.slot_of("s")]
            want = getattr(waves_e.store, name)[waves_e.store.slot_of("s")]
            np.testing.assert_array_equal(got, want, err_msg=f"{where} {name}")
    assert cast(FakeSeqBundle, seq_e.bundle).calls == [], f"seed={seed}: a batch went to waves"
