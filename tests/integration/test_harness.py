"""The harness against the real programs: a broker restart keeps its port and its sessions, a
daemon is started from the Config model and restarted with a changed one."""

from __future__ import annotations

import signal
from pathlib import Path

from forecaster.harness import Broker, Collector, mqtt_client, wait_until

from .conftest import MODEL, make_daemon


def test_broker_restart_keeps_port_and_queued_messages(tmp_path: Path) -> None:
    with Broker(tmp_path / "broker") as broker:
        port = broker.port
        sub = Collector(port, "t/#", client_id="harness-sub", persistent=True)
        sub.close()  # away; the broker keeps its session and queues QoS 1 messages for it
        pub = mqtt_client(port, "harness-pub")
        pub.loop_start()
        assert wait_until(pub.is_connected, 30)
        pub.publish("t/x", b"1", qos=1).wait_for_publish(30)
        pub.loop_stop()
        pub.disconnect()
        broker.restart(signal.SIGTERM)  # a clean stop saves the persistence file
        assert broker.port == port
        with Collector(port, "t/#", client_id="harness-sub", persistent=True) as back:
            assert back.wait_for(1, timeout=60) == [("t/x", b"1")]


def test_daemon_restart_applies_the_changed_config(tmp_path: Path) -> None:
    with Broker(tmp_path / "broker") as broker:
        d = make_daemon(tmp_path, broker.port, 0, MODEL, snapshot_interval=0)
        try:
            d.start()
            assert d.wait_metric("forecaster_ready", 1) == 1  # read from the same check as /readyz
            assert d.stop() == 0
            d.config.daemon.snapshot_interval = 0.25
            d.start()
            # the rewritten file is what the daemon runs with: snapshots now come by themselves
            # (with interval 0 the counter stays absent until the stop)
            assert d.wait_metric("forecaster_snapshots_total", 1, result="ok") >= 1
        finally:
            d.close()
