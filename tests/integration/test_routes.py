"""Several routes in one daemon, MQTT 3.1.1, the status topic, gap resets and model reloads."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import paho.mqtt.client as paho
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from forecaster.harness import wait_until

from .conftest import MODEL, ROOT, Collector
from .test_serve import WATER, by_stream, publish


@pytest.fixture(scope="module")
def compatible_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Same architecture as the bundled model (LSTM 2x64), other weights."""
    base = tmp_path_factory.mktemp("compat")
    for args in (
        [
            "train",
            str(WATER),
            "--time-column",
            "Time",
            "--until",
            "1014",
            "--layers",
            "2",
            "--hidden",
            "64",
            "--epochs",
            "1",
            "--seed",
            "3",
            "--name",
            "water-flow",
            "--version",
            "2.0.0",
            "--out",
            str(base / "run"),
            "-q",
        ],
        ["export", str(base / "run"), "--out", str(base / "bundle")],
    ):
        subprocess.run(
            [sys.executable, "-m", "forecaster", *args], check=True, capture_output=True, cwd=ROOT
        )
    return base / "bundle"


def test_two_routes_two_models(broker, daemon_factory, tiny_bundle: Path) -> None:
    tiny = {
        "name": "tiny",
        "subscribe": ["plant/+/temp"],
        "bundle": str(tiny_bundle),
        "prediction_topic": "forecast-tiny/{topic}",
        "payload": "number",
    }
    water = {"name": "water", "subscribe": ["sensors/+/flow"], "bundle": str(MODEL)}
    d = daemon_factory(routes=[water, tiny])
    d.start()
    sub = Collector(broker.port, "forecast/#,forecast-tiny/#")
    n = publish(broker.port, stop="20")
    client = paho.Client(callback_api_version=CallbackAPIVersion.VERSION2, protocol=paho.MQTTv5)
    client.connect("127.0.0.1", broker.port)
    client.loop_start()
    for v in (20.5, 20.7, 20.6):
        client.publish("plant/a/temp", str(v), qos=1).wait_for_publish(5)
    client.loop_stop()
    client.disconnect()
    msgs = sub.wait_for(n + 3)
    models: dict[str, set[str]] = {}
    for topic, payload in msgs:
        if topic.startswith(("forecast/", "forecast-tiny/")):
            models.setdefault(topic.split("/")[0], set()).add(json.loads(payload)["model"])
    assert models == {"forecast": {"water-flow"}, "forecast-tiny": {"tiny"}}
    assert d.wait_metric("forecaster_predictions_total", 3, route="tiny") == 3
    assert d.wait_metric("forecaster_predictions_total", n, route="water") == n
    assert d.stop() == 0
    sub.close()


def test_mqtt_311_and_status_topic(broker, daemon_factory) -> None:
    d = daemon_factory(mqtt={"protocol": "3.1.1"})
    d.start()
    status = Collector(broker.port, "forecaster/status")

    def last_status() -> bytes:
        msgs = status.snapshot()
        return msgs[-1][1] if msgs else b""

    assert wait_until(lambda: last_status() == b"online", 30)  # retained
    sub = Collector(broker.port)
    n = publish(broker.port, stop="30")
    assert len(sub.wait_for(n)) == n
    assert d.stop() == 0
    assert wait_until(lambda: last_status() == b"offline", 30), status.snapshot()
    # a crash leaves the last will
    d.start()
    assert wait_until(lambda: last_status() == b"online", 30), status.snapshot()
    assert d.kill() == -signal.SIGKILL
    # the broker sends the will after 1.5 x keepalive at most
    assert wait_until(lambda: last_status() == b"offline", 90), status.snapshot()
    sub.close()
    status.close()


def test_gap_resets_state(broker, daemon_factory) -> None:
    d = daemon_factory(route={"reset_after": 7200})  # > 2 h of event time
    d.start()
    sub = Collector(broker.port)
    n = publish(broker.port)  # the series has gaps of up to 32 h
    sub.wait_for(n)
    assert d.metric("forecaster_state_resets_total", route="water", reason="gap") >= 1
    preds = by_stream(sub.snapshot())["sensors/s0/flow"]
    assert len(preds) == n
    assert not all(p["warm"] for p in preds[100:])  # a reset starts a new warm-up
    assert d.stop() == 0
    sub.close()


def test_reload_compatible_keeps_states_incompatible_resets(
    broker, daemon_factory, tmp_path: Path, compatible_bundle: Path, tiny_bundle: Path
) -> None:
    live = tmp_path / "live"
    shutil.copytree(MODEL, live)
    d = daemon_factory(bundle=live)
    d.start()
    sub = Collector(broker.port)
    n = publish(broker.port, stop="100")
    sub.wait_for(n)
    assert d.proc is not None

    shutil.rmtree(live)
    shutil.copytree(compatible_bundle, live)
    d.proc.send_signal(signal.SIGHUP)
    assert d.wait_metric("forecaster_reloads_total", 1, result="ok") == 1
    assert d.metric("forecaster_model_info", route="water", version="2.0.0") == 1
    assert d.metric("forecaster_state_resets_total", default=0.0, reason="model_changed") == 0
    assert d.metric("forecaster_streams", route="water") == 1

    shutil.rmtree(live)
    shutil.copytree(tiny_bundle, live)
    d.proc.send_signal(signal.SIGHUP)
    assert d.wait_metric("forecaster_reloads_total", 2, result="ok") == 2
    assert d.metric("forecaster_state_resets_total", route="water", reason="model_changed") == 1
    before = len(sub)
    m = publish(broker.port, start="100", stop="110")
    msgs = sub.wait_for(before + m)[before:]
    assert {json.loads(p)["model"] for _, p in msgs} == {"tiny"}
    assert d.stop() == 0
    sub.close()
