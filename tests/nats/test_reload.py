"""SIGHUP under the NATS transport: the routes' models swapped in every partition served,
between turns, as the MQTT daemon's reload does; an invalid file, or one changing what only a
restart can change, refused whole while serving goes on."""

from __future__ import annotations

import signal
import socket
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from forecaster.harness import DaemonProcess, wait_until, write_config
from forecaster.harness.nats import NatsServer
from forecaster.serve.nats import reload
from forecaster.serve.nats.partitions import mappings_for

from .conftest import (
    FILTER,
    ROOT,
    nats_config,
    needs_nats,
    publish_stored,
    readings,
    start_owning,
)

PARTS = 2
STREAMS = 6
TAYLOR = ROOT / "models" / "taylor-demand"


def test_what_needs_a_restart(tmp_path: Path) -> None:
    old = nats_config(["nats://127.0.0.1:4222"], tmp_path, PARTS)
    new = old.model_copy(deep=True)
    new.nats.member = "worker-7"  # --worker-id rewrites it in the running config only
    new.routes[0].bundle = TAYLOR
    new.routes[0].idle_ttl = 30.0
    assert reload.restart_needed(old, new) == []
    new.nats.partitions = PARTS + 1
    new.routes[0].subscribe = ["meters/+/flow"]
    assert reload.restart_needed(old, new) == [
        "[nats]",
        "routes added, removed, reordered or resubscribed",
    ]
    with pytest.raises(reload.RestartNeeded, match="needs a restart"):
        reload.check(old, new)


class Systemd:
    """A stand-in for systemd's notification socket: what the worker told it, in order."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(path)
        self.sock.setblocking(False)
        self.lines: list[str] = []

    def said(self) -> list[str]:
        while True:
            try:
                self.lines.extend(self.sock.recv(4096).decode().splitlines())
            except BlockingIOError:
                return self.lines


@pytest.fixture
def systemd() -> Iterator[Systemd]:
    with tempfile.TemporaryDirectory(dir="/tmp") as d:  # AF_UNIX paths are short
        s = Systemd(f"{d}/notify")
        try:
            yield s
        finally:
            s.sock.close()


def _last(systemd: Systemd, line: str) -> int:
    said = systemd.said()
    assert line in said, said
    return len(said) - 1 - said[::-1].index(line)


def _reloads(d: DaemonProcess, result: str, n: int) -> None:
    d.send_signal(signal.SIGHUP)
    assert d.wait_metric("forecaster_reloads_total", n, timeout=15, result=result) == n


@needs_nats
def test_sighup_swaps_models_and_refuses_what_needs_a_restart(
    tmp_path: Path, daemons: list[DaemonProcess], systemd: Systemd
) -> None:
    with NatsServer(tmp_path / "nats", mappings=mappings_for([FILTER], PARTS)) as srv:
        d = DaemonProcess(
            nats_config([srv.url], tmp_path / "state", PARTS),
            tmp_path,
            "fc",
            cwd=ROOT,
            env={"NOTIFY_SOCKET": systemd.path},
        )
        daemons.append(d)
        start_owning(d, PARTS, 30)
        items = readings(streams=STREAMS, rows=10)
        publish_stored(srv, items, len(items), 30)
        assert wait_until(lambda: d.metric("forecaster_streams", route="water") == STREAMS, 10)

        # another model, other state shapes: swapped in every partition, the states reset
        d.config.routes[0].bundle = TAYLOR
        write_config(d.config, d.config_path)
        _reloads(d, "ok", 1)
        assert d.metric("forecaster_model_info", route="water", name="taylor-demand") == 1
        assert d.metric("forecaster_model_info", route="water", name="water-flow", default=0) == 0
        reset = d.metric("forecaster_state_resets_total", route="water", reason="model_changed")
        assert reset == STREAMS
        # systemd heard the reload begin and end (ExecReload= waits for READY=1)
        assert wait_until(lambda: "READY=1" in systemd.said()[_last(systemd, "RELOADING=1") :], 10)
        more = readings(streams=STREAMS, rows=3, start=10)
        publish_stored(srv, more, len(items) + len(more), 30)

        # an invalid file: refused, the running configuration kept
        d.config_path.write_text("[routes\n")
        _reloads(d, "failed", 1)
        assert "configuration refused, keeping the running one" in d.log_text()

        # a change only a restart can apply: refused whole, not half applied
        d.config.nats.partitions = PARTS * 2
        d.config.routes[0].bundle = ROOT / "models" / "water-flow"
        write_config(d.config, d.config_path)
        _reloads(d, "failed", 2)
        assert "needs a restart" in d.log_text()
        assert d.metric("forecaster_model_info", route="water", name="taylor-demand") == 1
        assert d.metric("forecaster_nats_partitions_owned") == PARTS
        assert d.stop() == 0

        # the partitions were snapshotted under the new model: a restart with it restores them
        d.config.nats.partitions = PARTS
        d.config.routes[0].bundle = TAYLOR
        start_owning(d, PARTS, 30)
        assert d.metric("forecaster_snapshot_restores_total", result="ok") == PARTS
        assert d.stop() == 0
