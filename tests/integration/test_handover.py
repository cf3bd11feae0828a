"""What one read of the socket brings is handed over together, on a real mosquitto.

A burst of QoS 1 readings published while the transport is subscribed reaches ``on_messages``
in order, each exactly once, in hand-overs of several messages (the intake decodes those in one
call) and never more than ``STAGED_MAX`` at once.
"""

from __future__ import annotations

import threading

import paho.mqtt.client as paho

from forecaster.harness import Broker, wait_until
from forecaster.serve.config import MQTTConfig
from forecaster.serve.mqtt import STAGED_MAX, Transport

READINGS = 2000


def test_a_burst_is_handed_over_in_order_in_groups_and_acknowledged(broker: Broker) -> None:
    cfg = MQTTConfig(host="127.0.0.1", port=broker.port, client_id="handover")
    got: list[tuple[str, bytes, int, int]] = []
    sizes: list[int] = []
    lock = threading.Lock()

    def take(messages: list[tuple[str, bytes, int, int]]) -> None:
        with lock:
            sizes.append(len(messages))
            got.extend(messages)
        for _topic, _payload, mid, qos in messages:
            t.ack(mid, qos)

    t = Transport(cfg, None, ["sensors/#"], lambda *_a: None, on_error=print, on_messages=take)
    t.start()
    pub = paho.Client(paho.CallbackAPIVersion.VERSION2, client_id="handover-producer")
    try:
        assert wait_until(lambda: t.subscribed, 60), "the transport never subscribed"
        pub.max_inflight_messages_set(1000)  # a real burst: many messages per read
        pub.connect("127.0.0.1", broker.port)
        pub.loop_start()
        infos = [pub.publish(f"sensors/s{i}/flow", b"%d" % i, qos=1) for i in range(READINGS)]
        assert wait_until(lambda: all(i.is_published() for i in infos), 120)
        assert wait_until(lambda: len(got) >= READINGS, 120), f"{len(got)} of {READINGS}"
    finally:
        pub.loop_stop()
        pub.disconnect()
        t.stop()
    assert [p for _t, p, _m, _q in got] == [b"%d" % i for i in range(READINGS)]
    assert max(sizes) > 1, "every message was handed over alone"
    assert max(sizes) <= STAGED_MAX
