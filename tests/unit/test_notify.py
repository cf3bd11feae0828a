"""sd_notify against a real AF_UNIX datagram socket, the way systemd listens for it."""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from forecaster.serve.notify import Notifier


@pytest.fixture
def listener(tmp_path: Path) -> Iterator[tuple[socket.socket, str]]:
    # AF_UNIX paths are limited to ~107 bytes; pytest's tmp_path can be longer than that.
    path = tmp_path / "n.sock"
    if len(str(path)) > 100:
        pytest.fail(f"tmp path too long for AF_UNIX: {path}")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(path))
    sock.settimeout(2)
    yield sock, str(path)
    sock.close()


def _recv(sock: socket.socket) -> list[str]:
    return sock.recv(4096).decode().split("\n")


def test_messages_reach_the_socket(listener: tuple[socket.socket, str]) -> None:
    sock, path = listener
    n = Notifier({"NOTIFY_SOCKET": path})
    assert n.enabled

    assert n.ready(status="serving 3 routes")
    assert _recv(sock) == ["READY=1", "STATUS=serving 3 routes"]
    assert n.watchdog()
    assert _recv(sock) == ["WATCHDOG=1"]
    assert n.status("line one\nREADY=1")
    assert _recv(sock) == ["STATUS=line one READY=1"]  # a newline cannot forge a field
    assert n.stopping()
    assert _recv(sock) == ["STOPPING=1"]

    before = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    assert n.reloading()
    after = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    reload_msg = _recv(sock)
    assert reload_msg[0] == "RELOADING=1"
    key, value = reload_msg[1].split("=")
    assert key == "MONOTONIC_USEC" and before <= int(value) <= after
    n.close()


def test_abstract_socket() -> None:
    name = f"forecaster-test-{os.getpid()}-{time.monotonic_ns()}"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind("\0" + name)
    sock.settimeout(2)
    try:
        n = Notifier({"NOTIFY_SOCKET": "@" + name})
        assert n.ready()
        assert _recv(sock) == ["READY=1"]
    finally:
        sock.close()


def test_noop_without_notify_socket() -> None:
    n = Notifier({})
    assert not n.enabled
    assert not n.ready()
    assert not n.watchdog()
    assert not n.reloading()
    assert n.watchdog_interval() is None


def test_unsupported_address_disables() -> None:
    n = Notifier({"NOTIFY_SOCKET": "vsock:2:1234"})
    assert not n.enabled
    assert not n.ready()


def test_send_failure_is_logged_not_raised(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    n = Notifier({"NOTIFY_SOCKET": str(tmp_path / "nobody-listens")})
    assert n.enabled
    assert not n.watchdog()
    assert "sd_notify" in caplog.text


def test_recovers_after_listener_returns(tmp_path: Path) -> None:
    path = str(tmp_path / "late.sock")
    n = Notifier({"NOTIFY_SOCKET": path})
    assert not n.ready()  # nobody listening yet
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(path)
    sock.settimeout(2)
    try:
        assert n.ready()
        assert _recv(sock) == ["READY=1"]
    finally:
        sock.close()


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({"WATCHDOG_USEC": "30000000"}, 30.0),
        ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": str(os.getpid())}, 30.0),
        ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": str(os.getpid() + 1)}, None),
        ({"WATCHDOG_USEC": "0"}, None),
        ({"WATCHDOG_USEC": "abc"}, None),
        ({"WATCHDOG_USEC": "1000", "WATCHDOG_PID": "x"}, None),
        ({}, None),
    ],
)
def test_watchdog_interval(env: dict[str, str], expected: float | None) -> None:
    assert Notifier(env).watchdog_interval() == expected


def test_default_env_is_os_environ(
    monkeypatch: pytest.MonkeyPatch, listener: tuple[socket.socket, str]
) -> None:
    sock, path = listener
    monkeypatch.setenv("NOTIFY_SOCKET", path)
    monkeypatch.setenv("WATCHDOG_USEC", "2000000")
    monkeypatch.delenv("WATCHDOG_PID", raising=False)
    n = Notifier()
    assert n.watchdog_interval() == 2.0
    assert n.watchdog()
    assert _recv(sock) == ["WATCHDOG=1"]
