"""Readings and predictions as columns are the objects they stand for, and encode to their bytes.

:class:`ReadingColumns` and :class:`PredictionColumns` replace lists of objects on the gateway
batch path, so every way the rest of the daemon reads a list (index, negative index, slice,
iteration, length, equality, ``count(None)``) must give what the list of objects gives, and the
encoder must write exactly the bytes it writes for the objects (hypothesis prints the failing
example; it is reproducible with the seed hypothesis reports).
"""

from __future__ import annotations

import itertools
import json
import math
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from forecaster.serve import codec, fastcodec
from forecaster.serve.codec import Prediction, Reading
from forecaster.serve.columns import PredictionColumns, ReadingColumns, join_readings

finite = st.floats(allow_nan=False, allow_infinity=False)
any_float = st.floats(allow_nan=True, allow_infinity=True)
# Ids as a broker may hand them over: non-ASCII, quotes, backslashes, text that looks like a
# key, and lone surrogates (the encoders must fall back to the reference's escaping for those).
ids = st.text(max_size=6) | st.sampled_from(['a,"warm":1', 'x\\","warm":', "ü/流", "x\ud800y"])

reading_rows = st.lists(
    st.tuples(ids, finite, finite, finite, ids, st.none() | st.sampled_from([0.0, 1.0])),
    max_size=12,
)


def readings_of(rows: list[Any], labelled: bool) -> tuple[list[Reading], ReadingColumns]:
    objs = [Reading(s, v, t, rc, tp, lab if labelled else None) for s, v, t, rc, tp, lab in rows]
    cols = ReadingColumns(
        [r.stream for r in objs],
        [r.value for r in objs],
        [r.ts for r in objs],
        [r.received for r in objs],
        [r.topic for r in objs],
        [r.label for r in objs] if labelled else None,
    )
    return objs, cols


@settings(max_examples=150, deadline=None)
@given(rows=reading_rows, labelled=st.booleans(), cut=st.integers(-14, 14))
def test_reading_columns_read_as_the_list_of_readings(
    rows: list[Any], labelled: bool, cut: int
) -> None:
    objs, cols = readings_of(rows, labelled)
    assert len(cols) == len(objs)
    assert list(cols) == objs and cols == objs and objs == cols
    assert [cols[i] for i in range(-len(objs), len(objs))] == objs + objs
    for part in (cols[:cut], cols[cut:], cols[::2]):
        assert isinstance(part, ReadingColumns)
    assert (cols[:cut], cols[cut:], cols[::2]) == (objs[:cut], objs[cut:], objs[::2])
    if objs:
        with pytest.raises(IndexError):
            cols[len(objs)]
        changed = [*objs[:-1], Reading("other", 1.0, 2.0, 3.0, "t")]
        assert cols != changed
    assert cols != [*objs, Reading("more", 1.0, 2.0, 3.0, "t")]
    assert cols != "not readings"


@settings(max_examples=100, deadline=None)
@given(rows=reading_rows, cuts=st.lists(st.integers(0, 12), max_size=3), labels=st.booleans())
def test_joined_columns_are_the_messages_readings_in_order(
    rows: list[Any], cuts: list[int], labels: bool
) -> None:
    """A micro-batch of gateway batches, some with labels and some without: the joined columns
    are every message's readings in order; one part of objects makes it a list."""
    objs, cols = readings_of(rows, labels)
    bounds = sorted({0, len(objs), *(min(c, len(objs)) for c in cuts)})
    parts = [cols[a:b] for a, b in itertools.pairwise(bounds)]
    if len(parts) > 1:
        # a part without labels beside labelled ones: its readings have none
        unlabelled = parts[0]
        parts[0] = ReadingColumns(
            unlabelled.streams,
            unlabelled.values,
            unlabelled.ts,
            unlabelled.received,
            unlabelled.topics,
        )
        objs = [
            Reading(r.stream, r.value, r.ts, r.received, r.topic) if k < len(parts[0]) else r
            for k, r in enumerate(objs)
        ]
    joined = join_readings(parts)
    assert joined == objs
    assert isinstance(joined, ReadingColumns) or not parts
    if len(parts) > 1:
        mixed = join_readings([list(parts[0]), *parts[1:]])
        assert isinstance(mixed, list) and mixed == objs


def test_one_message_s_readings_share_its_topic_and_receive_time() -> None:
    cols = ReadingColumns.message(["a", "b"], [1.0, 2.0], [3.0, 4.0], 9.0, "gw/1", [None, 1.0])
    assert list(cols) == [
        Reading("a", 1.0, 3.0, 9.0, "gw/1"),
        Reading("b", 2.0, 4.0, 9.0, "gw/1", 1.0),
    ]
    with pytest.raises(ValueError, match="different lengths"):
        ReadingColumns(["a"], [1.0, 2.0], [3.0], [0.0], ["t"])
    with pytest.raises(ValueError, match="different lengths"):
        ReadingColumns(["a"], [1.0], [3.0], [0.0], ["t"], [None, None])


SHAPES = ("plain", "interval", "event")
prediction_rows = st.lists(
    # 0.5: the event threshold the tests use (a value at it is an event)
    st.tuples(ids, any_float, any_float | st.just(0.5), st.booleans(), any_float, any_float),
    max_size=10,
)


def predictions_of(rows: list[Any], shape: str) -> tuple[list[Prediction], PredictionColumns]:
    streams = [r[0] for r in rows]
    ts, values, warm = [r[1] for r in rows], [r[2] for r in rows], [r[3] for r in rows]
    if shape == "interval":
        lower, upper = [r[4] for r in rows], [r[5] for r in rows]
        cols = PredictionColumns(streams, ts, values, warm, lower=lower, upper=upper)
        objs = [
            Prediction(s, t, v, w, lower=lo, upper=hi)
            for s, t, v, w, lo, hi in zip(streams, ts, values, warm, lower, upper, strict=True)
        ]
    elif shape == "event":
        cols = PredictionColumns(streams, ts, values, warm, threshold=0.5)
        objs = [
            Prediction(s, t, v, w, v, v >= 0.5)
            for s, t, v, w in zip(streams, ts, values, warm, strict=True)
        ]
    else:
        cols = PredictionColumns(streams, ts, values, warm)
        objs = list(map(Prediction, streams, ts, values, warm))
    return objs, cols


def _same_predictions(a: list[Prediction], b: list[Prediction]) -> bool:
    """Equal, NaN matching NaN (a non-finite model output is still published, as null)."""

    return list(map(repr, a)) == list(map(repr, b))


@settings(max_examples=150, deadline=None)
@given(rows=prediction_rows, shape=st.sampled_from(SHAPES), cut=st.integers(-12, 12))
def test_prediction_columns_read_as_the_list_of_predictions(
    rows: list[Any], shape: str, cut: int
) -> None:
    objs, cols = predictions_of(rows, shape)
    assert cols.shape == shape and len(cols) == len(objs)
    assert _same_predictions(list(cols), objs)
    assert _same_predictions([cols[i] for i in range(-len(objs), len(objs))], objs + objs)
    for part, want in ((cols[:cut], objs[:cut]), (cols[cut:], objs[cut:])):
        assert isinstance(part, PredictionColumns) and part.shape == shape
        assert _same_predictions(list(part), want)
    assert cols.count(None) == 0


def test_prediction_columns_refuse_what_no_prediction_is() -> None:
    with pytest.raises(ValueError, match="different lengths"):
        PredictionColumns(["a"], [1.0], [2.0, 3.0], [True])
    with pytest.raises(ValueError, match="pairs"):
        PredictionColumns(["a"], [1.0], [2.0], [True], lower=[1.0])
    with pytest.raises(ValueError, match="pairs"):
        PredictionColumns(["a"], [1.0], [2.0], [True], lower=[1.0], upper=[3.0], threshold=0.5)
    with pytest.raises(ValueError, match="different lengths"):
        PredictionColumns(["a"], [1.0], [2.0], [True], lower=[1.0, 2.0], upper=[3.0, 4.0])


MODELS = ("water-flow", 'm,"warm":', "mödel")


@settings(max_examples=200, deadline=None)
@given(
    rows=prediction_rows.filter(bool),
    shape=st.sampled_from(SHAPES),
    model=st.sampled_from(MODELS),
    batch=st.booleans(),
)
def test_columns_encode_to_the_bytes_of_their_objects(
    rows: list[Any], shape: str, model: str, batch: bool
) -> None:
    """Written from the columns, a prediction message is byte for byte the message written
    from the Prediction objects (and so the reference's document), whatever the ids and the
    model's name hold and whatever the model output (NaN and infinities are null)."""
    objs, cols = predictions_of(rows, shape)
    if not batch:
        objs, cols = objs[:1], cols[:1]
    got = fastcodec.encode_predictions(cols, model, "v1", batch)
    assert got == fastcodec.encode_predictions(objs, model, "v1", batch)
    assert json.loads(got) == json.loads(codec.encode_predictions(objs, model, "v1", batch))
    assert fastcodec.encode_singles(cols, model, "v1") == fastcodec.encode_singles(
        objs, model, "v1"
    )


def test_a_columns_document_has_the_reference_keys_in_order() -> None:
    _, cols = predictions_of([("s", 1.0, 2.0, True, 1.5, math.inf)], "interval")
    doc = json.loads(fastcodec.encode_predictions(cols, "m", "v", True))
    assert doc == [
        {
            "stream": "s",
            "ts": 1.0,
            "value": 2.0,
            "model": "m",
            "version": "v",
            "warm": True,
            "lower": 1.5,
            "upper": None,
        }
    ]
    assert list(doc[0]) == ["stream", "ts", "value", "model", "version", "warm", "lower", "upper"]
    two = PredictionColumns(["a", "b"], [1.0, 2.0], [1.0, 2.0], [True, True])
    with pytest.raises(ValueError, match="exactly one"):
        fastcodec.encode_predictions(two, "m", "v", False)
