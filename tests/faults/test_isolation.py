"""Failure isolation, black-box: a reading whose prediction cannot be published (its topic at
MQTT's 65,535-byte limit, so ``forecast/<topic>`` would exceed it) costs only itself.

Measured before the fix (issue 11, item 3): bystanders in the same micro-batch lost their
predictions uncounted, an in-flight slot leaked per such message (five stalled a daemon with
``max_inflight = 5`` for good) and each one logged a traceback. Now: every bystander is
predicted, the hostile reading is counted under a reason, ``/healthz`` stays 200, nothing stays
in flight, and the log carries no traceback.
"""

from __future__ import annotations

import json
from collections.abc import Callable

from forecaster.harness import Broker, DaemonProcess, mqtt_client

from .conftest import Sink, log_text, wait_until

ROUNDS = 10
BYSTANDERS = 10


def test_a_topic_at_the_length_limit_costs_only_its_own_reading(
    broker: Broker, daemon: Callable[..., DaemonProcess]
) -> None:
    # max_inflight 5: with a slot leaked per hostile message the daemon would stall at round 5.
    d = daemon(mqtt={"max_inflight": 5}, max_delay_ms=20)
    d.start()
    sink = Sink(broker.port)
    client = mqtt_client(broker.port, "isolation-feed")
    client.loop_start()
    try:
        assert wait_until(client.is_connected, 30)
        # "sensors/<x...>/flow" of 65,535 bytes: a legal topic whose prediction topic is not.
        hostile = "sensors/" + "x" * (65535 - len("sensors//flow")) + "/flow"
        for r in range(ROUNDS):
            client.publish(hostile, json.dumps({"value": 1.0, "ts": r}), qos=1)
            for b in range(BYSTANDERS):
                payload = json.dumps({"value": 100.0 + b, "ts": r})
                client.publish(f"sensors/b{b}/flow", payload, qos=1).wait_for_publish(10)
        want = {(f"sensors/b{b}/flow", float(r)) for r in range(ROUNDS) for b in range(BYSTANDERS)}
        assert wait_until(lambda: sink.count() >= len(want), 60), (sink.count(), log_text(d))
        got = sink.answered()
        assert want <= got, f"bystanders without a prediction: {sorted(want - got)[:5]}"
        assert not any(len(s) > 1000 for s, _ in got)
        rejected = d.wait_metric("forecaster_readings_rejected_total", ROUNDS)
        assert rejected == ROUNDS, log_text(d)  # each hostile reading counted, once
        assert d.http("/healthz")[0] == 200 and d.ready()
        assert wait_until(lambda: d.metric("forecaster_publish_inflight") == 0, 10)
        assert "Traceback" not in log_text(d)
    finally:
        client.loop_stop()
        client.disconnect()
        sink.close()
