"""Payload decoding/encoding and MQTT topic rules.

Expected topic-match results come from the examples in the MQTT 5.0 specification, section 4.7;
expected epoch values were computed independently (``date -d ... +%s``).
"""

from __future__ import annotations

import json
import math
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from forecaster.serve.codec import (
    Decoded,
    PayloadSpec,
    Prediction,
    Reading,
    Reason,
    decode,
    encode_predictions,
    prediction_topic,
    topic_matches,
    validate_filter,
    validate_topic_template,
)

T0 = 1_700_000_000.5
SPEC = PayloadSpec()
TOPIC = "sensors/a/flow"


def dec(payload: bytes, spec: PayloadSpec = SPEC, topic: str = TOPIC) -> Decoded:
    return decode(payload, topic, spec, T0)


def only_reject(d: Decoded) -> Reason:
    assert d.readings == []
    assert len(d.rejects) == 1
    return d.rejects[0][0]


# --- plain numbers -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("payload", "value"),
    [(b"21.5", 21.5), (b"-3e2", -300.0), (b"  7\r\n", 7.0), (b"+.5", 0.5), (b"0", 0.0)],
)
def test_plain_number(payload: bytes, value: float) -> None:
    d = dec(payload)
    assert d.rejects == []
    assert d.batch is False
    assert d.readings == [Reading(TOPIC, value, T0, T0, TOPIC)]


@pytest.mark.parametrize("payload", [b"nan", b"inf", b"-Infinity", b"NaN", b"1e999"])
def test_plain_non_finite(payload: bytes) -> None:
    assert only_reject(dec(payload)) is Reason.NOT_FINITE


@pytest.mark.parametrize(
    "payload",
    [b"abc", b"1_000", "١٢".encode(), b"0x10", b"1 2", b'"x"', b"true", b"null", b"1,5"],
)
def test_plain_not_a_number(payload: bytes) -> None:
    assert only_reject(dec(payload)) is Reason.WRONG_TYPE


# --- single JSON objects -------------------------------------------------------------------


def test_object_with_defaults() -> None:
    d = dec(b'{"value": 3}')
    assert d.readings == [Reading(TOPIC, 3.0, T0, T0, TOPIC)]
    assert isinstance(d.readings[0].value, float)
    assert d.batch is False


def test_object_custom_keys() -> None:
    spec = PayloadSpec(value_key="v", ts_key="t")
    d = dec(b'{"v": 1.25, "t": 1647770400, "value": "ignored"}', spec)
    assert d.readings == [Reading(TOPIC, 1.25, 1647770400.0, T0, TOPIC)]


@pytest.mark.parametrize(
    ("ts", "expected"),
    [
        ('"2022-03-20T11:00:00+01:00"', 1647770400.0),
        ('"2022-03-20T10:00:00Z"', 1647770400.0),
        ('"2022-03-20T10:00:00"', 1647770400.0),  # naive means UTC
        ('"2022-03-20T05:30:00.250-04:30"', 1647770400.25),
        ("1647770400.5", 1647770400.5),
        ("0", 0.0),
        ("null", T0),  # null is treated as absent
    ],
)
def test_timestamps(ts: str, expected: float) -> None:
    d = dec(f'{{"value": 1, "ts": {ts}}}'.encode())
    assert d.rejects == []
    assert d.readings[0].ts == expected


@pytest.mark.parametrize("ts", ['"yesterday"', "true", "[1]", "{}", "1e999", '"2022-13-01"', '""'])
def test_bad_timestamps(ts: str) -> None:
    assert only_reject(dec(f'{{"value": 1, "ts": {ts}}}'.encode())) is Reason.BAD_TIMESTAMP


@pytest.mark.parametrize("value", ["true", "false", '"1.5"', "null", "[1]", "{}"])
def test_value_wrong_type(value: str) -> None:
    assert only_reject(dec(f'{{"value": {value}}}'.encode())) is Reason.WRONG_TYPE


@pytest.mark.parametrize("value", ["NaN", "Infinity", "-Infinity", "1e999"])
def test_value_not_finite(value: str) -> None:
    assert only_reject(dec(f'{{"value": {value}}}'.encode())) is Reason.NOT_FINITE


def test_missing_value_key() -> None:
    assert only_reject(dec(b'{"val": 1}')) is Reason.MISSING_KEY


# --- whole-message rejects -----------------------------------------------------------------


def test_too_large_checked_before_decoding() -> None:
    spec = PayloadSpec(max_bytes=8)
    assert only_reject(dec(b"\xff" * 9, spec)) is Reason.TOO_LARGE
    assert dec(b"12345678", spec).readings[0].value == 12345678.0


@pytest.mark.parametrize("payload", [b"\xff", b"1\xc3", b'{"value": 1, "s": "\xed\xa0\x80"}'])
def test_not_utf8(payload: bytes) -> None:
    assert only_reject(dec(payload)) is Reason.NOT_UTF8


@pytest.mark.parametrize("payload", [b"", b" \t\r\n", b"[]", b" [ ] "])
def test_empty(payload: bytes) -> None:
    assert only_reject(dec(payload)) is Reason.EMPTY


@pytest.mark.parametrize(
    "payload",
    [
        b'{"value": 1,',
        b"{value: 1}",
        b'{"value": 1} x',
        b"[1,]",
        b'{"value": 1, "ts": 1} {}',
    ],
)
def test_bad_json(payload: bytes) -> None:
    assert only_reject(dec(payload)) is Reason.BAD_JSON


def test_nan_anywhere_in_json_rejects_message() -> None:
    assert only_reject(dec(b'{"value": 1, "other": NaN}')) is Reason.NOT_FINITE


def nested(depth: int) -> bytes:
    """An object whose deepest container sits ``depth`` levels down (the object is level 1)."""
    return b'{"value": 1, "x": ' + b"[" * (depth - 1) + b"]" * (depth - 1) + b"}"


def test_depth_limit() -> None:
    assert dec(nested(32)).readings[0].value == 1.0
    assert only_reject(dec(nested(33))) is Reason.TOO_DEEP


def test_very_deep_json_hits_recursion_and_is_too_deep() -> None:
    spec = PayloadSpec(max_bytes=1 << 20)
    assert only_reject(dec(b"[" * 200_000 + b"]" * 200_000, spec)) is Reason.TOO_DEEP
    assert only_reject(dec(b'{"a":' * 100_000 + b"1" + b"}" * 100_000, spec)) is Reason.TOO_DEEP


def test_brackets_inside_strings_do_not_count_as_depth() -> None:
    d = dec(b'{"value": 2, "note": "' + b"[{" * 100 + b'"}')
    assert d.readings[0].value == 2.0


@pytest.mark.parametrize(
    ("fmt", "payload"),
    [
        ("number", b'{"value": 1}'),
        ("json", b"[1]"),
        ("json", b"1.5"),
        ("json", b'"x"'),
        ("json", b"true"),
        ("batch", b'{"value": 1}'),
        ("batch", b"null"),
    ],
)
def test_forced_format_mismatch_is_wrong_type(fmt: Any, payload: bytes) -> None:
    assert only_reject(dec(payload, PayloadSpec(format=fmt))) is Reason.WRONG_TYPE


def test_forced_formats_accept_their_form() -> None:
    assert dec(b"4", PayloadSpec(format="number")).readings[0].value == 4.0
    assert dec(b' {"value": 4}', PayloadSpec(format="json")).readings[0].value == 4.0
    batch = dec(b'[{"stream": "s", "value": 4}]', PayloadSpec(format="batch"))
    assert batch.readings[0].value == 4.0


# --- batches -------------------------------------------------------------------------------


def test_batch_mixed_good_and_bad_items() -> None:
    items = [
        {"stream": "a", "value": 1.5, "ts": 10},
        {"stream": "b", "value": "x"},
        7,
        {"value": 2},
        {"stream": "c+d", "value": 2},
        {"stream": "c", "value": 3, "ts": "2022-03-20T10:00:00Z"},
        {"stream": "d"},
        {"stream": "e", "value": 1, "ts": "soon"},
        {"stream": "f", "value": "HUGE"},
    ]
    payload = json.dumps(items).replace('"HUGE"', "1e400").encode()
    d = dec(payload)
    assert d.batch is True
    assert d.readings == [
        Reading("a", 1.5, 10.0, T0, TOPIC),
        Reading("c", 3.0, 1647770400.0, T0, TOPIC),
    ]
    assert [r.reason for r in d.rejects] == [
        Reason.WRONG_TYPE,
        Reason.WRONG_TYPE,
        Reason.MISSING_KEY,
        Reason.BAD_STREAM,
        Reason.MISSING_KEY,
        Reason.BAD_TIMESTAMP,
        Reason.NOT_FINITE,
    ]
    assert d.rejects[0][1].startswith("item 1:")


@pytest.mark.parametrize("stream", ['""', '"a+b"', '"a/#"', '"a\\u0000"', "5", "null", '"\\ud800"'])
def test_bad_stream_ids(stream: str) -> None:
    d = dec(f'[{{"stream": {stream}, "value": 1}}]'.encode())
    assert [r.reason for r in d.rejects] == [Reason.BAD_STREAM]


def test_stream_id_length_limit() -> None:
    ok = dec(json.dumps([{"stream": "s" * 256, "value": 1}]).encode())
    assert len(ok.readings) == 1
    long = dec(json.dumps([{"stream": "s" * 257, "value": 1}]).encode())
    assert [r.reason for r in long.rejects] == [Reason.BAD_STREAM]


def test_non_ascii_stream_id_kept() -> None:
    d = dec(json.dumps([{"stream": "Zürich/Pumpe 1", "value": 1}]).encode())
    assert d.readings[0].stream == "Zürich/Pumpe 1"


def test_too_many_items_rejects_whole_message() -> None:
    spec = PayloadSpec(max_items=2)
    payload = json.dumps([{"stream": "a", "value": 1}] * 3).encode()
    d = dec(payload, spec)
    assert only_reject(d) is Reason.TOO_MANY
    assert len(dec(json.dumps([{"stream": "a", "value": 1}] * 2).encode(), spec).readings) == 2


def test_details_do_not_echo_payload() -> None:
    d = dec(b'{"value": "SECRET-PAYLOAD"}')
    assert "SECRET" not in d.rejects[0][1]


def test_every_reason_is_covered_by_these_tests() -> None:
    triggers = {
        Reason.NOT_UTF8: b"\xff",
        Reason.TOO_LARGE: b"1" * (SPEC.max_bytes + 1),
        Reason.BAD_JSON: b"{",
        Reason.TOO_DEEP: nested(40),
        Reason.NOT_FINITE: b"nan",
        Reason.WRONG_TYPE: b"x",
        Reason.MISSING_KEY: b"{}",
        Reason.BAD_TIMESTAMP: b'{"value": 1, "ts": true}',
        Reason.EMPTY: b"",
        Reason.BAD_STREAM: b'[{"stream": "", "value": 1}]',
        Reason.TOO_MANY: json.dumps([{}] * (SPEC.max_items + 1)).encode(),
        Reason.OUT_OF_RANGE: b'{"value": 1e308}',
        Reason.FUTURE_TIMESTAMP: b'{"value": 1, "ts": "2999-01-01T00:00:00Z"}',
        Reason.DUPLICATE_KEY: b'{"value": 1, "value": 2}',
    }
    assert set(triggers) == set(Reason)
    for reason, payload in triggers.items():
        assert [r.reason for r in dec(payload).rejects] == [reason]


# --- property tests ------------------------------------------------------------------------

json_scalars = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=10)
)
json_keys = st.sampled_from(["value", "ts", "stream"]) | st.text(max_size=5)
json_docs = st.recursive(
    json_scalars,
    lambda children: (
        st.lists(children, max_size=5) | st.dictionaries(json_keys, children, max_size=5)
    ),
    max_leaves=25,
)


def check_invariants(d: Decoded) -> None:
    assert isinstance(d, Decoded)
    for reading in d.readings:
        assert math.isfinite(reading.value)
        assert math.isfinite(reading.ts)
    for reason, detail, lost in d.rejects:
        assert isinstance(reason, Reason)
        assert isinstance(detail, str)
        assert lost >= 1


@settings(max_examples=300)
@given(payload=st.binary(max_size=200))
def test_decode_never_raises_on_bytes(payload: bytes) -> None:
    for fmt in ("auto", "number", "json", "batch"):
        check_invariants(dec(payload, PayloadSpec(format=fmt)))


@settings(max_examples=300)
@given(doc=json_docs, allow_nan=st.booleans())
def test_decode_never_raises_on_json(doc: Any, allow_nan: bool) -> None:
    payload = json.dumps(doc, allow_nan=allow_nan).encode()
    check_invariants(dec(payload))


@settings(max_examples=200)
@given(
    items=st.lists(
        st.fixed_dictionaries(
            {"stream": st.text(max_size=5), "value": json_scalars},
            optional={"ts": json_scalars | st.datetimes().map(lambda t: t.isoformat())},
        ),
        max_size=8,
    )
)
def test_batch_readings_and_rejects_account_for_every_item(items: list[Any]) -> None:
    d = dec(json.dumps(items).encode())
    check_invariants(d)
    if items:
        assert len(d.readings) + len(d.rejects) == len(items)


# --- input limits (issue 11): lengths, clocks, ranges, per-item judging ----------------------


@pytest.mark.parametrize("fmt", ["auto", "number", "json"])
def test_topic_stream_id_length_limit_in_bytes(fmt: Any) -> None:
    spec = PayloadSpec(format=fmt, max_stream_bytes=20)
    payload = b"1.5" if fmt == "number" else b'{"value": 1.5}'
    assert len(dec(payload, spec, topic="t" * 20).readings) == 1
    assert only_reject(dec(payload, spec, topic="t" * 21)) is Reason.BAD_STREAM
    # counted in UTF-8 bytes, not characters: 10 × "ü" is 20 bytes, 11 is 22
    assert len(dec(payload, spec, topic="ü" * 10).readings) == 1
    assert only_reject(dec(payload, spec, topic="ü" * 11)) is Reason.BAD_STREAM


def test_topic_near_mqtt_limit_is_refused_by_default() -> None:
    d = dec(b"1.0", topic="a/" + "x" * 65_530)
    assert only_reject(d) is Reason.BAD_STREAM
    assert "65532 bytes" in d.rejects[0].detail


def test_long_batch_topic_rejects_every_item() -> None:
    items = [{"stream": f"s{i}", "value": i} for i in range(7)]
    d = dec(json.dumps(items).encode(), PayloadSpec(max_stream_bytes=10), topic="g" * 11)
    assert d.readings == []
    assert [(r.reason, r.readings) for r in d.rejects] == [(Reason.BAD_STREAM, 7)]
    assert d.rejected == 7


def test_batch_stream_id_limit_counts_bytes() -> None:
    spec = PayloadSpec(max_stream_bytes=8)
    d = dec(
        json.dumps([{"stream": "ü" * 4, "value": 1}, {"stream": "ü" * 5, "value": 1}]).encode(),
        spec,
        topic="gw",
    )
    assert [r.stream for r in d.readings] == ["ü" * 4]
    assert [r.reason for r in d.rejects] == [Reason.BAD_STREAM]


def test_future_timestamp_limit() -> None:
    spec = PayloadSpec(max_future_s=60)
    ok = dec(f'{{"value": 1, "ts": {T0 + 60}}}'.encode(), spec)
    assert ok.readings[0].ts == T0 + 60
    assert only_reject(dec(f'{{"value": 1, "ts": {T0 + 61}}}'.encode(), spec)) is (
        Reason.FUTURE_TIMESTAMP
    )
    # the year 2999, as a number and as ISO 8601; the default limit catches both
    for ts in ("32472144000", '"2999-01-01T00:00:00Z"'):
        assert only_reject(dec(f'{{"value": 1, "ts": {ts}}}'.encode())) is Reason.FUTURE_TIMESTAMP
    # 0 switches the limit off
    far = dec(b'{"value": 1, "ts": 32472144000}', PayloadSpec(max_future_s=0))
    assert far.readings[0].ts == 32472144000.0


@pytest.mark.parametrize("ts", ["-1", "-1e300", '"1969-12-31T23:59:59Z"', '"0001-01-01T00:00:00Z"'])
def test_timestamps_before_1970_are_refused(ts: str) -> None:
    assert only_reject(dec(f'{{"value": 1, "ts": {ts}}}'.encode())) is Reason.BAD_TIMESTAMP


@pytest.mark.parametrize(
    ("value", "ok"),
    [
        ("3.4028234e38", True),
        ("-3.4028234e38", True),
        ("3.5e38", False),
        ("-1e308", False),
        ("1" + "0" * 39, False),
        ("1" + "0" * 400, False),
        ("1" + "0" * 5000, False),
    ],
)
def test_values_must_fit_float32(value: str, ok: bool) -> None:
    spec = PayloadSpec(max_bytes=1 << 16)
    for payload in (f'{{"value": {value}}}', f'[{{"stream": "s", "value": {value}}}]'):
        d = dec(payload.encode(), spec)
        if ok:
            assert d.rejects == []
        else:
            assert [r.reason for r in d.rejects] == [Reason.OUT_OF_RANGE], payload[:40]
    if "e" in value:
        plain = dec(value.encode())
        assert (plain.rejects == []) if ok else (only_reject(plain) is Reason.OUT_OF_RANGE)


def test_out_of_range_value_prints_no_warning() -> None:
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert only_reject(dec(b'{"value": 1e308}')) is Reason.OUT_OF_RANGE
        assert only_reject(dec(b"1e308")) is Reason.OUT_OF_RANGE


def test_duplicate_keys_are_refused_where_they_matter() -> None:
    assert only_reject(dec(b'{"value": 1, "value": 2}')) is Reason.DUPLICATE_KEY
    # inside a field the daemon does not read, they are nobody's business
    assert dec(b'{"value": 1, "meta": {"a": 1, "a": 2}}').readings[0].value == 1.0
    d = dec(b'[{"stream": "a", "value": 1}, {"stream": "b", "stream": "c", "value": 2}]')
    assert [r.stream for r in d.readings] == ["a"]
    assert [r.reason for r in d.rejects] == [Reason.DUPLICATE_KEY]


def _good(i: int) -> dict[str, Any]:
    return {"stream": f"s{i}", "value": float(i), "ts": 1_600_000_000 + i}


POISON = {
    "nan": ('{"stream": "p", "value": NaN}', Reason.NOT_FINITE),
    "infinity": ('{"stream": "p", "value": -Infinity}', Reason.NOT_FINITE),
    "nan_elsewhere": ('{"stream": "p", "value": 1, "x": [NaN]}', Reason.NOT_FINITE),
    "bare_nan": ("NaN", Reason.NOT_FINITE),
    "deep": ('{"stream": "p", "value": 1, "x": ' + "[" * 40 + "]" * 40 + "}", Reason.TOO_DEEP),
    "digits": ('{"stream": "p", "value": ' + "9" * 5000 + "}", Reason.OUT_OF_RANGE),
    "digits_ts": ('{"stream": "p", "value": 1, "ts": ' + "9" * 5000 + "}", Reason.BAD_TIMESTAMP),
    "huge": ('{"stream": "p", "value": 1e308}', Reason.OUT_OF_RANGE),
    "future": ('{"stream": "p", "value": 1, "ts": 32472144000}', Reason.FUTURE_TIMESTAMP),
    "negative_ts": ('{"stream": "p", "value": 1, "ts": -5}', Reason.BAD_TIMESTAMP),
    "dup": ('{"stream": "p", "value": 1, "value": 2}', Reason.DUPLICATE_KEY),
    "bool": ('{"stream": "p", "value": true}', Reason.WRONG_TYPE),
    "bool_ts": ('{"stream": "p", "value": 1, "ts": false}', Reason.BAD_TIMESTAMP),
    "long_id": ('{"stream": "' + "x" * 300 + '", "value": 1}', Reason.BAD_STREAM),
    "nul_id": ('{"stream": "a\\u0000b", "value": 1}', Reason.BAD_STREAM),
}


@pytest.mark.parametrize("kind", sorted(POISON))
def test_one_bad_item_costs_only_itself(kind: str) -> None:
    text, reason = POISON[kind]
    good = [json.dumps(_good(i)) for i in range(4)]
    payload = ("[" + ", ".join([*good[:2], text, *good[2:]]) + "]").encode()
    d = dec(payload, PayloadSpec(max_bytes=1 << 16))
    assert [r.stream for r in d.readings] == ["s0", "s1", "s2", "s3"]
    assert [r.reason for r in d.rejects] == [reason]
    assert d.rejects[0].detail.startswith("item 2:")


def test_too_large_batch_counts_its_readings() -> None:
    items = [_good(i) for i in range(100_000)]
    payload = json.dumps(items).encode()
    d = dec(payload)  # ~6 MB against the 64 KiB default: refused unread
    assert [(r.reason, r.readings) for r in d.rejects] == [(Reason.TOO_LARGE, 100_000)]
    assert only_reject(dec(b"1" * (SPEC.max_bytes + 1))) is Reason.TOO_LARGE
    assert dec(b"1" * (SPEC.max_bytes + 1)).rejected == 1


def test_too_many_items_count_every_item() -> None:
    d = dec(json.dumps([_good(i) for i in range(12)]).encode(), PayloadSpec(max_items=10))
    assert [(r.reason, r.readings) for r in d.rejects] == [(Reason.TOO_MANY, 12)]
    assert d.rejected == 12


@settings(max_examples=150, deadline=None)
@given(
    layout=st.lists(st.one_of(st.none(), st.sampled_from(sorted(POISON))), min_size=1, max_size=12),
)
def test_batch_items_are_judged_one_by_one(layout: list[str | None]) -> None:
    """Any mix of good items and poisoned ones: every good item is kept, in order, and every
    poisoned one is rejected with its own reason; nothing else is lost or invented."""
    texts, want_streams, want_reasons = [], [], []
    for i, kind in enumerate(layout):
        if kind is None:
            texts.append(json.dumps(_good(i)))
            want_streams.append(f"s{i}")
        else:
            texts.append(POISON[kind][0])
            want_reasons.append(POISON[kind][1])
    d = dec(("[" + ",".join(texts) + "]").encode(), PayloadSpec(max_bytes=1 << 20))
    assert [r.stream for r in d.readings] == want_streams, f"layout={layout}"
    assert [r.reason for r in d.rejects] == want_reasons, f"layout={layout}"
    assert len(d.readings) + d.rejected == len(layout)


@settings(max_examples=300)
@given(topic=st.text(min_size=1, max_size=400), payload=st.binary(max_size=64))
def test_any_topic_and_payload_decode_within_limits(topic: str, payload: bytes) -> None:
    spec = PayloadSpec(max_stream_bytes=64)
    for fmt in ("auto", "number", "json", "batch"):
        d = decode(payload, topic, PayloadSpec(format=fmt, max_stream_bytes=64), T0)
        check_invariants(d)
        for r in d.readings:
            assert len(r.stream.encode("utf-8", "surrogatepass")) <= spec.max_stream_bytes
            assert abs(r.value) <= 3.4028234663852886e38
            assert 0 <= r.ts <= T0 + spec.max_future_s


# --- encoding ------------------------------------------------------------------------------


def test_encode_single_is_compact_object() -> None:
    out = encode_predictions([Prediction("s1", 10.0, 0.1, True)], "water", "3", batch=False)
    assert out == (
        b'{"stream":"s1","ts":10.0,"value":0.1,"model":"water","version":"3","warm":true}'
    )


def test_encode_batch_is_array() -> None:
    preds = [Prediction("a", 1.0, 2.0, False), Prediction("b", 1.0, 3.0, True)]
    doc = json.loads(encode_predictions(preds, "m", "v", batch=True))
    assert [p["stream"] for p in doc] == ["a", "b"]
    assert doc[0] == {
        "stream": "a",
        "ts": 1.0,
        "value": 2.0,
        "model": "m",
        "version": "v",
        "warm": False,
    }


def test_encode_non_batch_needs_exactly_one() -> None:
    with pytest.raises(ValueError, match="exactly one"):
        encode_predictions([], "m", "v", batch=False)


def test_encode_non_finite_becomes_null() -> None:
    doc = json.loads(encode_predictions([Prediction("s", 1.0, math.nan, True)], "m", "v", False))
    assert doc["value"] is None


def test_encode_odd_stream_ids() -> None:
    out = encode_predictions([Prediction('\ud800"ü', 1.0, 1.0, True)], "m", "v", False)
    assert out.isascii()
    assert json.loads(out)["stream"] == '\ud800"ü'


@settings(max_examples=300)
@given(
    values=st.lists(st.floats(allow_nan=False, allow_infinity=False), min_size=1, max_size=5),
    ts=st.floats(allow_nan=False, allow_infinity=False),
)
def test_encode_round_trips_values_exactly(values: list[float], ts: float) -> None:
    preds = [Prediction(f"s{i}", ts, v, True) for i, v in enumerate(values)]
    doc = json.loads(encode_predictions(preds, "m", "v", batch=True))
    assert [p["value"] for p in doc] == values
    assert all(p["ts"] == ts for p in doc)


# --- topics --------------------------------------------------------------------------------


def test_prediction_topic_uses_plain_replacement() -> None:
    assert prediction_topic("forecast/{topic}", "a/b") == "forecast/a/b"
    assert prediction_topic("forecast/{topic}", "a/{0}/{topic}") == "forecast/a/{0}/{topic}"
    assert prediction_topic("fixed", "a") == "fixed"


@pytest.mark.parametrize("template", ["forecast/{topic}", "{topic}/fc", "fc-{topic}", "static"])
def test_valid_templates(template: str) -> None:
    validate_topic_template(template)


@pytest.mark.parametrize(
    "template", ["", "forecast/+/{topic}", "f/#", "f/{stream}", "f/{topic", "f}", "a\0b"]
)
def test_invalid_templates(template: str) -> None:
    with pytest.raises(ValueError, match="template"):
        validate_topic_template(template)


@pytest.mark.parametrize(
    ("filter", "topic", "expected"),
    [
        ("sport/tennis/player1/#", "sport/tennis/player1", True),
        ("sport/tennis/player1/#", "sport/tennis/player1/ranking", True),
        ("sport/tennis/player1/#", "sport/tennis/player1/score/wimbledon", True),
        ("sport/#", "sport", True),
        ("#", "sport/tennis", True),
        ("#", "/", True),
        ("sport/tennis/+", "sport/tennis/player1", True),
        ("sport/tennis/+", "sport/tennis/player1/ranking", False),
        ("sport/+", "sport", False),
        ("sport/+", "sport/", True),
        ("+/+", "/finance", True),
        ("/+", "/finance", True),
        ("+", "/finance", False),
        ("+/tennis/#", "sport/tennis/player1", True),
        ("sport/+/player1", "sport/tennis/player1", True),
        ("sport/+/player1", "sport/tennis/player2", False),
        ("#", "$SYS/broker", False),
        ("+/monitor/Clients", "$SYS/monitor/Clients", False),
        ("$SYS/#", "$SYS/monitor/Clients", True),
        ("$SYS/monitor/+", "$SYS/monitor/Clients", True),
        ("sport/tennis", "sport/tennis", True),
        ("sport/tennis", "Sport/tennis", False),
        ("sport/tennis", "sport/tennis/", False),
        ("$share/g1/sensors/+/flow", "sensors/a/flow", True),
        ("$share/g1/sensors/+/flow", "sensors/a/temp", False),
    ],
)
def test_topic_matches(filter: str, topic: str, expected: bool) -> None:
    assert topic_matches(filter, topic) is expected


@pytest.mark.parametrize(
    "filter", ["#", "+", "sport/+/player1", "+/tennis/#", "/", "$SYS/#", "$share/g/s/#"]
)
def test_valid_filters(filter: str) -> None:
    validate_filter(filter)


@pytest.mark.parametrize(
    "filter",
    [
        "",
        "sport/tennis#",
        "sport/tennis/#/ranking",
        "sport+",
        "sport/+x/a",
        "a\0b",
        "a" * 65536,
        "\ud800",
        "$share/g",
        "$share//x",
        "$share/g+/x",
    ],
)
def test_invalid_filters(filter: str) -> None:
    with pytest.raises(ValueError):
        validate_filter(filter)
