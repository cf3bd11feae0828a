"""Write-ahead journal of what the engine stepped, so a crash loses no state.

Why: snapshots are periodic, but readings are acknowledged to the broker as soon as their
predictions are out. Without a journal, a ``kill -9`` loses the effect of every reading
acknowledged after the last snapshot (the broker will not send them again), and the restored
states drift from an uninterrupted run. The engine appends one record per micro-batch it steps,
*before* any of its predictions is published (so before any of its readings is acknowledged);
at start the records after the snapshot's position are stepped again through the same model,
which rebuilds the exact states.

File layout (little-endian), one file per route (``<route>.journal``), the previous segment kept
as ``<route>.journal.prev`` until the next rotation::

    file   := MAGIC(8) header_len:u32 header_crc:u32 header_json  record*
    record := length:u32 crc:u32 seq:u64 kind:u8 payload[length]

``crc`` is ``zlib.crc32`` over ``seq``, ``kind`` and the payload. The JSON header names the
bundle (sha256) and ``base_seq``, the sequence number of the state the segment continues from
(its first record is ``base_seq + 1``). A record is written with one ``write()`` call on an
``O_APPEND`` descriptor, so a process crash leaves at most one torn record at the end; a reader
stops at the first record that is short, fails its CRC, does not parse or breaks the sequence,
and reports why (``torn``, ``corrupt``, ``gap``, ``foreign``): never an exception.

Durability: after ``write()`` returns, the record is in the kernel's page cache and survives the
process being killed. With ``fsync=True`` it is also ``fdatasync``-ed before the predictions go
out, so it survives a power loss or kernel crash too, at the price of one disk flush per batch.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import struct
import time
import zlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np

from forecaster.serve.codec import (
    LABEL_OF,
    STREAM_OF,
    TS_OF,
    VALUE_OF,
    WARM_OF,
    Prediction,
    Reading,
)
from forecaster.serve.snapshot import fsync_dir

__all__ = [
    "KIND_FORGET",
    "KIND_WAVE",
    "Journal",
    "JournalScan",
    "RefusalReason",
    "Wave",
    "WaveColumns",
    "decode_forget",
    "decode_wave",
    "encode_forget",
    "encode_wave",
    "journal_prev_path",
    "scan_journal",
]

log = logging.getLogger(__name__)

MAGIC = b"FCJRNL01"
_FILE_HEAD = struct.Struct("<8sII")  # magic, header length, header crc
_REC_HEAD = struct.Struct("<IIQB")  # payload length, crc, seq, kind
_CRC_PART = struct.Struct("<QB")  # what the crc covers before the payload
_COUNT = struct.Struct("<I")
_MAX_HEADER = 1 << 16

KIND_WAVE = 1  # readings given to Engine.step, in order, with the predictions made
KIND_FORGET = 2  # streams the engine forgot (idle expiry)

# flags per reading in a wave record
_HAS_PRED = 1
_WARM = 2
_HAS_LABEL = 4

RefusalReason = Literal["torn", "corrupt", "gap", "foreign"]
REFUSAL_REASONS: tuple[RefusalReason, ...] = ("torn", "corrupt", "gap", "foreign")


class JournalDecodeError(ValueError):
    """A record's payload does not parse; the reader turns it into a ``corrupt`` refusal."""


def journal_prev_path(path: Path) -> Path:
    return path.with_name(path.name + ".prev")


# ------------------------------------------------------------------ payloads


@dataclass(slots=True)
class Wave:
    """A decoded wave record: the readings as the engine got them and what it predicted."""

    readings: list[Reading]
    predictions: list[Prediction | None]


@dataclass(slots=True)
class WaveColumns:
    """A stepped micro-batch's columns as the engine already holds them, every reading
    predicted, in arrival order: :func:`encode_wave` packs them instead of reading each
    reading and prediction object again (a twentieth of the inference worker's time on
    gateway batches went to that)."""

    streams: list[str]
    ts: np.ndarray  # float64
    values: np.ndarray  # float64
    predictions: np.ndarray  # float64
    warm: np.ndarray  # bool
    labels: list[float | None] | None = None  # None: no reading has a label


def encode_wave(
    readings: Sequence[Reading],
    predictions: Sequence[Prediction | None],
    columns: WaveColumns | None = None,
) -> bytes:
    """Pack readings and predictions into one payload: numeric columns, then the ids.

    ``received`` and ``topic`` are not kept: the engine never reads them, and a redelivered
    reading arrives with its own. ``columns``, when given, are these readings' and
    predictions' own (the same bytes come out either way), and nothing is read from the
    objects.
    """
    n = len(readings)
    if len(predictions) != n:
        raise ValueError(f"{n} readings but {len(predictions)} predictions")
    if columns is not None and (
        len(columns.streams) != n or (columns.labels is not None and len(columns.labels) != n)
    ):
        raise ValueError(f"{n} readings but columns for {len(columns.streams)}")
    # Columns read with C-level getters, and the usual batch (no labels, every reading
    # predicted, ASCII ids) without a Python step per reading: this runs for every micro-batch.
    if columns is None:
        ts = np.fromiter(map(TS_OF, readings), dtype="<f8", count=n)
        values = np.fromiter(map(VALUE_OF, readings), dtype="<f8", count=n)
    else:
        ts = columns.ts.astype("<f8", copy=False)
        values = columns.values.astype("<f8", copy=False)
    labels_in = list(map(LABEL_OF, readings)) if columns is None else columns.labels
    flags = np.zeros(n, dtype=np.uint8)
    if labels_in is None or labels_in.count(None) == n:
        labels = np.zeros(n, dtype="<f8")
    else:
        labels = np.fromiter((0.0 if x is None else x for x in labels_in), dtype="<f8", count=n)
        flags |= np.fromiter(
            (0 if x is None else _HAS_LABEL for x in labels_in), dtype=np.uint8, count=n
        )
    if columns is not None:
        preds = columns.predictions.astype("<f8", copy=False)
        flags |= np.where(columns.warm, _HAS_PRED | _WARM, _HAS_PRED).astype(np.uint8)
    elif predictions.count(None) == 0:
        preds = np.fromiter(map(VALUE_OF, predictions), dtype="<f8", count=n)
        warm = np.fromiter(map(WARM_OF, predictions), dtype=bool, count=n)
        flags |= np.where(warm, _HAS_PRED | _WARM, _HAS_PRED).astype(np.uint8)
    else:
        preds = np.fromiter(
            (np.nan if p is None else p.value for p in predictions), dtype="<f8", count=n
        )
        flags |= np.fromiter(
            (0 if p is None else _HAS_PRED | (_WARM if p.warm else 0) for p in predictions),
            dtype=np.uint8,
            count=n,
        )
    streams = list(map(STREAM_OF, readings)) if columns is None else columns.streams
    joined = "".join(streams)
    if joined.isascii():  # one byte per character
        lengths = np.fromiter(map(len, streams), dtype="<u4", count=n)
        ids = [joined.encode("ascii")]
    else:
        ids = [s.encode("utf-8", "surrogatepass") for s in streams]
        lengths = np.fromiter(map(len, ids), dtype="<u4", count=n)
    return b"".join(
        (
            _COUNT.pack(n),
            ts.tobytes(),
            values.tobytes(),
            labels.tobytes(),
            preds.tobytes(),
            flags.tobytes(),
            lengths.tobytes(),
            *ids,
        )
    )


def decode_wave(payload: bytes) -> Wave:
    """Inverse of :func:`encode_wave`; raises :class:`JournalDecodeError` on any mismatch."""
    view = memoryview(payload)
    if len(view) < _COUNT.size:
        raise JournalDecodeError("wave record shorter than its count")
    (n,) = _COUNT.unpack_from(view, 0)
    pos = _COUNT.size
    fixed = n * (8 * 4 + 1 + 4)
    if len(view) - pos < fixed:
        raise JournalDecodeError(f"wave record of {n} readings is {len(view)} bytes")

    def take(dtype: str, size: int) -> np.ndarray:
        nonlocal pos
        arr = np.frombuffer(view, dtype=dtype, count=n, offset=pos)
        pos += n * size
        return arr

    ts, values, labels, preds = (take("<f8", 8) for _ in range(4))
    flags = take("u1", 1)
    lengths = take("<u4", 4)
    if int(lengths.sum(dtype=np.int64)) != len(view) - pos:
        raise JournalDecodeError("stream id lengths do not add up to the record")
    if not (np.isfinite(ts).all() and np.isfinite(values).all()):
        raise JournalDecodeError("non-finite timestamp or value")
    readings: list[Reading] = []
    predictions: list[Prediction | None] = []
    for k in range(n):
        size = int(lengths[k])
        try:
            stream = bytes(view[pos : pos + size]).decode("utf-8", "surrogatepass")
        except UnicodeDecodeError as exc:
            raise JournalDecodeError(f"stream id {k} is not UTF-8") from exc
        pos += size
        f = int(flags[k])
        t = float(ts[k])
        label = float(labels[k]) if f & _HAS_LABEL else None
        readings.append(Reading(stream, float(values[k]), t, t, stream, label))
        predictions.append(
            Prediction(stream, t, float(preds[k]), bool(f & _WARM)) if f & _HAS_PRED else None
        )
    return Wave(readings, predictions)


def encode_forget(streams: Sequence[str]) -> bytes:
    ids = [s.encode("utf-8", "surrogatepass") for s in streams]
    lengths = np.fromiter((len(b) for b in ids), dtype="<u4", count=len(ids))
    return b"".join((_COUNT.pack(len(ids)), lengths.tobytes(), *ids))


def decode_forget(payload: bytes) -> list[str]:
    view = memoryview(payload)
    if len(view) < _COUNT.size:
        raise JournalDecodeError("forget record shorter than its count")
    (n,) = _COUNT.unpack_from(view, 0)
    pos = _COUNT.size
    if len(view) - pos < 4 * n:
        raise JournalDecodeError(f"forget record of {n} streams is {len(view)} bytes")
    lengths = np.frombuffer(view, dtype="<u4", count=n, offset=pos)
    pos += 4 * n
    if int(lengths.sum(dtype=np.int64)) != len(view) - pos:
        raise JournalDecodeError("stream id lengths do not add up to the record")
    out: list[str] = []
    for size in lengths.tolist():
        try:
            out.append(bytes(view[pos : pos + size]).decode("utf-8", "surrogatepass"))
        except UnicodeDecodeError as exc:
            raise JournalDecodeError("stream id is not UTF-8") from exc
        pos += size
    return out


# ------------------------------------------------------------------ writing


class Journal:
    """An open journal segment, appended to by the one worker thread.

    Not thread-safe, like the engine that owns it. ``size`` is the segment's length in bytes;
    the owner rotates (snapshot, then :meth:`rotate`) when it passes its bound, so the journal on
    disk never exceeds two segments.
    """

    def __init__(self, path: Path, bundle_sha256: str, base_seq: int, *, fsync: bool) -> None:
        self.path = Path(path)
        self.bundle_sha256 = bundle_sha256
        self.fsync = fsync
        self.base_seq = int(base_seq)
        self.last_seq = int(base_seq)
        self.size = 0
        self._fd = -1
        self._open_new()

    def _open_new(self) -> None:
        """Move the current segment to ``.prev`` and start an empty one continuing ``last_seq``.

        The new file is written under a temp name and renamed, so ``path`` is always a segment
        with a whole header."""
        header = json.dumps(
            {
                "format": "forecaster-journal",
                "version": 1,
                "bundle_sha256": self.bundle_sha256,
                "base_seq": self.last_seq,
                "created": time.time(),
            }
        ).encode()
        head = _FILE_HEAD.pack(MAGIC, len(header), zlib.crc32(header)) + header
        tmp = self.path.with_name(self.path.name + ".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_APPEND, 0o600)
        try:
            os.write(fd, head)
            if self.fsync:
                os.fsync(fd)
            if self.path.exists():
                os.replace(self.path, journal_prev_path(self.path))
            os.replace(tmp, self.path)
        except BaseException:
            os.close(fd)
            tmp.unlink(missing_ok=True)
            raise
        fsync_dir(self.path.parent)
        if self._fd >= 0:
            with contextlib.suppress(OSError):  # the old segment is complete either way
                os.close(self._fd)
        self._fd = fd
        self.base_seq = self.last_seq
        self.size = len(head)

    def rotate(self) -> None:
        """Start a new segment after a snapshot that covers every record so far."""
        self._open_new()

    def append(self, kind: int, payload: bytes) -> int:
        """Write one record (one ``write()``); returns its sequence number.

        OSError (disk full, I/O error) propagates with ``last_seq`` unchanged and the file cut
        back to its last whole record, so the records appended after a failure still follow
        an intact sequence a replay can read.
        """
        if self._fd < 0:
            raise OSError("journal is closed")
        seq = self.last_seq + 1
        crc = zlib.crc32(payload, zlib.crc32(_CRC_PART.pack(seq, kind)))
        data = _REC_HEAD.pack(len(payload), crc, seq, kind) + payload
        try:
            written = os.write(self._fd, data)
            if written != len(data):
                raise OSError(f"short journal write: {written} of {len(data)} bytes")
            if self.fsync:
                os.fdatasync(self._fd)
        except OSError:
            with contextlib.suppress(OSError):
                os.ftruncate(self._fd, self.size)
            raise
        self.last_seq = seq
        self.size += len(data)
        return seq

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


# ------------------------------------------------------------------ reading


@dataclass
class JournalScan:
    """Records after a given position, from ``.prev`` then the current segment.

    ``records`` are ``(seq, kind, payload)`` in order and contiguous from ``after + 1``;
    ``refused`` says where and why reading stopped early (one entry per segment that was cut);
    ``dropped_bytes`` is how much was not used because of it."""

    records: list[tuple[int, int, bytes]] = field(default_factory=list)
    refused: list[tuple[RefusalReason, str]] = field(default_factory=list)
    dropped_bytes: int = 0


def scan_journal(path: Path, bundle_sha256: str, after: int) -> JournalScan:
    """Read the records with ``seq > after`` that continue the state at ``after`` exactly.

    Never raises for damaged content: a segment of another bundle is ``foreign``; a record cut
    short by a crash is ``torn``; a CRC or parse failure is ``corrupt``; a missing stretch of
    sequence numbers (a segment lost, or a state older than the journal) is ``gap``. Reading
    stops at the first of these, since nothing after it can be applied to an exact state.
    """
    out = JournalScan()
    expected = after + 1
    for segment in (journal_prev_path(Path(path)), Path(path)):
        try:
            data = segment.read_bytes()
        except FileNotFoundError:
            continue
        except OSError as exc:
            out.refused.append(("corrupt", f"{segment}: cannot be read ({exc})"))
            return out
        stop = _scan_segment(segment, data, bundle_sha256, expected, out)
        if stop:
            return out
        if out.records:
            expected = out.records[-1][0] + 1
    return out


def _scan_segment(segment: Path, data: bytes, sha: str, expected: int, out: JournalScan) -> bool:
    """Append this segment's usable records to ``out``; True when reading must stop."""

    def refuse(reason: RefusalReason, why: str, at: int) -> bool:
        out.refused.append((reason, f"{segment} at byte {at}: {why}"))
        out.dropped_bytes += len(data) - at
        return True

    if len(data) < _FILE_HEAD.size:
        return refuse("torn", "shorter than the file header", 0)
    magic, hlen, hcrc = _FILE_HEAD.unpack_from(data, 0)
    if magic != MAGIC or hlen > _MAX_HEADER:
        return refuse("corrupt", "not a forecaster journal", 0)
    end = _FILE_HEAD.size + hlen
    if len(data) < end:
        return refuse("torn", "header cut short", 0)
    raw = data[_FILE_HEAD.size : end]
    if zlib.crc32(raw) != hcrc:
        return refuse("corrupt", "header checksum mismatch", 0)
    try:
        header = json.loads(raw)
        base = header["base_seq"]
        if not isinstance(base, int) or isinstance(base, bool) or base < 0:
            raise ValueError("base_seq is not a non-negative integer")
    except (ValueError, KeyError, TypeError) as exc:
        return refuse("corrupt", f"bad header ({exc})", 0)
    if header.get("bundle_sha256") != sha:
        return refuse("foreign", "written for another bundle", 0)
    if base > expected - 1:
        return refuse("gap", f"segment starts after {base}, the state is at {expected - 1}", 0)
    pos = end
    seq_next = base + 1
    while pos < len(data):
        if len(data) - pos < _REC_HEAD.size:
            return refuse("torn", "record header cut short", pos)
        length, crc, seq, kind = _REC_HEAD.unpack_from(data, pos)
        body = pos + _REC_HEAD.size
        if length > len(data) - body:
            return refuse("torn", f"record of {length} bytes cut short", pos)
        payload = data[body : body + length]
        if zlib.crc32(payload, zlib.crc32(_CRC_PART.pack(seq, kind))) != crc:
            return refuse("corrupt", f"checksum mismatch in record {seq_next}", pos)
        if seq != seq_next or kind not in (KIND_WAVE, KIND_FORGET):
            return refuse("corrupt", f"record {seq} (kind {kind}) where {seq_next} was due", pos)
        if seq >= expected:
            if seq > expected:
                return refuse("gap", f"record {seq} follows state {expected - 1}", pos)
            out.records.append((seq, kind, payload))
            expected = seq + 1
        seq_next += 1
        pos = body + length
    return False
