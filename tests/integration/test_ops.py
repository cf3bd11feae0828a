"""Operability of a live daemon: the scraped exposition, online accuracy, health and readiness."""

from __future__ import annotations

import shutil
import subprocess

import pytest

from forecaster.harness import wait_until
from forecaster.model.bundle import read_manifest

from .conftest import Collector
from .test_serve import publish


def test_live_metrics_pass_promtool_and_track_online_accuracy(broker, daemon_factory) -> None:
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.fail("promtool is missing: apt-get install prometheus (make test does it)")
    d = daemon_factory()
    d.start()
    assert d.http("/healthz")[0] == 200
    assert d.http("/readyz")[0] == 200
    sub = Collector(broker.port)
    n = publish(broker.port, stop="400")
    assert len(sub.wait_for(n)) == n
    status, text = d.http("/metrics")
    assert status == 200
    check = subprocess.run(
        [promtool, "check", "metrics"], input=text, capture_output=True, text=True, timeout=30
    )
    assert check.returncode == 0, check.stdout + check.stderr
    # online accuracy: every warm prediction met its actual (the bundle's measured warm-up)
    warmup = read_manifest(d.config.routes[0].bundle).warmup
    judged = d.metric("forecaster_prediction_abs_error_count", route="water")
    assert judged == pytest.approx(400 - warmup, abs=1)
    assert d.metric("forecaster_naive_abs_error_count", route="water") == judged
    assert d.metric("forecaster_prediction_squared_error_total", route="water") > 0
    assert d.metric("forecaster_streams", route="water") == 1
    assert d.metric("forecaster_mqtt_connected") == 1
    assert d.metric("forecaster_ready") == 1
    assert d.metric("forecaster_end_to_end_seconds_count") == n
    assert d.metric("forecaster_model_info", route="water", version="1.0.0") == 1
    assert "sensors/s0/flow" not in text  # no stream id ever becomes a label
    assert d.stop() == 0
    sub.close()


def test_readyz_follows_the_broker(broker, daemon_factory) -> None:
    d = daemon_factory()
    d.start()
    broker.stop()
    assert wait_until(lambda: not d.ready(), 30), "readyz stayed 200 with the broker gone"
    status, body = d.http("/readyz")
    assert status == 503 and "MQTT" in body
    assert d.http("/healthz")[0] == 200  # alive, just not ready
    broker.start()
    d.wait_ready(timeout=60)
    assert d.metric("forecaster_mqtt_reconnects_total") >= 1
    assert d.stop() == 0
