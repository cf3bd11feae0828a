"""The codec's fast paths: well-formed gateway batches in, predictions out, at C speed.

:mod:`forecaster.serve.codec` is the reference: it parses with the standard library and judges
every item in Python, which profiles showed as most of the daemon's per-reading cost on batches
(tens of microseconds per reading, against about two for ONNX Runtime). Here a batch is decoded
by msgspec straight into typed items, and the checks run on whole columns. Anything the fast path
is not *sure* about (a bad item, a NaN literal (msgspec refuses it), a long integer, a ``\\u``
escape, nesting, a key that may be repeated, an ISO timestamp) goes to :func:`codec.decode`, so
the two give equal results on every payload (``tests/unit/test_fastcodec.py`` checks that with
generated batches); the fast path only decides how quickly a clean batch is accepted. A clean
batch's readings come back as columns (:mod:`forecaster.serve.columns`), not an object each.
Reading objects that arrive together are decoded together (:func:`clean_objects`).

Predictions are encoded by msgspec from the :class:`~forecaster.serve.codec.Prediction` structs
themselves, with the model's name and version put in, or, given as columns, through a struct per
document shape that carries the name and version as fields: the same JSON document as
:func:`codec.encode_predictions` (same keys in the same order, ``null`` for non-finite numbers,
absent optional fields), written as UTF-8; stream ids that are not ASCII take the reference
encoder, which escapes them.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from functools import lru_cache
from itertools import repeat
from operator import attrgetter
from typing import NamedTuple, cast

import msgspec
from msgspec import UNSET, UnsetType

from forecaster.serve import codec
from forecaster.serve.codec import FLOAT32_MAX, Decoded, PayloadSpec, Prediction, Reading
from forecaster.serve.columns import PredictionColumns, ReadingColumns

__all__ = [
    "clean_batch",
    "clean_object",
    "clean_objects",
    "decode",
    "encode_predictions",
    "encode_singles",
]

_ASCII_WS = b" \t\n\r\x0b\x0c"
#: An integer this long is marked by the reference parser (and its item refused).
_LONG = codec._MAX_INT_DIGITS
# Digits to "0", everything else to " ": a run of _LONG + 1 zeros is then a plain substring
# search, far cheaper than a regex over the payload.
_DIGITS = bytes(0x30 if 0x30 <= c <= 0x39 else 0x20 for c in range(256))
_LONG_RUN = b"0" * (_LONG + 1)


#: Every byte but the braces, brackets and backslash: deleted by :func:`_marks`.
_NOT_MARKS = bytes(c for c in range(256) if c not in b"{}[]\\")


def _all_numbers(column: list[float | UnsetType | None]) -> bool:
    """No None or UNSET in ``column``: ``sum`` raises on either, and costs a fifth of a
    ``count`` (which compares every float with the sentinel)."""
    try:
        sum(column)  # type: ignore[arg-type]
    except TypeError:
        return False
    return True


def _unset(column: list[float | UnsetType | None]) -> int:
    """How many of ``column`` are UNSET (an item without the key): none, when all are numbers."""
    return 0 if _all_numbers(column) else column.count(UNSET)


def _marks(body: bytes) -> bytes:
    """``body``'s braces, brackets and backslashes, in order: one pass over the payload, after
    which counting them is cheap (each ``count`` or ``in`` over the whole payload took about
    5 µs per 5.5 KB gateway batch, and the checks made four of them)."""
    return body.translate(None, _NOT_MARKS)


def _long_integer(body: bytes) -> bool:
    return len(body) > _LONG and _LONG_RUN in body.translate(_DIGITS)


_ENCODER = msgspec.json.Encoder()
# An item's fields, as the typed decoders below name them (s, v, t, l).
_S, _V, _T, _L = (attrgetter(k) for k in ("s", "v", "t", "l"))


class _Plan(NamedTuple):
    """What the fast paths need of a route's payload spec, made once per spec."""

    one: msgspec.json.Decoder[msgspec.Struct] | None  # None: value, ts and label keys not distinct
    objects: msgspec.json.Decoder[list[msgspec.Struct]] | None  # a list of ``one``'s objects
    batch: msgspec.json.Decoder[list[msgspec.Struct]] | None  # None: two of its keys share a name
    value: bytes  # each key as it appears quoted in a payload
    stream: bytes
    ts: bytes
    label: bytes


@lru_cache(maxsize=256)
def _made(spec: PayloadSpec) -> _Plan:
    ts = ("t", float | None | UnsetType, msgspec.field(name=spec.ts_key, default=UNSET))
    label = ("l", float | None | UnsetType, msgspec.field(name=spec.label_key, default=UNSET))
    value = ("v", float, msgspec.field(name=spec.value_key))
    stream = ("s", str, msgspec.field(name=spec.stream_key))
    keys = (spec.value_key, spec.ts_key, spec.label_key)
    one = objects = None
    if len(set(keys)) == len(keys):  # a reading object's stream id is its topic
        one_type = msgspec.defstruct("One", [value, ts, label])
        one = msgspec.json.Decoder(one_type)
        objects = msgspec.json.Decoder(list[one_type])  # type: ignore[valid-type]
    batch = None
    if spec.stream_key not in keys and one is not None:
        item = msgspec.defstruct("Item", [stream, value, ts, label])
        batch = msgspec.json.Decoder(list[item])  # type: ignore[valid-type]
    quoted = [b'"' + k.encode() + b'"' for k in (*keys[:1], spec.stream_key, *keys[1:])]
    return _Plan(one, objects, batch, *quoted)


#: Plans by the identity of their spec (a route's spec is one object for the route's life), so
#: a message costs one lookup, not the hash and comparison of the spec's fields.
_PLANS: dict[int, tuple[PayloadSpec, _Plan]] = {}


def _plan(spec: PayloadSpec) -> _Plan:
    hit = _PLANS.get(id(spec))
    if hit is not None and hit[0] is spec:
        return hit[1]
    plan = _made(spec)
    if len(_PLANS) >= 256:
        _PLANS.clear()
    _PLANS[id(spec)] = (spec, plan)  # the spec held: its id is not reused while here
    return plan


def decode(payload: bytes, topic: str, spec: PayloadSpec, received: float) -> Decoded:
    """:func:`codec.decode`'s result, computed quickly for a clean batch or reading object."""
    fast = clean_object(payload, topic, spec, received)
    if fast is None:
        fast = clean_batch(payload, topic, spec, received)
    return fast if fast is not None else codec.decode(payload, topic, spec, received)


def clean_object(payload: bytes, topic: str, spec: PayloadSpec, received: float) -> Decoded | None:
    """One reading object's reading when it is certainly valid, else None (use the reference)."""
    if spec.format not in ("auto", "json") or len(payload) > spec.max_bytes:
        return None
    body = payload.strip(_ASCII_WS)
    # No scan for NaN or Infinity: msgspec refuses those literals, so the reference judges them.
    if body[:1] != b"{" or b"\\u" in body:
        return None
    if body.count(b"{") != 1 or body.count(b"}") != 1 or b"[" in body:
        return None
    plan = _plan(spec)
    if plan.one is None or codec._topic_too_long(topic, spec.max_stream_bytes):
        return None
    try:
        one = plan.one.decode(body)
    except (msgspec.DecodeError, UnicodeDecodeError):
        return None
    t, lab = one.t, one.l  # type: ignore[attr-defined]
    # Each key the reference reads at most once, so none can be repeated (see clean_batch).
    if body.count(plan.value) != 1 or body.count(plan.stream) > 1:
        return None
    if body.count(plan.ts) != (t is not UNSET) or body.count(plan.label) != (lab is not UNSET):
        return None
    if _long_integer(body):
        return None
    value = float(one.v)  # type: ignore[attr-defined]
    if not abs(value) <= FLOAT32_MAX:
        return None
    ts = received if t is None or t is UNSET else float(t)
    if not (0 <= ts < math.inf):
        return None
    if spec.max_future_s > 0 and ts - received > spec.max_future_s:
        return None
    if lab is None or lab is UNSET:
        label = None
    elif lab == 0.0 or lab == 1.0:
        label = float(lab)
    else:
        return None
    return Decoded([Reading(topic, value, ts, received, topic, label)], [], False)


def clean_objects(
    payloads: Sequence[bytes], topics: Sequence[str], spec: PayloadSpec, received: float
) -> list[Reading] | None:
    """Each reading object's reading, one per payload (its stream id its topic), when every
    payload is certainly valid; else None (decode them one by one).

    One msgspec call over the payloads joined as a JSON array, and each check once over the
    joined bytes, instead of a dozen calls per message: :func:`clean_object` costs ~4 µs per
    message, this ~0.5 (``tests/unit/test_fastcodec.py`` checks both give the reference's
    readings). Why checks on the joined bytes hold for each payload: the array must decode to
    exactly one object per payload, and ``{``, ``}`` and the value key must occur exactly once
    per object, so no payload can hold two objects, a nested one, or a repeated key; the ts and
    label keys occur exactly as often as objects hold them, so once in each that does.
    """
    n = len(payloads)
    if spec.format not in ("auto", "json") or n == 0:
        return None
    plan = _plan(spec)
    if plan.objects is None:
        return None
    if max(map(len, payloads)) > spec.max_bytes or 4 * max(map(len, topics)) > (
        spec.max_stream_bytes
    ):
        return None  # the rare long one: the reference measures it exactly
    joined = b",".join(payloads)
    marks = _marks(joined)
    if (b"\\" in marks and b"\\u" in joined) or b"[" in marks or plan.stream in joined:
        return None
    if marks.count(b"{") != n or marks.count(b"}") != n or joined.count(plan.value) != n:
        return None
    try:
        items = plan.objects.decode(b"[" + joined + b"]")
    except (msgspec.DecodeError, UnicodeDecodeError):
        return None
    if len(items) != n:
        return None
    ts_raw = list(map(_T, items))
    labels = list(map(_L, items))
    no_ts = _unset(ts_raw)
    unlabelled = labels.count(UNSET)
    if joined.count(plan.ts) != n - no_ts or joined.count(plan.label) != n - unlabelled:
        return None
    if _long_integer(joined):
        return None
    values = list(map(_V, items))
    checked = _checked(values, ts_raw, no_ts, labels, unlabelled, spec, received)
    if checked is None:
        return None
    ts, label_of = checked
    streams = list(topics)  # a reading object's stream id is its topic
    return list(
        map(Reading, streams, values, ts, repeat(received), streams, label_of or repeat(None))
    )


def _checked(
    values: list[float],
    ts_raw: list[float | UnsetType | None],
    no_ts: int,
    labels: list[float | UnsetType | None],
    unlabelled: int,
    spec: PayloadSpec,
    received: float,
) -> tuple[list[float], list[float | None] | None] | None:
    """Decoded columns judged as the reference judges each item: the readings' ts (``received``
    where an item has none) and labels (None when no item has one), or None where the reference
    must judge an item: a value beyond float32, a negative or too-future ts, a label neither 0
    nor 1.

    Checked with ``min``/``max``/``sum`` over lists, not numpy: a few reading objects decoded
    together would pay numpy's fixed cost per call. msgspec decodes no NaN or infinity (it
    refuses the literals and out-of-range numbers); the sums' NaN test guards that anyway."""
    n = len(values)
    total = sum(values)
    if total != total or min(values) < -FLOAT32_MAX or max(values) > FLOAT32_MAX:
        return None
    if no_ts == 0 and _all_numbers(ts_raw):
        ts = cast(list[float], ts_raw)
    else:
        ts = [received if t is None or t is UNSET else t for t in ts_raw]
    total = sum(ts)
    if total != total or not (0 <= min(ts) and max(ts) < math.inf):
        return None
    if spec.max_future_s > 0 and max(ts) - received > spec.max_future_s:
        return None
    if unlabelled + labels.count(None) == n:
        return ts, None
    label_of: list[float | None] = []
    for x in labels:
        if x is None or x is UNSET:
            label_of.append(None)
        elif x == 0.0 or x == 1.0:
            label_of.append(float(x))
        else:
            return None
    return ts, label_of


def clean_batch(payload: bytes, topic: str, spec: PayloadSpec, received: float) -> Decoded | None:
    """The batch's readings when every item is certainly valid, else None (use the reference)."""
    if spec.format not in ("auto", "batch") or len(payload) > spec.max_bytes:
        return None
    body = payload.strip(_ASCII_WS)
    if body[:1] != b"[":
        return None
    marks = _marks(body)
    if b"\\" in marks and b"\\u" in body:  # NaN and Infinity: see clean_object
        return None
    n = marks.count(b"{")
    # Flat: one object per item and no nested arrays or objects anywhere (a brace inside a
    # string only sends the batch to the reference path).
    if n == 0 or n > spec.max_items or marks.count(b"[") != 1 or marks.count(b"}") != n:
        return None
    if codec._topic_too_long(topic, spec.max_stream_bytes):
        return None
    plan = _plan(spec)
    decoder = plan.batch
    if decoder is None:
        return None
    try:
        items = decoder.decode(body)
    except (msgspec.DecodeError, UnicodeDecodeError):
        return None
    if len(items) != n:
        return None
    # A key quoted more often than items hold it may be repeated inside one item (msgspec keeps
    # the last copy; the reference refuses the item), or sit in a value: the reference decides.
    if body.count(plan.stream) != n or body.count(plan.value) != n:
        return None
    # Columns read with C-level getters: no Python step per item where the batch is usual
    # (every item with a ts, none with a label).
    ts_raw = list(map(_T, items))
    labels = list(map(_L, items))
    no_ts = _unset(ts_raw)
    if body.count(plan.ts) != n - no_ts:
        return None
    unlabelled = labels.count(UNSET)
    if body.count(plan.label) != n - unlabelled:
        return None
    if _long_integer(body):
        return None
    streams = list(map(_S, items))
    if not _streams_ok(streams, spec.max_stream_bytes):
        return None
    values = list(map(_V, items))
    checked = _checked(values, ts_raw, no_ts, labels, unlabelled, spec, received)
    if checked is None:
        return None
    ts, label_of = checked
    # Kept as columns (columns.py): no object per reading unless something asks for one.
    return Decoded(ReadingColumns.message(streams, values, ts, received, topic, label_of), [], True)


def _streams_ok(streams: list[str], limit: int) -> bool:
    """The reference's stream-id rules on a whole column: non-empty, no ``+``/``#``/NUL, at
    most ``limit`` UTF-8 bytes (escapes, hence lone surrogates, were excluded before)."""
    joined = "\x01".join(streams)
    if "+" in joined or "#" in joined or "\0" in joined or min(map(len, streams)) == 0:
        return False
    if joined.isascii():
        return max(map(len, streams)) <= limit
    return max(len(s.encode("utf-8")) for s in streams) <= limit


def encode_predictions(preds: Sequence[Prediction], model: str, version: str, batch: bool) -> bytes:
    """:func:`codec.encode_predictions`'s document, encoded by msgspec (from the columns
    themselves when ``preds`` is :class:`~forecaster.serve.columns.PredictionColumns`)."""
    if not batch and len(preds) != 1:
        raise ValueError(f"a non-batch message carries exactly one prediction, got {len(preds)}")
    if isinstance(preds, PredictionColumns):
        body = _columns_body(preds, model, version)
        if body is not None:
            return body if batch else body[1:-1]
        preds = list(preds)
    # A prediction's fields are the document's keys in order (those that are None omitted, as
    # the reference omits them), with the model's name and version to go before "warm". Every
    # string in the document is JSON-escaped, so the key's bytes are found nowhere else.
    keys = _model_keys(model, version)
    encoded = _ascii_encoded((preds if batch else preds[0],))
    if keys is None or encoded is None:
        return codec.encode_predictions(preds, model, version, batch)
    return encoded[0].replace(_WARM_KEY, keys)


def encode_singles(preds: Sequence[Prediction], model: str, version: str) -> list[bytes]:
    """:func:`encode_predictions` of each prediction as its own (non-batch) message: the
    prediction messages of a micro-batch of single-reading messages, encoded with C-level
    passes over the batch instead of a call per message (profiles of single readings put the
    per-message encoding at a tenth of the inference worker's time)."""
    if isinstance(preds, PredictionColumns):
        docs = _wire_documents(preds, model, version)
        bodies = None if docs is None else _ascii_encoded(docs)
        if bodies is not None:
            return bodies
        preds = list(preds)
    keys = _model_keys(model, version)
    bodies = _ascii_encoded(preds)
    if keys is None or bodies is None:  # each message on its own, the odd one by the reference
        return [encode_predictions((p,), model, version, False) for p in preds]
    return [body.replace(_WARM_KEY, keys) for body in bodies]


def _ascii_encoded(items: Sequence[object]) -> list[bytes] | None:
    """Each of ``items`` encoded by msgspec, or None where the reference must write one: a lone
    surrogate in a stream id (msgspec refuses it), or anything not ASCII (the reference escapes
    it)."""
    try:
        bodies = list(map(_ENCODER.encode, items))
    except UnicodeEncodeError:
        return None
    return bodies if b"".join(bodies).isascii() else None


# The published document of each prediction shape, with the model's name and version as fields
# in their place: made from columns by one C-level ``map`` and encoded without the key
# insertion the Prediction struct needs (together ~0.43 µs per prediction with bounds, against
# ~0.87 for Prediction structs made and encoded, and their keys put in: timeit, 100 predictions;
# benchmarks/README.md, 2026-12-03). Field order is the document's key order.
class _Plain(msgspec.Struct, gc=False):
    stream: str
    ts: float
    value: float
    model: str
    version: str
    warm: bool


class _Interval(_Plain, gc=False):  # a subclass's fields follow its base's
    lower: float
    upper: float


class _Event(_Plain, gc=False):
    probability: float
    event: bool


def _wire_documents(
    preds: PredictionColumns, model: str, version: str
) -> list[msgspec.Struct] | None:
    """Each prediction's document as a struct, or None when the model's name or version is not
    ASCII (the reference escapes it)."""
    if not (model + version).isascii():
        return None
    head = (preds.streams, preds.ts, preds.values, repeat(model), repeat(version), preds.warm)
    if preds.lower is not None and preds.upper is not None:
        return list(map(_Interval, *head, preds.lower, preds.upper))
    events = preds.events()
    if events is not None:
        return list(map(_Event, *head, preds.values, events))
    return list(map(_Plain, *head))


def _columns_body(preds: PredictionColumns, model: str, version: str) -> bytes | None:
    """The batch document of ``preds`` (a JSON array), or None where the reference must write
    it (an id or the model's name not ASCII: it escapes them)."""
    docs = _wire_documents(preds, model, version)
    body = None if docs is None else _ascii_encoded((docs,))
    return None if body is None else body[0]


_WARM_KEY = b',"warm":'


@lru_cache(maxsize=64)
def _model_keys(model: str, version: str) -> bytes | None:
    """The model's keys to go before "warm"; None when its name or version is not ASCII."""
    if not (model + version).isascii():
        return None
    return b',"model":%s,"version":%s,"warm":' % (_ENCODER.encode(model), _ENCODER.encode(version))
