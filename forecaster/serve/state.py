"""Per-stream recurrent state: stream id → slot, states in the layout the ONNX graph takes.

Each state tensor lives in one preallocated float32 array ``[L, capacity, H]``. A micro-batch
gather is ``np.take(arr, slots, axis=1)``, already the contiguous ``[L, B, H]`` the graph wants:
storing ``[capacity, L, H]`` instead would cost a transpose per call (1.4 ms at B=4096, see
ARCHITECTURE-NOTES §8). Per-slot metadata sits in parallel 1-D arrays so the batcher can read and
write it for a whole wave with one fancy-index operation.

Stream ids map to slots through an ``OrderedDict`` kept in least-recently-used order, so both LRU
eviction (``max_streams`` reached) and TTL expiry look only at the front of it: a flood of new
topics costs O(1) per topic, never a scan of every stream.

The store is not thread-safe and is meant to be owned by the one inference thread. Slots are only
valid until the next call that can free one (:meth:`acquire` when full, :meth:`expire`,
:meth:`discard`): acquire every stream of a wave, then gather/step/scatter/record, then expire.

Snapshots are ``.npz`` files without pickles (``np.load(allow_pickle=False)`` reads them), tied to
the model by its sha256 and written atomically with the previous generation kept beside them.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import time
import zipfile
import zlib
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from enum import IntEnum
from pathlib import Path
from typing import Any, Literal

import numpy as np

from forecaster.errors import ForecasterError

__all__ = [
    "SNAPSHOT_VERSION",
    "SnapshotError",
    "StateStore",
    "Verdict",
    "finite_rows",
    "previous_path",
]

log = logging.getLogger(__name__)

SNAPSHOT_VERSION = 1
_SNAPSHOT_FORMAT = "forecaster-state"
_META = ("last_ts", "last_value", "last_pred", "seen", "last_used")
# Exceptions np.load and zipfile raise for files that are not what they claim to be. A damaged
# header can claim a newer zip version or an unknown compression method (NotImplementedError) or
# an encrypted member (RuntimeError): found by tests/faults/test_fuzz.py.
_LOAD_ERRORS = (
    OSError,
    ValueError,
    KeyError,
    EOFError,
    MemoryError,
    NotImplementedError,
    RuntimeError,
    zipfile.BadZipFile,
    zlib.error,
)

SnapshotReason = Literal["missing", "corrupt", "foreign"]


class Verdict(IntEnum):
    """What to do with one reading, given the stream's last event time."""

    STEP = 0
    RESET = 1  # event-time gap > reset_after: zero the state, then step (reset reason "gap")
    DUPLICATE = 2  # ts == last_ts: drop
    OUT_OF_ORDER = 3  # ts < last_ts: drop


class SnapshotError(ForecasterError):
    """A snapshot cannot be used; ``reason`` lets the daemon tell a first start from damage.

    ``missing``: no file. ``corrupt``: unreadable, truncated, malformed or non-finite content.
    ``foreign``: a sound file written for another model (bundle sha256 or state shapes differ),
    the normal outcome after deploying a new bundle.
    """

    def __init__(self, message: str, *, reason: SnapshotReason, path: Path) -> None:
        super().__init__(message)
        self.reason: SnapshotReason = reason
        self.path = path


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


def previous_path(path: Path) -> Path:
    """Where the generation before ``path`` is kept."""
    return path.with_name(path.name + ".prev")


def _tmp_path(path: Path) -> Path:
    # A fixed name, so a temp file left by a crash is overwritten by the next snapshot.
    return path.with_name(path.name + ".tmp")


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
        return (self._last_ts, self._last_value, self._last_pred, self._seen, self._last_used)

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
    def last_used(self) -> np.ndarray:
        return self._ro(self._last_used)

    def __len__(self) -> int:
        return len(self._lru)

    def __contains__(self, stream: object) -> bool:
        return stream in self._lru

    def slot_of(self, stream: str) -> int | None:
        return self._lru.get(stream)

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
        self._ids.extend([None] * (cap - old))

    def _clear(self, slot: int) -> None:
        for arr in self._states:
            arr[:, slot, :] = 0.0
        self._last_ts[slot] = np.nan
        self._last_value[slot] = np.nan
        self._last_pred[slot] = np.nan
        self._seen[slot] = 0

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
    ) -> None:
        """Bookkeeping after a wave was stepped (distinct slots, all live)."""
        idx = np.asarray(slots, dtype=np.intp)
        self._last_ts[idx] = ts
        self._last_value[idx] = values
        self._last_pred[idx] = preds
        self._seen[idx] += 1
        self._last_used[idx] = now
        move = self._lru.move_to_end
        ids = self._ids
        for slot in idx.tolist():
            stream = ids[slot]
            if stream is None:
                raise ValueError(f"slot {slot} holds no stream")
            move(stream)

    # ---------------------------------------------------------------- snapshots

    def snapshot(self, path: Path, bundle_sha256: str, *, created: float | None = None) -> int:
        """Write the live streams to ``path`` atomically; returns the bytes written.

        Order: write ``<path>.tmp`` and fsync it; hard-link the current ``path`` to
        ``<path>.prev`` (via a temp link and a rename, so ``.prev`` is always whole); rename the
        temp file onto ``path``; fsync the directory. At every instant ``path`` is a complete
        snapshot (old or new). Where hard links are not supported the old file is renamed to
        ``.prev`` instead, and between the two renames only ``.prev`` exists — which is what
        :meth:`restore_latest` falls back to. OSError propagates; the temp file is removed.

        The live rows are copied out first (as much memory again as the live state), and at 1M
        LSTM 2×64 streams the whole call takes seconds, mostly writing and fsyncing ~1 GB.
        """
        path = Path(path)
        live = list(self._lru.items())  # LRU order: restoring in file order keeps it
        slots = np.fromiter((s for _, s in live), dtype=np.intp, count=len(live))
        header = {
            "format": _SNAPSHOT_FORMAT,
            "version": SNAPSHOT_VERSION,
            "bundle_sha256": bundle_sha256,
            "shapes": [list(s) for s in self._shapes],
            "count": len(live),
            "created": time.time() if created is None else created,
        }
        arrays: dict[str, Any] = {  # Any: the numpy stub types savez(**kwds) as its flags
            "header": _json_bytes(header),
            "ids": _json_bytes([stream for stream, _ in live]),
        }
        for i, arr in enumerate(self._states):
            arrays[f"state{i}"] = np.take(arr, slots, axis=1)
        for name, arr in zip(_META, self._meta_arrays(), strict=True):
            arrays[name] = arr[slots]

        tmp = _tmp_path(path)
        try:
            with tmp.open("wb") as fh:
                np.savez(fh, **arrays)
                fh.flush()
                os.fsync(fh.fileno())
                size = fh.tell()
            _keep_previous(path)
            os.replace(tmp, path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        _fsync_dir(path.parent)
        return size

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
        path = Path(path)
        want = _check_shapes(shapes)
        data = _load_snapshot(path, bundle_sha256, want)
        n_file = len(data["ids"])
        keep = slice(max(0, n_file - int(max_streams)), n_file)  # file order is LRU order
        ids: list[str] = data["ids"][keep]
        n = len(ids)
        store = cls(want, max_streams, reset_after, idle_ttl, initial_capacity=max(n, 1024))
        for i in range(len(want)):
            store._states[i][:, :n, :] = data[f"state{i}"][:, keep, :]
        for name, arr in zip(_META, store._meta_arrays(), strict=True):
            arr[:n] = data[name][keep]
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


# -------------------------------------------------------------------- snapshot file helpers


def _json_bytes(obj: Any) -> np.ndarray:
    # uint8 rather than a str/object array: object arrays would need pickle to load.
    return np.frombuffer(json.dumps(obj, ensure_ascii=False).encode("utf-8"), dtype=np.uint8)


def _json_from(arr: np.ndarray) -> Any:
    if arr.dtype != np.uint8 or arr.ndim != 1:
        raise ValueError(f"expected 1-D uint8 JSON bytes, got {arr.dtype} {arr.shape}")
    return json.loads(arr.tobytes().decode("utf-8"))


def _keep_previous(path: Path) -> None:
    prev = previous_path(path)
    link = prev.with_name(prev.name + ".tmp")
    link.unlink(missing_ok=True)
    try:
        os.link(path, link)
    except FileNotFoundError:
        return  # first snapshot: no previous generation
    except OSError:
        # No hard links here (some network/FUSE filesystems): rename, accepting a short window
        # in which only .prev exists.
        if path.exists():
            os.replace(path, prev)
        return
    os.replace(link, prev)


def _fsync_dir(directory: Path) -> None:
    """Make the renames durable; without it a power cut can bring the old directory entry back."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return  # not openable as a directory here (e.g. Windows); renames are still atomic
    try:
        # Some filesystems refuse fsync on a directory; the renames are done, nothing to undo.
        with contextlib.suppress(OSError):
            os.fsync(fd)
    finally:
        os.close(fd)


def _load_snapshot(
    path: Path, bundle_sha256: str, shapes: tuple[tuple[int, int], ...]
) -> dict[str, Any]:
    """Read and validate every array; all failures become :class:`SnapshotError`."""

    def fail(reason: SnapshotReason, why: str) -> SnapshotError:
        return SnapshotError(f"snapshot {path}: {why}", reason=reason, path=path)

    try:
        loaded = np.load(path, allow_pickle=False)
        if not isinstance(loaded, np.lib.npyio.NpzFile):
            raise ValueError("a bare .npy array, not an .npz archive")
        with loaded as npz:
            raw = {name: npz[name] for name in npz.files}
    except FileNotFoundError:
        raise fail("missing", "no such file") from None
    except _LOAD_ERRORS as exc:
        raise fail("corrupt", f"cannot be read ({type(exc).__name__}: {exc})") from None

    try:
        header = _json_from(raw["header"])
        if not isinstance(header, dict):
            raise ValueError("header is not a JSON object")
    except (KeyError, ValueError, UnicodeDecodeError) as exc:
        raise fail("corrupt", f"bad header ({exc})") from None
    if header.get("format") != _SNAPSHOT_FORMAT or header.get("version") != SNAPSHOT_VERSION:
        raise fail(
            "corrupt",
            f"format {header.get('format')!r} version {header.get('version')!r} is not "
            f"{_SNAPSHOT_FORMAT!r} version {SNAPSHOT_VERSION}",
        )
    if header.get("bundle_sha256") != bundle_sha256:
        got = str(header.get("bundle_sha256"))
        raise fail("foreign", f"written for bundle {got[:12]}…, not {bundle_sha256[:12]}…")
    if header.get("shapes") != [list(s) for s in shapes]:
        raise fail("foreign", f"state shapes {header.get('shapes')} != {[list(s) for s in shapes]}")

    try:
        ids = _json_from(raw["ids"])
    except (KeyError, ValueError, UnicodeDecodeError) as exc:
        raise fail("corrupt", f"bad stream ids ({exc})") from None
    if not isinstance(ids, list) or not all(isinstance(s, str) for s in ids):
        raise fail("corrupt", "stream ids are not a list of strings")
    n = len(ids)
    if header.get("count") != n or len(set(ids)) != n:
        raise fail("corrupt", f"{n} stream ids for a count of {header.get('count')} (or repeated)")

    expected: dict[str, tuple[tuple[int, ...], type[np.generic]]] = {
        f"state{i}": ((la, n, hi), np.float32) for i, (la, hi) in enumerate(shapes)
    }
    for name in _META:
        expected[name] = ((n,), np.int64 if name == "seen" else np.float64)
    out: dict[str, Any] = {"ids": ids}
    for name, (shape, dtype) in expected.items():
        arr = raw.get(name)
        if arr is None:
            raise fail("corrupt", f"array {name!r} is missing")
        if arr.shape != shape or arr.dtype != dtype:
            raise fail("corrupt", f"array {name!r} is {arr.dtype}{arr.shape}, not {shape}")
        out[name] = arr
    for i in range(len(shapes)):
        if not np.isfinite(out[f"state{i}"]).all():
            raise fail("corrupt", f"state{i} holds non-finite values")
    # NaN is meaningful metadata ("none yet"); infinities never are.
    for name in ("last_ts", "last_value", "last_pred"):
        if np.isinf(out[name]).any():
            raise fail("corrupt", f"{name} holds infinities")
    if not np.isfinite(out["last_used"]).all():
        raise fail("corrupt", "last_used holds non-finite values")
    if (out["seen"] < 0).any():
        raise fail("corrupt", "seen holds negative counts")
    return out
