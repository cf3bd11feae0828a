"""StateStore: slots, LRU/TTL, verdicts, gather/scatter, snapshots.

Expected values come from plain-Python models (a dict of per-stream arrays, an ordered list for
LRU order), not from the store's own arrays.
"""

from __future__ import annotations

import tempfile
from collections import OrderedDict
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from forecaster.errors import ForecasterError
from forecaster.serve.state import (
    SnapshotError,
    StateStore,
    Verdict,
    all_finite,
    finite_rows,
    previous_path,
)

LSTM = [(2, 8), (2, 8)]
GRU = [(3, 5)]
SHA = "a" * 64
OTHER_SHA = "b" * 64


def rand_states(shapes: list[tuple[int, int]], batch: int, seed: int) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.standard_normal((la, batch, hi)).astype(np.float32) for la, hi in shapes]


def filled_store(
    shapes: list[tuple[int, int]], names: list[str]
) -> tuple[StateStore, dict[str, list[np.ndarray]]]:
    """A store with one distinct state per stream, and the per-stream truth to compare with."""
    store = StateStore(shapes, max_streams=1000)
    slots = np.array([store.acquire(n, now=float(i))[0] for i, n in enumerate(names)])
    new = rand_states(shapes, len(names), seed=len(names))
    store.scatter(slots, new)
    ts = np.arange(len(names), dtype=np.float64) * 10.0
    store.record(slots, ts, ts + 0.5, ts + 0.25, now=100.0)
    truth = {n: [s[:, i, :].copy() for s in new] for i, n in enumerate(names)}
    return store, truth


def state_of(store: StateStore, stream: str) -> list[np.ndarray]:
    slot = store.slot_of(stream)
    assert slot is not None
    return [g[:, 0, :] for g in store.gather(np.array([slot]))]


# ---------------------------------------------------------------------------- construction


@pytest.mark.parametrize(
    ("shapes", "kwargs"),
    [
        ([], {}),
        ([(0, 4)], {}),
        ([(1, 4)], {"max_streams": 0}),
        ([(1, 4)], {"initial_capacity": 0}),
        ([(1, 4)], {"reset_after": -1.0}),
        ([(1, 4)], {"idle_ttl": float("nan")}),
    ],
)
def test_rejects_bad_configuration(shapes: list[tuple[int, int]], kwargs: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        StateStore(shapes, **{"max_streams": 10, **kwargs})


def test_memory_accounting() -> None:
    store = StateStore(LSTM, max_streams=100, initial_capacity=10)
    assert store.bytes_per_stream == 2 * (2 * 8 * 4) + 7 * 8
    assert store.nbytes == 10 * store.bytes_per_stream


# ---------------------------------------------------------------------------- gather / scatter


@pytest.mark.parametrize("shapes", [LSTM, GRU], ids=["lstm", "gru"])
def test_gather_scatter_round_trip(shapes: list[tuple[int, int]]) -> None:
    store = StateStore(shapes, max_streams=100)
    slots = np.array([store.acquire(f"s{i}", now=0.0)[0] for i in range(6)])
    # A fresh stream starts from zero.
    for arr in store.gather(slots):
        assert not arr.any()
    batch = np.array([slots[4], slots[1], slots[3]])
    new = rand_states(shapes, 3, seed=1)
    store.scatter(batch, new)
    got = store.gather(batch)
    assert len(got) == len(shapes)
    for g, n, (la, hi) in zip(got, new, shapes, strict=True):
        assert g.shape == (la, 3, hi)
        assert g.dtype == np.float32
        assert g.flags["C_CONTIGUOUS"]
        np.testing.assert_array_equal(g, n)
    # A gather is a copy: changing it does not change the store.
    got[0][:] = 7.0
    np.testing.assert_array_equal(store.gather(batch)[0], new[0])
    # Streams outside the batch were not touched.
    for arr in store.gather(np.array([slots[0], slots[2], slots[5]])):
        assert not arr.any()


def test_scatter_ok_mask_leaves_rows_untouched() -> None:
    store = StateStore(LSTM, max_streams=10)
    slots = np.array([store.acquire(s, now=0.0)[0] for s in "abcd"])
    before = rand_states(LSTM, 4, seed=2)
    store.scatter(slots, before)
    after = rand_states(LSTM, 4, seed=3)
    ok = np.array([True, False, True, False])
    store.scatter(slots, after, ok=ok)
    for got, b, a in zip(store.gather(slots), before, after, strict=True):
        np.testing.assert_array_equal(got[:, ok, :], a[:, ok, :])
        np.testing.assert_array_equal(got[:, ~ok, :], b[:, ~ok, :])
    # All False writes nothing.
    store.scatter(slots, rand_states(LSTM, 4, seed=4), ok=np.zeros(4, dtype=bool))
    np.testing.assert_array_equal(store.gather(slots)[0][:, ok, :], after[0][:, ok, :])


def test_scatter_checks_shapes() -> None:
    store = StateStore(LSTM, max_streams=10)
    slots = np.array([store.acquire("a", now=0.0)[0]])
    with pytest.raises(ValueError, match="expected 2 state tensors"):
        store.scatter(slots, rand_states(GRU, 1, seed=0))
    with pytest.raises(ValueError, match="shape"):
        store.scatter(slots, rand_states(LSTM, 2, seed=0))
    with pytest.raises(ValueError, match="ok mask"):
        store.scatter(slots, rand_states(LSTM, 1, seed=0), ok=np.ones(2, dtype=bool))


def test_finite_rows() -> None:
    h, c = rand_states(LSTM, 5, seed=5)
    h[1, 1, 3] = np.nan
    c[0, 3, 0] = np.inf
    h[0, 4, 7] = -np.inf
    np.testing.assert_array_equal(finite_rows([h, c]), [True, False, True, False, False])
    np.testing.assert_array_equal(finite_rows([h]), [True, False, True, True, False])
    assert finite_rows([np.zeros((1, 0, 3), np.float32)]).shape == (0,)


_ODD = st.sampled_from([np.nan, np.inf, -np.inf, 3e38, -3e38, 1e20, 0.0])


@settings(max_examples=300, deadline=None)
@given(
    st.integers(1, 3),
    st.integers(0, 6),
    st.integers(1, 5),
    st.lists(st.tuples(st.integers(0, 10**6), _ODD), max_size=4),
    st.integers(0, 2**32 - 1),
)
def test_all_finite_is_finite_rows_all(
    layers: int, batch: int, hidden: int, odd: list[tuple[int, float]], seed: int
) -> None:
    """The quick check agrees with the exact one, with values that overflow its dot product
    (1e20, 3e38: finite, yet their squares are not) as well as NaN and infinities."""
    rng = np.random.default_rng(seed)
    states = [rng.standard_normal((layers, batch, hidden)).astype(np.float32) for _ in range(2)]
    for where, value in odd:
        if batch:
            arr = states[where % 2].reshape(-1)
            arr[where % arr.size] = value
    assert all_finite(states) == bool(finite_rows(states).all()), f"seed {seed}, odd {odd}"


def test_non_finite_state_is_not_stored_when_screened() -> None:
    store = StateStore(GRU, max_streams=10)
    slots = np.array([store.acquire(s, now=0.0)[0] for s in "ab"])
    (new,) = rand_states(GRU, 2, seed=6)
    new[2, 0, 1] = np.nan
    store.scatter(slots, [new], ok=finite_rows([new]))
    (got,) = store.gather(slots)
    assert np.isfinite(got).all()
    assert not got[:, 0, :].any()
    np.testing.assert_array_equal(got[:, 1, :], new[:, 1, :])


# ---------------------------------------------------------------------------- growth


def test_growth_by_doubling_keeps_data() -> None:
    names = [f"s{i}" for i in range(9)]
    store = StateStore(LSTM, max_streams=100, initial_capacity=2)
    assert store.capacity == 2
    truth: dict[str, list[np.ndarray]] = {}
    for i, name in enumerate(names):
        slot, evicted = store.acquire(name, now=float(i))
        assert evicted is None
        new = rand_states(LSTM, 1, seed=100 + i)
        store.scatter(np.array([slot]), new)
        store.record(np.array([slot]), np.array([i * 1.0]), np.array([i + 0.5]), np.array([i]), 1.0)
        truth[name] = [s[:, 0, :] for s in new]
    assert store.capacity == 16
    for i, name in enumerate(names):
        for got, want in zip(state_of(store, name), truth[name], strict=True):
            np.testing.assert_array_equal(got, want)
        found = store.slot_of(name)
        assert found is not None
        assert store.last_ts[found] == i
        assert store.last_value[found] == i + 0.5
        assert store.seen[found] == 1


def test_growth_stops_at_max_streams() -> None:
    store = StateStore(GRU, max_streams=6, initial_capacity=4)
    for i in range(20):
        store.acquire(f"s{i}", now=float(i))
    assert store.capacity == 6
    assert len(store) == 6


# ---------------------------------------------------------------------------- LRU and TTL


def test_lru_evicts_least_recently_used_not_oldest() -> None:
    store = StateStore(GRU, max_streams=3)
    a, _ = store.acquire("a", now=1.0)
    store.acquire("b", now=2.0)
    store.acquire("c", now=3.0)
    assert store.acquire("a", now=4.0) == (a, None)  # a is now the most recent
    slot_d, evicted = store.acquire("d", now=5.0)
    assert evicted == "b"
    assert store.slot_of("b") is None
    assert "b" not in store
    assert len(store) == 3
    # record() also counts as use: c stepped, so a is now the least recently used.
    c = store.slot_of("c")
    assert c is not None
    store.record(np.array([c]), np.array([1.0]), np.array([1.0]), np.array([1.0]), now=6.0)
    store.record(np.array([slot_d]), np.array([1.0]), np.array([1.0]), np.array([1.0]), now=6.0)
    assert store.acquire("e", now=7.0)[1] == "a"
    assert [s for s, _ in store.streams()] == ["c", "d", "e"]


def test_evicted_slot_is_reused_from_zero() -> None:
    store = StateStore(GRU, max_streams=1)
    slot, _ = store.acquire("a", now=0.0)
    store.scatter(np.array([slot]), rand_states(GRU, 1, seed=7))
    store.record(np.array([slot]), np.array([5.0]), np.array([1.0]), np.array([2.0]), now=1.0)
    slot_b, evicted = store.acquire("b", now=2.0)
    assert (slot_b, evicted) == (slot, "a")
    assert not store.gather(np.array([slot_b]))[0].any()
    assert np.isnan(store.last_ts[slot_b])
    assert np.isnan(store.last_pred[slot_b])
    assert store.seen[slot_b] == 0
    assert store.stream_of(slot_b) == "b"


def test_expire_with_ttl() -> None:
    store = StateStore(GRU, max_streams=10, idle_ttl=10.0)
    store.acquire("a", now=0.0)
    store.acquire("b", now=5.0)
    store.acquire("c", now=8.0)
    c = store.slot_of("c")
    assert c is not None
    store.touch(c, now=9.0)
    assert store.expire(now=10.0) == []  # idle exactly ttl: kept
    assert store.expire(now=12.0) == ["a"]
    assert store.expire(now=16.0) == ["b"]
    assert store.slot_of("b") is None
    assert [s for s, _ in store.streams()] == ["c"]
    assert store.expire(now=100.0) == ["c"]
    assert len(store) == 0
    # Freed slots are reused before the store grows.
    cap = store.capacity
    for i in range(3):
        store.acquire(f"n{i}", now=101.0)
    assert store.capacity == cap


def test_expire_zero_ttl_never_expires() -> None:
    store = StateStore(GRU, max_streams=10, idle_ttl=0.0)
    store.acquire("a", now=0.0)
    assert store.expire(now=1e12) == []
    assert len(store) == 1


def test_discard() -> None:
    store = StateStore(GRU, max_streams=10)
    slot, _ = store.acquire("a", now=0.0)
    assert store.discard("a")
    assert not store.discard("a")
    assert store.stream_of(slot) is None
    with pytest.raises(ValueError, match="holds no stream"):
        store.reset(slot)


def test_flood_of_new_streams_keeps_the_newest() -> None:
    store = StateStore(GRU, max_streams=10_000, initial_capacity=16)
    evictions = 0
    for i in range(200_000):
        _, evicted = store.acquire(f"sensor/{i}", now=float(i))
        evictions += evicted is not None
    assert len(store) == 10_000
    assert evictions == 190_000
    assert store.capacity == 10_000
    live = {s for s, _ in store.streams()}
    assert live == {f"sensor/{i}" for i in range(190_000, 200_000)}


# ---------------------------------------------------------------------------- verdicts


def stepped(store: StateStore, stream: str, ts: float) -> int:
    slot, _ = store.acquire(stream, now=0.0)
    store.record(np.array([slot]), np.array([ts]), np.array([1.0]), np.array([1.0]), now=0.0)
    return slot


def test_check_verdicts() -> None:
    store = StateStore(GRU, max_streams=10, reset_after=60.0)
    fresh, _ = store.acquire("fresh", now=0.0)
    assert store.check(fresh, -1e9) is Verdict.STEP  # nothing seen yet: anything goes
    slot = stepped(store, "s", 1000.0)
    assert store.check(slot, 1000.0) is Verdict.DUPLICATE
    assert store.check(slot, 999.5) is Verdict.OUT_OF_ORDER
    assert store.check(slot, 1001.0) is Verdict.STEP
    assert store.check(slot, 1060.0) is Verdict.STEP  # gap == reset_after: not more than it
    assert store.check(slot, 1060.5) is Verdict.RESET
    # check() decides only; it changes nothing.
    assert store.last_ts[slot] == 1000.0
    assert store.check(slot, 1000.0) is Verdict.DUPLICATE


def test_zero_reset_after_never_resets() -> None:
    store = StateStore(GRU, max_streams=10, reset_after=0.0)
    slot = stepped(store, "s", 0.0)
    assert store.check(slot, 1e12) is Verdict.STEP


def test_check_many_agrees_with_check() -> None:
    store = StateStore(GRU, max_streams=10, reset_after=60.0)
    slots = np.array([stepped(store, s, 1000.0) for s in "abcde"] + [store.acquire("f", 0)[0]])
    ts = np.array([1000.0, 999.0, 1030.0, 1060.0, 2000.0, 5.0])
    got = store.check_many(slots, ts)
    want = [store.check(int(s), float(t)) for s, t in zip(slots, ts, strict=True)]
    assert got.tolist() == [int(v) for v in want]
    assert want == [
        Verdict.DUPLICATE,
        Verdict.OUT_OF_ORDER,
        Verdict.STEP,
        Verdict.STEP,
        Verdict.RESET,
        Verdict.STEP,
    ]


def test_reset_zeroes_state_and_clears_metadata_but_keeps_mapping() -> None:
    store, _ = filled_store(LSTM, ["a", "b"])
    a = store.slot_of("a")
    assert a is not None
    order = list(store.streams())
    store.reset(a)
    assert store.slot_of("a") == a
    assert list(store.streams()) == order
    for arr in state_of(store, "a"):
        assert not arr.any()
    assert np.isnan(store.last_ts[a]) and np.isnan(store.last_value[a])
    assert np.isnan(store.last_pred[a])
    assert store.seen[a] == 0
    assert store.check(a, -5.0) is Verdict.STEP
    assert any(arr.any() for arr in state_of(store, "b"))


def test_metadata_views_are_read_only() -> None:
    store, _ = filled_store(GRU, ["a"])
    for view in (store.last_ts, store.last_value, store.last_pred, store.seen, store.last_used):
        with pytest.raises(ValueError):
            view[0] = 1


# ---------------------------------------------------------------------------- snapshots


def assert_same(a: StateStore, b: StateStore) -> None:
    """Same streams, LRU order, states and metadata; slot numbers may differ."""
    assert [s for s, _ in a.streams()] == [s for s, _ in b.streams()]
    for stream, slot_a in a.streams():
        slot_b = b.slot_of(stream)
        assert slot_b is not None
        for x, y in zip(state_of(a, stream), state_of(b, stream), strict=True):
            np.testing.assert_array_equal(x, y)
        for name in ("last_ts", "last_value", "last_pred", "seen", "last_used"):
            np.testing.assert_array_equal(
                getattr(a, name)[slot_a], getattr(b, name)[slot_b], err_msg=name
            )


@pytest.mark.parametrize("shapes", [LSTM, GRU], ids=["lstm", "gru"])
def test_snapshot_restore_round_trip(tmp_path: Path, shapes: list[tuple[int, int]]) -> None:
    names = [f"dev/{i}/temp" for i in range(40)] + ["ünïcode/流"]
    store, truth = filled_store(shapes, names)
    # Shuffle LRU order, leave a hole in the slots and a reset stream with NaN metadata.
    store.acquire("dev/3/temp", now=200.0)
    store.discard("dev/7/temp")
    slot5 = store.slot_of("dev/5/temp")
    assert slot5 is not None
    store.reset(slot5)
    path = tmp_path / "state.npz"
    written = store.snapshot(path, SHA)
    assert written == path.stat().st_size
    assert not (tmp_path / "state.npz.tmp").exists()
    # Readable without pickle by plain numpy.
    with np.load(path, allow_pickle=False) as npz:
        assert npz["state0"].shape == (shapes[0][0], len(store), shapes[0][1])

    back = StateStore.restore(path, SHA, shapes, max_streams=1000)
    assert len(back) == len(store) == len(names) - 1
    assert_same(store, back)
    for name in names:
        if name not in ("dev/5/temp", "dev/7/temp"):
            for got, want in zip(state_of(back, name), truth[name], strict=True):
                np.testing.assert_array_equal(got, want)
    # LRU order survived: eviction in the restored store picks the same stream.
    small = StateStore.restore(path, SHA, shapes, max_streams=len(store))
    assert small.acquire("new", now=300.0)[1] == next(store.streams())[0]


def test_empty_store_round_trip(tmp_path: Path) -> None:
    path = tmp_path / "state.npz"
    StateStore(GRU, max_streams=5).snapshot(path, SHA)
    back = StateStore.restore(path, SHA, GRU, max_streams=5)
    assert len(back) == 0
    assert back.acquire("a", now=0.0) == (0, None)


def test_restore_into_smaller_cap_keeps_most_recent(tmp_path: Path) -> None:
    names = [f"s{i}" for i in range(10)]
    store, _ = filled_store(GRU, names)
    path = tmp_path / "state.npz"
    store.snapshot(path, SHA)
    back = StateStore.restore(path, SHA, GRU, max_streams=4)
    assert [s for s, _ in back.streams()] == [s for s, _ in store.streams()][-4:]


def test_restore_rebases_last_used(tmp_path: Path) -> None:
    store = StateStore(GRU, max_streams=10, idle_ttl=10.0)
    store.acquire("old", now=1000.0)
    store.acquire("new", now=1008.0)
    path = tmp_path / "state.npz"
    store.snapshot(path, SHA)
    back = StateStore.restore(path, SHA, GRU, max_streams=10, idle_ttl=10.0, now=5.0)
    new, old = back.slot_of("new"), back.slot_of("old")
    assert new is not None and old is not None
    assert back.last_used[new] == 5.0
    assert back.last_used[old] == -3.0
    assert back.expire(now=7.5) == ["old"]


def test_restore_missing(tmp_path: Path) -> None:
    with pytest.raises(SnapshotError) as info:
        StateStore.restore(tmp_path / "nope.npz", SHA, GRU, max_streams=5)
    assert info.value.reason == "missing"
    assert isinstance(info.value, ForecasterError)


def test_restore_rejects_truncated_file(tmp_path: Path) -> None:
    store, _ = filled_store(LSTM, [f"s{i}" for i in range(20)])
    path = tmp_path / "state.npz"
    store.snapshot(path, SHA)
    blob = path.read_bytes()
    for cut in (0, 10, len(blob) // 2, len(blob) - 1):
        path.write_bytes(blob[:cut])
        with pytest.raises(SnapshotError) as info:
            StateStore.restore(path, SHA, LSTM, max_streams=100)
        assert info.value.reason == "corrupt", cut


@pytest.mark.parametrize("seed", range(5))
def test_restore_rejects_random_bytes(tmp_path: Path, seed: int) -> None:
    path = tmp_path / "state.npz"
    path.write_bytes(np.random.default_rng(seed).bytes(4096))
    with pytest.raises(SnapshotError) as info:
        StateStore.restore(path, SHA, GRU, max_streams=5)
    assert info.value.reason == "corrupt"


def test_restore_rejects_bare_npy_and_pickles(tmp_path: Path) -> None:
    npy = tmp_path / "state.npy"
    np.save(npy, np.zeros(3))
    with pytest.raises(SnapshotError, match="npz") as info:
        StateStore.restore(npy, SHA, GRU, max_streams=5)
    assert info.value.reason == "corrupt"
    pickled = tmp_path / "pickled.npz"
    np.savez(pickled, header=np.array([{"evil": 1}], dtype=object))
    with pytest.raises(SnapshotError) as info:
        StateStore.restore(pickled, SHA, GRU, max_streams=5)
    assert info.value.reason == "corrupt"


def test_restore_rejects_another_model(tmp_path: Path) -> None:
    store, _ = filled_store(LSTM, ["a", "b"])
    path = tmp_path / "state.npz"
    store.snapshot(path, SHA)
    with pytest.raises(SnapshotError, match="bundle") as info:
        StateStore.restore(path, OTHER_SHA, LSTM, max_streams=10)
    assert info.value.reason == "foreign"
    with pytest.raises(SnapshotError, match="shapes") as info:
        StateStore.restore(path, SHA, [(2, 16), (2, 16)], max_streams=10)
    assert info.value.reason == "foreign"
    with pytest.raises(SnapshotError) as info:
        StateStore.restore(path, SHA, [(2, 8)], max_streams=10)
    assert info.value.reason == "foreign"


def test_restore_rejects_non_finite_state(tmp_path: Path) -> None:
    store = StateStore(GRU, max_streams=5)
    slot, _ = store.acquire("a", now=0.0)
    (bad,) = rand_states(GRU, 1, seed=8)
    bad[0, 0, 0] = np.nan
    store.scatter(np.array([slot]), [bad])  # unscreened on purpose
    path = tmp_path / "state.npz"
    store.snapshot(path, SHA)
    with pytest.raises(SnapshotError, match="non-finite") as info:
        StateStore.restore(path, SHA, GRU, max_streams=5)
    assert info.value.reason == "corrupt"


def test_restore_rejects_inconsistent_arrays(tmp_path: Path) -> None:
    store, _ = filled_store(GRU, ["a", "b"])
    path = tmp_path / "state.npz"
    store.snapshot(path, SHA)
    with np.load(path, allow_pickle=False) as npz:
        arrays = {k: npz[k] for k in npz.files}
    arrays["seen"] = arrays["seen"][:1]
    bad = tmp_path / "bad.npz"
    np.savez(bad, **arrays)
    with pytest.raises(SnapshotError, match="seen") as info:
        StateStore.restore(bad, SHA, GRU, max_streams=5)
    assert info.value.reason == "corrupt"


def test_snapshot_keeps_previous_generation(tmp_path: Path) -> None:
    path = tmp_path / "state.npz"
    first, _ = filled_store(GRU, ["a", "b"])
    first.snapshot(path, SHA)
    assert not previous_path(path).exists()
    second, _ = filled_store(GRU, ["x", "y", "z"])
    second.snapshot(path, SHA)
    assert_same(StateStore.restore(path, SHA, GRU, max_streams=10), second)
    assert_same(StateStore.restore(previous_path(path), SHA, GRU, max_streams=10), first)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["state.npz", "state.npz.prev"]


def test_restore_latest_falls_back_to_previous(tmp_path: Path) -> None:
    path = tmp_path / "state.npz"
    first, _ = filled_store(GRU, ["a", "b"])
    first.snapshot(path, SHA)
    second, _ = filled_store(GRU, ["x"])
    second.snapshot(path, SHA)

    store, used = StateStore.restore_latest(path, SHA, GRU, max_streams=10)
    assert used == str(path)
    assert_same(store, second)

    path.write_bytes(path.read_bytes()[:100])  # the newest is damaged
    store, used = StateStore.restore_latest(path, SHA, GRU, max_streams=10)
    assert used == str(previous_path(path))
    assert_same(store, first)

    path.unlink()  # e.g. a crash between renames on a filesystem without hard links
    store, used = StateStore.restore_latest(path, SHA, GRU, max_streams=10)
    assert used == str(previous_path(path))


def test_restore_latest_raises_reason_of_newest(tmp_path: Path) -> None:
    path = tmp_path / "state.npz"
    with pytest.raises(SnapshotError) as info:
        StateStore.restore_latest(path, SHA, GRU, max_streams=10)
    assert info.value.reason == "missing"

    store, _ = filled_store(GRU, ["a"])
    store.snapshot(path, SHA)
    store.snapshot(path, SHA)
    with pytest.raises(SnapshotError) as info:
        StateStore.restore_latest(path, OTHER_SHA, GRU, max_streams=10)
    assert info.value.reason == "foreign"
    assert info.value.path == path

    path.write_bytes(b"garbage")
    previous_path(path).write_bytes(b"garbage")
    with pytest.raises(SnapshotError) as info:
        StateStore.restore_latest(path, SHA, GRU, max_streams=10)
    assert info.value.reason == "corrupt"


def test_stray_temp_file_from_a_crash_is_harmless(tmp_path: Path) -> None:
    path = tmp_path / "state.npz"
    store, _ = filled_store(LSTM, ["a", "b", "c"])
    store.snapshot(path, SHA)
    # A crash mid-write leaves a partial temp file (and a partial .prev link) behind.
    tmp = tmp_path / "state.npz.tmp"
    tmp.write_bytes(path.read_bytes()[:50])
    (tmp_path / "state.npz.prev.tmp").write_bytes(b"partial")
    restored, used = StateStore.restore_latest(path, SHA, LSTM, max_streams=10)
    assert used == str(path)
    assert_same(restored, store)
    # The next snapshot replaces the leftovers.
    store.snapshot(path, SHA)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["state.npz", "state.npz.prev"]


def test_failed_snapshot_leaves_old_file_and_no_temp(tmp_path: Path) -> None:
    path = tmp_path / "state.npz"
    store, _ = filled_store(GRU, ["a"])
    store.snapshot(path, SHA)
    blob = path.read_bytes()
    with pytest.raises(OSError):
        store.snapshot(tmp_path / "no-such-dir" / "state.npz", SHA)
    assert path.read_bytes() == blob
    assert sorted(p.name for p in tmp_path.iterdir()) == ["state.npz"]


# ---------------------------------------------------------------------------- property test

MAX = 4
SHAPES = [(1, 2), (2, 3)]
POOL = [f"s{i}" for i in range(8)]


class StoreMachine(RuleBasedStateMachine):
    """Random acquire/scatter/record/reset/discard/expire/snapshot against a dict model."""

    def __init__(self) -> None:
        super().__init__()
        self.store = StateStore(SHAPES, max_streams=MAX, idle_ttl=5.0, initial_capacity=1)
        self.now = 0.0
        # stream → its states, in LRU order (front = least recent)
        self.model: OrderedDict[str, list[np.ndarray]] = OrderedDict()
        self.seen: dict[str, int] = {}
        self.used: dict[str, float] = {}

    def live(self) -> list[str]:
        return list(self.model)

    @rule(stream=st.sampled_from(POOL), dt=st.sampled_from([0.0, 1.0, 2.5]))
    def acquire(self, stream: str, dt: float) -> None:
        self.now += dt
        expect_evicted = None
        if stream not in self.model and len(self.model) == MAX:
            expect_evicted = next(iter(self.model))
            del self.model[expect_evicted]
        slot, evicted = self.store.acquire(stream, self.now)
        assert evicted == expect_evicted
        assert self.store.slot_of(stream) == slot
        if stream not in self.model:
            self.model[stream] = [np.zeros((la, hi), np.float32) for la, hi in SHAPES]
            self.seen[stream] = 0
        self.model.move_to_end(stream)
        self.used[stream] = self.now

    @precondition(lambda self: self.model)
    @rule(data=st.data())
    def scatter(self, data: st.DataObject) -> None:
        batch = data.draw(st.lists(st.sampled_from(self.live()), min_size=1, unique=True))
        ok = np.array(data.draw(st.lists(st.booleans(), min_size=len(batch), max_size=len(batch))))
        new = rand_states(SHAPES, len(batch), seed=data.draw(st.integers(0, 2**32 - 1)))
        slots = np.array([self.store.slot_of(s) for s in batch])
        self.store.scatter(slots, new, ok=ok)
        for i, stream in enumerate(batch):
            if ok[i]:
                self.model[stream] = [n[:, i, :].copy() for n in new]

    @precondition(lambda self: self.model)
    @rule(data=st.data())
    def record(self, data: st.DataObject) -> None:
        batch = data.draw(st.lists(st.sampled_from(self.live()), min_size=1, unique=True))
        slots = np.array([self.store.slot_of(s) for s in batch])
        ts = np.full(len(batch), self.now)
        self.store.record(slots, ts, ts, ts, self.now)
        for stream in batch:
            self.model.move_to_end(stream)
            self.seen[stream] += 1
            self.used[stream] = self.now

    @precondition(lambda self: self.model)
    @rule(data=st.data())
    def reset(self, data: st.DataObject) -> None:
        stream = data.draw(st.sampled_from(self.live()))
        slot = self.store.slot_of(stream)
        assert slot is not None
        self.store.reset(slot)
        self.model[stream] = [np.zeros((la, hi), np.float32) for la, hi in SHAPES]
        self.seen[stream] = 0

    @rule(stream=st.sampled_from(POOL))
    def discard(self, stream: str) -> None:
        assert self.store.discard(stream) == (stream in self.model)
        self.model.pop(stream, None)

    @rule(dt=st.sampled_from([0.0, 3.0, 6.0]))
    def expire(self, dt: float) -> None:
        self.now += dt
        expect = [s for s in self.model if self.used[s] < self.now - 5.0]
        assert self.store.expire(self.now) == expect
        for stream in expect:
            del self.model[stream]

    @rule()
    def snapshot_round_trip(self) -> None:
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "state.npz"
            self.store.snapshot(path, SHA)
            self.store = StateStore.restore(path, SHA, SHAPES, MAX, idle_ttl=5.0)

    @invariant()
    def mapping_is_consistent(self) -> None:
        pairs = list(self.store.streams())
        assert len(self.store) == len(pairs) == len(self.model) <= MAX
        assert [s for s, _ in pairs] == list(self.model)
        slots = [slot for _, slot in pairs]
        assert len(set(slots)) == len(slots)
        for stream, slot in pairs:
            assert self.store.slot_of(stream) == slot
            assert self.store.stream_of(slot) == stream
            assert 0 <= slot < self.store.capacity <= MAX

    @invariant()
    def states_change_only_by_own_scatter(self) -> None:
        if not self.model:
            return
        slots = np.array([self.store.slot_of(s) for s in self.model])
        got = self.store.gather(slots)
        for i, (stream, want) in enumerate(self.model.items()):
            for g, w in zip(got, want, strict=True):
                np.testing.assert_array_equal(g[:, i, :], w, err_msg=stream)
            assert self.store.seen[slots[i]] == self.seen[stream]
            assert self.store.last_used[slots[i]] == self.used[stream]


TestStoreMachine = StoreMachine.TestCase
TestStoreMachine.settings = settings(
    max_examples=60,
    stateful_step_count=40,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)


def test_acquire_many_matches_acquiring_one_by_one(rng: Any, seed: int) -> None:
    """Slots, evictions (oldest first), LRU order and last-used times as a loop of acquires."""
    many, one = StateStore(GRU, max_streams=6), StateStore(GRU, max_streams=6)
    for k in range(100):
        names = rng.sample("abcdefghij", rng.randint(0, 5))
        got, gone = many.acquire_many(names, now=float(k))
        want, want_gone = [], []
        for name in names:
            slot, evicted = one.acquire(name, now=float(k))
            want.append(slot)
            if evicted is not None:
                want_gone.append(evicted)
        where = f"seed={seed} call={k}"
        assert (got, gone) == (want, want_gone), where
        assert list(many.streams()) == list(one.streams()), where
        np.testing.assert_array_equal(many.last_used, one.last_used, err_msg=where)
