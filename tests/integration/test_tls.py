"""TLS against a real mosquitto with a CA made here: verified by default, refused when it fails."""

from __future__ import annotations

import shutil
import subprocess
import time
from pathlib import Path

import pytest

from .conftest import MODEL, DaemonProc, free_port, mosquitto_binary, wait_port


def openssl(*args: str, cwd: Path) -> None:
    exe = shutil.which("openssl")
    if exe is None:
        pytest.fail("openssl is missing: apt-get install openssl")
    subprocess.run([exe, *args], cwd=cwd, check=True, capture_output=True)


@pytest.fixture
def pki(tmp_path: Path) -> Path:
    d = tmp_path / "pki"
    d.mkdir()
    for name, cn in (("ca", "test-ca"), ("other-ca", "other-ca")):
        openssl(
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "2",
            "-subj",
            f"/CN={cn}",
            "-keyout",
            f"{name}.key",
            "-out",
            f"{name}.pem",
            cwd=d,
        )
    openssl(
        "req",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-subj",
        "/CN=localhost",
        "-keyout",
        "server.key",
        "-out",
        "server.csr",
        cwd=d,
    )
    (d / "ext.cnf").write_text("subjectAltName=DNS:localhost,IP:127.0.0.1\n")
    openssl(
        "x509",
        "-req",
        "-in",
        "server.csr",
        "-CA",
        "ca.pem",
        "-CAkey",
        "ca.key",
        "-CAcreateserial",
        "-days",
        "2",
        "-extfile",
        "ext.cnf",
        "-out",
        "server.pem",
        cwd=d,
    )
    return d


def tls_broker(tmp_path: Path, pki: Path) -> subprocess.Popen[bytes]:
    port = free_port()
    conf = tmp_path / "tls.conf"
    conf.write_text(
        f"listener {port} 127.0.0.1\nallow_anonymous true\ncafile {pki}/ca.pem\n"
        f"certfile {pki}/server.pem\nkeyfile {pki}/server.key\nuser root\n"
    )
    proc = subprocess.Popen(
        [mosquitto_binary(), "-c", str(conf)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    wait_port(port)
    proc.port = port  # type: ignore[attr-defined]
    return proc


def daemon_for(tmp_path: Path, port: int, ca: Path, name: str) -> DaemonProc:
    mport = free_port()
    cfg = tmp_path / f"{name}.toml"
    cfg.write_text(f"""
[mqtt]
host = "localhost"
port = {port}
client_id = "tls-{name}"
reconnect_min_delay = 0.2
reconnect_max_delay = 1.0
[mqtt.tls]
enabled = true
ca_file = "{ca}"
[daemon]
state_dir = "{tmp_path / name}"
[metrics]
port = {mport}
[[routes]]
name = "water"
subscribe = ["sensors/+/flow"]
bundle = "{MODEL}"
""")
    return DaemonProc(cfg, mport, tmp_path / f"{name}.log")


def test_tls_verified_connection_and_refused_untrusted_broker(tmp_path: Path, pki: Path) -> None:
    broker = tls_broker(tmp_path, pki)
    good = daemon_for(tmp_path, broker.port, pki / "ca.pem", "good")  # type: ignore[attr-defined]
    bad = daemon_for(tmp_path, broker.port, pki / "other-ca.pem", "bad")  # type: ignore[attr-defined]
    try:
        good.start()
        assert good.metric("forecaster_mqtt_connected") == 1
        bad.start(wait_ready=False)
        time.sleep(4)
        assert bad.http("/readyz")[0] == 503  # the broker's certificate is not trusted
        assert bad.metric("forecaster_mqtt_connected") == 0
        assert "cannot connect" in bad.log.read_text()
        assert good.stop() == 0 and bad.stop() == 0
    finally:
        for d in (good, bad):
            if d.proc and d.proc.poll() is None:
                d.proc.kill()
        broker.kill()
        broker.wait()
