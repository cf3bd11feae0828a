"""A broker that refuses the daemon's predictions (its ACL), black-box, MQTT 5.

mosquitto answers a PUBLISH outside the client's ACL with reason 0x87 "not authorized" (in the
PUBACK at QoS 1, in the PUBREC at QoS 2) and drops the message. Before, paho reported both as a
publish like any other: the prediction was counted as published and nothing said it was lost.
Now it is counted by route and reason, logged (rate-limited), its reading acknowledged once (not
redelivered forever), and the routes the broker accepts lose nothing.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from forecaster.harness import Broker, DaemonProcess, mqtt_client

from .conftest import MODEL, Sink, log_text, wait_until

ROUNDS = 12
STREAMS = 4

#: Anonymous clients (the feed, the daemon, the sink) may do anything but write ``restricted/``.
ACL = """\
topic readwrite sensors/#
topic readwrite plant/#
topic readwrite forecast/#
topic readwrite forecaster/#
topic read restricted/#
"""


def routes(qos: int) -> list[dict[str, object]]:
    """Two routes publishing at ``qos``; the broker refuses every prediction of the second."""
    return [
        {"name": "water", "subscribe": ["sensors/+/flow"], "bundle": str(MODEL), "qos": qos},
        {
            "name": "plant",
            "subscribe": ["plant/+/flow"],
            "bundle": str(MODEL),
            "prediction_topic": "restricted/{topic}",
            "qos": qos,
        },
    ]


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[Broker]:
    """The suite's mosquitto (persistence on), with the ACL above."""
    acl = tmp_path / "acl"
    acl.write_text(ACL)
    with Broker(tmp_path / "broker", extra=[f"acl_file {acl}"]) as b:
        yield b


def _counted_for_plant(d: DaemonProcess) -> float:
    """Readings of the refused route the daemon saw at all: accepted or rejected."""
    accepted = d.metric("forecaster_readings_total", default=0.0, route="plant")
    return accepted + d.metric("forecaster_readings_rejected_total", default=0.0, route="plant")


@pytest.mark.parametrize("qos", [1, 2])
def test_refused_predictions_are_counted_and_cost_the_other_routes_nothing(
    broker: Broker, daemon: Callable[..., DaemonProcess], qos: int
) -> None:
    d = daemon(routes=routes(qos), max_delay_ms=20)
    d.start()
    sink = Sink(broker.port)
    client = mqtt_client(broker.port, "refused-feed")
    client.loop_start()
    try:
        assert wait_until(client.is_connected, 30)
        for r in range(ROUNDS):
            for s in range(STREAMS):
                payload = json.dumps({"value": 10.0 + s + 0.1 * r, "ts": r})
                client.publish(f"plant/p{s}/flow", payload, qos=1).wait_for_publish(10)
                client.publish(f"sensors/w{s}/flow", payload, qos=1).wait_for_publish(10)
        want = {(f"sensors/w{s}/flow", float(r)) for r in range(ROUNDS) for s in range(STREAMS)}
        assert wait_until(lambda: sink.count() >= len(want), 60), (sink.count(), log_text(d))
        assert sink.answered() == want  # all accepted ones arrived; no refused one leaked out
        n = ROUNDS * STREAMS
        labels = {"route": "plant", "reason": "not_authorized"}
        refused = d.wait_metric("forecaster_predictions_refused_total", n, **labels)
        assert refused == n, log_text(d)  # each refused prediction counted, once
        assert d.metric("forecaster_predictions_refused_total", default=0.0, route="water") == 0
        # published, then refused: in both counters, so predictions + rejected = readings holds
        assert d.metric("forecaster_predictions_total", route="plant") == n
        assert wait_until(lambda: d.metric("forecaster_publish_inflight") == 0, 10)
        assert d.http("/healthz")[0] == 200 and d.ready()
        said = [line for line in log_text(d).splitlines() if "the broker refused" in line]
        assert said and "restricted/plant/" in said[0] and "not_authorized" in said[0]
        assert len(said) < n  # rate-limited, not one line per refusal
        assert "Traceback" not in log_text(d)
        assert d.stop() == 0

        # The refused predictions' readings were acknowledged: a restart on the same session
        # gets none of them again. The broker resends unacknowledged messages before new ones,
        # so once a fresh reading has been answered, any redelivery would have been counted.
        d2 = daemon(routes=routes(qos), max_delay_ms=20)
        d2.start()
        client.publish("sensors/w0/flow", json.dumps({"value": 1.0, "ts": ROUNDS}), qos=1)
        assert wait_until(lambda: sink.count() >= len(want) + 1, 60), log_text(d2)
        d2.wait_metric("forecaster_predictions_total", 1, route="water")
        assert _counted_for_plant(d2) == 0, log_text(d2)
    finally:
        client.loop_stop()
        client.disconnect()
        sink.close()
