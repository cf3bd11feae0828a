"""A broker that hangs (SIGSTOP: the TCP connections stay open, nothing is acknowledged).

The daemon's publish window fills and the worker waits. Waiting for the broker is not being hung:
``/healthz`` stays 200 and says so (systemd's watchdog is fed from the same place, see
tests/unit/test_lifecycle.py), ``forecaster_publish_inflight`` shows the full window. A SIGTERM
then stops the daemon within systemd's ``TimeoutStopSec`` (15 s) with status 0, without a
snapshot ahead of what the broker confirmed, and its log says what is true: the readings of the
unconfirmed predictions are redelivered. Once the broker resumes, a restarted daemon predicts
every reading.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable

from forecaster.harness import Broker, DaemonProcess

from .conftest import Feed, Sink, log_text, verify, wait_until, water_items

STOP_LIMIT_S = 15.0  # systemd/forecaster.service: TimeoutStopSec=15
WINDOW = 5


def test_a_hung_broker_is_waited_for_not_fatal_and_loses_nothing(
    broker: Broker, daemon: Callable[..., DaemonProcess]
) -> None:
    # Batches of one keep the daemon behind a burst, so it holds a backlog when the broker hangs
    # and its window certainly fills.
    d = daemon(mqtt={"max_inflight": WINDOW}, max_batch=1, max_delay_ms=0)
    d.start()
    sink = Sink(broker.port)
    items = water_items(streams=4)
    feed = Feed(broker.port, items, rate=0)
    feed.start()
    frozen = False
    try:

        def waiting() -> bool:
            status, body = d.http("/healthz")
            return status == 200 and body.startswith("ok: waiting for the broker")

        # Freeze the broker while the daemon holds readings it has not answered: then its window
        # fills. On a starved machine the daemon may be idle at that moment (the broker was the
        # slow one), so thaw and try again a little later.
        def predicted() -> float:
            return d.metric("forecaster_predictions_total", 0.0)

        def more_than(target: float) -> Callable[[], bool]:
            return lambda: predicted() > target

        attempts = 0
        while attempts < 10:
            attempts += 1
            target = predicted() + 50
            assert wait_until(more_than(target), 60), log_text(d)
            os.kill(broker.pid, signal.SIGSTOP)
            frozen = True
            if wait_until(waiting, 5):
                break
            os.kill(broker.pid, signal.SIGCONT)
            frozen = False
        assert frozen, (attempts, d.http("/healthz"), d.metric("forecaster_publish_inflight"))
        assert wait_until(lambda: d.metric("forecaster_publish_inflight") == WINDOW, 10)
        t0 = time.monotonic()
        assert d.stop(signal.SIGTERM) == 0
        took = time.monotonic() - t0
        assert took < STOP_LIMIT_S, f"stop took {took:.1f} s"
        text = log_text(d)
        assert "unconfirmed by the broker" in text and "will be redelivered" in text, text
        assert "Traceback" not in text
    finally:
        if frozen:
            os.kill(broker.pid, signal.SIGCONT)
    daemon().start()  # the same client id and state directory: a restart
    assert feed.wait_acked(120), f"feed: {len(feed.acked)} of {feed.sent} acknowledged"
    assert wait_until(lambda: verify(items, sink.snapshot()).predicted == len(items), 120), (
        f"{len(items) - verify(items, sink.snapshot()).predicted} readings without a prediction"
    )
    feed.close()
    sink.close()
