"""The transport's coalesced wake-ups never leave a packet waiting, on a real mosquitto.

A publish from another thread must reach the broker without the network thread's ``select``
timing out first (1 s in paho): with a lost wake-up each of these publishes would wait a whole
second for its PUBACK, so the bound below is 50 times what a lost wake-up per publish costs
and ~100 times what a healthy run takes.
"""

from __future__ import annotations

import time

from forecaster.harness import Broker
from forecaster.serve.config import MQTTConfig
from forecaster.serve.mqtt import Delivery, PublishResult, Transport
from forecaster.serve.wakeup import WakeWriter

MESSAGES = 20


def _wait(cond, limit: float = 60.0) -> bool:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + limit
    while not cond():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


def test_publishes_one_at_a_time_never_wait_for_the_select_timeout(broker: Broker) -> None:
    cfg = MQTTConfig(host="127.0.0.1", port=broker.port, client_id="wakeups")
    t = Transport(cfg, None, ["sensors/#"], lambda *_a: None, on_error=print)
    t.start()
    try:
        assert _wait(lambda: t.subscribed), "the transport never subscribed"
        assert isinstance(t._pub.client._sockpairW, WakeWriter)
        started = time.monotonic()
        for i in range(MESSAGES):
            # one message in flight at a time: the network thread is idle in select each time
            out = Delivery("wakeups", 1, f"forecast/s{i}")
            assert t.publish(out, b"{}", 1, False, []) is PublishResult.SENT
            assert t.flush(30.0), f"publish {i} was never acknowledged"
        elapsed = time.monotonic() - started
    finally:
        t.stop()
    assert elapsed < MESSAGES * 0.5, f"{MESSAGES} publishes took {elapsed:.1f} s"
