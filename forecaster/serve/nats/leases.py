"""Leases: which process owns which partition, kept in a NATS KV bucket with a TTL.

A partition ``k`` is owned by whoever holds the key ``p.<k>``. The bucket's ``max_age`` is the
lease TTL: a key not rewritten within it vanishes. A process claims with ``create`` (fails if
the key exists), renews with ``update(last=revision)`` every TTL/3 (fails if anyone else wrote
it) and **stops serving the partition when a renewal fails or when TTL·``FENCE`` has passed
since its last successful one** (fencing by its own clock, so a paused process never serves on a
lease the others already consider free). Every process also writes ``m.<member>`` every TTL/3;
the live members spread the partitions: each takes at most ``ceil(N / live)``.

The decisions are pure (:func:`target`, :func:`plan`, :class:`Lease`); :class:`LeaseBook` does
the KV calls (nats-py, imported by the caller).
"""

from __future__ import annotations

import asyncio
import math
from dataclasses import dataclass
from typing import Any

#: fraction of the TTL after the last successful renewal at which we stop serving on our own
FENCE = 0.75


def lease_key(k: int) -> str:
    return f"p.{k}"


def member_key(member: str) -> str:
    return f"m.{member}"


def target(partitions: int, live: int) -> int:
    """Most partitions one process should own when ``live`` processes share ``partitions``."""
    return math.ceil(partitions / max(1, live))


def plan(
    owned: set[int], free: list[int], partitions: int, live: int
) -> tuple[list[int], list[int]]:
    """(claim, release): free partitions to try to claim and owned ones to hand back.

    Claims fill up to the target lowest-number first; a process over the target (a new member
    joined) releases its highest-numbered extras, one per turn, so hand-overs are gradual.
    """
    want = target(partitions, live)
    if len(owned) > want:
        return [], sorted(owned)[-1:]
    room = want - len(owned)
    return sorted(k for k in free if k not in owned)[:room], []


@dataclass
class Lease:
    """One held lease: its KV revision and until when we may serve on it (monotonic s)."""

    k: int
    revision: int
    renewed_at: float
    ttl: float

    @property
    def valid_until(self) -> float:
        return self.renewed_at + self.ttl * FENCE

    def valid(self, now: float) -> bool:
        return now < self.valid_until

    def due(self, now: float) -> bool:
        """Time to renew (every TTL/3)."""
        return now - self.renewed_at >= self.ttl / 3


class LeaseBook:
    """The KV side of the leases (``kv`` is a nats-py KeyValue)."""

    def __init__(self, kv: Any, member: str, partitions: int, ttl: float) -> None:
        self.kv = kv
        self.member = member
        self.partitions = partitions
        self.ttl = ttl

    async def heartbeat(self) -> None:
        await self.kv.put(member_key(self.member), self.member.encode())

    async def leave(self) -> None:
        await self.kv.delete(member_key(self.member))

    async def live_members(self) -> int:
        from nats.js.errors import NoKeysError

        try:
            keys = await self.kv.keys()
        except NoKeysError:
            return 1
        # a set: a key rewritten while the listing runs can be listed twice
        return max(1, len({key for key in keys if key.startswith("m.")}))

    async def free(self) -> list[int]:
        """Partitions nobody holds now (no live key); the keys are read concurrently (one
        round trip, not N)."""
        from nats.js.errors import KeyNotFoundError

        async def is_free(k: int) -> bool:
            try:
                entry = await self.kv.get(lease_key(k))
            except KeyNotFoundError:
                return True
            return entry.value is None or entry.operation is not None  # delete/purge marker

        found = await asyncio.gather(*(is_free(k) for k in range(self.partitions)))
        return [k for k, free in enumerate(found) if free]

    async def claim(self, k: int, now: float) -> Lease | None:
        """Take partition ``k`` if nobody holds it; None if someone does (or the call fails)."""
        from nats.errors import Error as NatsError

        try:
            rev = await self.kv.create(lease_key(k), self.member.encode())
        except NatsError:
            return None
        return Lease(k, rev, now, self.ttl)

    async def renew(self, lease: Lease, now: float) -> bool:
        """Rewrite our key at its last revision; False if that failed (someone else has it, or
        the server did not answer): the caller then stops serving the partition."""
        from nats.errors import Error as NatsError

        try:
            lease.revision = await self.kv.update(
                lease_key(lease.k), self.member.encode(), last=lease.revision
            )
        except NatsError:
            return False
        lease.renewed_at = now
        return True

    async def release(self, lease: Lease) -> None:
        from nats.errors import Error as NatsError

        try:
            await self.kv.delete(lease_key(lease.k), last=lease.revision)
        except NatsError:
            pass  # it expires by itself within the TTL
