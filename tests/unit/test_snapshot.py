"""The snapshot file format (snapshot.py): version 2's journal position and recent predictions,
and version 1 files from before the journal still restoring.

Damage of the common part (truncation, pickles, NaN states, foreign models) is covered in
test_state.py and tests/faults/test_snapshots.py; here only what version 2 added.
"""

from __future__ import annotations

import json
import tracemalloc
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from forecaster.serve import snapshot
from forecaster.serve.snapshot import (
    SNAPSHOT_VERSION,
    Rows,
    SnapshotError,
    json_bytes,
    load_snapshot,
    write_snapshot,
)
from forecaster.serve.state import StateStore

SHA = "a" * 64
SHAPES = [(1, 3)]


def store_with(n: int) -> StateStore:
    store = StateStore(SHAPES, 100)
    for i in range(n):
        slot = np.array([store.acquire(f"s{i}", float(i))[0]])
        store.scatter(slot, [np.full((1, 1, 3), i, dtype=np.float32)])
        store.record(slot, np.array([10.0 + i]), np.array([1.0]), np.array([2.0]), float(i))
    return store


def recent(n: int) -> tuple[list[str], dict[str, np.ndarray]]:
    return [f"s{i}" for i in range(n)], {
        "recent_ts": np.arange(n, dtype=np.float64),
        "recent_value": np.arange(n, dtype=np.float64) / 2,
        "recent_flags": np.ones(n, dtype=np.uint8),
    }


def test_version_2_round_trip(tmp_path: Path) -> None:
    path = tmp_path / "r.npz"
    ids, arrays = recent(4)
    store_with(3).snapshot(path, SHA, journal_seq=17, recent_ids=ids, recent=arrays)
    data = load_snapshot(path, SHA, SHAPES)
    assert data.journal_seq == 17
    assert data.ids == ["s0", "s1", "s2"]
    assert data.recent_ids == ids
    for name, arr in arrays.items():
        np.testing.assert_array_equal(data.recent[name], arr)
    with np.load(path, allow_pickle=False) as npz:
        assert json.loads(npz["header"].tobytes())["version"] == SNAPSHOT_VERSION == 2


def test_version_1_file_still_restores(tmp_path: Path) -> None:
    """A snapshot written before journals existed: states restore, no journal position."""
    path = tmp_path / "r.npz"
    store_with(2).snapshot(path, SHA)
    with np.load(path, allow_pickle=False) as npz:
        raw = {k: npz[k] for k in npz.files}
    header = json.loads(raw["header"].tobytes())
    header["version"] = 1
    raw["header"] = json_bytes(header)
    with path.open("wb") as fh:
        np.savez(fh, **raw)
    data = load_snapshot(path, SHA, SHAPES)
    assert data.journal_seq is None and data.recent_ids == []
    assert len(StateStore.restore(path, SHA, SHAPES, 100)) == 2


def test_spreads_and_published_bounds_round_trip_and_older_files_read_as_none(
    tmp_path: Path,
) -> None:
    path = tmp_path / "r.npz"
    store = store_with(3)
    slots = np.array([store.slot_of(f"s{i}") for i in range(2)])
    store.record(slots, np.array([20.0, 21.0]), np.ones(2), np.ones(2), 5.0, np.array([0.5, 2.0]))
    ids, arrays = recent(4)
    arrays["recent_lower"] = np.array([-1.0, np.nan, 0.5, 2.0])
    arrays["recent_upper"] = np.array([1.0, np.nan, 3.5, 4.0])
    store.snapshot(path, SHA, journal_seq=1, recent_ids=ids, recent=arrays)
    data = load_snapshot(path, SHA, SHAPES)
    back = StateStore.from_data(data, SHAPES, 100)
    got = [back.spread[back.slot_of(f"s{i}")] for i in range(3)]
    np.testing.assert_array_equal(got, [0.5, 2.0, np.nan])
    for name in ("recent_lower", "recent_upper"):
        np.testing.assert_array_equal(data.recent[name], arrays[name])
    # A file from before spreads and bounds were kept: both read as "none".
    with np.load(path, allow_pickle=False) as npz:
        raw = {k: npz[k] for k in npz.files if k not in ("spread", "recent_lower", "recent_upper")}
    with path.open("wb") as fh:
        np.savez(fh, **raw)
    data = load_snapshot(path, SHA, SHAPES)
    assert np.isnan(data.arrays["spread"]).all() and len(data.arrays["spread"]) == 3
    assert np.isnan(data.recent["recent_lower"]).all() and len(data.recent["recent_upper"]) == 4


def rewrite(path: Path, change: dict[str, Any], header: dict[str, Any] | None = None) -> None:
    with np.load(path, allow_pickle=False) as npz:
        raw = {k: npz[k] for k in npz.files}
    raw.update(change)
    if header:
        h = json.loads(raw["header"].tobytes())
        h.update(header)
        raw["header"] = json_bytes(h)
    with path.open("wb") as fh:
        np.savez(fh, **raw)


@pytest.mark.parametrize(
    ("change", "header", "why"),
    [
        ({}, {"journal_seq": -1}, "journal_seq"),
        ({}, {"journal_seq": "7"}, "journal_seq"),
        ({}, {"journal_seq": True}, "journal_seq"),
        ({"recent_ts": np.zeros(3)}, None, "recent_ts"),
        ({"recent_value": np.array([0.0, np.nan, 1.0, 2.0])}, None, "recent_value"),
        ({"recent_ts": np.array([0.0, np.inf, 1.0, 2.0])}, None, "recent_ts"),
        ({"recent_flags": np.ones(4, dtype=np.int64)}, None, "recent_flags"),
        ({"recent_ids": json_bytes({"not": "a list"})}, None, "recent_ids"),
        ({"recent_ids": np.zeros(3)}, None, "recent_ids"),
        ({"spread": np.array([1.0, np.inf])}, None, "spread"),
        ({"spread": np.array([1.0, -2.0])}, None, "spread"),
        ({"spread": np.zeros(3)}, None, "spread"),
        ({"recent_lower": np.array([0.0, np.inf, 1.0, 2.0])}, None, "recent_lower"),
        ({"recent_upper": np.zeros(2)}, None, "recent_upper"),
    ],
)
def test_damaged_version_2_parts_are_corrupt(
    tmp_path: Path, change: dict[str, Any], header: dict[str, Any] | None, why: str
) -> None:
    path = tmp_path / "r.npz"
    ids, arrays = recent(4)
    store_with(2).snapshot(path, SHA, journal_seq=3, recent_ids=ids, recent=arrays)
    rewrite(path, change, header)
    with pytest.raises(SnapshotError) as info:
        load_snapshot(path, SHA, SHAPES)
    assert info.value.reason == "corrupt"
    assert why in str(info.value)


def test_write_is_atomic_and_keeps_previous(tmp_path: Path) -> None:
    path = tmp_path / "r.npz"
    a = {"state0": np.zeros((1, 0, 3), dtype=np.float32)}
    meta = {
        name: np.zeros(0, dtype=np.int64 if name == "seen" else np.float64)
        for name in ("last_ts", "last_value", "last_pred", "seen", "last_used")
    }
    write_snapshot(path, SHA, SHAPES, [], {**a, **meta}, journal_seq=1)
    write_snapshot(path, SHA, SHAPES, [], {**a, **meta}, journal_seq=2)
    assert load_snapshot(path, SHA, SHAPES).journal_seq == 2
    assert load_snapshot(path.with_name("r.npz.prev"), SHA, SHAPES).journal_seq == 1
    assert not path.with_name("r.npz.tmp").exists()


# ------------------------------------------------------------------ rows gathered while written


def test_rows_write_what_a_gather_and_savez_write(tmp_path: Path, monkeypatch: Any) -> None:
    """Rows of a state (axis 1) and of a column (axis 0), in any slot order, chunked finer than
    their length, read back as np.take would have made them."""
    monkeypatch.setattr(snapshot, "ROWS_CHUNK", 3)  # 10 slots: chunks of 3, 3, 3 and 1
    rng = np.random.default_rng(7)
    state = rng.standard_normal((2, 12, 5)).astype(np.float32)
    column = rng.standard_normal(12)
    seen = rng.integers(0, 100, 12)
    slots = rng.permutation(12)[:10]
    path = tmp_path / "rows.npz"
    write_snapshot(
        path,
        SHA,
        [(2, 5)],
        [f"s{i}" for i in range(10)],
        {"state0": Rows(state, slots), "last_ts": Rows(column, slots), "seen": Rows(seen, slots)},
    )
    with np.load(path, allow_pickle=False) as npz:
        np.testing.assert_array_equal(npz["state0"], np.take(state, slots, axis=1))
        np.testing.assert_array_equal(npz["last_ts"], column[slots])
        np.testing.assert_array_equal(npz["seen"], seen[slots])
        assert npz["seen"].dtype == seen.dtype
    empty = tmp_path / "empty.npz"
    write_snapshot(empty, SHA, [(2, 5)], [], {"state0": Rows(state, slots[:0])})
    with np.load(empty, allow_pickle=False) as npz:
        assert npz["state0"].shape == (2, 0, 5)


def test_a_snapshot_does_not_copy_the_states(tmp_path: Path, monkeypatch: Any) -> None:
    """The memory a snapshot allocates (numpy's allocations are traced) stays far below the
    states it writes: their rows are gathered a chunk at a time, not copied out first."""
    monkeypatch.setattr(snapshot, "ROWS_CHUNK", 1000)  # 20 chunks per plane, as 1M streams have
    store = StateStore([(2, 64), (2, 64)], 20_000)
    streams = [f"sensor-{i}" for i in range(20_000)]
    slots, _ = store.acquire_many(streams, 1.0, store.slots_of(streams))
    rng = np.random.default_rng(3)
    states = [rng.standard_normal((2, 20_000, 64)).astype(np.float32) for _ in range(2)]
    store.scatter(np.asarray(slots, dtype=np.intp), states)
    state_bytes = sum(s.nbytes for s in states)  # ~20 MB
    tracemalloc.start()
    try:
        store.snapshot(tmp_path / "big.npz", SHA)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < state_bytes / 4, f"snapshot allocated {peak:,} B for {state_bytes:,} B of states"
    data = load_snapshot(tmp_path / "big.npz", SHA, [(2, 64), (2, 64)])
    which = [int(stream.rsplit("-", 1)[1]) for stream in data.ids]
    assert sorted(which) == list(range(20_000))
    for i, s in enumerate(states):
        np.testing.assert_array_equal(data.arrays[f"state{i}"], s[:, which])
