"""A 3-node nats-server cluster on loopback (streams with 3 replicas), 2 forecaster processes,
MQTT publishers: kill -9 of a forecaster → its partitions move within 10 s and every reading
gets its prediction, equal to evaluate's; kill -9 of the readings stream's leader → 0 lost."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from forecaster.harness import DaemonProcess, wait_until
from forecaster.harness.nats import NatsCluster
from forecaster.serve.nats.partitions import mappings_for

from .conftest import (
    FILTER,
    ROOT,
    by_stream,
    check_exact,
    mqtt_publish,
    nats_config,
    needs_nats,
    read_stream,
    readings,
    stream_count,
)

pytestmark = needs_nats

PARTS = 6
STREAMS = 12


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[NatsCluster]:
    with NatsCluster(tmp_path / "cluster", size=3, mappings=mappings_for([FILTER], PARTS)) as c:
        yield c


def owned(d: DaemonProcess) -> float:
    try:
        return d.metric("forecaster_nats_partitions_owned")
    except OSError:
        return -1


def start_pair(
    tmp_path: Path, cluster: NatsCluster, daemons: list[DaemonProcess]
) -> list[tuple[str, bytes]]:
    """Two forecasters sharing the partitions evenly, with the first 100 rows of every stream
    published and predicted; returns those readings."""
    for i in range(2):
        cfg = nats_config(
            cluster.urls,
            tmp_path / f"state-{i}",
            PARTS,
            nats={"replicas": 3, "member": f"fc{i}"},
            daemon={"snapshot_interval": 5.0},
        )
        d = DaemonProcess(cfg, tmp_path, f"fc{i}", cwd=ROOT, ready_timeout=120)
        daemons.append(d)
        d.start()
    # both serve, the partitions split evenly
    assert wait_until(lambda: [owned(d) for d in daemons] == [PARTS / 2] * 2, 90), [
        owned(d) for d in daemons
    ]
    first = readings(STREAMS, 100)
    mqtt_publish(cluster.nodes[0].mqtt_port, first)
    assert all_predicted(cluster.urls, len(first), 120)
    return first


def distinct(url: str) -> int:
    return sum(len({p["ts"] for p in ps}) for ps in by_stream(read_stream(url)).values())


def all_predicted(urls: list[str], n: int, timeout: float) -> bool:
    """Every one of ``n`` readings has a prediction in the stream (duplicates aside)."""

    def done() -> bool:
        for url in urls:  # the first node that answers (one may be down)
            try:
                return stream_count(url) >= n and distinct(url) >= n
            except Exception as exc:
                print(f"{url}: {type(exc).__name__}: {exc}")
        return False

    return wait_until(done, timeout, step=1.0)


def test_kill_a_forecaster_partitions_move_nothing_lost(
    tmp_path: Path,
    cluster: NatsCluster,
    daemons: list[DaemonProcess],
    reference: dict[float, float],
) -> None:
    first = start_pair(tmp_path, cluster, daemons)
    victim, survivor = daemons
    victim.kill()
    killed = time.monotonic()
    # readings keep coming while the partitions are orphaned; the survivor must answer them
    second = readings(STREAMS, 100, start=100)
    mqtt_publish(cluster.nodes[1].mqtt_port, second)
    assert wait_until(lambda: owned(survivor) == PARTS, 60)
    took = time.monotonic() - killed
    print(f"takeover of {PARTS // 2} partitions after kill -9: {took:.1f} s")
    assert took <= 10.0, f"takeover took {took:.1f} s"
    assert all_predicted(cluster.urls, len(first) + len(second), 120), survivor.log_text()[-3000:]
    preds = by_stream(read_stream(cluster.urls[1]))
    assert len(preds) == STREAMS
    check_exact(preds, reference, 200)
    assert survivor.metric("forecaster_nats_takeovers_total") >= PARTS
    replayed = survivor.metric("forecaster_nats_replayed_readings_total", default=0)
    print(f"replayed without publishing after the takeover: {replayed:.0f} readings")
    assert survivor.stop() == 0


async def _leader(url: str, stream: str) -> str:
    import nats

    nc = await nats.connect(url)
    try:
        info = await nc.jetstream().stream_info(stream)
        assert info.cluster is not None
        return str(info.cluster.leader)
    finally:
        await nc.close()


def leader_of(url: str) -> str:
    """The readings stream's leader now, "" while there is none (an election)."""
    try:
        return asyncio.run(_leader(url, "FORECASTER_READINGS"))
    except Exception:
        return ""


def test_kill_a_nats_server_nothing_lost(
    tmp_path: Path,
    cluster: NatsCluster,
    daemons: list[DaemonProcess],
    reference: dict[float, float],
) -> None:
    first = start_pair(tmp_path, cluster, daemons)
    leader = leader_of(cluster.urls[0])
    assert leader
    victim = next(n for n in cluster.nodes if n.name == leader)
    others = [n for n in cluster.nodes if n is not victim]
    victim.kill()
    t0 = time.monotonic()
    print(f"killed nats-server {leader}, the readings stream's leader")
    # readings published once the cluster has a new leader; the forecasters reconnect, may
    # lose and retake leases meanwhile, and must answer every reading exactly once at least
    assert wait_until(lambda: leader_of(others[0].url) not in ("", leader), 90)
    print(f"new leader {leader_of(others[0].url)} after {time.monotonic() - t0:.1f} s")
    second = readings(STREAMS, 100, start=100)
    mqtt_publish(others[0].mqtt_port, second)
    print(f"published after {time.monotonic() - t0:.1f} s")
    urls = [n.url for n in others]
    assert all_predicted(urls, len(first) + len(second), 180), "\n".join(
        d.log_text()[-2000:] for d in daemons
    )
    print(f"all predicted after {time.monotonic() - t0:.1f} s")
    preds = by_stream(read_stream(urls[0]))
    assert len(preds) == STREAMS
    check_exact(preds, reference, 200)
    for d in daemons:
        assert d.running, d.log_text()[-2000:]
