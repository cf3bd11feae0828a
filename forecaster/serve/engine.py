"""Micro-batching: step many streams with one ONNX Runtime call, in order, per stream.

A micro-batch can hold several readings of one stream. They must be stepped one after the other
(each needs the state the previous one produced). With a sequence graph (bundle format 3) the
whole micro-batch is one padded ``[B, T, F]`` batch: one row per run of consecutive readings of
a stream (streams in first-seen order, each stream's readings in order), one ONNX call, and the
predictions scattered back to the readings (:meth:`Engine._step_sequence`). A rule that breaks a
stream's run mid-batch (a gap reset) starts a new row from a zero state in the same call; rows
of very different lengths are split into a few calls by length (:func:`length_groups`) so one
busy stream does not pad a thousand quiet ones. The rare batches whose outcome depends on the
model's intermediate results or on evictions among their own streams (a non-finite state, a
batch wider than ``max_streams``, the same reading twice with the recent cache on) are stepped
in *waves* instead, as format 1-2 bundles always are: wave k holds the k-th reading of every
stream in the batch, in arrival order, and is one gather, one ONNX call and one scatter. Both
paths apply the same per-reading rules and give the same outcome. A bundle that clips readings
far from their prediction (``model/clip.py``) clips a row's first reading before the call and
any later one before committing (``clip.settle``): the predictions after a clipped reading
depend on it. This module holds no I/O: the daemon feeds it readings and turns
the :class:`Outcome` into MQTT messages and metrics.

A window model (see ``window.py``) goes through the same waves: each reading is pushed into its
stream's buffer of the last W readings and the full buffers of a wave are run as one ``[B, W, F]``
call. A stream's first W−1 readings (after its start or a reset) only fill the buffer: they give
no prediction and count as nothing (neither a drop nor an error). An event classifier's
predictions carry a probability and an event, and labels that arrive with readings are counted as
true/false positives/negatives instead of regression errors.

Durability (see ``journal.py`` and docs/reliability.md): when a journal is attached, every
:meth:`Engine.step` appends the readings it was given and the predictions it made to the journal
*before it returns*, so before the caller can publish a prediction or acknowledge a reading.
:meth:`Engine.recover` rebuilds the exact states after a crash (newest snapshot, then the
journal records after its position, stepped again through the same model). A bounded cache of
recent predictions answers a reading the broker redelivers, whose effect the state already holds,
with the prediction it had the first time, instead of dropping it as a duplicate.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from forecaster.model import clip, spread
from forecaster.model.bundle import Bundle, Interval, Manifest
from forecaster.model.classify import counts
from forecaster.serve.codec import LABEL_OF, STREAM_OF, TS_OF, VALUE_OF, Prediction, Reading
from forecaster.serve.columns import PredictionColumns, ReadingColumns
from forecaster.serve.journal import (
    KIND_FORGET,
    KIND_WAVE,
    Journal,
    JournalDecodeError,
    JournalScan,
    RefusalReason,
    WaveColumns,
    decode_forget,
    decode_wave,
    encode_forget,
    encode_wave,
    scan_journal,
)
from forecaster.serve.recent import WARM_FLAG, Columns, RecentPredictions
from forecaster.serve.snapshot import SnapshotData, SnapshotError, load_snapshot, previous_path
from forecaster.serve.state import StateStore, Verdict, all_finite, finite_rows
from forecaster.serve.window import as_batch, push

log = logging.getLogger(__name__)

_STEP, _RESET, _DUPLICATE, _OUT_OF_ORDER = (
    int(v) for v in (Verdict.STEP, Verdict.RESET, Verdict.DUPLICATE, Verdict.OUT_OF_ORDER)
)


#: A call's padded cells may be at most ``PAD_FACTOR`` × its readings + ``PAD_SLACK`` before its
#: rows are split into calls by length (one stream with 100 readings beside 999 with one: two
#: calls, not a ``[1000, 100]`` batch that is 99 % padding).
PAD_FACTOR = 2
PAD_SLACK = 64


def length_groups(lengths: np.ndarray) -> list[np.ndarray]:
    """Rows of a padded batch (``lengths`` ``[R]``, each >= 1) grouped into calls, each group's
    rows in ascending order: one group unless padding would exceed the bound above; then rows
    are taken longest first, a group growing while its padded size stays within the bound."""
    n = len(lengths)
    if n == 0:
        return []
    total = int(lengths.sum())
    if n * int(lengths.max()) <= PAD_FACTOR * total + PAD_SLACK:
        return [np.arange(n)]
    order = np.argsort(-lengths, kind="stable")
    ordered = lengths[order].tolist()
    groups: list[np.ndarray] = []
    start = 0
    while start < n:
        top = ordered[start]
        valid = 0
        end = start
        while (
            end < n and (end - start + 1) * top <= PAD_FACTOR * (valid + ordered[end]) + PAD_SLACK
        ):
            valid += ordered[end]
            end += 1
        groups.append(np.sort(order[start:end]))
        start = end
    return groups


def waves(streams: Sequence[str]) -> list[list[int]]:
    """Indices of ``streams`` grouped so no stream appears twice in a group, order kept."""
    count: dict[str, int] = {}
    out: list[list[int]] = []
    for i, s in enumerate(streams):
        k = count.get(s, 0)
        count[s] = k + 1
        if k == len(out):
            out.append([])
        out[k].append(i)
    return out


def _streams(readings: Sequence[Reading]) -> list[str]:
    """Every reading's stream id: a gateway batch's column, else read from the objects."""
    if isinstance(readings, ReadingColumns):
        return readings.streams
    return list(map(STREAM_OF, readings))


def _occurrences(streams: Sequence[str]) -> list[int]:
    """Each reading's wave: how many readings of its stream came before it in the batch."""
    count: dict[str, int] = {}
    occ: list[int] = []
    for stream in streams:
        k = count.get(stream, 0)
        occ.append(k)
        count[stream] = k + 1
    return occ


def _labels(labels: list[float | None]) -> list[float | None] | None:
    """The labels column, None when no reading has one (as :class:`ReadingColumns` holds it)."""
    return None if labels.count(None) == len(labels) else labels


@dataclass
class _Plan:
    """How :meth:`Engine._step_sequence` lays a micro-batch out: the verdict on every reading and
    the rows of the padded call (a row is a run of one stream's consecutive stepped readings)."""

    flat: list[int]  # stepped readings, row by row
    lens: np.ndarray  # [R] readings per row
    row_stream: np.ndarray  # [R] the row's stream, as a position in the batch's streams
    row_stored: np.ndarray  # [R] the row starts from the stored state (else from zero)
    last_row: np.ndarray  # [S] each stream's last row, -1 when none of its readings is stepped
    last_seen: list[int]  # [S] each stream's last reading not answered from the cache
    last_kept: list[int]  # [S] the same reading when it was stepped, else -1
    reset_streams: list[int]  # streams a gap resets in this batch
    # A reading this batch steps twice: the waves answer the second from the cache the first
    # one filled (with the cache on), so it is not a duplicate. (second, first) indices.
    echoes: list[tuple[int, int]]
    dup: int
    ooo: int
    gap: int


def _plan_distinct(
    ts: np.ndarray, slot: np.ndarray, last_ts: np.ndarray, reset_after: float
) -> _Plan:
    """The plan when every reading is its own stream's only one and none is a cache hit (a
    gateway batch): the same verdicts as :func:`_plan_runs`, as array operations. ``ts``: the
    readings' times; ``slot``: their streams' slots before the batch, -1 for a new stream."""
    n = len(ts)
    stored = slot >= 0
    last = np.full(n, np.nan)
    last[stored] = last_ts[slot[stored]]
    seen = ~np.isnan(last)  # something was stepped since the stream's (re)start
    dup = seen & (ts == last)
    ooo = seen & (ts < last)
    step = ~(dup | ooo)
    gap = step & seen & (ts - last > reset_after) if reset_after > 0 else np.zeros(n, bool)
    stepped = np.flatnonzero(step)
    last_row = np.full(n, -1, dtype=np.intp)
    last_row[stepped] = np.arange(len(stepped))
    return _Plan(
        flat=stepped.tolist(),
        lens=np.ones(len(stepped), dtype=np.int64),
        row_stream=stepped,
        row_stored=(stored & ~gap)[stepped],
        last_row=last_row,
        last_seen=list(range(n)),
        last_kept=np.where(step, np.arange(n), -1).tolist(),
        reset_streams=np.flatnonzero(gap).tolist(),
        echoes=[],
        dup=int(np.count_nonzero(dup)),
        ooo=int(np.count_nonzero(ooo)),
        gap=int(np.count_nonzero(gap)),
    )


def _plan_runs(
    ts: Sequence[float],
    by_stream: dict[str, list[int]],
    known: list[int | None],
    last_ts: np.ndarray,
    reset_after: float,
    cache: bool,
) -> _Plan:
    """Verdicts per stream in order, against the last stepped time; rows = runs of steps.
    ``ts``: the readings' times; ``by_stream``: each stream's readings not answered from the
    cache, in order."""
    rows: list[list[int]] = []  # reading indices of each row, in order
    row_stream: list[int] = []
    row_stored: list[bool] = []
    n_streams = len(by_stream)
    last_row = [-1] * n_streams
    last_seen = [-1] * n_streams
    last_kept = [-1] * n_streams
    reset_streams: list[int] = []
    echoes: list[tuple[int, int]] = []
    dup = ooo = gap = 0
    for j, (slot, idxs) in enumerate(zip(known, by_stream.values(), strict=True)):
        last = float(last_ts[slot]) if slot is not None else float("nan")
        stored = slot is not None
        cur: list[int] | None = None
        here: dict[float, int] | None = {} if cache and len(idxs) > 1 else None
        for i in idxs:
            t = ts[i]
            if here is not None:
                first = here.get(t)
                if first is not None:
                    echoes.append((i, first))
                    continue
            last_seen[j] = i
            if last == last:  # not NaN: something was stepped since the (re)start
                if t == last:
                    dup += 1
                    continue
                if t < last:
                    ooo += 1
                    continue
                if reset_after > 0 and t - last > reset_after:
                    gap += 1
                    if not reset_streams or reset_streams[-1] != j:
                        reset_streams.append(j)
                    cur = None
                    stored = False
            last = t
            if here is not None:
                here[t] = i
            if cur is None:
                cur = [i]
                rows.append(cur)
                row_stream.append(j)
                row_stored.append(stored)
                stored = False
                last_row[j] = len(rows) - 1
            else:
                cur.append(i)
        if cur is not None and cur[-1] == last_seen[j]:
            last_kept[j] = cur[-1]
    return _Plan(
        flat=[i for row in rows for i in row],
        lens=np.fromiter((len(x) for x in rows), dtype=np.int64, count=len(rows)),
        row_stream=np.asarray(row_stream, dtype=np.intp),
        row_stored=np.asarray(row_stored, dtype=bool),
        last_row=np.asarray(last_row, dtype=np.intp),
        last_seen=last_seen,
        last_kept=last_kept,
        reset_streams=reset_streams,
        echoes=echoes,
        dup=dup,
        ooo=ooo,
        gap=gap,
    )


@dataclass
class Outcome:
    """What stepping a list of readings produced, aligned with the input.

    ``predictions[i]`` is None when reading ``i`` was dropped; ``drops`` says why, counted by
    reason. ``abs_err``/``naive_abs_err`` hold the online errors of the previous (warm)
    predictions that these readings resolved.
    """

    predictions: Sequence[Prediction | None]  # a list, or columns when every reading has one
    drops: Counter[str] = field(default_factory=Counter)
    resets: Counter[str] = field(default_factory=Counter)
    evicted: list[str] = field(default_factory=list)
    calls: list[tuple[int, float]] = field(default_factory=list)  # (batch size, seconds)
    abs_err: list[np.ndarray] = field(default_factory=list)
    naive_abs_err: list[np.ndarray] = field(default_factory=list)
    events: Counter[str] = field(default_factory=Counter)  # tp/fp/tn/fn of labelled readings
    # Readings that resolved a warm prediction with an interval: inside / outside its bounds.
    interval_inside: int = 0
    interval_outside: int = 0
    interval_coverage: float | None = None  # the target, when any reading was checked
    repeated: int = 0  # readings answered from the recent-predictions cache (redeliveries)
    clipped: int = 0  # readings that entered the model clipped (model/clip.py)
    journal_error: str | None = None  # why the journal append failed, if it did
    snapshot: str | None = None  # "ok"/"failed" when this step forced a snapshot (bound, rescue)
    # Every reading stepped in arrival order: the columns the journal record packs.
    wave: WaveColumns | None = None


def count_interval(
    out: Outcome,
    interval: Interval,
    actual: np.ndarray,
    pred: np.ndarray,
    spread: np.ndarray | None = None,
) -> None:
    """Readings ``actual`` against the bounds published with their previous predictions ``pred``
    (made at ``spread`` when the interval follows it), computed as they were published, so live
    coverage counts exactly what a consumer saw."""
    lower, upper = interval.bounds(pred, spread)
    inside = int(np.count_nonzero((actual >= lower) & (actual <= upper)))
    out.interval_inside += inside
    out.interval_outside += int(actual.size) - inside
    out.interval_coverage = interval.coverage


def _scaling(manifest: Manifest) -> tuple[float, float] | None:
    """``(weight, start)`` of the streams' spread when the bundle's interval follows it."""
    iv = manifest.interval
    return None if iv is None or manifest.task == "classify" else iv.spreading


_RETRY_S = 5.0  # least seconds between snapshots forced by failing journal appends


@dataclass
class Recovery:
    """What :meth:`Engine.recover` found and did, for the daemon's log and metrics."""

    snapshot: str  # restore result: ok, missing, corrupt, foreign
    snapshot_error: str | None = None  # the newest file's problem, when not ok
    source: str | None = None  # the file the states came from
    streams: int = 0
    replayed: int = 0  # journal records stepped again
    readings: int = 0  # readings in them
    refused: list[tuple[RefusalReason, str]] = field(default_factory=list)
    mismatches: int = 0  # replayed predictions that differ from the journal's (should be 0)
    snapshot_written: bool = False


class Engine:
    """One route's model and states; stepping happens on one thread only (the worker's)."""

    def __init__(
        self,
        bundle: Bundle,
        store: StateStore,
        clock: Callable[[], float] = time.perf_counter,
        *,
        recent: int = 0,
    ) -> None:
        self._bundle = bundle
        self.store = store
        self._clock = clock
        self.recent = RecentPredictions(recent)
        self.journal: Journal | None = None
        self.snapshot_path: Path | None = None
        self.journal_path: Path | None = None
        self.journal_fsync = False
        self.journal_max_bytes = 0  # 0 = no size bound (snapshots alone rotate it)
        self._seq = 0  # journal position the in-memory states include, when no journal is open
        self._last_rescue = -_RETRY_S  # when a failed append last triggered a snapshot
        self._suspended = False  # an append failed: no records until a snapshot covers it

    @property
    def bundle(self) -> Bundle:
        return self._bundle

    @bundle.setter
    def bundle(self, bundle: Bundle) -> None:
        """Swap the model; with persistence on, snapshot at once under the new sha256.

        Journal records are replayed only through the model that wrote them, so a model change
        must start a new journal from a snapshot of the states the new model continues from.
        """
        changed = bundle.sha256 != self._bundle.sha256
        self._bundle = bundle
        if changed and self.snapshot_path is not None:
            if self.journal is not None:
                self.journal.close()
                self.journal = None  # the next snapshot starts a fresh chain for the new model
            try:
                self.snapshot()
            except OSError as exc:
                log.error(
                    "snapshot after a model change failed: %s; journal off until one works", exc
                )

    @property
    def warmup(self) -> int:
        return self.bundle.manifest.warmup

    @property
    def seq(self) -> int:
        """The last journal record whose effect the in-memory states include."""
        return self.journal.last_seq if self.journal is not None else self._seq

    def step(self, readings: Sequence[Reading], now: float) -> Outcome:
        """Step a micro-batch; with a journal attached, it is on disk before this returns.

        A failed append (disk full) is reported in ``Outcome.journal_error`` and the batch is
        still answered. The states then hold a step no record describes, and records appended
        after it would replay onto the wrong states, so journaling is suspended until a
        snapshot (attempted at once, then at most every ``_RETRY_S`` seconds) covers it. A
        journal past ``journal_max_bytes`` also triggers a snapshot, which rotates it.
        """
        out = self._step(readings, now)
        if self.journal is None or not readings:
            return out
        if self._suspended:
            out.journal_error = "journal suspended until a snapshot succeeds"
        else:
            try:
                self.journal.append(KIND_WAVE, encode_wave(readings, out.predictions, out.wave))
            except OSError as exc:
                out.journal_error = f"{type(exc).__name__}: {exc}"
                self._suspended = True
                self._last_rescue = -_RETRY_S
            else:
                if 0 < self.journal_max_bytes <= self.journal.size:
                    self._snapshot_into(out, "at the journal bound")
                return out
        if self._clock() - self._last_rescue >= _RETRY_S:
            self._last_rescue = self._clock()
            self._snapshot_into(out, "to cover steps the journal could not record")
        return out

    def _snapshot_into(self, out: Outcome, why: str) -> None:
        try:
            self.snapshot()
        except OSError as exc:
            log.error("snapshot %s failed: %s", why, exc)
            out.snapshot = "failed"
        else:
            out.snapshot = "ok"

    def expire(self, now: float) -> list[str]:
        """Forget streams idle past the TTL, journaled so a replay forgets them too."""
        gone = self.store.expire(now)
        if gone and self.journal is not None and not self._suspended:
            try:
                self.journal.append(KIND_FORGET, encode_forget(gone))
            except OSError as exc:
                log.error("journal append failed: %s; suspended until a snapshot", exc)
                self._suspended = True
        return gone

    def _step(self, readings: Sequence[Reading], now: float) -> Outcome:
        bundle = self._bundle
        if readings and bundle.mode == "stateful" and getattr(bundle, "sequence", False):
            done = self._step_sequence(readings, now)
            if done is not None:
                return done
        preds: list[Prediction | None] = [None] * len(readings)
        out = Outcome(predictions=preds)
        for wave in waves(_streams(readings)):
            self._step_wave([readings[i] for i in wave], wave, now, out, preds)
        return out

    def _step_sequence(self, readings: Sequence[Reading], now: float) -> Outcome | None:
        """The micro-batch as one padded batch (see the module docstring); None, with nothing
        changed, when it must go through waves instead.

        Plan first (cache hits, duplicate/out-of-order/gap verdicts per stream, rows), run the
        model on states gathered read-only, and only when every valid output is finite commit:
        acquire (first-seen order, as wave 0 does), resets, states, bookkeeping, the LRU order
        the waves would have left, predictions."""
        n = len(readings)
        preds: list[Prediction | None] = [None] * n
        out = Outcome(predictions=preds)
        recent = self.recent
        # Every reading's stream, ts and value: a gateway batch's columns as decoded, else read
        # from the objects with C-level getters.
        if isinstance(readings, ReadingColumns):
            streams_all, ts_all, values_all = readings.streams, readings.ts, readings.values
        else:
            streams_all = list(map(STREAM_OF, readings))
            ts_all = list(map(TS_OF, readings))
            values_all = list(map(VALUE_OF, readings))
        by_stream: dict[str, list[int]] | None = None
        hits = 0
        # Every reading newer than what the cache holds for its stream (nearly every batch): no
        # lookup, and its predictions go in as they are (``put_many``'s ``new``).
        maybe_cached = recent.capacity > 0 and recent.could_hold(streams_all, ts_all)
        if maybe_cached and recent.holds_any(streams_all, ts_all):
            get = recent.get
            by_stream = {}
            for i, (stream, ts) in enumerate(zip(streams_all, ts_all, strict=True)):
                hit = get(stream, ts)
                if hit is not None:
                    preds[i] = hit
                    hits += 1
                    continue
                by_stream.setdefault(stream, []).append(i)
            out.repeated = hits
            if not by_stream:
                return out
            if len(recent) + n - hits > recent.capacity:
                # The waves look a later wave's readings up after earlier waves' predictions
                # went in, which may push a hit out of a full cache: let them decide.
                occurrence = _occurrences(streams_all)
                if any(preds[i] is not None and occurrence[i] for i in range(n)):
                    return None
        members: dict[str, list[int]] | set[str]
        if by_stream is None and len(members := set(streams_all)) == n:
            streams = streams_all  # every reading its own stream's only one (gateway batches)
        else:
            if by_stream is None:
                by_stream = {}
                for i, stream in enumerate(streams_all):
                    by_stream.setdefault(stream, []).append(i)
            members = by_stream
            streams = list(by_stream)
        store = self.store
        known = store.slots_of(streams)
        if None in known:
            known_arr = np.fromiter(
                (-1 if k is None else k for k in known), dtype=np.intp, count=len(known)
            )
        else:
            known_arr = np.array(known, dtype=np.intp)
        excess = len(store) + known.count(None) - store.max_streams
        if excess > 0:
            front = store.lru_front(excess)  # the victims, unless the batch touches them first
            if len(front) < excess or any(s in members for s in front):
                return None  # the batch would evict one of its own streams
        if by_stream is None:
            ts_arr = np.array(ts_all, dtype=np.float64)
            plan = _plan_distinct(ts_arr, known_arr, store.last_ts, store.reset_after)
        else:
            plan = _plan_runs(
                ts_all, by_stream, known, store.last_ts, store.reset_after, recent.capacity > 0
            )
        if plan.echoes:
            hits += len(plan.echoes)
            out.repeated = hits

        flat, lens = plan.flat, plan.lens
        n_rows = len(lens)
        if n_rows:
            m = len(flat)
            row_of = np.repeat(np.arange(n_rows), lens)
            ends = np.cumsum(lens)
            t_of = np.arange(m) - np.repeat(ends - lens, lens)
            if by_stream is None and m == n:  # every reading its stream's only one, stepped
                vals = np.array(values_all, dtype=np.float64)
            else:
                vals = np.fromiter(map(values_all.__getitem__, flat), dtype=np.float64, count=m)
            width = int(lens.max())
            grid = np.empty((n_rows, width), dtype=np.float64)
            grid[:] = vals[ends - 1][:, None]  # padding repeats the row's last reading
            grid[row_of, t_of] = vals
            # Each row's stream as stored (a row that does not continue a stored state: none).
            stored_slot = np.where(plan.row_stored, known_arr[plan.row_stream], 0)
            first_val = np.where(plan.row_stored, store.last_value[stored_slot], np.nan)
            manifest = self.bundle.manifest
            scaling = _scaling(manifest)
            limit = manifest.clip if scaling is not None else None
            x = grid  # float64: the bundle rounds it, and puts the reading back
            row_sp = sp_grid = clipped0 = None
            if scaling is not None:
                weight, begin = scaling
                stored_sp = np.where(plan.row_stored, store.spread[stored_slot], np.nan)
                row_sp = spread.resumed(stored_sp, begin)  # when each row's first was predicted
                if limit is not None:
                    # A row's first reading meets its stream's stored prediction: clipped here,
                    # exactly as a wave would clip it.
                    first_pred = np.where(plan.row_stored, store.last_pred[stored_slot], np.nan)
                    after = np.where(plan.row_stored, store.clipped[stored_slot], np.nan) > 0
                    seen0, clipped0 = clip.inputs(
                        grid[:, 0], first_pred, clip.limits(row_sp, begin, limit), after
                    )
                    if clipped0.any():
                        x = grid.copy()
                        x[:, 0] = seen0
            from_store = np.flatnonzero(plan.row_stored)
            src = known_arr[plan.row_stream[from_store]]
            if len(from_store) == n_rows:  # every row continues a stored state: no zeros
                init = list(store.gather(src))
            else:
                init = [np.zeros((la, n_rows, hi), dtype=np.float32) for la, hi in store.shapes]
                if len(from_store):
                    for z, g in zip(init, store.gather(src), strict=True):
                        z[:, from_store] = g
            y, new = self._run_rows(x[:, :, None], lens, init, out)
            if row_sp is not None:
                sp_grid = spread.rows(grid, first_val, row_sp, weight)  # after each reading
            last_clipped = None
            if limit is not None and sp_grid is not None and clipped0 is not None:
                # Later readings of a row to clip: the row runs again from each, before commit.
                y, new, last_clipped, later = clip.settle(
                    grid,
                    x,
                    y,
                    new,
                    init,
                    lens,
                    clipped0,
                    clip.limits(sp_grid, begin, limit),
                    lambda xs, ls, st: self._run_rows(xs, ls, st, out),
                )
                out.clipped += int(np.count_nonzero(clipped0)) + later
            y_flat = y[row_of, t_of]
            if not np.isfinite(y_flat).all() or not all_finite(new):
                return None  # waves drop and reset exactly the reading that blew up

        # Commit.
        slots, evicted = store.acquire_many(streams, now, known)
        out.evicted.extend(evicted)
        if plan.dup:
            out.drops["duplicate"] += plan.dup
        if plan.ooo:
            out.drops["out_of_order"] += plan.ooo
        if len(streams) > 1 and (hits or not n_rows == len(streams) == n):
            # Not every reading its own stream's only one, all stepped: waves touch in another
            # order than first-seen.
            self._touch_in_wave_order(
                streams_all, streams, slots, plan.last_seen, plan.last_kept, now
            )
        if not n_rows:
            return out

        slot_arr = np.asarray(slots, dtype=np.intp)
        row_slot = slot_arr[plan.row_stream]
        stored_rows = plan.row_stored
        start = t_of == 0
        first_slot = row_slot[row_of[start]]
        first_stored = stored_rows[row_of[start]]
        y64 = y_flat.astype(np.float64, copy=False)
        prev_pred = np.empty(m, dtype=np.float64)
        prev_pred[1:] = y64[:-1]
        prev_pred[start] = np.where(first_stored, store.last_pred[first_slot], np.nan)
        prev_val = np.empty(m, dtype=np.float64)
        prev_val[1:] = vals[:-1]
        prev_val[start] = first_val
        base_seen = np.where(stored_rows, store.seen[row_slot], 0)
        prior_seen = base_seen[row_of] + t_of
        sp = prev_sp = None
        if sp_grid is not None and row_sp is not None:
            sp = sp_grid[row_of, t_of]
            prev_sp = np.empty(m, dtype=np.float64)
            prev_sp[1:] = sp[:-1]
            prev_sp[start] = row_sp
        if plan.gap:  # after reading the stored bookkeeping a stream's first row continues from
            for j in plan.reset_streams:
                store.reset(slots[j])
            out.resets["gap"] += plan.gap
        self._online_errors(
            readings, flat, vals, y64, prev_pred, prev_val, prior_seen, prev_sp, out
        )
        # ``flat`` is every reading, in arrival order: each its stream's only one, or one
        # stream's readings (a busy stream's micro-batch), all stepped.
        in_order = m == n and (by_stream is None or len(streams) == 1)
        if in_order and by_stream is not None:
            ts_arr = np.array(ts_all, dtype=np.float64)

        done = np.flatnonzero(plan.last_row >= 0)
        ends_rows = plan.last_row[done]
        done_slots = slot_arr[done]
        if len(ends_rows) == n_rows:  # one row per stream, in order: the states as they are
            store.scatter(done_slots, new)
        else:
            store.scatter(done_slots, [s[:, ends_rows] for s in new])
        last_flat = ends[ends_rows] - 1
        if in_order:
            last_ts = ts_arr[last_flat]
        else:
            last_ts = np.array([ts_all[flat[k]] for k in last_flat.tolist()], dtype=np.float64)
        store.record_runs(
            done_slots,
            lens[ends_rows],
            last_ts,
            vals[last_flat],
            y64[last_flat],
            now,
            None if sp is None else sp[last_flat],
            None if last_clipped is None else last_clipped[ends_rows].astype(np.float64),
        )
        warm = prior_seen + 1 >= self.warmup
        if in_order:
            labels = (
                readings.labels
                if isinstance(readings, ReadingColumns)
                else _labels(list(map(LABEL_OF, readings)))
            )
            out.wave = WaveColumns(streams_all, ts_arr, vals, y64, warm, labels)
        self._publish(
            flat,
            y64,
            sp,
            warm,
            len(streams),
            n,
            hits,
            out,
            preds,
            streams_all,
            ts_all,
            not maybe_cached,
        )
        for i, first in plan.echoes:
            preds[i] = preds[first]
        return out

    def _run_rows(
        self, x: np.ndarray, lens: np.ndarray, init: list[np.ndarray], out: Outcome
    ) -> tuple[np.ndarray, list[np.ndarray]]:
        """``x`` ``[R, T, 1]`` through the sequence graph: one call, or one per length group."""
        groups = length_groups(lens)
        run = self._bundle.run
        clock = self._clock
        if len(groups) == 1:
            started = clock()
            y, new = run(x, lens, init)
            out.calls.append((int(lens.sum()), clock() - started))
            return y, list(new)
        y_all = np.zeros(x.shape[:2], dtype=np.float64)
        new_all = [np.empty_like(z) for z in init]
        for rows in groups:
            width = int(lens[rows].max())
            started = clock()
            y, new = run(x[rows, :width], lens[rows], [z[:, rows] for z in init])
            out.calls.append((int(lens[rows].sum()), clock() - started))
            y_all[rows, :width] = y
            for dst, got in zip(new_all, new, strict=True):
                dst[:, rows] = got
        return y_all, new_all

    def _online_errors(
        self,
        readings: Sequence[Reading],
        flat: list[int],
        vals: np.ndarray,
        y: np.ndarray,
        prev_pred: np.ndarray,
        prev_val: np.ndarray,
        prior_seen: np.ndarray,
        prev_sp: np.ndarray | None,
        out: Outcome,
    ) -> None:
        """What ``_step_wave`` counts per wave, for every stepped reading of the batch at once:
        each reading resolves its stream's previous prediction (errors, interval coverage at
        the spread ``prev_sp`` it was made at, or event counts)."""
        manifest = self.bundle.manifest
        judged = np.isfinite(prev_pred) & (prior_seen >= self.warmup)
        if manifest.task == "classify":
            column = (
                readings.labels
                if isinstance(readings, ReadingColumns)
                else list(map(LABEL_OF, readings))
            )
            labels = np.full(len(flat), np.nan)
            if column is not None:
                got = [column[i] for i in flat]
                labels = np.array([np.nan if x is None else x for x in got], dtype=np.float64)
            if manifest.horizon == 1:
                self._judge(prev_pred, labels, judged, out)
            if manifest.threshold is not None and manifest.horizon == 0:
                self._judge(y, labels, np.ones(len(flat), dtype=bool), out)
            return
        if not judged.any():
            return
        actual, judged_pred = vals[judged], prev_pred[judged]
        out.abs_err.append(np.abs(actual - judged_pred))
        out.naive_abs_err.append(np.abs(actual - prev_val[judged]))
        if manifest.interval is not None:
            at = None if prev_sp is None else prev_sp[judged]
            count_interval(out, manifest.interval, actual, judged_pred, at)

    def _publish(
        self,
        flat: list[int],
        y: np.ndarray,
        sp: np.ndarray | None,
        warm: np.ndarray,
        n_streams: int,
        n: int,
        hits: int,
        out: Outcome,
        preds: list[Prediction | None],
        streams_all: list[str],
        ts_all: list[float],
        new: bool,
    ) -> None:
        """Predictions for the stepped readings (bounds at the spreads ``sp`` when the interval
        follows them), into ``preds`` (the outcome's list) or, when every reading was stepped in
        arrival order, as the outcome's predictions themselves (columns); and into the recent
        cache in the waves' order (``streams_all``, ``ts_all``: every reading's, the cache's
        keys when every reading was stepped in arrival order; ``new``: none of them could be
        cached before this batch)."""
        manifest = self.bundle.manifest
        threshold = manifest.threshold if manifest.task == "classify" else None
        iv = manifest.interval if threshold is None else None
        every = len(flat) == n and (n_streams == 1 or (not hits and n_streams == n))
        if every:  # ``flat`` is every reading, in arrival order: the batch's own columns
            streams, ts = streams_all, ts_all
        else:
            streams = list(map(streams_all.__getitem__, flat))
            ts = list(map(ts_all.__getitem__, flat))
        lows = highs = None
        if iv is not None:
            lows, highs = iv.bounds(y, sp)
        made = PredictionColumns(
            streams,
            ts,
            y.tolist(),
            warm.tolist(),
            lower=None if lows is None else lows.tolist(),
            upper=None if highs is None else highs.tolist(),
            threshold=threshold,
        )
        if every:
            # Every reading predicted: the columns are the outcome's predictions as they are
            # (no object per prediction; the encoder writes the messages from them).
            out.predictions = made
            if self.recent.capacity:
                if lows is None or highs is None:
                    lows = highs = np.full(len(flat), np.nan)
                columns = Columns(y, warm, lows, highs)
                # Every reading stepped, in arrival order: distinct keys, each stream's rising.
                self.recent.put_many(made, streams_all, ts_all, columns, new=new)
            return
        objects = list(made)  # shared by the outcome and the cache
        for i, p in zip(flat, objects, strict=True):
            preds[i] = p
        if not self.recent.capacity:
            return
        if n_streams == 1 or (not hits and n_streams == n):
            # One stream, or each its own stream's only reading: ``flat`` is in arrival order.
            self.recent.put_many(objects)
            return
        # Wave k holds the k-th reading of each stream (cache hits included).
        occurrence = _occurrences(streams_all)
        order = sorted(range(len(flat)), key=lambda k: (occurrence[flat[k]], flat[k]))
        self.recent.put_many([objects[k] for k in order])

    def _touch_in_wave_order(
        self,
        streams_all: list[str],
        streams: list[str],
        slots: list[int],
        last_seen: list[int],
        last_kept: list[int],
        now: float,
    ) -> None:
        """Leave the LRU order as the waves would: a stream's last touch is its last non-hit
        reading's wave, after that wave's acquires when the reading was stepped (recorded)."""
        occurrence = _occurrences(streams_all)
        keys = []
        for j in range(len(streams)):
            i = last_seen[j]
            keys.append((occurrence[i], last_kept[j] == i, i, j))
        keys.sort()
        touch = self.store.touch
        for *_, j in keys:
            touch(slots[j], now)

    def _prediction(
        self,
        stream: str,
        ts: float,
        value: float,
        warm: bool,
        bounds: tuple[float, float] | None = None,
    ) -> Prediction:
        """A prediction rebuilt from what a snapshot or the journal kept: ``bounds`` as they were
        published where known, else the interval's at a new stream's spread."""
        manifest = self.bundle.manifest
        if manifest.task == "classify" and manifest.threshold is not None:
            return Prediction(stream, ts, value, warm, value, value >= manifest.threshold)
        iv = manifest.interval
        if iv is None:
            return Prediction(stream, ts, value, warm)
        if bounds is None or not all(np.isfinite(bounds)):
            lo, hi = iv.bounds(value, iv.spread_start)  # a new stream's spread
            bounds = (float(lo), float(hi))
        return Prediction(stream, ts, value, warm, lower=bounds[0], upper=bounds[1])

    def _step_wave(
        self,
        rs: list[Reading],
        where: list[int],
        now: float,
        out: Outcome,
        preds: list[Prediction | None],
    ) -> None:
        """Step one wave (at most one reading per stream); ``preds``: the outcome's predictions,
        where this wave's go (``where[k]`` for ``rs[k]``)."""
        # Per-wave Python overhead is what a single busy stream pays per reading (one wave each),
        # so this path avoids enum lookups and work that only matters when something is wrong.
        if self.recent:
            # A reading already stepped (a redelivery, a producer's resend) is answered with the
            # prediction it had, and not stepped again.
            get = self.recent.get
            fresh: list[int] = []
            for pos, r in enumerate(rs):
                hit = get(r.stream, r.ts)
                if hit is None:
                    fresh.append(pos)
                else:
                    preds[where[pos]] = hit
                    out.repeated += 1
            if len(fresh) != len(rs):
                if not fresh:
                    return
                rs = [rs[pos] for pos in fresh]
                where = [where[pos] for pos in fresh]
        store = self.store
        acquire = store.acquire
        slot_list: list[int] = []
        evicted_here = False
        for r in rs:
            slot, evicted = acquire(r.stream, now)
            slot_list.append(slot)
            if evicted is not None:
                out.evicted.append(evicted)
                evicted_here = True
        slots = np.array(slot_list, dtype=np.intp)
        ts = np.array([r.ts for r in rs], dtype=np.float64)
        values = np.array([r.value for r in rs], dtype=np.float64)
        verdict = store.check_many(slots, ts)
        keep = verdict <= _RESET  # STEP or RESET
        if evicted_here:
            # A wave wider than max_streams evicts its own members: they have no state left.
            pairs = zip(rs, slot_list, strict=True)
            live = np.array([store.slot_of(r.stream) == s for r, s in pairs], dtype=bool)
            if not live.all():
                out.drops["evicted"] += int((~live).sum())
                verdict = np.where(live, verdict, _STEP)
                keep &= live
        if not keep.all():
            dup = int((verdict == _DUPLICATE).sum())
            ooo = int((verdict == _OUT_OF_ORDER).sum())
            if dup:
                out.drops["duplicate"] += dup
            if ooo:
                out.drops["out_of_order"] += ooo
            if not keep.any():
                return
        if (verdict == _RESET).any():
            for k in np.flatnonzero(keep & (verdict == _RESET)):
                store.reset(int(slots[k]))
                out.resets["gap"] += 1
        idx = np.flatnonzero(keep)
        if len(idx) != len(rs):
            slots, ts, values = slots[idx], ts[idx], values[idx]
        manifest = self.bundle.manifest
        classify = manifest.task == "classify"
        labels = np.array(
            [np.nan if rs[k].label is None else rs[k].label for k in idx.tolist()], dtype=np.float64
        )

        # Online accuracy: the previous prediction of each stream meets its actual value.
        last_pred = store.last_pred[slots]
        prior_seen = store.seen[slots]
        judged = np.isfinite(last_pred) & (prior_seen >= self.warmup)
        sp_prev = sp_new = None
        scaling = _scaling(manifest)
        if scaling is not None:
            weight, begin = scaling
            sp_prev = spread.resumed(store.spread[slots], begin)
            sp_new = spread.advance(sp_prev, store.last_value[slots], values, weight)
        if classify:
            if manifest.horizon == 1:  # the previous prediction was about this reading's label
                self._judge(last_pred, labels, judged, out)
        elif judged.any():
            out.abs_err.append(np.abs(values[judged] - last_pred[judged]))
            out.naive_abs_err.append(np.abs(values[judged] - store.last_value[slots][judged]))
            if manifest.interval is not None:
                at = None if sp_prev is None else sp_prev[judged]
                count_interval(out, manifest.interval, values[judged], last_pred[judged], at)

        seen, clipped = values, None
        if manifest.clip is not None and sp_prev is not None:
            limit = clip.limits(sp_prev, begin, manifest.clip)
            seen, clipped = clip.inputs(values, last_pred, limit, store.clipped[slots] > 0)
        state = store.gather(slots)
        if self.bundle.mode == "window":
            x = values.astype(np.float32).reshape(-1, 1)
            y, new_state, ready = self._run_windows(state, x, prior_seen + 1, out)
        else:
            started = self._clock()
            y, new_state = self.bundle.step(seen.reshape(-1, 1), state)
            out.calls.append((len(slots), self._clock() - started))
            ready = np.ones(len(slots), dtype=bool)
        ok = finite_rows(new_state) & (np.isfinite(y) | ~ready)
        store.scatter(slots, new_state, ok)
        if not ok.all():
            out.drops["non_finite_state"] += int((~ok).sum())
            for k in np.flatnonzero(~ok):
                store.reset(int(slots[k]))
                out.resets["non_finite"] += 1
        good = np.flatnonzero(ok)
        if not good.size:
            return
        store.record(
            slots[good],
            ts[good],
            values[good],
            y[good].astype(np.float64),
            now,
            None if sp_new is None else sp_new[good],
            None if clipped is None else clipped[good].astype(np.float64),
        )
        if clipped is not None:
            out.clipped += int(np.count_nonzero(clipped[good]))
        seen_after = store.seen[slots[good]]
        warmup = self.warmup
        threshold = manifest.threshold if classify and manifest.threshold is not None else None
        if threshold is not None and manifest.horizon == 0:
            made = np.zeros(len(slots), dtype=bool)
            made[good] = ready[good]
            self._judge(y.astype(np.float64), labels, made, out)
        remember = self.recent.put if self.recent.capacity else None
        iv = manifest.interval if threshold is None else None
        if iv is not None:
            lows, highs = iv.bounds(y.astype(np.float64), sp_new)
        for j, n_seen in zip(good.tolist(), seen_after.tolist(), strict=True):
            if not ready[j]:
                continue  # a window still filling: no prediction yet
            i = where[int(idx[j])]
            r = rs[int(idx[j])]
            value = float(y[j])
            if iv is not None:
                p = Prediction(
                    r.stream,
                    r.ts,
                    value,
                    n_seen >= warmup,
                    lower=float(lows[j]),
                    upper=float(highs[j]),
                )
            elif threshold is None:
                p = Prediction(r.stream, r.ts, value, n_seen >= warmup)
            else:
                p = Prediction(r.stream, r.ts, value, n_seen >= warmup, value, value >= threshold)
            preds[i] = p
            if remember is not None:
                remember(p)

    def _run_windows(
        self, state: tuple[np.ndarray, ...], x: np.ndarray, seen: np.ndarray, out: Outcome
    ) -> tuple[np.ndarray, tuple[np.ndarray, ...], np.ndarray]:
        """Push each reading into its buffer and run the full buffers in one call.

        Returns ``y`` (NaN where the buffer is not full yet), the new buffers and the mask of
        full ones."""
        (buffers,) = state
        new = push(buffers, x)
        ready = seen >= self.bundle.window
        y = np.full(len(x), np.nan, dtype=np.float32)
        if ready.any():
            started = self._clock()
            y[ready] = self.bundle.predict_windows(as_batch(new[:, ready]))
            out.calls.append((int(ready.sum()), self._clock() - started))
        return y, (new,), ready

    def _judge(self, probs: np.ndarray, labels: np.ndarray, mask: np.ndarray, out: Outcome) -> None:
        """Count predictions whose label is known as true/false positives/negatives."""
        threshold = self.bundle.manifest.threshold
        use = mask & np.isfinite(labels) & np.isfinite(probs)
        if threshold is None or not use.any():
            return
        tp, fp, tn, fn = counts(labels[use], probs[use] >= threshold)
        out.events.update({"tp": tp, "fp": fp, "tn": tn, "fn": fn})

    # ------------------------------------------------------------------ durability

    def snapshot(self) -> int:
        """Snapshot the states (with the journal position and recent predictions), then start
        a new journal segment: the records before it are no longer needed, except in ``.prev``
        for a start that must fall back to the previous snapshot. Returns the bytes written;
        OSError propagates with the journal untouched. Call it between micro-batches only, so
        the states include exactly the records up to :attr:`seq`."""
        if self.snapshot_path is None:
            raise RuntimeError("no snapshot path: call recover() first")
        seq = self.seq
        ids, arrays = self.recent.to_arrays()
        size = self.store.snapshot(
            self.snapshot_path,
            self.bundle.sha256,
            journal_seq=seq,
            recent_ids=ids,
            recent=arrays,
        )
        self._seq = seq
        if self.journal_path is not None:
            if self.journal is None:
                self._start_journal(seq)
            else:
                self.journal.rotate()
            self._suspended = False
        return size

    def _start_journal(self, seq: int) -> None:
        """A new chain from a snapshot at ``seq``: old segments belong to other states."""
        if self.journal_path is None:
            return
        for old in (
            self.journal_path,
            self.journal_path.with_name(self.journal_path.name + ".prev"),
        ):
            old.unlink(missing_ok=True)
        self.journal = Journal(self.journal_path, self.bundle.sha256, seq, fsync=self.journal_fsync)

    def close(self) -> None:
        if self.journal is not None:
            self.journal.close()
            self.journal = None

    def recover(
        self,
        snapshot_path: Path,
        journal_path: Path | None,
        *,
        now: float,
        fsync: bool = False,
        max_journal_bytes: int = 0,
    ) -> Recovery:
        """Restore the newest usable snapshot, replay the journal after it, snapshot, and open
        a new journal (when ``journal_path`` is given).

        Never raises for damaged files: a refused snapshot means fresh states (as before
        journals existed), a refused journal record ends the replay there; both are reported
        in the returned :class:`Recovery`. Replaying steps the same readings, in the same
        micro-batches, through the same ONNX session, so the states come back bit for bit; the
        predictions the journal holds (what may have been published) fill the recent cache.
        OSError from the final snapshot is reported, not raised: the daemon serves on, with
        the journal off until a snapshot succeeds.
        """
        self.snapshot_path = Path(snapshot_path)
        self.journal_path = None if journal_path is None else Path(journal_path)
        self.journal_fsync = fsync
        self.journal_max_bytes = max_journal_bytes
        store = self.store
        shapes = store.shapes
        data: SnapshotData | None = None
        rec = Recovery(snapshot="missing")
        for candidate in (self.snapshot_path, previous_path(self.snapshot_path)):
            try:
                data = load_snapshot(candidate, self.bundle.sha256, shapes)
            except SnapshotError as exc:
                if candidate == self.snapshot_path:
                    rec.snapshot, rec.snapshot_error = exc.reason, str(exc)
                continue
            rec.source = str(candidate)
            break
        after = 0
        if data is not None:
            if rec.source != str(self.snapshot_path):
                log.warning(
                    "snapshot %s unusable (%s); restored %s instead",
                    self.snapshot_path,
                    rec.snapshot_error,
                    rec.source,
                )
            rec.snapshot = "ok"
            self.store = StateStore.from_data(
                data, shapes, store.max_streams, store.reset_after, store.idle_ttl, now=now
            )
            kept: list[Prediction] = []
            for stream, ts, value, flags, lo, hi in zip(
                data.recent_ids,
                data.recent.get("recent_ts", ()),
                data.recent.get("recent_value", ()),
                data.recent.get("recent_flags", ()),
                data.recent.get("recent_lower", ()),
                data.recent.get("recent_upper", ()),
                strict=True,
            ):
                warm = bool(flags & WARM_FLAG)
                bounds = (float(lo), float(hi))
                kept.append(self._prediction(stream, float(ts), float(value), warm, bounds))
            self.recent.put_many(kept)  # oldest first, as they were put
            after = data.journal_seq if data.journal_seq is not None else -1
        rec.streams = len(self.store)
        self._seq = max(after, 0)
        if self.journal_path is not None and after >= 0:
            self._replay(scan_journal(self.journal_path, self.bundle.sha256, after), now, rec)
        if self.journal_path is not None:
            try:
                self.snapshot()
            except OSError as exc:
                log.error("snapshot after recovery to %s failed: %s", self.snapshot_path, exc)
            else:
                rec.snapshot_written = True
        return rec

    def _replay(self, scan: JournalScan, now: float, rec: Recovery) -> None:
        """Step the scanned records again; a record that does not decode ends the replay."""
        rec.refused.extend(scan.refused)
        for seq, kind, payload in scan.records:
            try:
                if kind == KIND_WAVE:
                    wave = decode_wave(payload)
                else:
                    forget = decode_forget(payload)
            except JournalDecodeError as exc:
                rec.refused.append(("corrupt", f"record {seq}: {exc}"))
                break
            if kind == KIND_FORGET:
                for stream in forget:
                    self.store.discard(stream)
            else:
                out = self._step(wave.readings, now)
                for got, logged in zip(out.predictions, wave.predictions, strict=True):
                    if logged is None:
                        continue
                    # The bounds it was published with: the stepped-again prediction's offsets
                    # (same state, same spread), around the logged value.
                    bounds = None
                    if got is not None and got.lower is not None and got.upper is not None:
                        bounds = (
                            logged.value + (got.lower - got.value),
                            logged.value + (got.upper - got.value),
                        )
                    original = self._prediction(
                        logged.stream, logged.ts, logged.value, logged.warm, bounds
                    )
                    self.recent.put(original)
                    if got is None or abs(got.value - logged.value) > 1e-6:
                        rec.mismatches += 1
                rec.readings += len(wave.readings)
            rec.replayed += 1
            self._seq = seq
