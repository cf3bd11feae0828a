"""Payload decoding and encoding, and MQTT topic rules: the pure edge between bytes and readings.

Everything here runs on the hot path for every message, so it stays plain Python (no pydantic)
and never raises on input: a bad payload becomes a ``Reason`` the daemon can count, because one
misbehaving sensor must not be able to stop the stream for everyone else.

Timestamps given as numbers are epoch *seconds*. Epoch milliseconds are deliberately not guessed
at: a heuristic would silently misread old or far-future seconds, so a producer sending
milliseconds must convert (or send an ISO 8601 string).

Input limits, each because one bad reading must not poison its stream or cost anyone else:

- a stream id (the topic, or a batch item's ``stream``) is at most ``max_stream_bytes`` of UTF-8:
  every stream costs a state and a snapshot row, and a topic near MQTT's 65,535-byte limit
  would make its prediction topic unpublishable;
- a timestamp may be at most ``max_future_s`` ahead of the receive time and not before 1970: a
  reading stamped in the year 2999 would make every later reading of its stream out of order;
- a value must fit float32 (the model's input type): 1e308 would become inf inside the model;
- batch items are judged one by one: a NaN, a too-deep value, a huge integer or a duplicated
  key costs only its own item, and a rejected batch counts every item it held.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from enum import StrEnum
from operator import attrgetter
from typing import Any, Literal, NamedTuple

import msgspec

MAX_DEPTH = 32
"""Deepest JSON nesting accepted; real readings are two levels deep (array of objects)."""

MAX_STREAM_LEN = 256
"""Default ``max_stream_bytes``: the longest stream id, in UTF-8 bytes (topic or batch field)."""
MAX_TOPIC_BYTES = 65535
MAX_FUTURE_S = 3600.0
"""Default ``max_future_s``: how far ahead of its receive time a reading may be stamped."""
FLOAT32_MAX = 3.4028234663852886e38
_MAX_INT_DIGITS = 320  # longer JSON integers exceed float64 anyway; int() of them is slow
_LONG_DIGITS = re.compile(f"[0-9]{{{_MAX_INT_DIGITS + 1}}}")
_ASCII_WS = " \t\n\r\x0b\x0c"
_SHARE_PREFIX = "$share/"


class Reason(StrEnum):
    """Why a payload (or one item of a batch) was rejected; used verbatim as a metric label."""

    NOT_UTF8 = "not_utf8"
    TOO_LARGE = "too_large"
    BAD_JSON = "bad_json"
    TOO_DEEP = "too_deep"
    NOT_FINITE = "not_finite"
    WRONG_TYPE = "wrong_type"
    MISSING_KEY = "missing_key"
    BAD_TIMESTAMP = "bad_timestamp"
    EMPTY = "empty"
    BAD_STREAM = "bad_stream"
    TOO_MANY = "too_many"
    OUT_OF_RANGE = "out_of_range"
    FUTURE_TIMESTAMP = "future_timestamp"
    DUPLICATE_KEY = "duplicate_key"


class Reading(msgspec.Struct, gc=False):
    """One accepted observation; ``value`` is always finite so the model never sees NaN.

    ``label`` is the reading's 0/1 event label when the payload carried one (an event
    classifier's online accuracy is counted from it), else None.

    A msgspec struct rather than a dataclass, because one is made per reading on the hot path:
    about 0.12 µs to create against 0.35 µs for a slotted dataclass (1 µs frozen), and, holding
    only strings and numbers, it is never tracked by the garbage collector (``gc=False``), so
    thousands in flight add nothing to a collection's pause. Not frozen, though nothing changes
    one after decoding (frozen would cost again)."""

    stream: str
    value: float
    ts: float
    received: float
    topic: str
    label: float | None = None


@dataclass(slots=True, frozen=True)
class PayloadSpec:
    """How a route's payloads are shaped; built once per route from the config."""

    format: Literal["auto", "number", "json", "batch"] = "auto"
    value_key: str = "value"
    ts_key: str = "ts"
    stream_key: str = "stream"
    label_key: str = "label"
    max_bytes: int = 65536
    max_items: int = 10000
    max_stream_bytes: int = MAX_STREAM_LEN
    max_future_s: float = MAX_FUTURE_S  # 0 = no limit


class Reject(NamedTuple):
    """One rejection: ``readings`` lost to it (a whole batch refused counts its items)."""

    reason: Reason
    detail: str
    readings: int = 1


@dataclass(slots=True)
class Decoded:
    """What one message yielded; a batch can carry good readings and rejects at once."""

    readings: Sequence[Reading]  # a list, or columns (columns.py) from the fast path
    rejects: list[Reject]
    batch: bool

    @property
    def rejected(self) -> int:
        """Readings rejected, counting every item of a batch refused whole."""
        return sum(r.readings for r in self.rejects)


class Prediction(msgspec.Struct, gc=False, omit_defaults=True):
    """One forecast for the next reading of ``stream``; ``warm`` is False while state is young.
    Never changed once made; a msgspec struct for the reasons :class:`Reading` gives.

    An event classifier's prediction also carries ``probability`` (= ``value``) and ``event``
    (probability ≥ the model's threshold); both stay None, and out of the JSON, otherwise.
    A regression bundle with a prediction interval adds ``lower`` and ``upper``: the bounds the
    next reading should fall between at the bundle's coverage (None, and absent, otherwise).

    The fields are in the published document's key order, which :mod:`fastcodec` encodes the
    struct in (the model's name and version go in before ``warm``)."""

    stream: str
    ts: float
    value: float
    warm: bool
    probability: float | None = None
    event: bool | None = None
    lower: float | None = None
    upper: float | None = None


#: Field getters for :class:`Reading` and :class:`Prediction` (C-level, for ``map`` over a
#: batch): the hot path reads a batch's columns with these instead of a Python step per item.
STREAM_OF, TS_OF, VALUE_OF, LABEL_OF, RECEIVED_OF = (
    attrgetter(k) for k in ("stream", "ts", "value", "label", "received")
)
WARM_OF, LOWER_OF, UPPER_OF = (attrgetter(k) for k in ("warm", "lower", "upper"))


class _Reject(Exception):
    """Unwinds out of nested parsing with a reason; caught inside ``decode`` only."""

    def __init__(self, reason: Reason, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason
        self.detail = detail


class _Marker:
    """A value the JSON parser puts where a number cannot be used, so the item holding it is
    rejected on its own instead of the whole document failing to parse."""

    __slots__ = ("name",)

    def __init__(self, name: str) -> None:
        self.name = name

    def __repr__(self) -> str:
        return self.name


_NON_FINITE = _Marker("non-finite literal")  # NaN, Infinity, -Infinity
_HUGE_INT = _Marker("integer too long")


class _DuplicateKeys(dict[str, Any]):
    """An object in which some key appeared twice: which one counts is ambiguous."""


def _pairs(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    obj = dict(pairs)
    return obj if len(obj) == len(pairs) else _DuplicateKeys(obj)


def _parse_int(text: str) -> Any:
    # int() refuses more than 4,300 digits with a ValueError that would fail the whole document.
    return int(text) if len(text) <= _MAX_INT_DIGITS else _HUGE_INT


# The fast decoder builds plain dicts with C ints; the careful one (Python hooks, ~2× slower on
# batches) runs only when the text could hold a duplicated key or an over-long integer.
_FAST = json.JSONDecoder(parse_constant=lambda _name: _NON_FINITE)
_CAREFUL = json.JSONDecoder(
    parse_constant=lambda _name: _NON_FINITE, parse_int=_parse_int, object_pairs_hook=_pairs
)


def _reject(reason: Reason, detail: str, batch: bool = False, count: int = 1) -> Decoded:
    return Decoded([], [Reject(reason, detail, count)], batch)


def _topic_too_long(topic: str, limit: int) -> int:
    """The topic's UTF-8 length when over ``limit``, else 0 (cheap for short topics)."""
    if 4 * len(topic) <= limit:
        return 0
    size = len(topic.encode("utf-8", "surrogatepass"))
    return size if size > limit else 0


def decode(payload: bytes, topic: str, spec: PayloadSpec, received: float) -> Decoded:
    """Turn one MQTT payload into readings; never raises, whatever the bytes.

    Whole-message problems give one reject and no readings; in a batch, each bad item gives
    its own reject while the good items are kept in order.
    """
    if len(payload) > spec.max_bytes:
        # Not parsed (that is the point of the limit), but a batch's readings are still counted:
        # each item carries the stream key once, which a byte count finds at C speed.
        lost = 1
        if spec.format in ("auto", "batch") and payload.lstrip()[:1] == b"[":
            lost = max(1, payload.count(b'"' + spec.stream_key.encode() + b'"'))
        detail = f"{len(payload)} bytes > {spec.max_bytes}"
        return _reject(Reason.TOO_LARGE, detail, batch=lost > 1, count=lost)
    try:
        text = payload.decode("utf-8").strip(_ASCII_WS)
    except UnicodeDecodeError as exc:
        return _reject(Reason.NOT_UTF8, f"invalid UTF-8 at byte {exc.start}")
    if not text:
        return _reject(Reason.EMPTY, "empty payload")

    fmt = spec.format
    if fmt == "auto":
        first = text[0]
        fmt = "json" if first == "{" else "batch" if first == "[" else "number"
    # The topic is the stream id (number, json) and, in every format, part of the prediction
    # topic; a batch's own count of items is only known after parsing.
    too_long = _topic_too_long(topic, spec.max_stream_bytes)
    if fmt == "number":
        if too_long:
            return _reject(Reason.BAD_STREAM, _topic_detail(too_long, spec))
        return _decode_number(text, topic, received)

    try:
        doc = _parse_json(text, spec)
    except _Reject as rej:
        return _reject(rej.reason, rej.detail)
    # Markers from the parser mean NaN/Infinity or a huge integer somewhere; only then is the
    # (per-item) search for them needed.
    poisoned = "NaN" in text or "Infinity" in text or _long_integer(text)
    if isinstance(doc, dict):
        if fmt != "json":
            return _reject(Reason.WRONG_TYPE, "expected a JSON array, got an object")
        if too_long:
            return _reject(Reason.BAD_STREAM, _topic_detail(too_long, spec))
        deep = text.count("[") + text.count("{") > MAX_DEPTH
        try:
            reading = _item(doc, topic, topic, spec, received, 1, deep, poisoned)
        except _Reject as rej:
            return _reject(rej.reason, rej.detail)
        return Decoded([reading], [], False)
    if isinstance(doc, list):
        if fmt != "batch":
            return _reject(Reason.WRONG_TYPE, "expected a JSON object, got an array")
        if too_long:
            n = max(1, len(doc))
            return _reject(Reason.BAD_STREAM, _topic_detail(too_long, spec), True, n)
        return _decode_batch(doc, text, topic, spec, received, poisoned)
    return _reject(Reason.WRONG_TYPE, f"top-level JSON {_kind(doc)} is not an object or array")


def _long_integer(text: str) -> bool:
    """Whether the text could hold an integer longer than ``_MAX_INT_DIGITS`` digits."""
    return len(text) > _MAX_INT_DIGITS and _LONG_DIGITS.search(text) is not None


def _topic_detail(size: int, spec: PayloadSpec) -> str:
    return f"topic (the stream id) is {size} bytes > max_stream_bytes {spec.max_stream_bytes}"


def _decode_number(text: str, topic: str, received: float) -> Decoded:
    # float() alone is too lenient (underscores, non-ASCII digits), hence the two extra checks.
    try:
        value = float(text)
    except ValueError:
        return _reject(Reason.WRONG_TYPE, "payload is not a number")
    if not text.isascii() or "_" in text:
        return _reject(Reason.WRONG_TYPE, "payload is not a plain ASCII number")
    if not math.isfinite(value):
        return _reject(Reason.NOT_FINITE, "value is not finite")
    if abs(value) > FLOAT32_MAX:
        return _reject(Reason.OUT_OF_RANGE, "value is outside the float32 range")
    return Decoded([Reading(topic, value, received, received, topic)], [], False)


def _parse_json(text: str, spec: PayloadSpec) -> Any:
    """Parse, failing the whole message only for what cannot be attributed to one item: broken
    syntax, or nesting deep enough to exhaust the parser's recursion."""
    try:
        doc = _FAST.decode(text)
    except RecursionError:
        raise _Reject(Reason.TOO_DEEP, f"JSON nested deeper than {MAX_DEPTH}") from None
    except json.JSONDecodeError as exc:
        raise _Reject(Reason.BAD_JSON, _json_error(exc)) from None
    except ValueError:  # int() refusing > 4,300 digits: the careful decoder marks them instead
        return _careful(text)
    if _may_repeat_keys(text, doc, spec):
        return _careful(text)
    return doc


def _careful(text: str) -> Any:
    try:
        return _CAREFUL.decode(text)
    except RecursionError:
        raise _Reject(Reason.TOO_DEEP, f"JSON nested deeper than {MAX_DEPTH}") from None
    except ValueError as exc:
        raise _Reject(Reason.BAD_JSON, _json_error(exc)) from None


def _may_repeat_keys(text: str, doc: Any, spec: PayloadSpec) -> bool:
    """Whether a key the daemon reads could appear twice in one reading object.

    A parsed dict keeps one copy of a repeated key, so a key quoted in the text more often than
    there are reading objects holding it may be repeated (or be a value, or sit in a nested
    object: that only costs a careful re-parse). A key spelt with a ``\\u`` escape is caught
    by looking for escapes at all.
    """
    if isinstance(doc, dict):
        objs: list[dict[str, Any]] = [doc]
    elif isinstance(doc, list):
        objs = [item for item in doc if type(item) is dict]
    else:
        return False
    if not objs:
        return False
    if "\\u" in text:
        return True
    for key in (spec.value_key, spec.ts_key, spec.stream_key, spec.label_key):
        quoted = text.count(f'"{key}"')
        if quoted and quoted > sum(1 for obj in objs if key in obj):
            return True
    return False


def _contains_marker(node: Any) -> _Marker | None:
    stack = [node]
    while stack:
        cur = stack.pop()
        if isinstance(cur, _Marker):
            return cur
        if isinstance(cur, dict):
            stack.extend(cur.values())
        elif isinstance(cur, list):
            stack.extend(cur)
    return None


def _item(
    obj: dict[str, Any],
    stream: str,
    topic: str,
    spec: PayloadSpec,
    received: float,
    level: int,
    deep: bool,
    poisoned: bool,
) -> Reading:
    """Judge one reading object (at nesting ``level``: 1 alone, 2 in a batch)."""
    if isinstance(obj, _DuplicateKeys):
        raise _Reject(Reason.DUPLICATE_KEY, "an object key appears twice")
    if deep and _depth_exceeds(obj, MAX_DEPTH - level + 1):
        raise _Reject(Reason.TOO_DEEP, f"JSON nested deeper than {MAX_DEPTH}")
    reading = _reading(obj, stream, topic, spec, received)  # its fields' own reasons first
    if poisoned:
        marker = _contains_marker(obj)
        if marker is _NON_FINITE:
            raise _Reject(Reason.NOT_FINITE, "JSON literal NaN or Infinity is not a finite number")
        if marker is _HUGE_INT:
            raise _Reject(Reason.OUT_OF_RANGE, f"an integer longer than {_MAX_INT_DIGITS} digits")
    return reading


def _json_error(exc: ValueError) -> str:
    if isinstance(exc, json.JSONDecodeError):
        return f"invalid JSON: {exc.msg} at line {exc.lineno} column {exc.colno}"
    return "invalid JSON: number out of range"


def _depth_exceeds(doc: Any, limit: int) -> bool:
    stack: list[tuple[Any, int]] = [(doc, 1)]
    while stack:
        node, depth = stack.pop()
        if depth > limit:
            return True
        for child in node.values() if isinstance(node, dict) else node:
            if isinstance(child, dict | list):
                stack.append((child, depth + 1))
    return False


def _decode_batch(
    items: list[Any], text: str, topic: str, spec: PayloadSpec, received: float, poisoned: bool
) -> Decoded:
    if not items:
        return _reject(Reason.EMPTY, "empty batch", batch=True)
    if len(items) > spec.max_items:
        detail = f"{len(items)} items > {spec.max_items}"
        return _reject(Reason.TOO_MANY, detail, batch=True, count=len(items))
    readings: list[Reading] = []
    rejects: list[Reject] = []
    stream_key = spec.stream_key
    deep = text.count("[") + text.count("{") > MAX_DEPTH
    for index, item in enumerate(items):
        try:
            if isinstance(item, _Marker):
                raise _Reject(
                    Reason.NOT_FINITE if item is _NON_FINITE else Reason.OUT_OF_RANGE,
                    f"{item} is not an object",
                )
            if not isinstance(item, dict):
                raise _Reject(Reason.WRONG_TYPE, f"{_kind(item)} is not an object")
            if stream_key not in item:
                raise _Reject(Reason.MISSING_KEY, f"missing key {stream_key!r}")
            stream = _stream_id(item[stream_key], spec.max_stream_bytes)
            readings.append(_item(item, stream, topic, spec, received, 2, deep, poisoned))
        except _Reject as rej:
            rejects.append(Reject(rej.reason, f"item {index}: {rej.detail}"))
    return Decoded(readings, rejects, True)


def _stream_id(raw: Any, limit: int = MAX_STREAM_LEN) -> str:
    if not isinstance(raw, str):
        raise _Reject(Reason.BAD_STREAM, f"stream id is a {_kind(raw)}, not a string")
    if not raw:
        raise _Reject(Reason.BAD_STREAM, "stream id is empty")
    if "+" in raw or "#" in raw or "\0" in raw:
        raise _Reject(Reason.BAD_STREAM, "stream id contains '+', '#' or NUL")
    if raw.isascii():
        size = len(raw)
    else:
        # JSON escapes can smuggle in lone surrogates, which cannot be written out as UTF-8.
        try:
            size = len(raw.encode("utf-8"))
        except UnicodeEncodeError:
            raise _Reject(Reason.BAD_STREAM, "stream id is not valid Unicode") from None
    if size > limit:
        raise _Reject(Reason.BAD_STREAM, f"stream id is {size} bytes > max_stream_bytes {limit}")
    return raw


def _reading(
    obj: dict[str, Any], stream: str, topic: str, spec: PayloadSpec, received: float
) -> Reading:
    key = spec.value_key
    if key not in obj:
        raise _Reject(Reason.MISSING_KEY, f"missing key {key!r}")
    raw = obj[key]
    # bool is an int subclass; True as a reading is a producer bug, not 1.0.
    if isinstance(raw, bool) or not isinstance(raw, int | float):
        if raw is _NON_FINITE:
            raise _Reject(Reason.NOT_FINITE, f"{key!r} is not finite")
        if raw is _HUGE_INT:
            raise _Reject(Reason.OUT_OF_RANGE, f"{key!r} is outside the float32 range")
        raise _Reject(Reason.WRONG_TYPE, f"{key!r} is a {_kind(raw)}, not a number")
    try:
        value = float(raw)
    except OverflowError:
        raise _Reject(Reason.OUT_OF_RANGE, f"{key!r} is outside the float32 range") from None
    if not math.isfinite(value):
        raise _Reject(Reason.NOT_FINITE, f"{key!r} is not finite")
    if abs(value) > FLOAT32_MAX:
        raise _Reject(Reason.OUT_OF_RANGE, f"{key!r} is outside the float32 range")
    ts_raw = obj.get(spec.ts_key)  # null counts as absent: producers write it for "unknown"
    if ts_raw is None:
        ts = received
    else:
        ts = _timestamp(ts_raw)
        if ts < 0:
            raise _Reject(Reason.BAD_TIMESTAMP, "timestamp is before 1970")
        if spec.max_future_s > 0 and ts - received > spec.max_future_s:
            raise _Reject(
                Reason.FUTURE_TIMESTAMP,
                f"timestamp is {ts - received:.0f} s ahead of the receive time "
                f"(max_future_s {spec.max_future_s:g})",
            )
    label_raw = obj.get(spec.label_key)
    label = None if label_raw is None else _label(label_raw, spec.label_key)
    return Reading(stream, value, ts, received, topic, label)


def _label(raw: Any, key: str) -> float:
    # 0/1 numbers only: true/false would be a second spelling to support forever.
    if isinstance(raw, bool) or not isinstance(raw, int | float) or raw not in (0, 1):
        raise _Reject(Reason.WRONG_TYPE, f"{key!r} is not 0 or 1")
    return float(raw)


def _timestamp(raw: Any) -> float:
    if isinstance(raw, str):
        return _iso_timestamp(raw)
    if isinstance(raw, _Marker):
        raise _Reject(Reason.BAD_TIMESTAMP, f"timestamp is a {raw}")
    if isinstance(raw, bool) or not isinstance(raw, int | float):
        raise _Reject(Reason.BAD_TIMESTAMP, f"timestamp is a {_kind(raw)}")
    try:
        ts = float(raw)
    except OverflowError:
        raise _Reject(Reason.BAD_TIMESTAMP, "timestamp is out of range") from None
    if not math.isfinite(ts):
        raise _Reject(Reason.BAD_TIMESTAMP, "timestamp is not finite")
    return ts


def _iso_timestamp(raw: str) -> float:
    try:
        when = datetime.fromisoformat(raw)  # Python 3.11 accepts a trailing "Z"
        if when.tzinfo is None:
            when = when.replace(tzinfo=UTC)
        return when.timestamp()
    except (ValueError, OverflowError):
        raise _Reject(Reason.BAD_TIMESTAMP, "timestamp is not ISO 8601") from None


def _kind(value: Any) -> str:
    """A JSON type name for messages: details must describe, never echo, untrusted input."""
    if isinstance(value, _Marker):
        return value.name
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int | float):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "array"
    if isinstance(value, dict):
        return "object"
    return type(value).__name__


def _finite_or_none(x: float) -> float | None:
    return x if math.isfinite(x) else None


def encode_predictions(preds: Sequence[Prediction], model: str, version: str, batch: bool) -> bytes:
    """Serialise predictions as compact JSON, an array exactly when the input was a batch.

    Floats are written with Python's shortest round-trip repr, so consumers get the exact
    value. JSON has no NaN or Infinity: a non-finite value or ts is written as ``null`` so the
    message stays valid JSON (the daemon should count such predictions separately). Output is
    ASCII-only, so any stream id can be written, however odd.
    """
    if not batch and len(preds) != 1:
        raise ValueError(f"a non-batch message carries exactly one prediction, got {len(preds)}")
    objs = [_prediction_obj(p, model, version) for p in preds]
    doc: Any = objs if batch else objs[0]
    return json.dumps(doc, separators=(",", ":"), allow_nan=False).encode("ascii")


def _prediction_obj(p: Prediction, model: str, version: str) -> dict[str, Any]:
    obj: dict[str, Any] = {
        "stream": p.stream,
        "ts": _finite_or_none(p.ts),
        "value": _finite_or_none(p.value),
        "model": model,
        "version": version,
        "warm": p.warm,
    }
    if p.probability is not None:
        obj["probability"] = _finite_or_none(p.probability)
    if p.event is not None:
        obj["event"] = p.event
    if p.lower is not None:
        obj["lower"] = _finite_or_none(p.lower)
    if p.upper is not None:
        obj["upper"] = _finite_or_none(p.upper)
    return obj


def prediction_topic(template: str, topic: str) -> str:
    """Fill ``{topic}`` by plain replacement: str.format would interpret braces in the topic."""
    return template.replace("{topic}", topic)


def validate_topic_template(template: str) -> None:
    """Reject templates that could produce an unpublishable topic or a misspelt placeholder."""
    if not template:
        raise ValueError("topic template is empty")
    if "+" in template or "#" in template or "\0" in template:
        raise ValueError("topic template must not contain '+', '#' or NUL")
    rest = template.replace("{topic}", "")
    if "{" in rest or "}" in rest:
        raise ValueError("topic template may only use the placeholder {topic}")
    if len(template.encode("utf-8", "surrogatepass")) > MAX_TOPIC_BYTES:
        raise ValueError(f"topic template is longer than {MAX_TOPIC_BYTES} bytes")


def _strip_share(filter: str) -> str:
    # "$share/<group>/<filter>" (MQTT 5 shared subscription) delivers topics matching <filter>.
    if filter.startswith(_SHARE_PREFIX):
        parts = filter.split("/", 2)
        if len(parts) == 3:
            return parts[2]
    return filter


def topic_matches(filter: str, topic: str) -> bool:
    """MQTT filter matching, including the rule that ``$`` topics escape leading wildcards."""
    filter = _strip_share(filter)
    if "+" not in filter and "#" not in filter:
        return filter == topic
    if topic.startswith("$") and filter[:1] in ("+", "#"):
        return False
    f_levels = filter.split("/")
    t_levels = topic.split("/")
    for i, level in enumerate(f_levels):
        if level == "#":
            return True  # also matches the parent: "a/#" matches "a"
        if i >= len(t_levels):
            return False
        if level != "+" and level != t_levels[i]:
            return False
    return len(f_levels) == len(t_levels)


def validate_filter(filter: str) -> None:
    """Raise ValueError for a filter a broker would refuse, so the mistake shows at start-up."""
    if not filter:
        raise ValueError("topic filter is empty")
    if "\0" in filter:
        raise ValueError("topic filter contains NUL")
    try:
        size = len(filter.encode("utf-8"))
    except UnicodeEncodeError:
        raise ValueError("topic filter is not valid Unicode") from None
    if size > MAX_TOPIC_BYTES:
        raise ValueError(f"topic filter is longer than {MAX_TOPIC_BYTES} bytes")
    inner = filter
    if filter.startswith(_SHARE_PREFIX):
        parts = filter.split("/", 2)
        if len(parts) < 3 or not parts[1] or "+" in parts[1] or "#" in parts[1] or not parts[2]:
            raise ValueError("shared subscription must be $share/<group>/<filter>")
        inner = parts[2]
    levels = inner.split("/")
    for i, level in enumerate(levels):
        if "#" in level and (level != "#" or i != len(levels) - 1):
            raise ValueError("'#' must be a whole level and the last one")
        if "+" in level and level != "+":
            raise ValueError("'+' must be a whole level")
