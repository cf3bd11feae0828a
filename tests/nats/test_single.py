"""One nats-server (JetStream + MQTT + the partition mapping), one forecaster: MQTT readings in,
predictions out equal to ``forecaster evaluate``'s; bad input costs nothing; a clean restart
resumes from the snapshot exactly."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

from forecaster.harness import DaemonProcess, wait_until
from forecaster.harness.nats import NatsServer
from forecaster.serve.nats.partitions import mappings_for, partition_of, split_subject

from .conftest import (
    FILTER,
    ROOT,
    by_stream,
    check_exact,
    mqtt_publish,
    nats_config,
    needs_nats,
    publish_stored,
    read_stream,
    readings,
    start_owning,
    stream_count,
)

pytestmark = needs_nats

PARTS = 4


def test_mqtt_in_predictions_out_equal_evaluate(
    tmp_path: Path, reference: dict[float, float], daemons: list[DaemonProcess]
) -> None:
    with NatsServer(tmp_path / "nats", mappings=mappings_for([FILTER], PARTS)) as srv:
        cfg = nats_config([srv.url], tmp_path / "state", PARTS)
        d = DaemonProcess(cfg, tmp_path, "fc", cwd=ROOT)
        daemons.append(d)
        start_owning(d, PARTS, 60)
        items = readings(streams=12, rows=150)
        # hostile input on a served topic: counted, acknowledged, costs the others nothing
        bad = [("sensors/bad/flow", b"{not json"), ("sensors/bad/flow", b'{"value": "x"}')]
        mqtt_publish(srv.mqtt_port, bad + items)
        n = len(items)
        assert wait_until(lambda: stream_count(srv.url) >= n, 120), d.log_text()[-3000:]
        preds = by_stream(read_stream(srv.url))
        assert len(preds) == 12
        check_exact(preds, reference, 150)
        assert d.wait_metric("forecaster_readings_rejected_total", 2, route="water") == 2
        assert d.metric("forecaster_ready") == 1  # the gauge follows /readyz here too
        # the server put every stream in the partition partition_of computes
        for subject, _ in read_stream(srv.url, "FORECASTER_READINGS"):
            k, topic = split_subject(subject)
            assert k == partition_of(topic, FILTER, PARTS), subject
        assert d.stop() == 0
        # a clean restart resumes from the snapshots: new readings continue the states exactly
        start_owning(d, PARTS, 60)
        more = readings(streams=12, rows=50, start=150)
        publish_stored(srv, more, n + len(more), 120)
        preds = by_stream(read_stream(srv.url))
        check_exact(preds, reference, 200)
        # nothing was replayed with predictions twice: a clean hand-over acks everything
        assert d.metric("forecaster_nats_replayed_readings_total", default=0) == 0
        assert d.stop() == 0
        payload = json.loads(read_stream(srv.url)[0][1])
        assert {"stream", "ts", "value", "warm"} <= set(payload)


async def _observe(url: str, subjects: list[str]) -> None:
    """A stream of our own on the prediction subjects: in ``publish = "core"`` mode the worker
    creates none, and a stream is the test's way to see every core publish that reached the
    server."""
    import nats
    from nats.js.api import StreamConfig

    nc = await nats.connect(url)
    try:
        await nc.jetstream().add_stream(StreamConfig(name="OBSERVED", subjects=subjects))
    finally:
        await nc.close()


def test_core_publish_answers_everything_exactly_and_acknowledges_it(
    tmp_path: Path, reference: dict[float, float], daemons: list[DaemonProcess]
) -> None:
    with NatsServer(tmp_path / "nats", mappings=mappings_for([FILTER], PARTS)) as srv:
        asyncio.run(_observe(srv.url, ["forecast.>"]))
        cfg = nats_config([srv.url], tmp_path / "state", PARTS, nats={"publish": "core"})
        d = DaemonProcess(cfg, tmp_path, "fc", cwd=ROOT)
        daemons.append(d)
        start_owning(d, PARTS, 60)
        items = readings(streams=12, rows=150)
        mqtt_publish(srv.mqtt_port, items)
        n = len(items)
        assert wait_until(lambda: stream_count(srv.url, "OBSERVED") >= n, 120), d.log_text()[-3000:]
        assert stream_count(srv.url, "FORECASTER_PREDICTIONS") == 0  # core: no stream made
        check_exact(by_stream(read_stream(srv.url, "OBSERVED")), reference, 150)
        assert d.stop() == 0
        # every reading was acknowledged: after a restart only the new ones are answered
        start_owning(d, PARTS, 60)
        more = readings(streams=12, rows=50, start=150)
        mqtt_publish(srv.mqtt_port, more)
        assert wait_until(lambda: stream_count(srv.url, "OBSERVED") >= n + len(more), 120)
        assert d.stop() == 0
        preds = read_stream(srv.url, "OBSERVED")
        assert len(preds) == n + len(more)  # no reading answered twice
        check_exact(by_stream(preds), reference, 200)
