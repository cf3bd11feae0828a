"""A real mosquitto on a free port, the real daemon as a subprocess, a real subscriber.

All three come from :mod:`forecaster.harness` (shared with the benchmarks and the demo); this
file only turns them into fixtures with the test-suite defaults.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest

from forecaster.harness import Broker, Collector, DaemonProcess, local_config

ROOT = Path(__file__).resolve().parents[2]
MODEL = ROOT / "models" / "water-flow"

__all__ = ["MODEL", "ROOT", "Broker", "Collector", "DaemonProcess", "make_daemon"]


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[Broker]:
    """A private mosquitto with persistence on, restartable on the same port and directory."""
    with Broker(tmp_path / "broker") as b:
        yield b


def make_daemon(
    workdir: Path,
    broker_port: int,
    index: int,
    bundle: Path = MODEL,
    *,
    mqtt: Mapping[str, Any] | None = None,
    metrics: Mapping[str, Any] | None = None,
    route: Mapping[str, Any] | None = None,
    routes: list[Mapping[str, Any]] | None = None,
    **daemon: Any,
) -> DaemonProcess:
    """A not-yet-started daemon on ``broker_port``; every daemon of one test shares the client
    id and ``workdir/state``, so a second one is a restart of the first."""
    cfg = local_config(
        broker_port,
        bundle=bundle,
        state_dir=workdir / "state",
        mqtt=mqtt,
        daemon=daemon,
        metrics=metrics,
        route=route,
        routes=routes,
    )
    return DaemonProcess(cfg, workdir, f"daemon-{index}", cwd=ROOT)


@pytest.fixture
def daemon_factory(tmp_path: Path, broker: Broker) -> Iterator[Callable[..., DaemonProcess]]:
    """``make(bundle=MODEL, mqtt=, metrics=, route=, routes=, **daemon_options)``: config
    sections as dicts, validated by the Config model before anything starts."""
    procs: list[DaemonProcess] = []

    def make(*args: Any, **kwargs: Any) -> DaemonProcess:
        d = make_daemon(tmp_path, broker.port, len(procs), *args, **kwargs)
        procs.append(d)
        return d

    yield make
    for d in procs:
        d.close()
