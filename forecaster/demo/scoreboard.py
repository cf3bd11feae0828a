"""The demo's pure core: join published readings with received predictions and score them.

No I/O and no clock of its own (every event carries its time), so it is unit-tested with
hand-worked numbers. Thread-safe: the replay thread reports what it sent, the MQTT thread what
came back, and the view reads :class:`Snapshot` copies.

An **anomaly** is a held-out reading the model did not expect: its one-step error is more than
``ANOMALY_FACTOR`` times the stream's typical error so far (the mean absolute error of its
earlier held-out targets, once there are ``ANOMALY_MIN_N`` of them). That is the simplest rule
that uses the product's output the way a person would (actual vs predicted); the demo injects
one on purpose so there is something to see.
"""

from __future__ import annotations

import math
import threading
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from forecaster.replay import ReplayItem

SPARK_WIDTH = 48  # most targets a sparkline shows; fewer on narrow terminals
ANOMALY_FACTOR = 10.0
ANOMALY_MIN_N = 20


@dataclass(frozen=True)
class Anomaly:
    """One flagged reading: where, what came, what was expected, how many typical errors off."""

    row: int
    ts: float
    actual: float
    predicted: float
    factor: float


@dataclass
class _Stream:
    """What the scoreboard knows about one stream (one reading topic)."""

    name: str
    route: str
    values: dict[int, float]  # row -> actual
    row_of_ts: dict[float, int]
    ts_of_row: dict[int, float]
    next_row: dict[int, int]
    prev_row: dict[int, int]
    live: set[int] = field(default_factory=set)  # rows of held-out readings
    published: set[int] = field(default_factory=set)
    predicted: dict[int, float] = field(default_factory=dict)  # row of the reading -> prediction
    scored: set[int] = field(default_factory=set)  # rows of scored targets
    n: int = 0
    abs_err: float = 0.0
    naive_abs_err: float = 0.0
    sq_err: float = 0.0
    naive_sq_err: float = 0.0
    last: tuple[float, float, float] | None = None  # (ts, actual, predicted) of the last target
    recent: deque[tuple[float, float]] = field(default_factory=lambda: deque(maxlen=SPARK_WIDTH))
    anomalies: list[Anomaly] = field(default_factory=list)


@dataclass(frozen=True)
class StreamView:
    name: str
    route: str
    n: int
    last_ts: float | None
    actual: float | None
    predicted: float | None
    mae: float
    naive_mae: float
    skill: float
    recent_actual: tuple[float, ...]
    recent_predicted: tuple[float, ...]
    anomalies: tuple[Anomaly, ...]


@dataclass(frozen=True)
class Snapshot:
    """Everything the view shows, copied out under the scoreboard's lock."""

    phase: str
    sent_warm: int
    total_warm: int
    sent_live: int
    total_live: int
    received: int
    scored: int
    rmse: float
    naive_rmse: float
    skill: float
    latency_ms: tuple[float, float]  # p50, p99; NaN while there is none
    latency_n: int
    streams: tuple[StreamView, ...]


def skill_of(sq_err: float, naive_sq_err: float) -> float:
    """1 - RMSE_model / RMSE_persistence over the same targets; NaN while undefined."""
    if naive_sq_err <= 0:
        return math.nan
    return 1.0 - math.sqrt(sq_err / naive_sq_err)


class Scoreboard:
    """Joins published readings and received predictions; thread-safe, no I/O.

    A prediction made at reading *t* is scored against the actual *t+1* once both the prediction
    has arrived and reading *t+1* has been published (in either order), and only when *t+1* is a
    held-out reading (in ``live_items``). Latency pairs the publish time of a held-out reading
    with the receive time of its prediction, keyed by (topic, ts), whichever is recorded first.
    ``routes`` maps a reading topic to the route (model) that serves it, for the view.
    """

    def __init__(
        self,
        warm_items: Sequence[ReplayItem],
        live_items: Sequence[ReplayItem],
        routes: dict[str, str] | None = None,
    ) -> None:
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)
        self.total_warm = len(warm_items)
        self.total_live = len(live_items)
        self._live = {(it.topic, it.row) for it in live_items}
        self._streams: dict[str, _Stream] = {}
        routes = routes or {}
        for it in (*warm_items, *live_items):
            s = self._streams.get(it.topic)
            if s is None:
                s = self._streams[it.topic] = _Stream(
                    it.stream, routes.get(it.topic, ""), {}, {}, {}, {}, {}
                )
            if s.values:
                last = next(reversed(s.values))
                s.next_row[last] = it.row
                s.prev_row[it.row] = last
            s.values[it.row] = it.value
            if it.ts is not None:
                s.row_of_ts[it.ts] = it.row
                s.ts_of_row[it.row] = it.ts
        for it in live_items:
            self._streams[it.topic].live.add(it.row)
        self._last_warm_row = {it.topic: it.row for it in warm_items}
        self.phase = "starting"
        self.sent_warm = 0
        self.sent_live = 0
        self.received = 0
        self.scored = 0
        self._sq = 0.0
        self._naive_sq = 0.0
        self._sent_at: dict[tuple[str, float], float] = {}
        self._received_at: dict[tuple[str, float], float] = {}
        self._latencies: list[float] = []

    # -- events ----------------------------------------------------------------------------

    def set_phase(self, phase: str) -> None:
        with self._changed:
            self.phase = phase
            self._changed.notify_all()

    def on_sent(self, item: ReplayItem, now: float) -> None:
        """Reading ``item`` was handed to the MQTT client at wall time ``now``."""
        with self._lock:
            s = self._streams[item.topic]
            s.published.add(item.row)
            if (item.topic, item.row) in self._live:
                self.sent_live += 1
                if item.ts is not None:
                    key = (item.topic, item.ts)
                    got = self._received_at.pop(key, None)
                    if got is None:
                        self._sent_at[key] = now
                    else:
                        self._latencies.append(got - now)
            else:
                self.sent_warm += 1
            prev = s.prev_row.get(item.row)
            if prev is not None:
                self._score(s, prev)

    def on_prediction(self, topic: str, ts: float | None, value: float | None, now: float) -> None:
        """A prediction for the reading on ``topic`` at data time ``ts`` arrived at ``now``."""
        with self._changed:
            self.received += 1
            s = self._streams.get(topic)
            row = None if s is None or ts is None else s.row_of_ts.get(ts)
            if s is None or ts is None or row is None:
                return
            if (topic, row) in self._live:
                key = (topic, ts)
                sent = self._sent_at.pop(key, None)
                if sent is None:
                    self._received_at[key] = now
                else:
                    self._latencies.append(now - sent)
            if value is not None and math.isfinite(value):
                s.predicted[row] = value
                self._score(s, row)
            if row == self._last_warm_row.get(topic):
                self._changed.notify_all()

    def _score(self, s: _Stream, row: int) -> None:
        target = s.next_row.get(row)
        if (
            target is None
            or target not in s.live
            or target in s.scored
            or target not in s.published
            or row not in s.predicted
        ):
            return
        s.scored.add(target)
        actual, pred, before = s.values[target], s.predicted.pop(row), s.values[row]
        err, naive = actual - pred, actual - before
        if s.n >= ANOMALY_MIN_N and s.abs_err > 0:
            factor = abs(err) / (s.abs_err / s.n)
            if factor > ANOMALY_FACTOR:
                ts = s.ts_of_row.get(target, math.nan)
                s.anomalies.append(Anomaly(target, ts, actual, pred, factor))
        s.n += 1
        s.abs_err += abs(err)
        s.naive_abs_err += abs(naive)
        s.sq_err += err * err
        s.naive_sq_err += naive * naive
        s.last = (s.ts_of_row.get(target, math.nan), actual, pred)
        s.recent.append((actual, pred))
        self.scored += 1
        self._sq += err * err
        self._naive_sq += naive * naive

    # -- waiting and reading ---------------------------------------------------------------

    def wait_warm(self, timeout: float, stop: threading.Event) -> bool:
        """Wait until every stream's prediction for its last training reading has arrived."""
        deadline = time.monotonic() + timeout
        with self._changed:
            while not all(
                row in s.predicted or s.next_row.get(row) in s.scored
                for topic, row in self._last_warm_row.items()
                for s in (self._streams[topic],)
            ):
                left = deadline - time.monotonic()
                if left <= 0 or stop.is_set():
                    return False
                self._changed.wait(min(left, 0.2))
        return True

    def snapshot(self) -> Snapshot:
        with self._lock:
            lat = np.asarray(self._latencies, dtype=np.float64) * 1e3
            streams = tuple(
                StreamView(
                    name=s.name,
                    route=s.route,
                    n=s.n,
                    last_ts=None if s.last is None else s.last[0],
                    actual=None if s.last is None else s.last[1],
                    predicted=None if s.last is None else s.last[2],
                    mae=s.abs_err / s.n if s.n else math.nan,
                    naive_mae=s.naive_abs_err / s.n if s.n else math.nan,
                    skill=skill_of(s.sq_err, s.naive_sq_err),
                    recent_actual=tuple(a for a, _ in s.recent),
                    recent_predicted=tuple(p for _, p in s.recent),
                    anomalies=tuple(s.anomalies),
                )
                for s in self._streams.values()
            )
            n = self.scored
            return Snapshot(
                phase=self.phase,
                sent_warm=self.sent_warm,
                total_warm=self.total_warm,
                sent_live=self.sent_live,
                total_live=self.total_live,
                received=self.received,
                scored=n,
                rmse=math.sqrt(self._sq / n) if n else math.nan,
                naive_rmse=math.sqrt(self._naive_sq / n) if n else math.nan,
                skill=skill_of(self._sq, self._naive_sq),
                latency_ms=(
                    (float(np.percentile(lat, 50)), float(np.percentile(lat, 99)))
                    if lat.size
                    else (math.nan, math.nan)
                ),
                latency_n=int(lat.size),
                streams=streams,
            )


class RateMeter:
    """Events per second over a sliding window of (time, running count) samples."""

    def __init__(self, window: float = 2.0) -> None:
        self._window = window
        self._samples: deque[tuple[float, int]] = deque()

    def update(self, now: float, count: int) -> float:
        self._samples.append((now, count))
        while len(self._samples) > 2 and now - self._samples[0][0] > self._window:
            self._samples.popleft()
        t0, c0 = self._samples[0]
        return (count - c0) / (now - t0) if now > t0 else 0.0
