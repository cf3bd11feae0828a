"""Per-stream recurrent state: stream id → slot, states in the layout the ONNX graph takes.

Each state tensor lives in one preallocated float32 array ``[L, capacity, H]``. A micro-batch
gather is ``np.take(arr, slots, axis=1)``, already the contiguous ``[L, B, H]`` the graph wants:
storing ``[capacity, L, H]`` instead would cost a transpose per call (1.4 ms at B=4096, measured
for the project's original design notes). Per-slot metadata sits in parallel 1-D arrays so the
engine can read and write it for a whole wave with one fancy-index operation.

Stream ids map to slots through an ``OrderedDict`` kept in least-recently-used order, so both LRU
eviction (``max_streams`` reached) and TTL expiry look only at the front of it: a flood of new
topics costs O(1) per topic, never a scan of every stream.

The store is not thread-safe and is meant to be owned by the one inference thread. Slots are only
valid until the next call that can free one (:meth:`acquire` when full, :meth:`expire`,
:meth:`discard`): acquire every stream of a wave, then gather/step/scatter/record, then expire.

Snapshots (the file format and its atomic I/O live in ``snapshot.py``) are ``.npz`` files without
pickles, tied to the model by its sha256 and written atomically with the previous generation kept
beside them.
"""

from __future__ import annotations

import logging
import math
from collections import OrderedDict, deque
from collections.abc import Iterator, Mapping, Sequence
from enum import IntEnum
from pathlib import Path
from typing import cast

import numpy as np

from forecaster.serve.snapshot import (
    META,
    OPTIONAL_META,
    SNAPSHOT_VERSION,
    Rows,
    SnapshotData,
    SnapshotError,
    load_snapshot,
    previous_path,
    write_snapshot,
)

__all__ = [
    "SNAPSHOT_VERSION",
    "SnapshotError",
    "StateStore",
    "Verdict",
    "all_finite",
    "finite_rows",
    "previous_path",
]

log = logging.getLogger(__name__)

_META = META + OPTIONAL_META


class Verdict(IntEnum):
    """What to do with one reading, given the stream's last event time."""

    STEP = 0
    RESET = 1  # event-time gap > reset_after: zero the state, then step (reset reason "gap")
    DUPLICATE = 2  # ts == last_ts: drop
    OUT_OF_ORDER = 3  # ts < last_ts: drop


def finite_rows(states: Sequence[np.ndarray]) -> np.ndarray:
    """``[B]`` bool: True where a batch row is finite in every state tensor.

    A NaN that gets into a hidden state never leaves it (ONNX Runtime does not complain), so new
    states are screened with this before :meth:`StateStore.scatter` stores them.
    """
    if not states:
        raise ValueError("finite_rows needs at least one state tensor")
    ok: np.ndarray = np.isfinite(states[0]).all(axis=(0, 2))
    for arr in states[1:]:
        ok &= np.isfinite(arr).all(axis=(0, 2))
    return ok


def all_finite(states: Sequence[np.ndarray]) -> bool:
    """``finite_rows(states).all()``, at about a fifth of its cost when the answer is True (the
    usual one; the sequence path asks it of every micro-batch's new states).

    A tensor's dot product with itself is finite only when every value is: a NaN or an infinity
    makes it NaN or infinite. When it is not finite (a non-finite value, or squares beyond
    float32's range, ~1.8e19), the exact check decides, so the answer never differs."""
    with np.errstate(all="ignore"):  # an overflow here is an answer, not a warning
        for arr in states:
            flat = arr.reshape(-1)
            if not math.isfinite(float(np.dot(flat, flat))):
                return bool(finite_rows(states).all())
    return True


def _check_shapes(shapes: Sequence[tuple[int, int]]) -> tuple[tuple[int, int], ...]:
    out = tuple((int(layers), int(hidden)) for layers, hidden in shapes)
    if not out:
        raise ValueError("a state store needs at least one state tensor shape")
    for layers, hidden in out:
        if layers < 1 or hidden < 1:
            raise ValueError(f"state shape (L={layers}, H={hidden}) must be positive")
    return out


class StateStore:
    """Recurrent state and bookkeeping for up to ``max_streams`` streams.

    ``reset_after`` (event-time seconds, 0 = never) turns a long gap into a reset; ``idle_ttl``
    (caller-clock seconds, 0 = never) lets :meth:`expire` drop quiet streams. ``now`` arguments
    must come from one non-decreasing clock: LRU order is touch order, and expiry stops at the
    first stream that is not idle.
    """

    def __init__(
        self,
        shapes: Sequence[tuple[int, int]],
        max_streams: int,
        reset_after: float = 0.0,
        idle_ttl: float = 0.0,
        initial_capacity: int = 1024,
    ) -> None:
        self._shapes = _check_shapes(shapes)
        if max_streams < 1:
            raise ValueError(f"max_streams must be at least 1, got {max_streams}")
        if initial_capacity < 1:
            raise ValueError(f"initial_capacity must be at least 1, got {initial_capacity}")
        for name, value in (("reset_after", reset_after), ("idle_ttl", idle_ttl)):
            if not (np.isfinite(value) and value >= 0):
                raise ValueError(f"{name} must be finite and >= 0 (0 = never), got {value}")
        self._max = int(max_streams)
        self._reset_after = float(reset_after)
        self._idle_ttl = float(idle_ttl)
        cap = min(int(initial_capacity), self._max)
        self._states = [np.zeros((la, cap, hi), dtype=np.float32) for la, hi in self._shapes]
        self._last_ts = np.full(cap, np.nan)
        self._last_value = np.full(cap, np.nan)
        self._last_pred = np.full(cap, np.nan)
        self._seen = np.zeros(cap, dtype=np.int64)
        self._last_used = np.zeros(cap)
        self._spread = np.full(cap, np.nan)
        self._clipped = np.full(cap, np.nan)
        self._lru: OrderedDict[str, int] = OrderedDict()  # front = least recently used
        self._ids: list[str | None] = [None] * cap  # slot → stream id
        self._free: list[int] = []  # released slots below _high
        self._high = 0  # slots >= _high have never been handed out

    # ---------------------------------------------------------------- configuration / accounting

    @property
    def shapes(self) -> tuple[tuple[int, int], ...]:
        return self._shapes

    @property
    def max_streams(self) -> int:
        return self._max

    @property
    def reset_after(self) -> float:
        return self._reset_after

    @property
    def idle_ttl(self) -> float:
        return self._idle_ttl

    @property
    def capacity(self) -> int:
        return len(self._ids)

    @property
    def bytes_per_stream(self) -> int:
        """Array bytes per slot; the dict entry and id string (~100+ B) come on top."""
        return sum(4 * la * hi for la, hi in self._shapes) + 8 * len(_META)

    @property
    def nbytes(self) -> int:
        """Bytes held by the arrays at the current capacity (allocated, not only live)."""
        return sum(a.nbytes for a in self._states) + sum(a.nbytes for a in self._meta_arrays())

    def _meta_arrays(self) -> tuple[np.ndarray, ...]:
        return (
            self._last_ts,
            self._last_value,
            self._last_pred,
            self._seen,
            self._last_used,
            self._spread,
            self._clipped,
        )

    # ---------------------------------------------------------------- read access (read-only views)

    @staticmethod
    def _ro(arr: np.ndarray) -> np.ndarray:
        view = arr.view()
        view.flags.writeable = False
        return view

    # The views index by slot. They are replaced when the store grows, so re-read them after an
    # acquire instead of holding on to one.
    @property
    def last_ts(self) -> np.ndarray:
        return self._ro(self._last_ts)

    @property
    def last_value(self) -> np.ndarray:
        return self._ro(self._last_value)

    @property
    def last_pred(self) -> np.ndarray:
        return self._ro(self._last_pred)

    @property
    def seen(self) -> np.ndarray:
        return self._ro(self._seen)

    @property
    def spread(self) -> np.ndarray:
        """Each stream's spread after its last reading (NaN: none yet, the model's start)."""
        return self._ro(self._spread)

    @property
    def clipped(self) -> np.ndarray:
        """1.0 where the stream's last reading entered the model clipped (model/clip.py);
        0 or NaN where it did not."""
        return self._ro(self._clipped)

    @property
    def last_used(self) -> np.ndarray:
        return self._ro(self._last_used)

    def __len__(self) -> int:
        return len(self._lru)

    def __contains__(self, stream: object) -> bool:
        return stream in self._lru

    def slot_of(self, stream: str) -> int | None:
        return self._lru.get(stream)

    def slots_of(self, streams: Sequence[str]) -> list[int | None]:
        """:meth:`slot_of` each of ``streams`` (one C-level pass)."""
        return list(map(self._lru.get, streams))

    def stream_of(self, slot: int) -> str | None:
        return self._ids[slot] if 0 <= slot < len(self._ids) else None

    def streams(self) -> Iterator[tuple[str, int]]:
        """Live ``(stream, slot)`` pairs, least recently used first.

        Iterates over a copy, so the caller may acquire or expire while walking it.
        """
        return iter(list(self._lru.items()))

    # ---------------------------------------------------------------- slots

    def acquire(self, stream: str, now: float) -> tuple[int, str | None]:
        """The stream's slot (created, zeroed, if new), marked as just used.

        When the store is full the least recently used stream is evicted first and its id
        returned, so the caller can count it. Touching here matters: streams of the wave being
        assembled are the most recent, so only a wave with more than ``max_streams`` distinct
        streams can evict one of its own (the caller must then drop that reading).
        """
        slot = self._lru.get(stream)
        if slot is not None:
            self._lru.move_to_end(stream)
            self._last_used[slot] = now
            return slot, None
        evicted: str | None = None
        if len(self._lru) >= self._max:
            evicted, freed = self._lru.popitem(last=False)
            self._release(freed)
        slot = self._allocate()
        self._clear(slot)
        self._lru[stream] = slot
        self._ids[slot] = stream
        self._last_used[slot] = now
        return slot, evicted

    def acquire_many(
        self, streams: Sequence[str], now: float, known: Sequence[int | None] | None = None
    ) -> tuple[list[int], list[str]]:
        """:meth:`acquire` each of ``streams`` in order: their slots, and the streams evicted to
        make room, oldest first. One call per micro-batch: the live streams (nearly all of them)
        cost a dict lookup and an LRU move each, and their last-used times one array write.
        ``known``: :meth:`slots_of` the same streams, just read; when every one is live, the
        moves are one C-level pass."""
        if known is not None and streams and None not in known:
            deque(map(self._lru.move_to_end, streams), maxlen=0)
            live = cast(list[int], list(known))  # no None in it
            self._last_used[np.asarray(live, dtype=np.intp)] = now
            return live, []
        lru = self._lru
        get = lru.get
        move = lru.move_to_end
        slots: list[int] = []
        evicted: list[str] = []
        for stream in streams:
            slot = get(stream)
            if slot is None:
                slot, gone = self.acquire(stream, now)
                if gone is not None:
                    evicted.append(gone)
            else:
                move(stream)
            slots.append(slot)
        if slots:
            self._last_used[np.asarray(slots, dtype=np.intp)] = now
        return slots, evicted

    def touch(self, slot: int, now: float) -> None:
        """Mark a live slot as used without stepping it (e.g. a dropped duplicate)."""
        self._lru.move_to_end(self._live(slot))
        self._last_used[slot] = now

    def discard(self, stream: str) -> bool:
        """Forget a stream; False if it was not live."""
        slot = self._lru.pop(stream, None)
        if slot is None:
            return False
        self._release(slot)
        return True

    def expire(self, now: float) -> list[str]:
        """Remove streams idle for more than ``idle_ttl``; returns their ids, oldest first.

        Only the front of the LRU order is visited, so the cost is the number expired.
        """
        if self._idle_ttl <= 0:
            return []
        gone: list[str] = []
        limit = now - self._idle_ttl
        while self._lru:
            stream, slot = next(iter(self._lru.items()))
            if self._last_used[slot] >= limit:
                break
            self._lru.popitem(last=False)
            self._release(slot)
            gone.append(stream)
        return gone

    def _live(self, slot: int) -> str:
        stream = self._ids[slot]
        if stream is None:
            raise ValueError(f"slot {slot} holds no stream")
        return stream

    def _release(self, slot: int) -> None:
        self._ids[slot] = None
        self._free.append(slot)

    def _allocate(self) -> int:
        if self._free:
            return self._free.pop()
        if self._high == len(self._ids):
            self._grow(min(max(2 * len(self._ids), 1), self._max))
        slot = self._high
        self._high += 1
        return slot

    def _grow(self, cap: int) -> None:
        """Double by copy: amortised O(1) per stream, and gathers stay on one array."""
        old = len(self._ids)
        for i, arr in enumerate(self._states):
            new = np.zeros((arr.shape[0], cap, arr.shape[2]), dtype=np.float32)
            new[:, :old, :] = arr
            self._states[i] = new

        def widen(arr: np.ndarray, fill: float) -> np.ndarray:
            new = np.full(cap, fill, dtype=arr.dtype)
            new[:old] = arr
            return new

        self._last_ts = widen(self._last_ts, np.nan)
        self._last_value = widen(self._last_value, np.nan)
        self._last_pred = widen(self._last_pred, np.nan)
        self._seen = widen(self._seen, 0)
        self._last_used = widen(self._last_used, 0.0)
        self._spread = widen(self._spread, np.nan)
        self._clipped = widen(self._clipped, np.nan)
        self._ids.extend([None] * (cap - old))

    def _clear(self, slot: int) -> None:
        for arr in self._states:
            arr[:, slot, :] = 0.0
        self._last_ts[slot] = np.nan
        self._last_value[slot] = np.nan
        self._last_pred[slot] = np.nan
        self._seen[slot] = 0
        self._spread[slot] = np.nan
        self._clipped[slot] = np.nan

    def reset(self, slot: int) -> None:
        """Start the stream over from a zero state; its mapping and LRU position stay."""
        self._live(slot)
        self._clear(slot)

    # ---------------------------------------------------------------- decisions

    def check(self, slot: int, ts: float) -> Verdict:
        """Decide what to do with a reading stamped ``ts`` (finite; the codec rejects others)."""
        last = float(self._last_ts[slot])
        if last != last:  # NaN: nothing stepped since the stream started or was reset
            return Verdict.STEP
        if ts == last:
            return Verdict.DUPLICATE
        if ts < last:
            return Verdict.OUT_OF_ORDER
        if self._reset_after > 0 and ts - last > self._reset_after:
            return Verdict.RESET
        return Verdict.STEP

    def check_many(self, slots: np.ndarray, ts: np.ndarray) -> np.ndarray:
        """:meth:`check` for a wave at once: ``[B]`` int8 of :class:`Verdict` values."""
        idx = np.asarray(slots, dtype=np.intp)
        t = np.asarray(ts, dtype=np.float64)
        last = self._last_ts[idx]
        known = ~np.isnan(last)
        out = np.zeros(idx.shape[0], dtype=np.int8)
        if self._reset_after > 0:
            out[known & (t - last > self._reset_after)] = Verdict.RESET
        out[known & (t == last)] = Verdict.DUPLICATE
        out[known & (t < last)] = Verdict.OUT_OF_ORDER
        return out

    # ---------------------------------------------------------------- batch state

    def gather(self, slots: np.ndarray) -> tuple[np.ndarray, ...]:
        """States for a wave, each a fresh contiguous ``[L, B, H]`` float32 copy.

        ``np.take`` along axis 1 is contiguous and ~4× faster than ``arr[:, slots, :]``, whose
        result comes back with non-C strides.
        """
        idx = np.asarray(slots, dtype=np.intp)
        return tuple(np.take(arr, idx, axis=1) for arr in self._states)

    def scatter(
        self, slots: np.ndarray, states: Sequence[np.ndarray], ok: np.ndarray | None = None
    ) -> None:
        """Store a wave's new states; rows where ``ok`` is False keep their old state.

        Slots in one call must be distinct (one reading per stream per wave). Pass
        ``ok=finite_rows(states)`` (possibly and-ed with other checks) so a non-finite state is
        never stored.
        """
        idx = np.asarray(slots, dtype=np.intp)
        if len(states) != len(self._states):
            raise ValueError(f"expected {len(self._states)} state tensors, got {len(states)}")
        for (la, hi), new in zip(self._shapes, states, strict=True):
            if new.shape != (la, idx.shape[0], hi):
                raise ValueError(f"state shape {new.shape} != {(la, idx.shape[0], hi)}")
        if ok is not None:
            mask = np.asarray(ok, dtype=bool)
            if mask.shape != idx.shape:
                raise ValueError(f"ok mask shape {mask.shape} != slots shape {idx.shape}")
            if not mask.all():
                idx = idx[mask]
                states = [new[:, mask, :] for new in states]
        # Layer by layer: ~1.5-2× faster than one arr[:, idx, :] = new assignment.
        for arr, new in zip(self._states, states, strict=True):
            for layer in range(arr.shape[0]):
                arr[layer][idx] = new[layer]

    def record(
        self,
        slots: np.ndarray,
        ts: np.ndarray,
        values: np.ndarray,
        preds: np.ndarray,
        now: float,
        spreads: np.ndarray | None = None,
        clipped: np.ndarray | None = None,
    ) -> None:
        """Bookkeeping after a wave was stepped (distinct slots, all live); ``spreads``: the
        streams' spreads after these readings, when the model's interval follows them;
        ``clipped``: whether each reading entered the model clipped, when the model clips."""
        idx = np.asarray(slots, dtype=np.intp)
        self._last_ts[idx] = ts
        self._last_value[idx] = values
        self._last_pred[idx] = preds
        if spreads is not None:
            self._spread[idx] = spreads
        if clipped is not None:
            self._clipped[idx] = clipped
        self._seen[idx] += 1
        self._last_used[idx] = now
        move = self._lru.move_to_end
        ids = self._ids
        for slot in idx.tolist():
            stream = ids[slot]
            if stream is None:
                raise ValueError(f"slot {slot} holds no stream")
            move(stream)

    def record_runs(
        self,
        slots: np.ndarray,
        counts: np.ndarray,
        ts: np.ndarray,
        values: np.ndarray,
        preds: np.ndarray,
        now: float,
        spreads: np.ndarray | None = None,
        clipped: np.ndarray | None = None,
    ) -> None:
        """:meth:`record` for several readings per stream at once (distinct live slots):
        ``counts[k]`` readings of slot ``k`` were stepped, ``ts``/``values``/``preds``/``spreads``
        are those of its last one. Unlike :meth:`record` it leaves the LRU order to the caller
        (:meth:`touch`), who knows the order the readings came in."""
        idx = np.asarray(slots, dtype=np.intp)
        self._last_ts[idx] = ts
        self._last_value[idx] = values
        self._last_pred[idx] = preds
        if spreads is not None:
            self._spread[idx] = spreads
        if clipped is not None:
            self._clipped[idx] = clipped
        self._seen[idx] += np.asarray(counts, dtype=np.int64)
        self._last_used[idx] = now

    def lru_front(self, count: int) -> list[str]:
        """The ``count`` least recently used streams, the next to be evicted first."""
        out: list[str] = []
        for stream in self._lru:
            if len(out) >= count:
                break
            out.append(stream)
        return out

    # ---------------------------------------------------------------- snapshots

    def snapshot(
        self,
        path: Path,
        bundle_sha256: str,
        *,
        created: float | None = None,
        journal_seq: int | None = None,
        recent_ids: list[str] | None = None,
        recent: Mapping[str, np.ndarray] | None = None,
    ) -> int:
        """Write the live streams to ``path`` atomically (see ``snapshot.write_snapshot``);
        returns the bytes written. OSError propagates, the previous file stays whole.

        ``journal_seq`` (the last journal record these states include) and ``recent`` (the
        engine's recent predictions) travel in the same file, so they can never disagree with
        the states. The live rows are gathered a chunk at a time as they are written
        (:class:`~forecaster.serve.snapshot.Rows`), not copied out first, so a snapshot costs
        little memory beyond the states; at 1M LSTM 2×64 streams the call takes seconds,
        mostly writing and fsyncing ~1 GB.
        """
        ids = list(self._lru)  # LRU order: restoring in file order keeps it
        slots = np.fromiter(self._lru.values(), dtype=np.intp, count=len(ids))
        arrays: dict[str, np.ndarray | Rows] = {}
        for i, arr in enumerate(self._states):
            arrays[f"state{i}"] = Rows(arr, slots)
        for name, arr in zip(_META, self._meta_arrays(), strict=True):
            arrays[name] = Rows(arr, slots)
        return write_snapshot(
            Path(path),
            bundle_sha256,
            self._shapes,
            ids,
            arrays,
            journal_seq=journal_seq,
            recent_ids=recent_ids,
            recent=recent,
            created=created,
        )

    @classmethod
    def restore(
        cls,
        path: Path,
        bundle_sha256: str,
        shapes: Sequence[tuple[int, int]],
        max_streams: int,
        reset_after: float = 0.0,
        idle_ttl: float = 0.0,
        *,
        now: float | None = None,
    ) -> StateStore:
        """Load a snapshot for this model, or raise :class:`SnapshotError`.

        LRU order and all metadata survive. With more streams than ``max_streams`` the most
        recently used are kept. ``now`` (the caller's clock at start) shifts ``last_used`` so the
        most recent stream reads ``now`` and the others keep their idle ages: downtime does not
        count as idleness, and a monotonic clock from another boot cannot confuse the TTL.
        """
        want = _check_shapes(shapes)
        data = load_snapshot(Path(path), bundle_sha256, want)
        return cls.from_data(data, want, max_streams, reset_after, idle_ttl, now=now)

    @classmethod
    def from_data(
        cls,
        data: SnapshotData,
        shapes: Sequence[tuple[int, int]],
        max_streams: int,
        reset_after: float = 0.0,
        idle_ttl: float = 0.0,
        *,
        now: float | None = None,
    ) -> StateStore:
        """A store holding a validated snapshot's streams (see :meth:`restore`)."""
        want = _check_shapes(shapes)
        n_file = len(data.ids)
        keep = slice(max(0, n_file - int(max_streams)), n_file)  # file order is LRU order
        ids: list[str] = data.ids[keep]
        n = len(ids)
        store = cls(want, max_streams, reset_after, idle_ttl, initial_capacity=max(n, 1024))
        for i in range(len(want)):
            store._states[i][:, :n, :] = data.arrays[f"state{i}"][:, keep, :]
        for name, arr in zip(_META, store._meta_arrays(), strict=True):
            arr[:n] = data.arrays[name][keep]
        if now is not None and n:
            store._last_used[:n] += now - store._last_used[:n].max()
        store._lru = OrderedDict(zip(ids, range(n), strict=True))
        store._ids[:n] = ids
        store._high = n
        return store

    @classmethod
    def restore_latest(
        cls,
        path: Path,
        bundle_sha256: str,
        shapes: Sequence[tuple[int, int]],
        max_streams: int,
        reset_after: float = 0.0,
        idle_ttl: float = 0.0,
        *,
        now: float | None = None,
    ) -> tuple[StateStore, str]:
        """:meth:`restore` from ``path``, else from its ``.prev`` generation.

        Returns the store and the path (as str) it came from; compare with ``str(path)`` to tell
        a fallback. When neither loads, the newest file's error is raised, so a missing snapshot
        reads "missing" and a new bundle reads "foreign". The fallback is taken for any failure,
        including "foreign": after rolling a model back, ``.prev`` may be that model's last state.
        """
        path = Path(path)
        args = (bundle_sha256, shapes, max_streams, reset_after, idle_ttl)
        try:
            return cls.restore(path, *args, now=now), str(path)
        except SnapshotError as newest:
            prev = previous_path(path)
            try:
                store = cls.restore(prev, *args, now=now)
            except SnapshotError:
                raise newest from None
            log.warning("snapshot %s unusable (%s); restored %s instead", path, newest, prev)
            return store, str(prev)
