"""``forecaster serve`` as a subprocess, configured from the :class:`Config` model.

The config file is written from ``config.model_dump(mode="json")`` with tomli-w, never assembled
or patched as text: a misspelt key or a wrong type fails in the caller (pydantic) rather than as
a daemon that will not start, and a new config field needs no change here. ``/metrics`` is read
strictly: asking for a series that does not exist is an error, not a silent 0, because a renamed
metric would otherwise make ``assert metric(...) == 0`` pass forever.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Mapping
from pathlib import Path
from types import TracebackType
from typing import Any, ClassVar

import tomli_w
from prometheus_client.parser import text_string_to_metric_families

from forecaster.harness.ports import (
    LOOPBACK,
    HarnessError,
    OwnedChild,
    child_options,
    free_port,
    wait_until,
)
from forecaster.serve.config import Config

#: what a test or the demo wants from a daemon that it differs from the production defaults in:
#: fast reconnects (brokers are restarted on purpose) and a short batching delay
LOCAL_MQTT = {"reconnect_min_delay": 0.2, "reconnect_max_delay": 1.0}
LOCAL_DAEMON = {"max_delay_ms": 2}

_SUFFIXES = ("", "_total", "_count", "_sum", "_bucket", "_created", "_info", "_gcount", "_gsum")


class MetricNotFound(HarnessError, LookupError):
    """``/metrics`` has no series of that name and labels."""


def _merge(base: dict[str, Any], extra: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in extra.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def local_config(
    broker_port: int,
    *,
    bundle: Path,
    state_dir: Path,
    subscribe: tuple[str, ...] = ("sensors/+/flow", "gateway/batch"),
    route_name: str = "water",
    client_id: str | None = None,
    metrics_port: int = 0,
    mqtt: Mapping[str, Any] | None = None,
    daemon: Mapping[str, Any] | None = None,
    metrics: Mapping[str, Any] | None = None,
    route: Mapping[str, Any] | None = None,
    routes: list[Mapping[str, Any]] | None = None,
) -> Config:
    """A validated :class:`Config` for a daemon on a loopback broker.

    One route (``route_name`` on ``subscribe``, serving ``bundle``) unless ``routes`` replaces
    them all; ``mqtt``, ``daemon``, ``metrics`` and ``route`` are merged over the local
    defaults key by key. ``metrics_port = 0`` is replaced by a free port when the daemon starts,
    so the harness knows where to scrape. Raises pydantic's ``ValidationError`` on a bad key.
    """
    data: dict[str, Any] = {
        "mqtt": _merge(
            {
                **LOCAL_MQTT,
                "host": LOOPBACK,
                "port": broker_port,
                "client_id": client_id or f"forecaster-{broker_port}",
            },
            mqtt or {},
        ),
        "daemon": _merge({**LOCAL_DAEMON, "state_dir": str(state_dir)}, daemon or {}),
        "metrics": _merge({"port": metrics_port}, metrics or {}),
        "routes": routes
        if routes is not None
        else [
            _merge(
                {"name": route_name, "subscribe": list(subscribe), "bundle": str(bundle)},
                route or {},
            )
        ],
    }
    return Config.model_validate(data)


def config_toml(config: Config) -> str:
    """The TOML text of ``config`` (unset optional values are left out: TOML has no null)."""
    return tomli_w.dumps(config.model_dump(mode="json", exclude_none=True))


def write_config(config: Config, path: Path) -> Path:
    """Write ``config`` as TOML to ``path`` (atomically: a daemon reading it sees all or none)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(config_toml(config))
    tmp.replace(path)
    return path


def parse_metric(text: str, name: str, /, default: float | None = None, **labels: str) -> float:
    """The sum of the samples called ``name`` whose labels include ``labels``.

    A family that is not in ``text`` at all is always an error (a misspelt or renamed metric).
    A known family without a matching series — a labelled counter that has not counted yet —
    is an error too unless the caller says what absence means with ``default``.
    """
    total = 0.0
    found = False
    family_known = False
    for fam in text_string_to_metric_families(text):
        if any(fam.name + s == name for s in _SUFFIXES):
            family_known = True
        for s in fam.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                total += s.value
                found = True
    if found:
        return total
    if family_known and default is not None:
        return default
    what = f"{name}{{{', '.join(f'{k}={v!r}' for k, v in labels.items())}}}"
    reason = "no such series" if family_known else "no such metric"
    raise MetricNotFound(f"{what}: {reason} in /metrics")


class DaemonProcess(OwnedChild):
    """One ``forecaster serve`` process; the config is rewritten from ``config`` at each start,
    so a caller can change it (``d.config.daemon.snapshot_interval = 1``) between restarts."""

    what: ClassVar[str] = "daemon"

    def __init__(
        self,
        config: Config,
        workdir: Path,
        name: str = "daemon",
        *,
        cwd: Path | None = None,
        env: Mapping[str, str] | None = None,
        python: str = sys.executable,
        ready_timeout: float = 60.0,
        new_session: bool = False,
        die_with_parent: bool = False,
    ) -> None:
        self.config = config
        self.workdir = workdir
        self.name = name
        self.cwd = cwd
        self.env = dict(env) if env is not None else None
        self.python = python
        self.ready_timeout = ready_timeout
        #: see :func:`forecaster.harness.ports.child_options`
        self.new_session = new_session
        self.die_with_parent = die_with_parent
        self.proc: subprocess.Popen[bytes] | None = None
        if self.config.metrics.enabled and self.config.metrics.port == 0:
            self.config.metrics.port = free_port()

    @property
    def config_path(self) -> Path:
        return self.workdir / f"{self.name}.toml"

    @property
    def log(self) -> Path:
        return self.workdir / f"{self.name}.log"

    @property
    def metrics_port(self) -> int:
        return self.config.metrics.port

    def command(self) -> list[str]:
        return [self.python, "-m", "forecaster", "serve", "--config", str(self.config_path)]

    def start(self, wait_ready: bool = True) -> DaemonProcess:
        """Write the config, start the daemon (its output appended to :attr:`log`) and, unless
        told otherwise, wait for ``/readyz``: bundles loaded, broker connected, subscribed."""
        if self.running:
            raise HarnessError(f"daemon {self.name} is already running")
        write_config(Config.model_validate(self.config.model_dump()), self.config_path)
        env = {**os.environ, **self.env} if self.env is not None else None
        with self.log.open("ab") as fh:
            self.proc = subprocess.Popen(
                self.command(),
                stdout=fh,
                stderr=fh,
                cwd=self.cwd,
                env=env,
                **child_options(self.new_session, self.die_with_parent),
            )
        if wait_ready:
            self.wait_ready()
        return self

    def http(self, path: str, timeout: float = 5.0) -> tuple[int, str]:
        """GET ``path`` on the metrics server: (status, body); OSError when nothing listens."""
        url = f"http://{LOOPBACK}:{self.metrics_port}{path}"
        try:
            with urllib.request.urlopen(url, timeout=timeout) as r:
                return int(r.status), r.read().decode()
        except urllib.error.HTTPError as e:
            return int(e.code), e.read().decode()

    def ready(self) -> bool:
        """``/readyz`` says 200 now (False while it does not answer at all)."""
        try:
            return self.http("/readyz")[0] == 200
        except OSError:
            return False

    def wait_ready(self, timeout: float | None = None) -> None:
        """Wait for ``/readyz``; fail at once with the daemon's log if it exits meanwhile."""
        timeout = self.ready_timeout if timeout is None else timeout
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc is None or self.proc.poll() is not None:
                code = None if self.proc is None else self.proc.returncode
                raise HarnessError(f"daemon {self.name} exited {code}:\n{self.log_text()[-4000:]}")
            if self.ready():
                return
            time.sleep(0.1)
        raise HarnessError(
            f"daemon {self.name} not ready in {timeout} s:\n{self.log_text()[-4000:]}"
        )

    def metrics_text(self) -> str:
        status, text = self.http("/metrics")
        if status != 200:
            raise HarnessError(f"/metrics answered {status}: {text[:200]}")
        return text

    def metric(self, name: str, /, default: float | None = None, **labels: str) -> float:
        """One value from ``/metrics`` (summed over unnamed labels); see :func:`parse_metric`
        for when a missing series is an error."""
        return parse_metric(self.metrics_text(), name, default=default, **labels)

    def wait_metric(
        self, name: str, value: float, /, timeout: float = 30.0, **labels: str
    ) -> float:
        """Wait until the series reaches at least ``value`` and return it (absent counts as 0
        while waiting: a counter appears with its first increment). Counters move a moment after
        the prediction they count is published, so read them this way after seeing the output."""
        wait_until(lambda: self.metric(name, default=0.0, **labels) >= value, timeout, step=0.1)
        return self.metric(name, default=0.0, **labels)

    def send_signal(self, sig: int) -> None:
        if self.proc is None:
            raise HarnessError("the daemon is not started")
        self.proc.send_signal(sig)

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 60.0) -> int:
        """Send ``sig`` and wait for the exit status (a negative number: killed by a signal)."""
        if self.proc is None:
            raise HarnessError("the daemon is not started")
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        return self.proc.wait(timeout=timeout)

    def kill(self) -> int:
        """``kill -9``: no shutdown code runs, exactly like a crash."""
        return self.stop(signal.SIGKILL)

    def log_text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def close(self) -> None:
        """Kill the process if it still runs (cleanup after a failed test)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def __enter__(self) -> DaemonProcess:
        return self.start() if not self.running else self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
