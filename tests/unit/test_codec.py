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


@pytest.mark.parametrize("value", ["NaN", "Infinity", "-Infinity", "1e999", "1" + "0" * 400])
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
        b'{"value": ' + b"9" * 5000 + b"}",
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
    assert [r for r, _ in d.rejects] == [
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
    assert [r for r, _ in d.rejects] == [Reason.BAD_STREAM]


def test_stream_id_length_limit() -> None:
    ok = dec(json.dumps([{"stream": "s" * 256, "value": 1}]).encode())
    assert len(ok.readings) == 1
    long = dec(json.dumps([{"stream": "s" * 257, "value": 1}]).encode())
    assert [r for r, _ in long.rejects] == [Reason.BAD_STREAM]


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
    }
    assert set(triggers) == set(Reason)
    for reason, payload in triggers.items():
        assert [r for r, _ in dec(payload).rejects] == [reason]


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
    for reason, detail in d.rejects:
        assert isinstance(reason, Reason)
        assert isinstance(detail, str)


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
