"""Predictions reach MQTT clients: a dashboard subscribed to ``forecast/#`` on nats-server's MQTT
listener gets every prediction, on the MQTT topic the mosquitto deployment would use, equal to
``forecaster evaluate``'s, whichever way the worker publishes (JetStream or core)."""

from __future__ import annotations

from pathlib import Path

import pytest

from forecaster.harness import Collector, DaemonProcess, predictions, wait_until
from forecaster.harness.nats import NatsServer
from forecaster.serve.nats.partitions import mappings_for

from .conftest import (
    FILTER,
    ROOT,
    check_exact,
    mqtt_publish,
    nats_config,
    needs_nats,
    readings,
    start_owning,
)

pytestmark = needs_nats

PARTS = 4


@pytest.mark.parametrize("publish", ["jetstream", "core"])
def test_an_mqtt_subscriber_sees_every_prediction(
    tmp_path: Path, reference: dict[float, float], daemons: list[DaemonProcess], publish: str
) -> None:
    with NatsServer(tmp_path / "nats", mappings=mappings_for([FILTER], PARTS)) as srv:
        cfg = nats_config([srv.url], tmp_path / "state", PARTS, nats={"publish": publish})
        d = DaemonProcess(cfg, tmp_path, "fc", cwd=ROOT)
        daemons.append(d)
        start_owning(d, PARTS, 60)
        reader = Collector(srv.mqtt_port, "forecast/#", v311=True)
        try:
            items = readings(streams=6, rows=100)
            mqtt_publish(srv.mqtt_port, items)
            assert wait_until(lambda: len(reader) >= len(items), 120), (
                f"{len(reader)} of {len(items)} predictions reached the MQTT reader\n"
                + d.log_text()[-3000:]
            )
            got = reader.snapshot()
        finally:
            reader.close()
        # the mosquitto deployment's topics: forecast/ + the reading's topic
        assert {t for t, _ in got} == {f"forecast/sensors/s{s}/flow" for s in range(6)}
        check_exact(predictions(got), reference, 100)
        assert d.stop() == 0
