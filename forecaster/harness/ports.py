"""Loopback ports and waiting on conditions: polling with a deadline, never a fixed sleep.

A fixed sleep is either too short on a busy machine (a flaky test) or too long on an idle one
(a slow suite); every wait here polls a condition until a generous deadline and says what it
was waiting for when the deadline passes.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from types import TracebackType
from typing import Any, ClassVar, Self

LOOPBACK = "127.0.0.1"


class HarnessError(RuntimeError):
    """A broker or daemon the harness started did not come up or behave as it must."""


def server_binary(name: str, hint: str) -> str:
    """A server's executable (PATH, else /usr/sbin); otherwise one line that says how to install
    it (``hint``)."""
    path = shutil.which(name) or f"/usr/sbin/{name}"
    if not os.path.exists(path):
        raise HarnessError(f"{name} is not installed: apt-get install {name} ({hint})")
    return path


def free_port(host: str = LOOPBACK) -> int:
    """A TCP port nothing listens on right now (the kernel's pick for port 0).

    Another process may take it before ours binds it; :class:`~forecaster.harness.Broker`
    retries with a new port when that happens.
    """
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def free_ports(count: int, host: str = LOOPBACK) -> list[int]:
    """``count`` distinct free ports: every socket stays bound until all are picked, so the
    kernel cannot hand the same port out twice (one :func:`free_port` after another can: a
    nats-server once got its MQTT port equal to its monitor port and failed to start)."""
    socks = [socket.socket() for _ in range(count)]
    try:
        for s in socks:
            s.bind((host, 0))
        return [int(s.getsockname()[1]) for s in socks]
    finally:
        for s in socks:
            s.close()


def port_open(port: int, host: str = LOOPBACK) -> bool:
    """Whether something accepts TCP connections on ``host:port``."""
    try:
        with socket.create_connection((host, port), timeout=0.5):
            return True
    except OSError:
        return False


def wait_until(cond: Callable[[], bool], timeout: float, step: float = 0.05) -> bool:
    """Poll ``cond`` until it holds or ``timeout`` seconds pass; the last answer is returned,
    so ``assert wait_until(...)`` fails only when the condition is false at the deadline."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(step)
    return bool(cond())


def _check_alive(proc: subprocess.Popen[Any] | None, what: str) -> None:
    if proc is not None and proc.poll() is not None:
        raise HarnessError(f"{what}: {proc.args!r} exited {proc.returncode}")


def wait_port(
    port: int,
    host: str = LOOPBACK,
    timeout: float = 30.0,
    proc: subprocess.Popen[Any] | None = None,
) -> None:
    """Wait until ``host:port`` accepts connections; fail early if ``proc`` (the process that
    should listen there) exits first, instead of waiting out the deadline."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        _check_alive(proc, f"waiting for {host}:{port}")
        if port_open(port, host):
            return
        time.sleep(0.05)
    raise HarnessError(f"nothing listens on {host}:{port} after {timeout} s")


def wait_file(path: Path, timeout: float, proc: subprocess.Popen[Any] | None = None) -> None:
    """Wait until ``path`` exists (a ready file, a first snapshot); fail early if ``proc`` dies."""
    deadline = time.monotonic() + timeout
    while not path.exists():
        _check_alive(proc, f"waiting for {path.name}")
        if time.monotonic() > deadline:
            raise HarnessError(f"{path} did not appear in {timeout} s")
        time.sleep(0.02)


def child_options(new_session: bool, die_with_parent: bool) -> dict[str, Any]:
    """``subprocess.Popen`` keyword arguments for a broker or daemon we start.

    ``new_session``: the child gets its own session, so a Ctrl-C in our terminal reaches only
    us, and we stop the children in the order we choose (daemon first, then the broker).
    ``die_with_parent`` (Linux): the kernel sends the child SIGTERM when the thread that started
    it exits, so a parent killed with -9 leaves no orphan broker behind. It runs a ``prctl`` in
    the child between fork and exec (``preexec_fn``), so start children from the main thread.
    """
    opts: dict[str, Any] = {}
    if new_session:
        opts["start_new_session"] = True
    if die_with_parent and sys.platform.startswith("linux"):
        opts["preexec_fn"] = _die_with_parent
    return opts


def _die_with_parent() -> None:
    import ctypes

    pr_set_pdeathsig = 1
    ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGTERM)


class OwnedChild:
    """The pid and liveness of a child process the harness started (the broker, a daemon)."""

    proc: subprocess.Popen[bytes] | None
    #: What the child is, for the error of asking a pid before ``start()``.
    what: ClassVar[str] = "process"

    @property
    def pid(self) -> int:
        if self.proc is None:
            raise HarnessError(f"the {self.what} is not started")
        return self.proc.pid

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None


class ServerChild(OwnedChild):
    """A server the harness owns (mosquitto, nats-server): stopped with a signal and a SIGKILL
    fallback, restarted on the same ports and files, killed when a ``with`` block ends."""

    def start(self) -> Self:
        raise NotImplementedError

    @property
    def log_path(self) -> Path:
        raise NotImplementedError

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 15.0) -> None:
        """Send ``sig`` and wait; SIGKILL if it does not exit in ``timeout``."""
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(sig)
        try:
            self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()

    def kill(self) -> None:
        """``kill -9``: the server loses whatever it had not saved yet."""
        self.stop(signal.SIGKILL)

    def restart(self, sig: int = signal.SIGTERM) -> Self:
        """Stop with ``sig`` and start again on the same port and store."""
        self.stop(sig)
        return self.start()

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def __enter__(self) -> Self:
        return self.start() if not self.running else self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.kill()
