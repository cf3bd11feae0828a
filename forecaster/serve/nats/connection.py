"""Reaching NATS: the connection (with reconnects) and the streams and buckets a fleet shares.

Every process creates what is missing on start (``ensure``): the readings stream, the prediction
stream when predictions go to JetStream, the lease bucket and the snapshot object store. A
stream that already exists with other settings is used as it is, so processes of one fleet never
fight over a configuration.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import time
from collections.abc import Awaitable, Callable
from typing import Any

from forecaster.errors import ForecasterError
from forecaster.logs import RateLimitedLog
from forecaster.serve.config import Config, NATSConfig, RouteConfig
from forecaster.serve.nats import leases

log = logging.getLogger("forecaster.serve.nats")

#: seconds to keep trying when no server is up yet
CONNECT_TIMEOUT = 60.0


def prediction_subjects(routes: list[RouteConfig]) -> list[str]:
    """Subjects the prediction stream captures: each template up to ``{topic}``, then ``>``."""
    out: list[str] = []
    for rc in routes:
        levels = rc.prediction_topic.split("/")
        head = []
        for level in levels:
            if "{topic}" in level:
                break
            head.append(level)
        subject = ".".join([*head, ">"]) if head else ">"
        if subject not in out:
            out.append(subject)
    return out


def default_member() -> str:
    """A lease holder's name: host and pid, so two processes of one host never share leases."""
    host = "".join(c if c.isalnum() or c in "-_" else "-" for c in socket.gethostname())
    return f"{host[:40]}-{os.getpid()}"


async def connect(
    n: NATSConfig,
    member: str,
    rl: RateLimitedLog,
    on_connected: Callable[[bool], None],
    stopping: Callable[[], bool],
    clock: Callable[[], float] = time.monotonic,
) -> Any:
    """A nats-py client that reconnects for ever; retried until ``CONNECT_TIMEOUT`` when no
    server is up yet (a fleet's processes may start before the servers)."""
    import nats

    nc: Any = None

    async def disconnected() -> None:
        on_connected(False)
        log.warning("disconnected from NATS")

    async def reconnected() -> None:
        on_connected(True)
        log.info("reconnected to NATS %s", nc.connected_url.netloc if nc else "?")

    async def error(exc: Exception) -> None:
        rl.warning("nats:error", "NATS: %s: %s", type(exc).__name__, exc)

    opts: dict[str, Any] = {
        "name": f"forecaster-{member}",
        "max_reconnect_attempts": -1,
        "reconnect_time_wait": 0.5,
        "disconnected_cb": disconnected,
        "reconnected_cb": reconnected,
        "error_cb": error,
        "allow_reconnect": True,
    }
    if n.credentials_file is not None:
        opts["user_credentials"] = str(n.credentials_file)
    deadline = clock() + CONNECT_TIMEOUT
    while True:
        try:
            nc = await nats.connect(n.servers, **opts)
            break
        except Exception as exc:  # no server up yet: keep trying until the deadline
            if clock() > deadline or stopping():
                raise ForecasterError(f"cannot connect to NATS {n.servers}: {exc}") from exc
            rl.warning("nats:connect", "NATS not reachable yet: %s", exc)
            await asyncio.sleep(0.5)
    on_connected(True)
    return nc


async def retry(
    what: str,
    fn: Callable[[], Awaitable[Any]],
    rl: RateLimitedLog,
    stopping: Callable[[], bool],
    clock: Callable[[], float] = time.monotonic,
    timeout: float = 60.0,
) -> Any:
    """``fn()`` until it succeeds, for at most ``timeout`` s (a cluster still electing)."""
    deadline = clock() + timeout
    while True:
        try:
            return await fn()
        except Exception as exc:
            if clock() > deadline or stopping():
                raise
            rl.warning(f"retry:{what}", "%s: %s: %s (retrying)", what, type(exc).__name__, exc)
            await asyncio.sleep(0.5)


async def ensure(js: Any, cfg: Config, member: str) -> tuple[leases.LeaseBook, Any]:
    """Create what is missing; (the lease book, the snapshot object store)."""
    from nats.js.api import (
        KeyValueConfig,
        ObjectStoreConfig,
        RetentionPolicy,
        StorageType,
        StreamConfig,
    )
    from nats.js.errors import BadRequestError

    n = cfg.nats
    wanted = [
        StreamConfig(
            name=n.stream,
            subjects=["part.>"],
            retention=RetentionPolicy.LIMITS,
            max_age=n.max_age,
            storage=StorageType.FILE,
            num_replicas=n.replicas,
            duplicate_window=120.0,
        )
    ]
    if n.publish == "jetstream":
        wanted.append(
            StreamConfig(
                name=n.prediction_stream,
                subjects=prediction_subjects(cfg.routes),
                retention=RetentionPolicy.LIMITS,
                max_age=n.prediction_max_age,
                storage=StorageType.FILE,
                num_replicas=n.replicas,
            )
        )
    for sc in wanted:
        try:
            await js.add_stream(sc)
        except BadRequestError:
            await js.stream_info(sc.name)  # exists with other settings: use it as is
    try:
        kv = await js.key_value(n.lease_bucket)
    except Exception:
        kv = await js.create_key_value(
            KeyValueConfig(bucket=n.lease_bucket, history=1, ttl=n.lease_ttl, replicas=n.replicas)
        )
    book = leases.LeaseBook(kv, member, n.partitions, n.lease_ttl)
    try:
        objects = await js.object_store(n.snapshot_bucket)
    except Exception:
        objects = await js.create_object_store(
            n.snapshot_bucket, ObjectStoreConfig(bucket=n.snapshot_bucket, replicas=n.replicas)
        )
    return book, objects
