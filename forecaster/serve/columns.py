"""Readings and predictions held as columns, from the codec's fast path to the encoder.

Why: on gateway batches the inference worker's own Python work costs more than the model, and a
part of it was making and reading objects one per reading: a :class:`Reading` per item at
decode, read again field by field by the engine, the journal and the responder, then a
:class:`Prediction` per reading, read again by the encoder. Here a message's readings stay the
lists msgspec's items were read into, a micro-batch's are those lists joined, and the
predictions of a micro-batch stepped whole are the model's output columns. The encoder writes
the prediction messages straight from them (``fastcodec.encode_predictions``).

Each class is a read-only :class:`~collections.abc.Sequence` of the objects it stands for, each
made when asked for: code that takes readings or predictions one at a time (the engine's wave
path, the recent-predictions cache when it is read, the replay, the tests) sees the same objects
it always did, equal to those the reference codec and the engine's object path make. Nothing
changes a column after it is made; the recent cache keeps them (see recent.py).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from itertools import chain, repeat
from operator import eq
from typing import Literal, overload

from forecaster.serve.codec import Prediction, Reading

__all__ = ["PredictionColumns", "ReadingColumns", "join_readings"]


def _same(a: Sequence[object], b: object) -> bool:
    """Element-wise equality with any other sequence (a list of objects, another columns)."""
    if not isinstance(b, Sequence) or isinstance(b, str | bytes):
        return False
    return len(a) == len(b) and all(map(eq, a, b))


class ReadingColumns(Sequence[Reading]):
    """Readings as columns: ``Reading(streams[i], values[i], ts[i], received[i], topics[i],
    labels[i])``; ``labels`` is None when no reading has one."""

    __slots__ = ("labels", "received", "streams", "topics", "ts", "values")

    def __init__(
        self,
        streams: list[str],
        values: list[float],
        ts: list[float],
        received: list[float],
        topics: list[str],
        labels: list[float | None] | None = None,
    ) -> None:
        n = len(streams)
        if not len(values) == len(ts) == len(received) == len(topics) == n or (
            labels is not None and len(labels) != n
        ):
            raise ValueError("reading columns of different lengths")
        self.streams = streams
        self.values = values
        self.ts = ts
        self.received = received
        self.topics = topics
        self.labels = labels

    @classmethod
    def message(
        cls,
        streams: list[str],
        values: list[float],
        ts: list[float],
        received: float,
        topic: str,
        labels: list[float | None] | None = None,
    ) -> ReadingColumns:
        """One message's readings: received together, on one topic."""
        n = len(streams)
        return cls(streams, values, ts, [received] * n, [topic] * n, labels)

    def __len__(self) -> int:
        return len(self.streams)

    @overload
    def __getitem__(self, i: int) -> Reading: ...
    @overload
    def __getitem__(self, i: slice) -> ReadingColumns: ...
    def __getitem__(self, i: int | slice) -> Reading | ReadingColumns:
        labels = self.labels
        if isinstance(i, slice):
            return ReadingColumns(
                self.streams[i],
                self.values[i],
                self.ts[i],
                self.received[i],
                self.topics[i],
                None if labels is None else labels[i],
            )
        label = None if labels is None else labels[i]
        return Reading(
            self.streams[i], self.values[i], self.ts[i], self.received[i], self.topics[i], label
        )

    def __iter__(self) -> Iterator[Reading]:
        labels = repeat(None) if self.labels is None else self.labels
        return map(Reading, self.streams, self.values, self.ts, self.received, self.topics, labels)

    def __eq__(self, other: object) -> bool:
        return _same(self, other)

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return f"ReadingColumns({list(self)!r})"


def join_readings(parts: Sequence[Sequence[Reading]]) -> Sequence[Reading]:
    """The readings of ``parts`` in order: joined columns when every part is columns (a
    micro-batch of gateway batches), else a list of objects."""
    if len(parts) == 1:
        return parts[0]
    if not all(isinstance(p, ReadingColumns) for p in parts):
        return list(chain.from_iterable(parts))
    cols: list[ReadingColumns] = parts  # type: ignore[assignment]
    labels: list[float | None] | None = None
    if any(c.labels is not None for c in cols):
        labels = list(
            chain.from_iterable([None] * len(c) if c.labels is None else c.labels for c in cols)
        )
    return ReadingColumns(
        list(chain.from_iterable(c.streams for c in cols)),
        list(chain.from_iterable(c.values for c in cols)),
        list(chain.from_iterable(c.ts for c in cols)),
        list(chain.from_iterable(c.received for c in cols)),
        list(chain.from_iterable(c.topics for c in cols)),
        labels,
    )


#: What a prediction document carries beside stream, ts, value and warm: nothing, the
#: interval's bounds, or an event classifier's probability and event.
Shape = Literal["plain", "interval", "event"]


class PredictionColumns(Sequence[Prediction]):
    """Predictions as columns, one per stepped reading: ``Prediction(streams[i], ts[i],
    values[i], warm[i], ...)`` with ``lower[i]``/``upper[i]`` (shape ``interval``) or
    ``probability = values[i]`` and ``event = values[i] >= threshold`` (shape ``event``).

    Short-lived: the columns are kept as the engine made them (lists), and the recent cache
    keeps only their arrays (recent.py says why)."""

    __slots__ = ("lower", "shape", "streams", "threshold", "ts", "upper", "values", "warm")

    def __init__(
        self,
        streams: Sequence[str],
        ts: Sequence[float],
        values: Sequence[float],
        warm: Sequence[bool],
        *,
        lower: Sequence[float] | None = None,
        upper: Sequence[float] | None = None,
        threshold: float | None = None,
    ) -> None:
        n = len(streams)
        if not len(ts) == len(values) == len(warm) == n:
            raise ValueError("prediction columns of different lengths")
        if (lower is None) != (upper is None) or (lower is not None and threshold is not None):
            raise ValueError("bounds come in pairs, and not with an event threshold")
        if lower is not None and upper is not None and not len(lower) == len(upper) == n:
            raise ValueError("prediction columns of different lengths")
        self.streams = streams
        self.ts = ts
        self.values = values
        self.warm = warm
        self.lower = lower
        self.upper = upper
        self.threshold = threshold
        self.shape: Shape = (
            "interval" if lower is not None else "plain" if threshold is None else "event"
        )

    def __len__(self) -> int:
        return len(self.streams)

    @overload
    def __getitem__(self, i: int) -> Prediction: ...
    @overload
    def __getitem__(self, i: slice) -> PredictionColumns: ...
    def __getitem__(self, i: int | slice) -> Prediction | PredictionColumns:
        lower, upper = self.lower, self.upper
        if isinstance(i, slice):
            return PredictionColumns(
                self.streams[i],
                self.ts[i],
                self.values[i],
                self.warm[i],
                lower=None if lower is None else lower[i],
                upper=None if upper is None else upper[i],
                threshold=self.threshold,
            )
        v = self.values[i]
        if lower is not None and upper is not None:
            return Prediction(
                self.streams[i], self.ts[i], v, self.warm[i], lower=lower[i], upper=upper[i]
            )
        if self.threshold is not None:
            return Prediction(self.streams[i], self.ts[i], v, self.warm[i], v, v >= self.threshold)
        return Prediction(self.streams[i], self.ts[i], v, self.warm[i])

    def __iter__(self) -> Iterator[Prediction]:
        head = (self.streams, self.ts, self.values, self.warm)
        if self.lower is not None and self.upper is not None:
            return map(Prediction, *head, repeat(None), repeat(None), self.lower, self.upper)
        events = self.events()
        if events is not None:
            return map(Prediction, *head, self.values, events)
        return map(Prediction, *head)

    def events(self) -> list[bool] | None:
        """Each prediction's event (shape ``event``), else None."""
        if self.threshold is None:
            return None
        threshold = self.threshold
        return [v >= threshold for v in self.values]

    def count(self, value: object) -> int:
        """Every reading has its prediction: no None (the responder asks per message)."""
        return 0 if value is None else super().count(value)

    def __eq__(self, other: object) -> bool:
        return _same(self, other)

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return f"PredictionColumns({list(self)!r})"
