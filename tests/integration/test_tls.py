"""TLS against a real mosquitto with a CA made here: verified by default, refused when it fails."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from forecaster.harness import Broker, DaemonProcess, local_config, wait_until

from .conftest import MODEL, ROOT


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


def tls_broker(tmp_path: Path, pki: Path) -> Broker:
    return Broker(
        tmp_path / "tls-broker",
        persistence=False,
        cafile=pki / "ca.pem",
        certfile=pki / "server.pem",
        keyfile=pki / "server.key",
    )


def daemon_for(tmp_path: Path, port: int, ca: Path, name: str) -> DaemonProcess:
    cfg = local_config(
        port,
        bundle=MODEL,
        state_dir=tmp_path / name,
        subscribe=("sensors/+/flow",),
        client_id=f"tls-{name}",
        mqtt={"host": "localhost", "tls": {"enabled": True, "ca_file": str(ca)}},
    )
    return DaemonProcess(cfg, tmp_path, name, cwd=ROOT)


def test_tls_verified_connection_and_refused_untrusted_broker(tmp_path: Path, pki: Path) -> None:
    with tls_broker(tmp_path, pki) as broker:
        good = daemon_for(tmp_path, broker.port, pki / "ca.pem", "good")
        bad = daemon_for(tmp_path, broker.port, pki / "other-ca.pem", "bad")
        with good, bad.start(wait_ready=False):
            assert good.metric("forecaster_mqtt_connected") == 1
            # the broker's certificate is not trusted: the daemon says so and stays unready
            assert wait_until(lambda: "cannot connect" in bad.log_text(), 60), bad.log_text()
            assert bad.http("/readyz")[0] == 503
            assert bad.metric("forecaster_mqtt_connected") == 0
            assert good.stop() == 0 and bad.stop() == 0
