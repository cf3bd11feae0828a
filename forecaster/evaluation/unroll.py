"""Scoring a model exactly as the daemon runs it: one step at a time, from a zero state.

The unroll here is shared by training (validation, with PyTorch) and ``forecaster evaluate``
(ONNX Runtime), so the figures in ``report.json``, ``model.json`` and ``evaluate`` mean the same.
A window model is run the same way the daemon runs it: one prediction per reading from the last W
readings, none for a segment's first W−1. An event classifier's probabilities are lined up with
the label of the reading they are about (:func:`unroll_events`).
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from forecaster.data import Dataset, Score, Series, cut_index, score
from forecaster.errors import DataError
from forecaster.model import clip, spread
from forecaster.model.bundle import Bundle, Interval
from forecaster.model.classify import ClassScore, score_events
from forecaster.model.windows import windows

#: Maps the readings of one segment (``[T]`` raw values, zero state at its start) to the
#: one-step predictions made after each reading (``[T]``: ``out[k]`` predicts ``values[k+1]``).
SegmentPredictor = Callable[[np.ndarray], np.ndarray]


@dataclass
class Unroll:
    """Every one-step prediction over a dataset, aligned with the reading it predicts."""

    stream: list[str]
    row: np.ndarray
    time: np.ndarray
    actual: np.ndarray
    predicted: np.ndarray
    naive: np.ndarray
    warm: np.ndarray
    scored: np.ndarray
    scale_diffs: np.ndarray
    #: True at each segment's first prediction (a stream's start, or its restart after a gap).
    segment_start: np.ndarray
    #: The prediction interval's bounds (raw units), when the bundle has one.
    lower: np.ndarray | None = None
    upper: np.ndarray | None = None
    coverage: float | None = None

    def score(self) -> Score:
        m = self.scored
        return score(self.actual[m], self.predicted[m], self.naive[m], self.scale_diffs)

    def spreads(self, weight: float, start: float) -> np.ndarray:
        """The stream's spread when each prediction was made (:func:`spread.along` over each
        segment's readings, which ``naive`` holds: the reading each prediction was made after)."""
        out = np.empty(len(self.naive))
        starts = [*np.flatnonzero(self.segment_start).tolist(), len(self.naive)]
        for a, b in itertools.pairwise(starts):
            out[a:b] = spread.along(self.naive[a:b], start, weight)
        return out

    def with_interval(self, interval: Interval | None) -> Unroll:
        """The same predictions with the interval's bounds attached (scaled by the stream's
        spread at each prediction when the interval says so)."""
        if interval is None:
            return self
        at = None if interval.spreading is None else self.spreads(*interval.spreading)
        self.lower, self.upper = interval.bounds(self.predicted, at)
        self.coverage = interval.coverage
        return self

    def interval_score(self) -> dict[str, float] | None:
        """Empirical coverage and mean width of the interval over the scored predictions, next
        to the coverage it was calibrated for; None without an interval."""
        if self.lower is None or self.upper is None or self.coverage is None:
            return None
        m = self.scored
        a, lo, hi = self.actual[m], self.lower[m], self.upper[m]
        if not a.size:
            return None
        return {
            "interval_target": self.coverage,
            "interval_coverage": float(np.mean((lo <= a) & (a <= hi))),
            "interval_width": float(np.mean(hi - lo)),
        }


def unroll(
    series: Sequence[Series],
    predict: SegmentPredictor,
    warmup: int,
    cuts: Sequence[int] | None = None,
    first: int = 0,
) -> Unroll:
    """Run ``predict`` over every segment and line predictions up with their targets.

    A prediction is *warm* once its stream has seen ``warmup`` readings since the last reset
    (the daemon's ``warm`` flag); it is *scored* when warm and its target's index in its series
    is at or after that series' cut (``None``: score everything warm). The first ``first``
    readings of each segment give no prediction (a window model's W−1): they are left out.
    """
    cols: dict[str, list[np.ndarray]] = {
        k: [] for k in ("row", "time", "actual", "predicted", "naive", "warm", "scored", "start")
    }
    names: list[str] = []
    diffs: list[np.ndarray] = []
    for i, s in enumerate(series):
        cut = cuts[i] if cuts is not None else 0
        for a, b in s.segments():
            vals = s.values[a:b]
            if b - a < 2:
                continue
            before = np.arange(a + 1, b) < cut
            diffs.append(np.diff(vals)[before])
            if b - a < first + 2:
                continue
            preds = np.asarray(predict(vals), dtype=np.float64)
            if preds.shape != vals.shape:
                raise DataError(f"predictor returned {preds.shape} for {vals.shape} readings")
            target = np.arange(a + 1 + first, b)
            warm = np.arange(1 + first, b - a) >= warmup
            cols["row"].append(s.rows[target])
            cols["time"].append(
                s.times[target] if s.times is not None else np.full(len(target), np.nan)
            )
            cols["actual"].append(vals[1 + first :])
            cols["predicted"].append(preds[first:-1])
            cols["naive"].append(vals[first:-1])
            cols["warm"].append(warm)
            cols["scored"].append(warm & (target >= cut))
            cols["start"].append(np.arange(len(target)) == 0)
            names.extend([s.name] * len(target))
    if not names:
        raise DataError("no segment has two consecutive readings to predict")
    cat = {k: np.concatenate(v) for k, v in cols.items()}
    return Unroll(
        stream=names,
        row=cat["row"],
        time=cat["time"],
        actual=cat["actual"],
        predicted=cat["predicted"],
        naive=cat["naive"],
        warm=cat["warm"].astype(bool),
        scored=cat["scored"].astype(bool),
        scale_diffs=np.concatenate(diffs),
        segment_start=cat["start"].astype(bool),
    )


#: Readings per call when a sequence graph runs a segment (the state is carried across calls).
SEQUENCE_CHUNK = 4096


def bundle_run(bundle: Bundle) -> clip.Rows:
    """The ONNX graph over the rows of a padded batch, as the daemon runs it: a sequence graph
    (format 3) in one call; a one-step graph (format 1-2) one reading at a time, each row's
    state kept once its readings end."""
    if bundle.sequence:

        def rows(
            x: np.ndarray, lens: np.ndarray, state: list[np.ndarray]
        ) -> tuple[np.ndarray, list[np.ndarray]]:
            y, new = bundle.run(x, lens, state)
            return np.asarray(y, dtype=np.float64), list(new)

        return rows

    def steps(
        x: np.ndarray, lens: np.ndarray, state: list[np.ndarray]
    ) -> tuple[np.ndarray, list[np.ndarray]]:
        y = np.empty(x.shape[:2], dtype=np.float64)
        for t in range(x.shape[1]):
            y[:, t], new = bundle.step(x[:, t], state)
            going = (t < lens)[None, :, None]
            state = [np.where(going, n, s) for n, s in zip(new, state, strict=True)]
        return y, state

    return steps


def predictor(
    run: clip.Rows,
    zero: Callable[[], list[np.ndarray]],
    limit: float | None,
    spreading: tuple[float, float] | None,
    chunk: int | None = SEQUENCE_CHUNK,
) -> SegmentPredictor:
    """Each segment through ``run`` from the state ``zero()``: in calls of up to ``chunk``
    readings (None: one call; the state is carried, and the fused RNN steps the same
    arithmetic either way), or, with a clip ``limit`` and the interval's ``spreading`` (weight,
    a new stream's spread), through :func:`clip.segment`, as the daemon clips them."""
    if limit is not None and spreading is not None:
        weight, start = spreading
        k = limit
        return lambda values: clip.segment(values, run, zero(), start, weight, k)

    def plain(values: np.ndarray) -> np.ndarray:
        v = np.asarray(values, dtype=np.float64)
        out = np.empty(len(v), dtype=np.float64)
        state = zero()
        step = chunk or max(len(v), 1)
        for lo in range(0, len(v), step):
            part = v[None, lo : lo + step, None]
            y, state = run(part, np.array([part.shape[1]], dtype=np.int64), state)
            out[lo : lo + part.shape[1]] = y[0]
        return out

    return plain


def bundle_predictor(bundle: Bundle) -> SegmentPredictor:
    """Each segment through the graph from a zero state (:func:`bundle_run`), clipped as the
    manifest says."""
    m = bundle.manifest
    spreading = None if m.interval is None else m.interval.spreading
    return predictor(bundle_run(bundle), lambda: list(bundle.zero_state(1)), m.clip, spreading)


@dataclass
class EventUnroll:
    """Every event probability over a labelled dataset, aligned with the label it predicts.

    ``row``/``time``/``label`` are those of the reading whose label is predicted (the last reading
    of the window with horizon 0, the next one with horizon 1); ``made_row``/``made_time`` those
    of the reading after which the prediction was made (what the daemon stamps it with).
    """

    stream: list[str]
    row: np.ndarray
    time: np.ndarray
    made_row: np.ndarray
    made_time: np.ndarray
    label: np.ndarray
    probability: np.ndarray
    scored: np.ndarray
    threshold: float

    def score(self) -> ClassScore:
        m = self.scored
        return score_events(self.label[m], self.probability[m], self.threshold)


def unroll_events(
    series: Sequence[Series],
    predict: SegmentPredictor,
    threshold: float,
    horizon: int = 0,
    cuts: Sequence[int] | None = None,
    first: int = 0,
) -> EventUnroll:
    """Run ``predict`` over every segment and pair the probability after reading ``k`` with the
    label of reading ``k + horizon`` (same segment). Readings before ``first`` in a segment give
    no prediction; a prediction is *scored* when its label is known and at/after the cut."""
    cols: dict[str, list[np.ndarray]] = {
        k: [] for k in ("row", "time", "made_row", "made_time", "label", "probability", "scored")
    }
    names: list[str] = []
    for i, s in enumerate(series):
        if s.labels is None:
            raise DataError(f"series {s.name!r} has no labels: give the label column")
        cut = cuts[i] if cuts is not None else 0
        for a, b in s.segments():
            if b - a < first + 1 + horizon:
                continue
            preds = np.asarray(predict(s.values[a:b]), dtype=np.float64)
            made = np.arange(a + first, b - horizon)
            target = made + horizon
            label = s.labels[target]
            nan_times = np.full(len(target), np.nan)
            cols["row"].append(s.rows[target])
            cols["time"].append(s.times[target] if s.times is not None else nan_times)
            cols["made_row"].append(s.rows[made])
            cols["made_time"].append(s.times[made] if s.times is not None else nan_times)
            cols["label"].append(label)
            cols["probability"].append(preds[made - a])
            cols["scored"].append(np.isfinite(label) & (target >= cut))
            names.extend([s.name] * len(target))
    if not names:
        raise DataError("no segment is long enough for one prediction")
    cat = {k: np.concatenate(v) for k, v in cols.items()}
    return EventUnroll(
        stream=names,
        row=cat["row"],
        time=cat["time"],
        made_row=cat["made_row"],
        made_time=cat["made_time"],
        label=cat["label"],
        probability=cat["probability"],
        scored=cat["scored"].astype(bool),
        threshold=threshold,
    )


def window_predictor(
    bundle_or_fn: Bundle | Callable[[np.ndarray], np.ndarray], window: int, chunk: int = 4096
) -> SegmentPredictor:
    """Every window of a segment in batched calls, as the daemon's window path runs them.

    ``out[k]`` is the prediction from readings ``k-W+1 … k``; NaN for ``k < W-1``."""
    run = bundle_or_fn.predict_windows if isinstance(bundle_or_fn, Bundle) else bundle_or_fn

    def predict(values: np.ndarray) -> np.ndarray:
        out = np.full(len(values), np.nan)
        x = windows(values.astype(np.float32), window)
        for lo in range(0, len(x), chunk):
            y = np.asarray(run(x[lo : lo + chunk]), dtype=np.float64)
            out[window - 1 + lo : window - 1 + lo + len(y)] = y
        return out

    return predict


def evaluate_bundle(bundle: Bundle, data: Dataset, warmup: int | None, start: str | None) -> Unroll:
    w = bundle.manifest.warmup if warmup is None else warmup
    if w < 0:
        raise DataError("--warmup must be 0 or more")
    cuts = [cut_index(s, start) for s in data.series] if start is not None else None
    if bundle.mode == "window":
        predictor = window_predictor(bundle, bundle.window)
        result = unroll(data.series, predictor, w, cuts, first=bundle.window - 1)
    else:
        result = unroll(data.series, bundle_predictor(bundle), w, cuts)
    return result.with_interval(bundle.interval)


def evaluate_events(bundle: Bundle, data: Dataset, start: str | None) -> EventUnroll:
    """An event classifier's probabilities over ``data`` (which must carry the label column)."""
    m = bundle.manifest
    if m.threshold is None or m.horizon is None:
        raise DataError(f"bundle {bundle.path} is not an event classifier")
    cuts = [cut_index(s, start) for s in data.series] if start is not None else None
    if bundle.mode == "window":
        predictor = window_predictor(bundle, bundle.window)
    else:
        predictor = bundle_predictor(bundle)
    first = bundle.window - 1
    return unroll_events(data.series, predictor, m.threshold, m.horizon, cuts, first)
