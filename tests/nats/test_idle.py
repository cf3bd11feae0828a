"""``idle_ttl`` under the NATS transport: streams idle past it are forgotten in every partition
served, counted as under MQTT, and a stream that comes back starts afresh."""

from __future__ import annotations

from pathlib import Path

from forecaster.harness import DaemonProcess, wait_until
from forecaster.harness.nats import NatsServer
from forecaster.serve.nats.partitions import mappings_for

from .conftest import (
    FILTER,
    ROOT,
    nats_config,
    needs_nats,
    publish_stored,
    readings,
    start_owning,
)

pytestmark = needs_nats

PARTS = 2
STREAMS = 6


def test_idle_streams_are_forgotten_per_partition(
    tmp_path: Path, daemons: list[DaemonProcess]
) -> None:
    with NatsServer(tmp_path / "nats", mappings=mappings_for([FILTER], PARTS)) as srv:
        cfg = nats_config([srv.url], tmp_path / "state", PARTS)
        cfg.routes[0].idle_ttl = 1.0
        d = DaemonProcess(cfg, tmp_path, "fc", cwd=ROOT)
        daemons.append(d)
        start_owning(d, PARTS, 30)
        items = readings(streams=STREAMS, rows=3)
        publish_stored(srv, items, len(items), 30)
        evicted = d.wait_metric(
            "forecaster_streams_evicted_total", STREAMS, timeout=15, route="water", reason="idle"
        )
        assert evicted == STREAMS
        assert wait_until(lambda: d.metric("forecaster_streams", route="water") == 0, 10)
        # one comes back: tracked again, and forgotten again once idle
        again = readings(streams=1, rows=1, start=3)
        publish_stored(srv, again, len(items) + 1, 30)
        assert d.wait_metric("forecaster_streams_evicted_total", STREAMS + 1, timeout=15) > STREAMS
        assert d.stop() == 0
