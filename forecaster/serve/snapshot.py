"""The snapshot file: format, atomic write, validating read. No knowledge of slots or LRU.

A snapshot is an ``.npz`` archive without pickles (``np.load(allow_pickle=False)`` reads it):

- ``header``: UTF-8 JSON bytes (``format``, ``version``, ``bundle_sha256``, ``shapes``,
  ``count``, ``created``; from version 2 also ``journal_seq``, the last journal record whose
  effect the states include, so recovery replays exactly the records after it);
- ``ids``: the stream ids as UTF-8 JSON bytes, in LRU order (least recently used first);
- ``state0``… ``[L, n, H]`` float32, and the per-stream metadata arrays;
- version 2, optional: ``recent_ids`` / ``recent_ts`` / ``recent_value`` / ``recent_flags``,
  the engine's cache of recent predictions (see ``engine.RecentPredictions``), so a reading the
  broker redelivers after a crash is answered with the prediction it already had; and, where
  the model's interval follows each stream's spread, ``recent_lower`` / ``recent_upper`` (the
  bounds those predictions were published with) and the per-stream ``spread``, and where the
  model clips readings far from their prediction the per-stream ``clipped`` flag (all optional:
  files written before them read as NaN, "none").

The file is tied to the model by its sha256; a sound file for another model is ``foreign``,
anything unreadable or inconsistent is ``corrupt``. Both come back as :class:`SnapshotError`,
never as a numpy or zipfile exception, because a damaged file must not stop a start.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
import zipfile
import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import msgspec
import numpy as np

from forecaster.errors import ForecasterError

__all__ = [
    "META",
    "OPTIONAL_META",
    "SNAPSHOT_VERSION",
    "Rows",
    "SnapshotData",
    "SnapshotError",
    "SnapshotReason",
    "json_bytes",
    "json_from",
    "load_snapshot",
    "previous_path",
    "write_snapshot",
]

SNAPSHOT_VERSION = 2
_READABLE_VERSIONS = (1, 2)  # version 1 has no journal position and no recent predictions
_SNAPSHOT_FORMAT = "forecaster-state"
META = ("last_ts", "last_value", "last_pred", "seen", "last_used")
#: Metadata a snapshot may lack (written by an older version): NaN when absent. ``spread``: each
#: stream's spread when its last prediction was made (NaN: none yet; see model/spread.py);
#: ``clipped``: 1 where its last reading entered the model clipped (model/clip.py).
OPTIONAL_META = ("spread", "clipped")
RECENT = ("recent_ts", "recent_value", "recent_flags")
#: Recent-prediction columns a snapshot may lack (NaN when absent).
OPTIONAL_RECENT = ("recent_lower", "recent_upper")
# Exceptions np.load and zipfile raise for files that are not what they claim to be. A damaged
# header can claim a newer zip version or an unknown compression method (NotImplementedError) or
# an encrypted member (RuntimeError): found by tests/faults/test_fuzz.py.
_LOAD_ERRORS = (
    OSError,
    ValueError,
    KeyError,
    EOFError,
    MemoryError,
    NotImplementedError,
    RuntimeError,
    zipfile.BadZipFile,
    zlib.error,
)

SnapshotReason = Literal["missing", "corrupt", "foreign"]


class SnapshotError(ForecasterError):
    """A snapshot cannot be used; ``reason`` lets the daemon tell a first start from damage.

    ``missing``: no file. ``corrupt``: unreadable, truncated, malformed or non-finite content.
    ``foreign``: a sound file written for another model (bundle sha256 or state shapes differ),
    the normal outcome after deploying a new bundle.
    """

    def __init__(self, message: str, *, reason: SnapshotReason, path: Path) -> None:
        super().__init__(message)
        self.reason: SnapshotReason = reason
        self.path = path


@dataclass
class SnapshotData:
    """A validated snapshot: every array has the shape and dtype its header promises."""

    ids: list[str]
    arrays: dict[str, np.ndarray]  # state0.., and META
    journal_seq: int | None = None  # None: written before journals existed (version 1)
    recent_ids: list[str] = field(default_factory=list)
    recent: dict[str, np.ndarray] = field(default_factory=dict)  # RECENT arrays, aligned


def previous_path(path: Path) -> Path:
    """Where the generation before ``path`` is kept."""
    return path.with_name(path.name + ".prev")


def tmp_path(path: Path) -> Path:
    """A fixed name, so a temp file left by a crash is overwritten by the next write."""
    return path.with_name(path.name + ".tmp")


def json_bytes(obj: Any) -> np.ndarray:
    """JSON as a uint8 array: a str/object array would need pickle to load. Written by msgspec
    (the ids of a full recent-predictions cache took the standard library 6 ms per snapshot,
    a stall every stream waits behind)."""
    return np.frombuffer(msgspec.json.encode(obj), dtype=np.uint8)


def json_from(arr: np.ndarray) -> Any:
    if arr.dtype != np.uint8 or arr.ndim != 1:
        raise ValueError(f"expected 1-D uint8 JSON bytes, got {arr.dtype} {arr.shape}")
    return json.loads(arr.tobytes().decode("utf-8"))


@dataclass(frozen=True, eq=False)
class Rows:
    """Some streams' rows of a store array, gathered only as they are written: ``index``'s
    entries of ``source`` along its stream axis (axis 1 of a ``[L, slots, H]`` state, axis 0
    of a per-stream column), in that order.

    Why: gathering the live rows first (``np.take``) held a second copy of every state while
    the file was written: at 1M LSTM 2×64 streams about 1 GB more, so a snapshot doubled the
    daemon's resident memory (2.5 GB peak for 1.4 GB of state, measured in the benchmark's 1M
    scenario, where the journal's bound forces snapshots while serving). Written a chunk of
    streams at a time, the extra memory is one chunk."""

    source: np.ndarray
    index: np.ndarray

    @property
    def shape(self) -> tuple[int, ...]:
        if self.source.ndim == 1:
            return (len(self.index),)
        return (self.source.shape[0], len(self.index), *self.source.shape[2:])

    def write_npy(self, fh: Any, chunk: int) -> None:
        """The ``.npy`` file ``np.save`` writes for the gathered array, ``chunk`` streams per
        write (C order: layer by layer, then stream by stream)."""
        header = {
            "descr": np.lib.format.dtype_to_descr(self.source.dtype),
            "fortran_order": False,
            "shape": self.shape,
        }
        np.lib.format.write_array_header_1_0(fh, header)
        planes = [self.source] if self.source.ndim == 1 else list(self.source)
        for plane in planes:
            for start in range(0, len(self.index), chunk):
                fh.write(np.ascontiguousarray(plane[self.index[start : start + chunk]]))


#: Streams gathered per write of a :class:`Rows` (a few MB for the largest states).
ROWS_CHUNK = 1 << 15


def _write_npz(fh: Any, members: Mapping[str, np.ndarray | Rows]) -> None:
    """What ``np.savez`` writes (a stored zip of ``.npy`` members, no pickles), with
    :class:`Rows` gathered while written."""
    with zipfile.ZipFile(fh, mode="w", compression=zipfile.ZIP_STORED, allowZip64=True) as zf:
        for name, arr in members.items():
            with zf.open(name + ".npy", mode="w", force_zip64=True) as member:
                if isinstance(arr, Rows):
                    arr.write_npy(member, ROWS_CHUNK)
                else:
                    np.lib.format.write_array(member, np.asanyarray(arr), allow_pickle=False)


def write_snapshot(
    path: Path,
    bundle_sha256: str,
    shapes: Sequence[tuple[int, int]],
    ids: list[str],
    arrays: Mapping[str, np.ndarray | Rows],
    *,
    journal_seq: int | None = None,
    recent_ids: list[str] | None = None,
    recent: Mapping[str, np.ndarray] | None = None,
    created: float | None = None,
) -> int:
    """Write a snapshot atomically; returns the bytes written.

    Order: write ``<path>.tmp`` and fsync it; hard-link the current ``path`` to
    ``<path>.prev`` (via a temp link and a rename, so ``.prev`` is always whole); rename the
    temp file onto ``path``; fsync the directory. At every instant ``path`` is a complete
    snapshot (old or new). Where hard links are not supported the old file is renamed to
    ``.prev`` instead, and between the two renames only ``.prev`` exists, which is what a
    restore falls back to. OSError propagates; the temp file is removed.
    """
    path = Path(path)
    header: dict[str, Any] = {
        "format": _SNAPSHOT_FORMAT,
        "version": SNAPSHOT_VERSION,
        "bundle_sha256": bundle_sha256,
        "shapes": [list(s) for s in shapes],
        "count": len(ids),
        "created": time.time() if created is None else created,
    }
    if journal_seq is not None:
        header["journal_seq"] = int(journal_seq)
    out: dict[str, np.ndarray | Rows] = {"header": json_bytes(header), "ids": json_bytes(ids)}
    out.update(arrays)
    if recent is not None:
        out["recent_ids"] = json_bytes(recent_ids or [])
        out.update(recent)
    tmp = tmp_path(path)
    try:
        with tmp.open("wb") as fh:
            _write_npz(fh, out)
            fh.flush()
            os.fsync(fh.fileno())
            size = fh.tell()
        _keep_previous(path)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)
    return size


def _keep_previous(path: Path) -> None:
    prev = previous_path(path)
    link = prev.with_name(prev.name + ".tmp")
    link.unlink(missing_ok=True)
    try:
        os.link(path, link)
    except FileNotFoundError:
        return  # first snapshot: no previous generation
    except OSError:
        # No hard links here (some network/FUSE filesystems): rename, accepting a short window
        # in which only .prev exists.
        if path.exists():
            os.replace(path, prev)
        return
    os.replace(link, prev)


def fsync_dir(directory: Path) -> None:
    """Make renames durable; without it a power cut can bring the old directory entry back."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return  # not openable as a directory here (e.g. Windows); renames are still atomic
    try:
        # Some filesystems refuse fsync on a directory; the renames are done, nothing to undo.
        with contextlib.suppress(OSError):
            os.fsync(fd)
    finally:
        os.close(fd)


def load_snapshot(
    path: Path, bundle_sha256: str, shapes: Sequence[tuple[int, int]]
) -> SnapshotData:
    """Read and validate every array; all failures become :class:`SnapshotError`."""
    path = Path(path)

    def fail(reason: SnapshotReason, why: str) -> SnapshotError:
        return SnapshotError(f"snapshot {path}: {why}", reason=reason, path=path)

    try:
        loaded = np.load(path, allow_pickle=False)
        if not isinstance(loaded, np.lib.npyio.NpzFile):
            raise ValueError("a bare .npy array, not an .npz archive")
        with loaded as npz:
            raw = {name: npz[name] for name in npz.files}
    except FileNotFoundError:
        raise fail("missing", "no such file") from None
    except _LOAD_ERRORS as exc:
        raise fail("corrupt", f"cannot be read ({type(exc).__name__}: {exc})") from None

    try:
        header = json_from(raw["header"])
        if not isinstance(header, dict):
            raise ValueError("header is not a JSON object")
    except (KeyError, ValueError, UnicodeDecodeError) as exc:
        raise fail("corrupt", f"bad header ({exc})") from None
    version = header.get("version")
    if header.get("format") != _SNAPSHOT_FORMAT or version not in _READABLE_VERSIONS:
        raise fail(
            "corrupt",
            f"format {header.get('format')!r} version {version!r} is not "
            f"{_SNAPSHOT_FORMAT!r} version {' or '.join(map(str, _READABLE_VERSIONS))}",
        )
    if header.get("bundle_sha256") != bundle_sha256:
        got = str(header.get("bundle_sha256"))
        raise fail("foreign", f"written for bundle {got[:12]}…, not {bundle_sha256[:12]}…")
    if header.get("shapes") != [list(s) for s in shapes]:
        raise fail("foreign", f"state shapes {header.get('shapes')} != {[list(s) for s in shapes]}")
    journal_seq = header.get("journal_seq")
    if journal_seq is not None and (
        isinstance(journal_seq, bool) or not isinstance(journal_seq, int) or journal_seq < 0
    ):
        raise fail("corrupt", f"journal_seq {journal_seq!r} is not a non-negative integer")

    ids = _string_list(raw, "ids", fail)
    n = len(ids)
    if header.get("count") != n or len(set(ids)) != n:
        raise fail("corrupt", f"{n} stream ids for a count of {header.get('count')} (or repeated)")

    expected: dict[str, tuple[tuple[int, ...], type[np.generic]]] = {
        f"state{i}": ((la, n, hi), np.float32) for i, (la, hi) in enumerate(shapes)
    }
    for name in META:
        expected[name] = ((n,), np.int64 if name == "seen" else np.float64)
    for name in OPTIONAL_META:
        if name in raw:
            expected[name] = ((n,), np.float64)
    arrays = _typed(raw, expected, fail)
    for name in OPTIONAL_META:
        arrays.setdefault(name, np.full(n, np.nan))
        if np.isinf(arrays[name]).any() or (arrays[name] < 0).any():
            raise fail("corrupt", f"{name} holds infinities or negative values")
    for i in range(len(shapes)):
        if not np.isfinite(arrays[f"state{i}"]).all():
            raise fail("corrupt", f"state{i} holds non-finite values")
    # NaN is meaningful metadata ("none yet"); infinities never are.
    for name in ("last_ts", "last_value", "last_pred"):
        if np.isinf(arrays[name]).any():
            raise fail("corrupt", f"{name} holds infinities")
    if not np.isfinite(arrays["last_used"]).all():
        raise fail("corrupt", "last_used holds non-finite values")
    if (arrays["seen"] < 0).any():
        raise fail("corrupt", "seen holds negative counts")

    data = SnapshotData(ids, arrays, journal_seq)
    if "recent_ids" in raw:
        data.recent_ids = _string_list(raw, "recent_ids", fail)
        m = len(data.recent_ids)
        data.recent = _typed(
            raw,
            {
                "recent_ts": ((m,), np.float64),
                "recent_value": ((m,), np.float64),
                "recent_flags": ((m,), np.uint8),
            },
            fail,
        )
        if not (np.isfinite(data.recent["recent_ts"]).all()):
            raise fail("corrupt", "recent_ts holds non-finite values")
        if not (np.isfinite(data.recent["recent_value"]).all()):
            raise fail("corrupt", "recent_value holds non-finite values")
        for name in OPTIONAL_RECENT:
            if name in raw:
                data.recent.update(_typed(raw, {name: ((m,), np.float64)}, fail))
                if np.isinf(data.recent[name]).any():
                    raise fail("corrupt", f"{name} holds infinities")
            else:
                data.recent[name] = np.full(m, np.nan)
    return data


def _string_list(raw: dict[str, np.ndarray], name: str, fail: Any) -> list[str]:
    try:
        ids = json_from(raw[name])
    except (KeyError, ValueError, UnicodeDecodeError) as exc:
        raise fail("corrupt", f"bad {name} ({exc})") from None
    if not isinstance(ids, list) or not all(isinstance(s, str) for s in ids):
        raise fail("corrupt", f"{name} is not a list of strings")
    return ids


def _typed(
    raw: dict[str, np.ndarray],
    expected: dict[str, tuple[tuple[int, ...], type[np.generic]]],
    fail: Any,
) -> dict[str, np.ndarray]:
    out: dict[str, np.ndarray] = {}
    for name, (shape, dtype) in expected.items():
        arr = raw.get(name)
        if arr is None:
            raise fail("corrupt", f"array {name!r} is missing")
        if arr.shape != shape or arr.dtype != dtype:
            raise fail("corrupt", f"array {name!r} is {arr.dtype}{arr.shape}, not {shape}")
        out[name] = arr
    return out
