"""A partition's states as one object: every route's snapshot file plus the stream sequence.

The envelope is ``FCSNAP1\\n`` + one JSON line ``{"seq": S, "routes": {name: size}}`` + the
routes' snapshot files (the existing ``.npz`` format, :mod:`forecaster.serve.snapshot`) back to
back. ``seq`` is the stream sequence of the last reading whose effect the states include: a
takeover restores the states and resumes the partition's stream right after it. Stored in a
JetStream object store (chunked, so size is not bounded by ``max_payload``), name ``p<k>``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

MAGIC = b"FCSNAP1\n"


class EnvelopeError(ValueError):
    """Bytes that are not a partition snapshot."""


@dataclass
class PartitionSnapshot:
    seq: int
    routes: dict[str, bytes] = field(default_factory=dict)


def pack(snap: PartitionSnapshot) -> bytes:
    head = {"seq": snap.seq, "routes": {name: len(b) for name, b in snap.routes.items()}}
    return b"".join([MAGIC, json.dumps(head).encode(), b"\n", *snap.routes.values()])


def unpack(data: bytes) -> PartitionSnapshot:
    if not data.startswith(MAGIC):
        raise EnvelopeError("not a forecaster partition snapshot")
    end = data.find(b"\n", len(MAGIC))
    if end < 0:
        raise EnvelopeError("truncated header")
    try:
        head = json.loads(data[len(MAGIC) : end])
        seq = int(head["seq"])
        sizes = {str(k): int(v) for k, v in head["routes"].items()}
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise EnvelopeError(f"bad header: {exc}") from None
    pos = end + 1
    routes = {}
    for name, size in sizes.items():
        if size < 0 or pos + size > len(data):
            raise EnvelopeError(f"route {name!r}: truncated")
        routes[name] = data[pos : pos + size]
        pos += size
    if pos != len(data):
        raise EnvelopeError("trailing bytes")
    return PartitionSnapshot(seq, routes)


def object_name(k: int) -> str:
    return f"p{k}"


async def save(store: Any, k: int, snap: PartitionSnapshot) -> int:
    """Put the envelope into the object store ``store``; the bytes written."""
    data = pack(snap)
    await store.put(object_name(k), data)
    return len(data)


async def load(store: Any, k: int) -> PartitionSnapshot | None:
    """The partition's snapshot, or None if there is none (a damaged one raises
    EnvelopeError: the caller starts from fresh states and the stream's beginning)."""
    from nats.js.errors import NotFoundError, ObjectNotFoundError

    try:
        result = await store.get(object_name(k))
    except (ObjectNotFoundError, NotFoundError):
        return None
    if result.data is None:
        return None
    return unpack(bytes(result.data))
