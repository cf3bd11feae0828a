"""Security basics: loopback metrics, a password that never leaks, bundles that cannot pull in
outside files or pickles, network topics that never become file names or metric labels.

The broker here requires a user name and password (a ``password_file`` made with
``mosquitto_passwd -b``); the daemon reads its password from ``mqtt.password_file``.
"""

from __future__ import annotations

import hashlib
import json
import pickle
import shutil
import ssl
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import onnx
import pytest

from forecaster.errors import BundleError
from forecaster.model.bundle import Bundle
from forecaster.serve.config import MetricsConfig, MQTTConfig, TLSConfig
from forecaster.serve.mqtt import Transport

from .conftest import (
    MODEL,
    PASSWORD_MARKER,
    Broker,
    log_text,
    mqtt_client,
    wait_until,
)
from .test_snapshots import Exploit

USER = "forecaster"


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[Broker]:
    """Overrides the shared broker for this module: every client here must log in."""
    workdir = tmp_path / "broker"
    workdir.mkdir()
    passwd = workdir / "passwd"
    passwd.touch(mode=0o600)
    subprocess.run(["mosquitto_passwd", "-b", str(passwd), USER, PASSWORD_MARKER], check=True)
    with Broker(workdir, allow_anonymous=False, password_file=passwd, persistence=False) as b:
        yield b


@pytest.fixture
def secret_daemon(daemon, tmp_path: Path):
    pw = tmp_path / "mqtt-password"
    pw.write_text(PASSWORD_MARKER + "\n")
    pw.chmod(0o600)
    d = daemon(mqtt={"username": USER, "password_file": str(pw)}, log_level="DEBUG")
    d.start()  # ready = connected and subscribed: the password was used
    yield d
    d.stop()


def publisher(port: int):
    c = mqtt_client(port, "sec-pub", auth=(USER, PASSWORD_MARKER))
    c.loop_start()
    assert wait_until(c.is_connected, 30)
    return c


def test_metrics_bind_loopback_by_default(secret_daemon) -> None:
    assert MetricsConfig().bind == "127.0.0.1"
    port = f"{secret_daemon.metrics_port:04X}"
    listening = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            local, state = line.split()[1], line.split()[3]
            if state == "0A" and local.endswith(":" + port):
                listening.append(local)
    assert listening == [f"0100007F:{port}"]  # 127.0.0.1 only, no 0.0.0.0 or ::


def test_password_never_leaks(broker, secret_daemon, tmp_path: Path) -> None:
    d = secret_daemon
    assert d.proc is not None
    pid = d.proc.pid
    pub = publisher(broker.port)
    pub.publish("sensors/x/flow", b'{"value": 1.0, "ts": 1}', qos=1).wait_for_publish(5)
    pub.publish("sensors/x/flow", b"not json {", qos=1).wait_for_publish(5)
    assert d.wait_metric("forecaster_readings_rejected_total", 1) >= 1
    cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    environ = Path(f"/proc/{pid}/environ").read_bytes()
    _, metrics = d.http("/metrics")
    secret = PASSWORD_MARKER.encode()
    assert secret not in cmdline
    assert secret not in environ
    assert PASSWORD_MARKER not in metrics
    pub.loop_stop()
    pub.disconnect()
    d.stop()
    assert PASSWORD_MARKER not in log_text(d)
    assert "DEBUG" in log_text(d)  # the most talkative level was on
    # and the configuration summary names the file, not its content
    out = subprocess.run(
        [sys.executable, "-m", "forecaster", "check-config", str(d.config_path), "--no-bundles"],
        capture_output=True,
        text=True,
        cwd=MODEL.parents[1],
    )
    assert out.returncode == 0, out.stderr
    assert PASSWORD_MARKER not in out.stdout + out.stderr


def test_topics_never_become_paths_or_labels(broker, secret_daemon, tmp_path: Path) -> None:
    d = secret_daemon
    odd = [
        "sensors/../flow",
        "sensors/..%2F..%2Fetc%2Fpasswd/flow",
        "sensors/water.npz/flow",
        "sensors/MARK3R-{topic}/flow",
        "sensors/MARK3R\u202e/flow",
        "sensors/ /flow",
    ]
    pub = publisher(broker.port)
    for t in odd:
        pub.publish(t, b'{"value": 1.0, "ts": 1}', qos=1).wait_for_publish(5)
    batch = [{"stream": s, "value": 1.0, "ts": 1} for s in ("../../MARK3R", "/tmp/MARK3R", "water")]
    pub.publish("gateway/batch", json.dumps(batch), qos=1).wait_for_publish(5)
    assert d.wait_metric("forecaster_predictions_total", len(odd) + 3) >= len(odd) + 3
    _, metrics = d.http("/metrics")
    assert "MARK3R" not in metrics and "sensors/" not in metrics and ".." not in metrics
    pub.loop_stop()
    pub.disconnect()
    assert d.stop() == 0
    state = tmp_path / "state"
    # only the route's own files (snapshot, its previous generation, journal): named after the
    # route, never after a topic or a stream id
    names = sorted(p.name for p in state.iterdir())
    assert "water.npz" in names and all(n.split(".")[0] == "water" for n in names), names
    strays = [p for p in tmp_path.rglob("*") if "MARK3R" in p.name or p.name == "passwd.npz"]
    assert strays == []
    assert not Path("/etc/passwd.npz").exists()


def _rewrite_bundle(src: Path, dst: Path, onnx_bytes: bytes | None = None) -> Path:
    shutil.copytree(src, dst)
    if onnx_bytes is not None:
        (dst / "model.onnx").write_bytes(onnx_bytes)
    manifest = json.loads((dst / "model.json").read_text())
    manifest["onnx_sha256"] = hashlib.sha256((dst / "model.onnx").read_bytes()).hexdigest()
    (dst / "model.json").write_text(json.dumps(manifest))
    return dst


def external_data_bundle(tmp_path: Path) -> Path:
    dst = tmp_path / "external"
    shutil.copytree(MODEL, dst)
    model = onnx.load(str(dst / "model.onnx"))
    onnx.save_model(
        model,
        str(dst / "model.onnx"),
        save_as_external_data=True,
        all_tensors_to_one_file=True,
        location="weights.bin",
        size_threshold=0,
    )
    assert (dst / "weights.bin").stat().st_size > 10_000
    manifest = json.loads((dst / "model.json").read_text())
    manifest["onnx_sha256"] = hashlib.sha256((dst / "model.onnx").read_bytes()).hexdigest()
    (dst / "model.json").write_text(json.dumps(manifest))
    return dst


def test_bundle_with_external_data_is_refused(tmp_path: Path, monkeypatch) -> None:
    bundle = external_data_bundle(tmp_path)
    with pytest.raises(BundleError, match="cannot load the graph"):
        Bundle.load(bundle)
    monkeypatch.chdir(bundle)  # weights.bin in the working directory: still not resolved
    with pytest.raises(BundleError):
        Bundle.load(bundle)


def test_daemon_refuses_external_data_bundle_at_start(daemon, tmp_path: Path) -> None:
    d = daemon(bundle=external_data_bundle(tmp_path))
    d.start(wait_ready=False)
    assert d.proc is not None
    code = d.proc.wait(timeout=30)
    assert code != 0
    assert "cannot load the graph" in log_text(d)


def test_pickled_bundle_is_refused_unread(tmp_path: Path) -> None:
    marker = tmp_path / "pickle-was-loaded"
    blob = pickle.dumps(Exploit(marker))
    bundle = _rewrite_bundle(MODEL, tmp_path / "pickled", blob)
    with pytest.raises(BundleError):
        Bundle.load(bundle)
    assert not marker.exists()


def test_tls_verifies_by_default() -> None:
    tls = TLSConfig(enabled=True)
    assert tls.insecure is False
    t = Transport(MQTTConfig(tls=tls), None, ["a"], lambda *a: None, on_error=lambda _n: None)
    for link in (t._sub, t._pub):
        ctx = link.client._ssl_context
        assert ctx.verify_mode == ssl.CERT_REQUIRED and ctx.check_hostname
