"""The fast codec equals the reference codec on every payload.

``fastcodec.decode`` must return exactly what ``codec.decode`` returns (readings, rejects,
reasons, details), whatever the bytes: the fast path may only change how quickly a clean batch
is accepted. Generated batches mix clean items with every kind of bad one (hypothesis prints the
failing example; it is reproducible with the seed hypothesis reports). The encoder must give the
same JSON document as the reference encoder.
"""

from __future__ import annotations

import json
import math
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from forecaster.serve import codec, fastcodec
from forecaster.serve.codec import PayloadSpec, Prediction
from forecaster.serve.columns import ReadingColumns

SPEC = PayloadSpec(max_future_s=3600.0)
RECEIVED = 1_700_000_000.0

clean_value = st.integers(-(10**30), 10**30) | st.floats(
    -3.4e38, 3.4e38, allow_nan=False, allow_infinity=False
)
clean_ts = st.none() | st.floats(0, RECEIVED + 3000, allow_nan=False)
# Ids and strings without brackets, quotes or backslashes (those send a batch to the reference
# path, which is allowed but not what the fast-path test is about).
_plain = st.characters(blacklist_categories=("Cs", "Cc"), blacklist_characters='+#[]{}"\\')
_KEYS = ("stream", "value", "ts", "label")
stream_ids = st.text(_plain, min_size=1, max_size=8).filter(
    lambda s: s not in _KEYS and "NaN" not in s and "Infinity" not in s
)


@st.composite
def clean_item(draw: st.DrawFn) -> dict[str, Any]:
    item: dict[str, Any] = {"stream": draw(stream_ids), "value": draw(clean_value)}
    if draw(st.booleans()):
        item["ts"] = draw(clean_ts)
    if draw(st.booleans()):
        item["label"] = draw(st.sampled_from([0, 1, 0.0, 1.0, None]))
    if draw(st.booleans()):
        item["unit"] = draw(stream_ids)
    return item


def _clean_text(items: list[dict[str, Any]]) -> str:
    return json.dumps(items, ensure_ascii=False)


bad_fragments = st.sampled_from(
    [
        '{"stream":"a","value":NaN}',
        '{"stream":"a","value":1e999}',
        '{"stream":"a","value":true}',
        '{"stream":"a","value":"1"}',
        '{"stream":"a"}',
        '{"value":1}',
        '{"stream":"","value":1}',
        '{"stream":"a+b","value":1}',
        '{"stream":"\\u0061","value":1}',
        '{"stream":"\\ud800","value":1}',
        '{"stream":"a","value":1,"value":2}',
        '{"stream":"a","value":1,"ts":1,"ts":2}',
        '{"stream":"a","value":1,"ts":"2024-01-01T00:00:00Z"}',
        '{"stream":"a","value":1,"ts":-1}',
        '{"stream":"a","value":1,"ts":9999999999}',
        '{"stream":"a","value":1,"label":2}',
        '{"stream":"a","value":1,"label":true}',
        '{"stream":"a","value":1e39}',
        '{"stream":"a","value":1,"x":{"y":[1]}}',
        '{"stream":"ts","value":1}',
        '{"stream":"a","value":' + "9" * 400 + "}",
        "[]",
        "5",
        "null",
        '"s"',
    ]
)


@st.composite
def mixed_batch(draw: st.DrawFn) -> bytes:
    parts = [json.dumps(it, ensure_ascii=False) for it in draw(st.lists(clean_item(), max_size=6))]
    for _ in range(draw(st.integers(0, 2))):
        parts.insert(draw(st.integers(0, len(parts))), draw(bad_fragments))
    return ("[" + ",".join(parts) + "]").encode()


def _same(payload: bytes, spec: PayloadSpec = SPEC) -> None:
    want = codec.decode(payload, "gateway/batch", spec, RECEIVED)
    got = fastcodec.decode(payload, "gateway/batch", spec, RECEIVED)
    assert got == want, payload


@settings(max_examples=150, deadline=None)
@given(items=st.lists(clean_item(), min_size=1, max_size=8))
def test_clean_batches_take_the_fast_path_and_equal_the_reference(
    items: list[dict[str, Any]],
) -> None:
    payload = _clean_text(items).encode()
    want = codec.decode(payload, "gateway/batch", SPEC, RECEIVED)
    if want.rejects:  # the generator's ids or numbers can still break a rule: then no promise
        return
    fast = fastcodec.clean_batch(payload, "gateway/batch", SPEC, RECEIVED)
    assert fast == want, payload


@settings(max_examples=250, deadline=None)
@given(payload=mixed_batch())
def test_any_batch_decodes_as_the_reference_does(payload: bytes) -> None:
    _same(payload)


@settings(max_examples=120, deadline=None)
@given(payload=st.binary(max_size=120))
def test_any_bytes_decode_as_the_reference_does(payload: bytes) -> None:
    _same(payload)
    _same(b"[" + payload + b"]")


def test_renamed_keys_and_limits_follow_the_spec() -> None:
    spec = PayloadSpec(value_key="v", stream_key="id", ts_key="t", max_items=2, max_stream_bytes=3)
    _same(b'[{"id":"abc","v":1,"t":5},{"id":"x","v":2}]', spec)
    _same(b'[{"id":"abcd","v":1}]', spec)  # id too long
    _same(b'[{"id":"a","v":1},{"id":"b","v":1},{"id":"c","v":1}]', spec)  # too many items
    assert fastcodec.clean_batch(b'[{"id":"abc","v":1,"t":5}]', "g", spec, RECEIVED) is not None


def test_a_clean_batch_is_really_fast_pathed() -> None:
    payload = b'[{"stream":"a","value":1.5,"ts":1699999999},{"stream":"b","value":-2}]'
    fast = fastcodec.clean_batch(payload, "gateway/batch", SPEC, RECEIVED)
    assert fast is not None
    assert isinstance(fast.readings, ReadingColumns)  # no object per reading (columns.py)
    assert [(r.stream, r.value, r.ts) for r in fast.readings] == [
        ("a", 1.5, 1699999999.0),
        ("b", -2.0, RECEIVED),
    ]


finite_or_not = st.floats(allow_nan=True, allow_infinity=True)


@settings(max_examples=120, deadline=None)
@given(
    rows=st.lists(
        st.tuples(
            st.text(max_size=6),
            finite_or_not,
            finite_or_not,
            st.booleans(),
            st.none() | finite_or_not,
            st.none() | st.booleans(),
            st.none() | finite_or_not,
        ),
        min_size=1,
        max_size=5,
    ),
    batch=st.booleans(),
)
def test_encoded_predictions_are_the_reference_document(rows: list[Any], batch: bool) -> None:
    preds = [
        Prediction(s, ts, v, w, probability=p, event=e, lower=lo, upper=None if lo is None else lo)
        for s, ts, v, w, p, e, lo in rows
    ]
    if not batch:
        preds = preds[:1]
    got = fastcodec.encode_predictions(preds, "m", "v1", batch)
    want = codec.encode_predictions(preds, "m", "v1", batch)
    # Same document (floats compare as numbers; NaN never appears: both write null).
    assert json.loads(got) == json.loads(want)
    assert list(_keys(json.loads(got))) == list(_keys(json.loads(want)))


@pytest.mark.parametrize(
    "stream", ['a,"warm":1', ',"warm":', 'x\\","warm":', '"', "\\", "ü/流", "x\ud800y"]
)
def test_stream_ids_that_look_like_keys_stay_stream_ids(stream: str) -> None:
    preds = [Prediction(stream, 1.0, 2.0, True), Prediction("b", 2.0, 3.0, False, lower=1.0)]
    for batch in (True, False):
        one = preds if batch else preds[:1]
        got = json.loads(fastcodec.encode_predictions(one, 'm,"warm":', "v", batch))
        want = json.loads(codec.encode_predictions(one, 'm,"warm":', "v", batch))
        assert got == want and list(_keys(got)) == list(_keys(want))


@settings(max_examples=80, deadline=None)
@given(
    rows=st.lists(
        st.tuples(st.text(max_size=6), finite_or_not, finite_or_not, st.booleans()),
        min_size=1,
        max_size=6,
    ),
    model=st.sampled_from(["m", 'm,"warm":', "mödel"]),
)
def test_singles_are_each_message_s_own_encoding(rows: list[Any], model: str) -> None:
    """Encoded together (one pass over a micro-batch), each single-reading message's payload
    is the bytes :func:`fastcodec.encode_predictions` gives it alone, whatever the ids hold
    (non-ASCII, a lone surrogate, text that looks like a key)."""
    preds = [Prediction(s, ts, v, w, lower=v, upper=v) for s, ts, v, w in rows]
    assert fastcodec.encode_singles(preds, model, "v1") == [
        fastcodec.encode_predictions([p], model, "v1", False) for p in preds
    ]


def _keys(doc: Any) -> list[str]:
    objs = doc if isinstance(doc, list) else [doc]
    return [k for o in objs for k in o]


def test_non_finite_numbers_are_null() -> None:
    p = Prediction("a", math.nan, math.inf, True, lower=-math.inf, upper=1.0)
    doc = json.loads(fastcodec.encode_predictions([p], "m", "v", False))
    assert doc["ts"] is None and doc["value"] is None and doc["lower"] is None
    assert doc["upper"] == 1.0


@st.composite
def reading_object(draw: st.DrawFn) -> bytes:
    """A reading object (its stream id is the topic): clean, or with one kind of defect."""
    item = draw(clean_item())
    item.pop("stream")
    text = json.dumps(item, ensure_ascii=False)
    defect = draw(
        st.sampled_from(
            [
                "",
                ',"value":2',
                ',"ts":1',
                ',"stream":"a","stream":"b"',
                ',"label":2',
                ',"x":NaN',
                ',"x":{"y":1}',
                ',"x":[1]',
                ',"x":"\\u0041"',
                ',"x":' + "1" * 400,
                ',"ts":"2024-01-01T00:00:00Z"',
                ',"ts":-5',
            ]
        )
    )
    return (text[:-1] + defect + "}").encode() if defect else text.encode()


@settings(max_examples=200, deadline=None)
@given(payload=reading_object(), topic=st.sampled_from(["sensors/a/flow", "s/" + "x" * 300]))
def test_any_reading_object_decodes_as_the_reference_does(payload: bytes, topic: str) -> None:
    want = codec.decode(payload, topic, SPEC, RECEIVED)
    assert fastcodec.decode(payload, topic, SPEC, RECEIVED) == want, payload
    # A clean object with none of the defects (they all add an "x" key or a repeated one)
    # must take the fast path.
    if not want.rejects and b"x" not in payload and topic == "sensors/a/flow":
        assert fastcodec.clean_object(payload, topic, SPEC, RECEIVED) == want, payload


@settings(max_examples=200, deadline=None)
@given(
    objects=st.lists(
        st.tuples(reading_object(), st.sampled_from(["sensors/a/flow", "s/b", "s/" + "x" * 300])),
        min_size=1,
        max_size=6,
    ),
    extra=st.sampled_from([b"", b"  ", b"12.5", b"[]", b"{", b"}", b'{"value":1},{"value":2}']),
)
def test_reading_objects_decoded_together_are_the_references_readings(
    objects: list[tuple[bytes, str]], extra: bytes
) -> None:
    """Either every payload's reading, exactly as the reference decodes it one by one, or None
    (then each is decoded alone): never a reading the reference would not give. ``extra``, when
    not empty, is one more payload that is not a clean reading object by itself."""
    payloads = [p for p, _ in objects]
    topics = [t for _, t in objects]
    if extra:
        payloads.append(extra)
        topics.append("sensors/e/flow")
    got = fastcodec.clean_objects(payloads, topics, SPEC, RECEIVED)
    want = [codec.decode(p, t, SPEC, RECEIVED) for p, t in zip(payloads, topics, strict=True)]
    if got is not None:
        assert all(not w.rejects and len(w.readings) == 1 for w in want), payloads
        assert got == [w.readings[0] for w in want], payloads
    # Clean objects (no defect but a harmless repeated ts, short topics) take the fast path.
    clean = not extra and all(
        not w.rejects and b'"x"' not in p and b'"stream"' not in p and b'"ts":"' not in p
        for w, p in zip(want, payloads, strict=True)
    )
    if clean and all(len(t) < 64 for t in topics):
        assert got is not None, payloads


def test_clean_reading_objects_are_decoded_together() -> None:
    payloads = [b'{"value": 1.5, "ts": 1699999999}', b' {"value":-2} ', b'{"value":3,"label":1}']
    topics = ["s/a", "s/b", "s/c"]
    got = fastcodec.clean_objects(payloads, topics, SPEC, RECEIVED)
    assert got == [
        codec.Reading("s/a", 1.5, 1699999999.0, RECEIVED, "s/a", None),
        codec.Reading("s/b", -2.0, RECEIVED, RECEIVED, "s/b", None),
        codec.Reading("s/c", 3.0, RECEIVED, RECEIVED, "s/c", 1.0),
    ]
    # One payload the reference must judge sends them all back to one-by-one decoding.
    for bad in (b'{"value":NaN}', b'{"value":1,"value":2}', b'{"value":1,"x":{"y":1}}', b"7"):
        assert fastcodec.clean_objects([*payloads, bad], [*topics, "s/d"], SPEC, RECEIVED) is None
