"""Payload decoding and encoding, and MQTT topic rules: the pure edge between bytes and readings.

Everything here runs on the hot path for every message, so it stays plain Python (no pydantic)
and never raises on input: a bad payload becomes a ``Reason`` the daemon can count, because one
misbehaving sensor must not be able to stop the stream for everyone else.

Timestamps given as numbers are epoch *seconds*. Epoch milliseconds are deliberately not guessed
at: a heuristic would silently misread old or far-future seconds, so a producer sending
milliseconds must convert (or send an ISO 8601 string).
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any, Literal

MAX_DEPTH = 32
"""Deepest JSON nesting accepted; real readings are two levels deep (array of objects)."""

MAX_STREAM_LEN = 256
MAX_TOPIC_BYTES = 65535
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


@dataclass(slots=True, frozen=True)
class Reading:
    """One accepted observation; ``value`` is always finite so the model never sees NaN.

    ``label`` is the reading's 0/1 event label when the payload carried one (an event
    classifier's online accuracy is counted from it), else None."""

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


@dataclass(slots=True)
class Decoded:
    """What one message yielded; a batch can carry good readings and rejects at once."""

    readings: list[Reading]
    rejects: list[tuple[Reason, str]]
    batch: bool


@dataclass(slots=True, frozen=True)
class Prediction:
    """One forecast for the next reading of ``stream``; ``warm`` is False while state is young.

    An event classifier's prediction also carries ``probability`` (= ``value``) and ``event``
    (probability ≥ the model's threshold); both stay None, and out of the JSON, otherwise."""

    stream: str
    ts: float
    value: float
    warm: bool
    probability: float | None = None
    event: bool | None = None


class _Reject(Exception):
    """Unwinds out of nested parsing with a reason; caught inside ``decode`` only."""

    def __init__(self, reason: Reason, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason
        self.detail = detail


def _reject_constant(name: str) -> Any:
    raise _Reject(Reason.NOT_FINITE, f"JSON literal {name} is not a finite number")


_DECODER = json.JSONDecoder(parse_constant=_reject_constant)


def _reject(reason: Reason, detail: str, batch: bool = False) -> Decoded:
    return Decoded([], [(reason, detail)], batch)


def decode(payload: bytes, topic: str, spec: PayloadSpec, received: float) -> Decoded:
    """Turn one MQTT payload into readings; never raises, whatever the bytes.

    Whole-message problems give one reject and no readings; in a batch, each bad item gives
    its own reject while the good items are kept in order.
    """
    if len(payload) > spec.max_bytes:
        return _reject(Reason.TOO_LARGE, f"{len(payload)} bytes > {spec.max_bytes}")
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
    if fmt == "number":
        return _decode_number(text, topic, received)

    try:
        doc = _parse_json(text)
    except _Reject as rej:
        return _reject(rej.reason, rej.detail)
    if isinstance(doc, dict):
        if fmt != "json":
            return _reject(Reason.WRONG_TYPE, "expected a JSON array, got an object")
        try:
            reading = _reading(doc, topic, topic, spec, received)
        except _Reject as rej:
            return _reject(rej.reason, rej.detail)
        return Decoded([reading], [], False)
    if isinstance(doc, list):
        if fmt != "batch":
            return _reject(Reason.WRONG_TYPE, "expected a JSON object, got an array")
        return _decode_batch(doc, topic, spec, received)
    return _reject(Reason.WRONG_TYPE, f"top-level JSON {_kind(doc)} is not an object or array")


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
    return Decoded([Reading(topic, value, received, received, topic)], [], False)


def _parse_json(text: str) -> Any:
    try:
        doc = _DECODER.decode(text)
    except RecursionError:
        raise _Reject(Reason.TOO_DEEP, f"JSON nested deeper than {MAX_DEPTH}") from None
    except ValueError as exc:  # JSONDecodeError, and int() refusing > 4300 digits
        raise _Reject(Reason.BAD_JSON, _json_error(exc)) from None
    # Counting brackets over-estimates depth (strings may hold brackets), so it only decides
    # whether the exact walk over the parsed document is needed.
    if text.count("[") + text.count("{") > MAX_DEPTH and _depth_exceeds(doc, MAX_DEPTH):
        raise _Reject(Reason.TOO_DEEP, f"JSON nested deeper than {MAX_DEPTH}")
    return doc


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


def _decode_batch(items: list[Any], topic: str, spec: PayloadSpec, received: float) -> Decoded:
    if not items:
        return _reject(Reason.EMPTY, "empty batch", batch=True)
    if len(items) > spec.max_items:
        return _reject(Reason.TOO_MANY, f"{len(items)} items > {spec.max_items}", batch=True)
    readings: list[Reading] = []
    rejects: list[tuple[Reason, str]] = []
    stream_key = spec.stream_key
    for index, item in enumerate(items):
        try:
            if not isinstance(item, dict):
                raise _Reject(Reason.WRONG_TYPE, f"{_kind(item)} is not an object")
            if stream_key not in item:
                raise _Reject(Reason.MISSING_KEY, f"missing key {stream_key!r}")
            stream = _stream_id(item[stream_key])
            readings.append(_reading(item, stream, topic, spec, received))
        except _Reject as rej:
            rejects.append((rej.reason, f"item {index}: {rej.detail}"))
    return Decoded(readings, rejects, True)


def _stream_id(raw: Any) -> str:
    if not isinstance(raw, str):
        raise _Reject(Reason.BAD_STREAM, f"stream id is a {_kind(raw)}, not a string")
    if not raw or len(raw) > MAX_STREAM_LEN:
        raise _Reject(Reason.BAD_STREAM, f"stream id length {len(raw)} not in 1..{MAX_STREAM_LEN}")
    if "+" in raw or "#" in raw or "\0" in raw:
        raise _Reject(Reason.BAD_STREAM, "stream id contains '+', '#' or NUL")
    if not raw.isascii():
        # JSON escapes can smuggle in lone surrogates, which cannot be written out as UTF-8.
        try:
            raw.encode("utf-8")
        except UnicodeEncodeError:
            raise _Reject(Reason.BAD_STREAM, "stream id is not valid Unicode") from None
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
        raise _Reject(Reason.WRONG_TYPE, f"{key!r} is a {_kind(raw)}, not a number")
    try:
        value = float(raw)
    except OverflowError:
        raise _Reject(Reason.NOT_FINITE, f"{key!r} is out of float range") from None
    if not math.isfinite(value):
        raise _Reject(Reason.NOT_FINITE, f"{key!r} is not finite")
    ts_raw = obj.get(spec.ts_key)  # null counts as absent: producers write it for "unknown"
    ts = received if ts_raw is None else _timestamp(ts_raw)
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
