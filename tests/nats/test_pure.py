"""The NATS transport's pure parts, with no server and no nats-py: the partition hash and
mapping, the lease decisions, the resume rule, the pull bookkeeping, the snapshot envelope, the
configuration; and that MQTT serving imports and configures without nats-py."""

from __future__ import annotations

import asyncio
import logging
import subprocess
import sys
import time
from types import SimpleNamespace
from typing import Any

import pytest
from prometheus_client import CollectorRegistry

from forecaster.errors import ConfigError
from forecaster.logs import RateLimitedLog
from forecaster.serve.config import Config, config_summary, load_config
from forecaster.serve.nats import leases, partitions, snapshots, source
from forecaster.serve.nats.partitions import (
    check_partitionable,
    fnv1a32,
    mapping_for,
    partition_of,
    split_subject,
)

ROUTE = {"name": "water", "subscribe": ["sensors/+/flow"], "bundle": "/nonexistent"}


# ---------------------------------------------------------------- partitions


def test_fnv1a32_known_vectors() -> None:
    # the FNV reference test vectors (http://www.isthe.com/chongo/src/fnv/test_fnv.c)
    assert fnv1a32(b"") == 0x811C9DC5
    assert fnv1a32(b"a") == 0xE40C292C
    assert fnv1a32(b"foobar") == 0xBF9CF968


def test_mapping_text_and_partition_of() -> None:
    assert mapping_for("sensors/+/flow", 4) == (
        "sensors.*.flow",
        "part.{{partition(4,1)}}.sensors.{{wildcard(1)}}.flow",
    )
    src, dst = mapping_for("site/+/+/v", 8)
    assert (src, dst) == (
        "site.*.*.v",
        "part.{{partition(8,1,2)}}.site.{{wildcard(1)}}.{{wildcard(2)}}.v",
    )
    # the server hashes the wildcard tokens concatenated
    assert partition_of("site/a/b/v", "site/+/+/v", 8) == fnv1a32(b"ab") % 8
    # NATS-NOTES: with N = 3, s0..s999 split 317/342/341
    counts = [0, 0, 0]
    for i in range(1000):
        counts[partition_of(f"sensors/s{i}/flow", "sensors/+/flow", 3)] += 1
    assert counts == [317, 342, 341]
    assert split_subject("part.3.sensors.s1.flow") == (3, "sensors/s1/flow")
    with pytest.raises(ValueError):
        split_subject("sensors.s1.flow")
    conf = partitions.mappings_conf(partitions.mappings_for(["sensors/+/flow"], 2))
    assert '"sensors.*.flow": "part.{{partition(2,1)}}' in conf


@pytest.mark.parametrize("bad", ["sensors/#", "sensors/all", "$share/g/sensors/+", "a.b/+"])
def test_unpartitionable_filters_are_refused(bad: str) -> None:
    with pytest.raises(ValueError):
        check_partitionable(bad)


# ---------------------------------------------------------------- leases


def test_target_and_plan_spread_evenly() -> None:
    assert leases.target(12, 1) == 12
    assert leases.target(12, 5) == 3
    assert leases.target(6, 0) == 6  # no member seen yet counts as one
    # alone: claim the lowest free ones up to the target
    assert leases.plan(set(), [0, 1, 2, 3], 4, 1) == ([0, 1, 2, 3], [])
    # a second member appeared: hand back one extra per turn, the highest first
    assert leases.plan({0, 1, 2, 3}, [], 4, 2) == ([], [3])
    assert leases.plan({0, 1}, [2, 3], 4, 2) == ([], [])
    # a member died: its partitions are free, the survivor may take them all
    assert leases.plan({0, 1}, [2, 3], 4, 1) == ([2, 3], [])


def test_lease_fences_itself_before_it_expires() -> None:
    lease = leases.Lease(k=0, revision=7, renewed_at=100.0, ttl=4.0)
    assert lease.valid(102.9)
    assert not lease.valid(103.0)  # 0.75 of the TTL: before anyone else may claim it
    assert not lease.due(101.0)
    assert lease.due(101.34)


# ---------------------------------------------------------------- source


@pytest.mark.parametrize(
    ("snap", "floor", "want"),
    [
        (None, None, (1, 0)),  # nothing yet: from the start, all published
        (500, 500, (501, 500)),  # clean hand-over
        (400, 500, (401, 500)),  # snapshot older than the acks: 401..500 replayed quietly
        (500, 400, (401, 400)),  # acks older than the snapshot: 401..500 answered again
        (None, 300, (1, 300)),  # no snapshot: replay from the start, quiet to the floor
    ],
)
def test_resume_point(snap: int | None, floor: int | None, want: tuple[int, int]) -> None:
    assert source.resume_point(snap, floor) == want


def test_pulls_keep_two_batches_outstanding_and_forget_expired_ones() -> None:
    p = source.Pulls(batch=100)
    assert p.want(0.0) == 100
    p.sent(100, 0.0)
    assert p.want(0.1) == 100  # a second request before the first runs dry
    p.sent(100, 0.1)
    assert p.want(0.2) == 0
    for _ in range(150):
        p.received()
    assert p.want(0.3) == 100
    p.ended(pending=50)  # the server ended a request with 50 unsent
    assert p.owed == 0
    p.sent(100, 1.0)
    assert p.want(1.0 + source.PULL_EXPIRES + 2) == 100  # presumed expired


def test_delivery_facts_from_the_reply_subject() -> None:
    # v1: $JS.ACK.<stream>.<consumer>.<delivered>.<stream seq>.<consumer seq>.<ns>.<pending>
    v1 = "$JS.ACK.READINGS.fc-p3-7.1.4521.17.1764633600123456789.42"
    assert source.delivery(v1) == (4521, 1764633600123456789, 42)
    # v2 adds the domain and the account hash in front, and a random token at the end
    v2 = "$JS.ACK.hub.ACCHASH.READINGS.fc-p3-7.2.4521.17.1764633600123456789.0.xyz"
    assert source.delivery(v2) == (4521, 1764633600123456789, 0)
    for bad in ("", "_INBOX.abc.1", "$JS.ACK.READINGS.c.1.2", "$JS.API.X.A.1.2.3.4.5"):
        with pytest.raises(ValueError):
            source.delivery(bad)


def test_pulls_count_a_batch_received_at_once() -> None:
    p = source.Pulls(batch=100)
    p.sent(100, 0.0)
    p.sent(100, 0.0)
    p.received(150)
    assert p.owed == 50 and p.want(0.1) == 100
    p.received(500)
    assert p.owed == 0


@pytest.mark.parametrize(
    ("topic", "subject"),
    [
        ("forecast/sensors/s1/flow", "forecast.sensors.s1.flow"),
        ("sensors/+/flow", "sensors.*.flow"),
        ("sensors/#", "sensors.>"),
        ("a+b/c#d", "a+b.c#d"),  # not wildcards: levels kept as they are
    ],
)
def test_topic_to_subject(topic: str, subject: str) -> None:
    assert partitions.topic_to_subject(topic) == subject


# ---------------------------------------------------------------- snapshots


def test_envelope_round_trip_and_damage() -> None:
    snap = snapshots.PartitionSnapshot(42, {"water": b"npz-bytes", "other": b""})
    back = snapshots.unpack(snapshots.pack(snap))
    assert back == snap
    data = snapshots.pack(snap)
    for bad in (b"", data[:-1], data + b"x", b"FCSNAP1\n{bad json\n", b"other"):
        with pytest.raises(snapshots.EnvelopeError):
            snapshots.unpack(bad)


# ---------------------------------------------------------------- config


def test_defaults_keep_mqtt_and_nats_errors_name_the_field() -> None:
    cfg = Config.model_validate({"routes": [ROUTE]})
    assert cfg.transport.kind == "mqtt"
    assert cfg.nats.partitions == 12 and cfg.nats.publish == "jetstream"
    assert "nats" not in config_summary(cfg)
    with pytest.raises(ConfigError) as err:
        load_config(
            None,
            env={
                "FORECASTER_ROUTES": '[{"name": "w", "subscribe": ["s/#"], "bundle": "/x"}]',
                "FORECASTER_TRANSPORT__KIND": "nats",
                "FORECASTER_NATS__PARTITIONS": "0",
                "FORECASTER_NATS__PUBLISH": "sometimes",
            },
        )
    text = str(err.value)
    assert "nats.partitions" in text and "nats.publish" in text
    with pytest.raises(ConfigError) as err:
        load_config(
            None,
            env={
                "FORECASTER_ROUTES": '[{"name": "w", "subscribe": ["s/#"], "bundle": "/x"}]',
                "FORECASTER_TRANSPORT__KIND": "nats",
            },
        )
    assert "routes.0.subscribe" in str(err.value) and "'#'" in str(err.value)


PROBE = """
import sys
sys.modules["nats"] = None  # as if nats-py were not installed
ROUTE = ROUTE_TEXT
import forecaster.cli, forecaster.serve.lifecycle, forecaster.serve.nats.worker
from forecaster.serve.config import Config
Config.model_validate({"routes": [ROUTE]})
from forecaster.serve.nats.worker import run
from forecaster.errors import ForecasterError
cfg = Config.model_validate({"transport": {"kind": "nats"}, "routes": [ROUTE]})
try:
    run(cfg)
except ForecasterError as exc:
    print("refused:", exc)
""".replace("ROUTE_TEXT", repr(ROUTE))


def test_serving_imports_and_mqtt_config_work_without_nats_py() -> None:
    out = subprocess.run(
        [sys.executable, "-c", PROBE], capture_output=True, text=True, check=True, timeout=120
    )
    assert 'pip install "forecaster[nats]"' in out.stdout, out.stdout + out.stderr


# ---------------------------------------------------------------- predictions out


class _FakeNats:
    """Answers every publish with a PubAck, refusing the first attempt at payload ``b"b"``."""

    def __init__(self) -> None:
        self.sent: list[tuple[str, bytes, str]] = []
        self.cb: Any = None

    def new_inbox(self) -> str:
        return "_INBOX.t"

    async def subscribe(self, subject: str, cb: Any) -> None:
        self.cb = cb

    async def publish(self, subject: str, payload: bytes, reply: str = "") -> None:
        self.sent.append((subject, payload, reply))
        first_b = payload == b"b" and sum(1 for s in self.sent if s[1] == b"b") == 1
        data = b'{"error":{"code":503}}' if first_b else b'{"stream":"P","seq":1}'
        asyncio.get_running_loop().call_soon(
            lambda: asyncio.ensure_future(self.cb(SimpleNamespace(subject=reply, data=data)))
        )


def test_jetstream_out_confirms_once_stored_and_republishes_what_was_refused() -> None:
    from forecaster.serve.metrics import Metrics
    from forecaster.serve.nats.publish import JetStreamOut

    async def scenario() -> tuple[bool, list[bytes], int]:
        nc = _FakeNats()
        out = JetStreamOut(nc, Metrics(CollectorRegistry()), RateLimitedLog(logging.getLogger()))
        await out.start()
        part = SimpleNamespace(lost=False, lease=leases.Lease(0, 1, time.monotonic(), 60.0))
        ok = await out.confirm(part, [("p.a", b"a"), ("p.b", b"b"), ("p.c", b"c")])  # type: ignore[arg-type]
        return ok, [s[1] for s in nc.sent], len(out.waiting)

    ok, sent, waiting = asyncio.run(scenario())
    assert ok
    assert sent == [b"a", b"b", b"c", b"b"]  # only the refused one again
    assert waiting == 0  # nothing left behind
