"""Micro-batching: step many streams with one ONNX Runtime call, in order, per stream.

A micro-batch can hold several readings of one stream. They must be stepped one after the other
(each needs the state the previous one produced), so the batch is split into *waves*: wave k
holds the k-th reading of every stream in the batch, in arrival order. Each wave is one gather,
one ONNX call and one scatter. This module holds no I/O: the daemon feeds it readings and turns
the :class:`Outcome` into MQTT messages and metrics.

A window model (see ``window.py``) goes through the same waves: each reading is pushed into its
stream's buffer of the last W readings and the full buffers of a wave are run as one ``[B, W, F]``
call. A stream's first W−1 readings (after its start or a reset) only fill the buffer: they give
no prediction and count as nothing (neither a drop nor an error). An event classifier's
predictions carry a probability and an event, and labels that arrive with readings are counted as
true/false positives/negatives instead of regression errors.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np

from forecaster.model.bundle import Bundle
from forecaster.model.classify import counts
from forecaster.serve.codec import Prediction, Reading
from forecaster.serve.state import StateStore, Verdict, finite_rows
from forecaster.serve.window import as_batch, push

_STEP, _RESET, _DUPLICATE, _OUT_OF_ORDER = (
    int(v) for v in (Verdict.STEP, Verdict.RESET, Verdict.DUPLICATE, Verdict.OUT_OF_ORDER)
)


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


@dataclass
class Outcome:
    """What stepping a list of readings produced, aligned with the input.

    ``predictions[i]`` is None when reading ``i`` was dropped; ``drops`` says why, counted by
    reason. ``abs_err``/``naive_abs_err`` hold the online errors of the previous (warm)
    predictions that these readings resolved.
    """

    predictions: list[Prediction | None]
    drops: Counter[str] = field(default_factory=Counter)
    resets: Counter[str] = field(default_factory=Counter)
    evicted: list[str] = field(default_factory=list)
    calls: list[tuple[int, float]] = field(default_factory=list)  # (batch size, seconds)
    abs_err: list[np.ndarray] = field(default_factory=list)
    naive_abs_err: list[np.ndarray] = field(default_factory=list)
    events: Counter[str] = field(default_factory=Counter)  # tp/fp/tn/fn of labelled readings


class Engine:
    """One route's model and states; stepping happens on one thread only (the worker's)."""

    def __init__(
        self, bundle: Bundle, store: StateStore, clock: Callable[[], float] = time.perf_counter
    ) -> None:
        self.bundle = bundle
        self.store = store
        self._clock = clock

    @property
    def warmup(self) -> int:
        return self.bundle.manifest.warmup

    def step(self, readings: Sequence[Reading], now: float) -> Outcome:
        out = Outcome(predictions=[None] * len(readings))
        for wave in waves([r.stream for r in readings]):
            self._step_wave([readings[i] for i in wave], wave, now, out)
        return out

    def _step_wave(self, rs: list[Reading], where: list[int], now: float, out: Outcome) -> None:
        # Per-wave Python overhead is what a single busy stream pays per reading (one wave each),
        # so this path avoids enum lookups and work that only matters when something is wrong.
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
        if classify:
            if manifest.horizon == 1:  # the previous prediction was about this reading's label
                self._judge(last_pred, labels, judged, out)
        elif judged.any():
            out.abs_err.append(np.abs(values[judged] - last_pred[judged]))
            out.naive_abs_err.append(np.abs(values[judged] - store.last_value[slots][judged]))

        x = values.astype(np.float32).reshape(-1, 1)
        state = store.gather(slots)
        if self.bundle.mode == "window":
            y, new_state, ready = self._run_windows(state, x, prior_seen + 1, out)
        else:
            started = self._clock()
            y, new_state = self.bundle.step(x, state)
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
        store.record(slots[good], ts[good], values[good], y[good].astype(np.float64), now)
        seen_after = store.seen[slots[good]]
        warmup = self.warmup
        threshold = manifest.threshold if classify and manifest.threshold is not None else None
        if threshold is not None and manifest.horizon == 0:
            made = np.zeros(len(slots), dtype=bool)
            made[good] = ready[good]
            self._judge(y.astype(np.float64), labels, made, out)
        for j, n_seen in zip(good.tolist(), seen_after.tolist(), strict=True):
            if not ready[j]:
                continue  # a window still filling: no prediction yet
            i = where[int(idx[j])]
            r = rs[int(idx[j])]
            value = float(y[j])
            if threshold is None:
                out.predictions[i] = Prediction(r.stream, r.ts, value, n_seen >= warmup)
            else:
                out.predictions[i] = Prediction(
                    r.stream, r.ts, value, n_seen >= warmup, value, value >= threshold
                )

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
