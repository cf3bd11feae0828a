"""The recent-predictions cache: a redelivered reading gets the prediction it had the first time.

Why: after a crash the broker redelivers every reading not yet acknowledged, and readings whose
effect a restored state already holds would otherwise be dropped as duplicates without a
prediction. Looking them up here answers them with the original prediction. The bound is the
number of readings that can be stepped but unacknowledged at once (see ``recent_predictions`` in
the configuration); ~250 bytes per entry.

Why it is lazy: the cache is written for every stepped reading and read almost never (after a
reconnect or a crash, or for a producer's resend). Kept exact on every put, a dict keyed by
``(stream, ts)`` plus its eviction order cost 1.5 µs per reading on gateway batches, a fifth of
the inference worker's own cost (``python -m benchmarks.worker``). So a batch whose every key is
newer than anything cached for its stream is only appended, as a chunk, and ``_newest`` (per
stream, an upper bound of the ``ts`` of every entry held) answers "could any of these readings be
cached?" with one dictionary lookup per reading. Only a reading that could be (its ``ts`` not
newer than its stream's bound) makes the cache exact: the chunks are put into the dict in order,
as they would have been one by one, and it is looked up as before. Chunks that enough newer
entries have pushed beyond the capacity are dropped whole. What the cache answers, holds, evicts
and snapshots is the same as for a dict kept exact on every put
(``tests/unit/test_engine.py`` compares the two on random puts and probes).

Entries are the :class:`Prediction` objects themselves, which hold only strings and numbers and
are never tracked by the garbage collector (see :class:`~forecaster.serve.codec.Reading`); keys
and chunks are tuples of strings, floats and predictions, which the collector stops tracking the
first time it sees them. A gateway batch's predictions arrive as the engine's columns
(``serve/columns.py``); their chunk keeps the column arrays only, and the predictions are made
from them if the cache is ever read. A filling cache so costs one cheap young-generation pass
per entry and nothing after, where tens of thousands of tracked objects promoted through every
generation made 30-60 ms pauses that the readings in flight waited behind.
"""

from __future__ import annotations

import operator
from collections import deque
from collections.abc import Iterator, Sequence
from itertools import repeat
from operator import itemgetter
from typing import NamedTuple

import numpy as np

from forecaster.serve.codec import LOWER_OF, UPPER_OF, VALUE_OF, WARM_OF, Prediction
from forecaster.serve.columns import PredictionColumns

__all__ = ["WARM_FLAG", "Columns", "RecentPredictions"]

#: Bit of the snapshot's ``recent_flags`` column: the prediction was warm.
WARM_FLAG = 1

_NEVER = -float("inf")
_FIRST, _SECOND = itemgetter(0), itemgetter(1)

Key = tuple[str, float]


class Columns(NamedTuple):
    """The snapshot's columns of predictions put in one call, when the caller has them as
    arrays: value, warm, lower and upper (NaN where a prediction has no bound)."""

    value: np.ndarray
    warm: np.ndarray
    lower: np.ndarray
    upper: np.ndarray


#: Predictions put in one call, not yet in the dict: their streams and ts; the predictions, or
#: None when they are the engine's :class:`PredictionColumns`, which are made again from the
#: columns only if the cache is read; their columns when the caller gave them (a snapshot then
#: reads no prediction one by one); and, to make them from the columns, the event threshold and
#: whether they carry bounds. Everything in a chunk is a plain tuple, a string, a number or an
#: array: the garbage collector stops tracking such tuples the first time it sees them, where
#: the columns object (or a :class:`Columns`, a tuple subclass) would stay tracked for as long
#: as the chunk is held, and every tracked object that survives brings the next collection
#: closer (see ``serve/gcsettings.py``).
Chunk = tuple[
    tuple[str, ...],
    tuple[float, ...],
    tuple[Prediction, ...] | None,
    tuple[np.ndarray, ...] | None,
    float | None,
    bool,
]


class RecentPredictions:
    """The last ``capacity`` predictions, by ``(stream, ts)``, oldest evicted first."""

    #: Stale copies of keys in the deque beyond which (and beyond the entries) it is rebuilt.
    COMPACT_AT = 1024
    #: Streams in ``_newest`` beyond twice the capacity before it is rebuilt from the entries.
    NEWEST_SLACK = 1024

    def __init__(self, capacity: int) -> None:
        if capacity < 0:
            raise ValueError(f"capacity must be >= 0, got {capacity}")
        self.capacity = int(capacity)
        # The exact part: the entries, and their keys oldest first. A plain dict and a deque
        # take and evict an entry in about 0.25 µs, an OrderedDict in 0.6 (measured with 65,536
        # entries). A key put again is appended again; ``_stale`` counts its older copies still
        # in the deque, which eviction and :meth:`keys` skip.
        self._map: dict[Key, Prediction] = {}
        self._order: deque[Key] = deque()
        self._stale: dict[Key, int] = {}
        self._stale_total = 0
        # The lazy part: chunks put after everything in the exact part, each key new (see the
        # module docstring), and per stream a bound of every held entry's ts.
        self._pending: deque[Chunk] = deque()
        self._pending_n = 0
        self._newest: dict[str, float] = {}

    def __len__(self) -> int:
        # Pending keys are distinct from each other and from the dict's (that is what lets
        # them wait), so this is the exact count.
        return min(self.capacity, len(self._map) + self._pending_n)

    def get(self, stream: str, ts: float) -> Prediction | None:
        if self._pending:
            self._flush()
        return self._map.get((stream, ts))

    def put(self, p: Prediction) -> None:
        """:meth:`put_many` of one prediction (the waves' and the replay's way)."""
        self.put_many((p,))

    def could_hold(self, streams: Sequence[str], ts: Sequence[float]) -> bool:
        """Whether any ``(streams[i], ts[i])`` may be cached: False when each ``ts[i]`` is newer
        than every entry held for its stream (one dict lookup per reading, no keys built)."""
        if not self._newest:
            return False
        bound = map(self._newest.get, streams, repeat(_NEVER))
        return any(map(operator.le, ts, bound))

    def holds_any(self, streams: Sequence[str], ts: Sequence[float]) -> bool:
        """Whether any ``(streams[i], ts[i])`` is cached; a batch of readings all newer than
        what is cached for their streams (nearly every one) is answered without a key."""
        if not self.could_hold(streams, ts):
            return False
        if self._pending:
            self._flush()
        return not self._map.keys().isdisjoint(zip(streams, ts, strict=True))

    def put_many(
        self,
        preds: Sequence[Prediction],
        streams: Sequence[str] | None = None,
        ts: Sequence[float] | None = None,
        columns: Columns | None = None,
        *,
        new: bool = False,
    ) -> None:
        """Put each of ``preds`` in order, as the newest entry (an entry already there moves
        to the newest end), then evict the oldest beyond the capacity. ``streams``, ``ts`` and
        ``columns``, when the caller has them, are the predictions' own (``p.stream``,
        ``p.ts``, ...; the arrays are kept, and must not change). ``new``: the caller knows the
        keys are distinct, each stream's ``ts`` rising, and :meth:`could_hold` said False of
        them with no put since (the engine checks that once per batch, before stepping)."""
        if self.capacity == 0 or not preds:
            return
        if streams is None or ts is None:
            streams = [p.stream for p in preds]
            ts = [p.ts for p in preds]
        if new or (self._distinct(streams, ts) and not self.could_hold(streams, ts)):
            # Every key new: appended as it is, the dict catches up only if ever read.
            plain = None if columns is None else tuple(columns)  # an exact tuple
            if isinstance(preds, PredictionColumns) and plain is not None:
                chunk: Chunk = (
                    tuple(streams),
                    tuple(ts),
                    None,
                    plain,
                    preds.threshold,
                    preds.shape == "interval",
                )
            else:
                chunk = (tuple(streams), tuple(ts), tuple(preds), plain, None, False)
            self._pending.append(chunk)
            self._pending_n += len(preds)
            self._newest.update(zip(streams, ts, strict=True))  # each above its bound
            self._trim()
            return
        if self._pending:
            self._flush()
        keys = list(zip(streams, ts, strict=True))
        newest = self._newest
        for s, t in keys:
            if t > newest.get(s, _NEVER):
                newest[s] = t
        self._put_exact(keys, preds)
        if len(newest) > 2 * self.capacity + self.NEWEST_SLACK:
            self._rebuild_newest()

    @staticmethod
    def _distinct(streams: Sequence[str], ts: Sequence[float]) -> bool:
        """The keys of one call are distinct and each stream's ``ts`` rise in call order, so
        the last ``ts`` of a stream is its largest. Cheap for the engine's usual calls: every
        reading its own stream's (a set), or one stream's run (an array)."""
        n = len(streams)
        if n == 1 or len(set(streams)) == n:
            return True
        if streams.count(streams[0]) == n:
            return bool(np.all(np.diff(np.asarray(ts, dtype=np.float64)) > 0))
        last: dict[str, float] = {}
        for s, t in zip(streams, ts, strict=True):
            if not t > last.get(s, _NEVER):
                return False
            last[s] = t
        return True

    def _trim(self) -> None:
        """Drop what newer pending entries have pushed beyond the capacity, whole chunks at a
        time; the exact part goes first (its entries are older than every pending one)."""
        if self._pending_n < self.capacity:
            return
        if self._map:
            self._clear_exact()
        pending = self._pending
        while self._pending_n - len(pending[0][0]) >= self.capacity:
            self._pending_n -= len(pending.popleft()[0])
        if len(self._newest) > 2 * self.capacity + self.NEWEST_SLACK:
            self._rebuild_newest()

    def _flush(self) -> None:
        """Put the pending chunks into the dict, oldest first, as puts one by one would."""
        pending, self._pending = self._pending, deque()
        skip = max(0, self._pending_n - self.capacity)  # evicted by the chunks after them
        self._pending_n = 0
        for chunk in pending:
            streams, ts = chunk[0], chunk[1]
            if skip >= len(streams):
                skip -= len(streams)
                continue
            preds = _predictions(chunk)
            self._put_exact(list(zip(streams[skip:], ts[skip:], strict=True)), preds[skip:])
            skip = 0

    def _rebuild_newest(self) -> None:
        """``_newest`` for the streams held now only (it grows with every stream ever seen)."""
        newest: dict[str, float] = {}
        for s, t in self._map:
            if t > newest.get(s, _NEVER):
                newest[s] = t
        for streams, ts, *_ in self._pending:  # each ts above every earlier one of its stream
            newest.update(zip(streams, ts, strict=True))
        self._newest = newest

    def _put_exact(self, keys: list[Key], preds: Sequence[Prediction]) -> None:
        m, order = self._map, self._order
        fresh = m.keys().isdisjoint(keys)
        present = set() if fresh else {k for k in keys if k in m}
        before = len(m)
        m.update(zip(keys, preds, strict=True))
        order.extend(keys)
        if not fresh or len(m) - before != len(keys):
            # Puts again (a replay, or a key twice in one call): older copies are now stale.
            stale = self._stale
            seen: set[Key] = set()
            for k in keys:
                if k in seen or k in present:
                    stale[k] = stale.get(k, 0) + 1
                    self._stale_total += 1
                seen.add(k)
        pop = order.popleft
        if not self._stale:
            for _ in range(len(m) - self.capacity):
                del m[pop()]
        while len(m) > self.capacity:
            self._drop(pop())
        if self._stale_total > max(len(m), self.COMPACT_AT):
            self._order = deque(self._exact_keys())
            self._stale.clear()
            self._stale_total = 0

    def _drop(self, key: Key) -> None:
        """Evict the entry of the oldest copy ``key`` in the deque, unless the copy is stale."""
        n = self._stale.get(key) if self._stale else None
        if n:
            if n == 1:
                del self._stale[key]
            else:
                self._stale[key] = n - 1
            self._stale_total -= 1
        else:
            del self._map[key]

    def keys(self) -> list[Key]:
        """The cached keys, oldest first (each once, where it was last put)."""
        streams, ts, _ = self._parts()
        return list(zip(streams, ts, strict=True))[self._evicted() :]

    def _evicted(self) -> int:
        # Pending keys are new: beyond the capacity, the oldest entries of the two parts go.
        return max(0, len(self._map) + self._pending_n - self.capacity)

    def _parts(self) -> tuple[list[str], list[float], list[Columns]]:
        """Every entry's stream and ts, and their snapshot columns in parts, oldest first,
        read where they are: the dict's entries, then the pending chunks' (a snapshot must not
        pay for making the dict exact: ~30 ms at 65,536 entries). Entries beyond the
        capacity (:meth:`_evicted`) are still in."""
        keys = self._exact_keys()
        streams = list(map(_FIRST, keys))
        ts = list(map(_SECOND, keys))
        parts = [_columns_of(list(map(self._map.__getitem__, keys)))]
        for chunk in self._pending:
            streams.extend(chunk[0])
            ts.extend(chunk[1])
            columns = chunk[3]
            parts.append(
                _columns_of(_predictions(chunk)) if columns is None else Columns._make(columns)
            )
        return streams, ts, parts

    def _exact_keys(self) -> list[Key]:
        if not self._stale:
            return list(self._order)
        skip = dict(self._stale)
        out: list[Key] = []
        for k in self._order:
            n = skip.get(k)
            if n:
                skip[k] = n - 1
            else:
                out.append(k)
        return out

    def _clear_exact(self) -> None:
        self._map.clear()
        self._order.clear()
        self._stale.clear()
        self._stale_total = 0

    def clear(self) -> None:
        self._clear_exact()
        self._pending.clear()
        self._pending_n = 0
        self._newest.clear()

    def to_arrays(self) -> tuple[list[str], dict[str, np.ndarray]]:
        """Column arrays for the snapshot file, oldest first."""
        streams, ts, parts = self._parts()
        skip = self._evicted()
        value, warm, lower, upper = (np.concatenate(c)[skip:] for c in zip(*parts, strict=True))
        arrays: dict[str, np.ndarray] = {
            "recent_ts": np.array(ts[skip:], dtype=np.float64).reshape(len(streams) - skip),
            "recent_value": value.astype(np.float64),
            "recent_flags": np.where(warm, WARM_FLAG, 0).astype(np.uint8),
            "recent_lower": lower.astype(np.float64),
            "recent_upper": upper.astype(np.float64),
        }
        return streams[skip:], arrays


def _predictions(chunk: Chunk) -> Sequence[Prediction]:
    """A chunk's predictions: as put, or made from its columns (the engine's, see ``Chunk``)."""
    streams, ts, preds, columns, threshold, bounded = chunk
    if preds is not None:
        return preds
    if columns is None:
        raise ValueError("a chunk without predictions must hold their columns")
    value, warm, lower, upper = columns
    return PredictionColumns(
        streams,
        ts,
        value.tolist(),
        warm.tolist(),
        lower=lower.tolist() if bounded else None,
        upper=upper.tolist() if bounded else None,
        threshold=threshold,
    )


def _columns_of(preds: Sequence[Prediction]) -> Columns:
    """The snapshot's columns of ``preds``, read one prediction at a time."""
    n = len(preds)
    return Columns(
        np.fromiter(map(VALUE_OF, preds), dtype=np.float64, count=n),
        np.fromiter(map(WARM_OF, preds), dtype=bool, count=n),
        _bounds(map(LOWER_OF, preds), n),
        _bounds(map(UPPER_OF, preds), n),
    )


def _bounds(values: Iterator[float | None], n: int) -> np.ndarray:
    """A bound per entry, NaN where a prediction has none."""
    out = list(values)
    if out.count(None):
        return np.fromiter((np.nan if v is None else v for v in out), dtype=np.float64, count=n)
    return np.array(out, dtype=np.float64).reshape(n)
