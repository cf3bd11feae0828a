"""``forecaster serve --workers N``: the supervisor's rules and its behaviour with fake workers.

The fake worker (``_FAKE``) speaks sd_notify like the daemon (READY=1, WATCHDOG=1, STOPPING=1),
records the signals it gets and exits with a chosen status, so the supervisor's signal
forwarding, exit status and notification relay are tested in a few seconds without models or a
broker. Every wait polls a condition with a generous deadline.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from typer.testing import CliRunner

from forecaster.cli import app
from forecaster.harness import wait_until
from forecaster.serve.workers import (
    NotifyRelay,
    apply_worker_id,
    child_environment,
    describe_exit,
    group_status,
    serve_command,
    worker_member,
    worker_metrics_port,
    worker_state_dir,
)

ROOT = Path(__file__).resolve().parents[1]
MODEL = ROOT / "models" / "water-flow"
DEADLINE = 60.0

# --------------------------------------------------------------------------------- pure rules


def test_worker_ports_and_dirs() -> None:
    assert [worker_metrics_port(18090, i) for i in range(3)] == [18090, 18091, 18092]
    assert worker_metrics_port(0, 5) == 0  # "any free port" stays that
    with pytest.raises(ValueError, match="above 65535"):
        worker_metrics_port(65535, 1)
    with pytest.raises(ValueError):
        worker_metrics_port(18090, -1)
    assert worker_state_dir(Path("/var/lib/forecaster"), 2) == Path("/var/lib/forecaster/worker-2")


def test_worker_member_names() -> None:
    assert worker_member("", "box1.plant.example", 0) == "box1-w0"
    assert worker_member("east", "box1", 3) == "east-w3"
    assert worker_member("", "we!rd host", 1) == "we-rd-host-w1"
    long = worker_member("x" * 64, "h", 12)
    assert len(long) == 64 and long.endswith("-w12")


def test_apply_worker_id() -> None:
    from forecaster.serve.config import Config

    cfg = Config.model_validate(
        {
            "transport": {"kind": "nats"},
            "nats": {"member": "m"},
            "daemon": {"state_dir": "/srv/fc"},
            "metrics": {"port": 9000},
            "routes": [{"name": "w", "subscribe": ["sensors/+/flow"], "bundle": str(MODEL)}],
        }
    )
    apply_worker_id(cfg, 2)
    assert (cfg.metrics.port, cfg.daemon.state_dir, cfg.nats.member) == (
        9002, Path("/srv/fc/worker-2"), "m-w2")  # fmt: skip
    # the result is still a valid configuration
    Config.model_validate(cfg.model_dump())


def test_group_status() -> None:
    assert group_status([0, 0, 0], stop_requested=True) == 0
    assert group_status([0, -15, 0], stop_requested=True) == 1  # one failed while stopping
    assert group_status([0, 0], stop_requested=False) == 1  # a worker ended on its own
    assert describe_exit(-9) == "killed by SIGKILL"
    assert describe_exit(3) == "exited with status 3"


def test_child_environment() -> None:
    env = {"PATH": "/bin", "NOTIFY_SOCKET": "/run/systemd/notify", "WATCHDOG_PID": "1",
           "WATCHDOG_USEC": "30000000"}  # fmt: skip
    assert child_environment(env, None, None) == {"PATH": "/bin"}
    out = child_environment(env, "/tmp/w0.sock", "30000000")
    assert out == {"PATH": "/bin", "NOTIFY_SOCKET": "/tmp/w0.sock", "WATCHDOG_USEC": "30000000"}


def test_serve_command() -> None:
    cmd = serve_command(["--config=/etc/f.toml"], 3)
    assert cmd == [sys.executable, "-m", "forecaster", "serve", "--config=/etc/f.toml",
                   "--worker-id", "3"]  # fmt: skip


def test_relay_ready_once_all_ready() -> None:
    r = NotifyRelay(3)
    assert "READY=1" not in r.feed(0, b"READY=1")
    assert "READY=1" not in r.feed(2, b"READY=1\nSTATUS=5 streams")
    out = r.feed(1, b"READY=1")
    assert out[0] == "READY=1"
    assert out[1].startswith("STATUS=3/3 workers ready; w2: 5 streams")
    assert "READY=1" not in r.feed(1, b"READY=1")  # said once
    # A worker reloads: the group reloads, READY again once that worker is ready again.
    assert r.feed(1, b"RELOADING=1\nMONOTONIC_USEC=1")[0] == "RELOADING=1"
    assert "RELOADING=1" not in r.feed(0, b"RELOADING=1")  # the same reload, said once
    assert "READY=1" not in r.feed(0, b"READY=1")
    assert "READY=1" in r.feed(1, b"READY=1")


def test_relay_a_worker_that_ignores_sighup_leaves_the_group_ready() -> None:
    """The supervisor says RELOADING=1 only when a worker does (one that did not start a
    reload says nothing): otherwise the unit would stay "reloading" forever."""
    r = NotifyRelay(2)
    r.feed(0, b"READY=1")
    r.feed(1, b"READY=1")
    assert r.announced_ready
    assert r.feed(0, b"WATCHDOG=1") == []  # nothing about a reload without a worker's word


def test_relay_watchdog_only_while_every_worker_pings() -> None:
    r = NotifyRelay(2)
    assert r.feed(0, b"WATCHDOG=1") == []
    assert r.feed(0, b"WATCHDOG=1") == []  # worker 1 is silent (wedged): nothing goes up
    assert "WATCHDOG=1" in r.feed(1, b"WATCHDOG=1")
    assert r.feed(1, b"WATCHDOG=1") == []  # a new round starts
    assert "WATCHDOG=1" in r.feed(0, b"WATCHDOG=1")


def test_relay_ignores_a_forged_status_line() -> None:
    r = NotifyRelay(1)
    # the daemon flattens newlines in STATUS; one datagram is one set of fields
    assert r.feed(0, b"STATUS=fine") == ["STATUS=0/1 workers ready; w0: fine"]


# --------------------------------------------------------------------------------- supervisor

_FAKE = r"""
import os, signal, socket, sys, time
wid = int(sys.argv[1])
out = sys.argv[2]
exit_code = int(os.environ.get("FAKE_EXIT_" + str(wid), "0"))
die_after = float(os.environ.get("FAKE_DIE_AFTER_" + str(wid), "0"))
state = {"stop": False}
def record(what):
    with open(out, "a") as f:
        f.write(f"{wid} {what}\n")
def on_term(s, f):
    state["stop"] = True
signal.signal(signal.SIGTERM, on_term)
signal.signal(signal.SIGINT, on_term)
def on_hup(s, f):
    record("HUP")
    notify("RELOADING=1")
    notify("READY=1")
signal.signal(signal.SIGHUP, on_hup)
addr = os.environ.get("NOTIFY_SOCKET")
sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) if addr else None
def notify(msg):
    if sock is not None:
        try:
            sock.sendto(msg.encode(), addr)
        except OSError:  # the supervisor is gone (the daemon's Notifier also ignores this)
            pass
record("start " + (addr or "-") + " " + os.environ.get("WATCHDOG_USEC", "-"))
notify("READY=1\nSTATUS=w%d up" % wid)
started = time.monotonic()
while not state["stop"]:
    time.sleep(0.05)
    notify("WATCHDOG=1")
    if die_after and time.monotonic() - started > die_after:
        record("dies")
        sys.exit(exit_code)
notify("STOPPING=1")
record("TERM")
sys.exit(exit_code)
"""

_SUPERVISOR = r"""
import sys
from forecaster.serve.workers import Supervisor
n, fake, out = int(sys.argv[1]), sys.argv[2], sys.argv[3]
s = Supervisor(n, lambda i: [sys.executable, fake, str(i), out], kill_after=20)
s.install_signals()
sys.exit(s.run())
"""


class Upstream:
    """A stand-in for systemd's notification socket: collects the supervisor's datagrams."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.sock.settimeout(0.05)
        self.messages: list[str] = []

    def poll(self) -> list[str]:
        while True:
            try:
                self.messages.append(self.sock.recv(65536).decode())
            except TimeoutError:
                return self.messages

    def saw(self, field: str) -> bool:
        return any(field in m.splitlines() for m in self.poll())

    def count(self, field: str) -> int:
        return sum(field in m.splitlines() for m in self.poll())


class Group:
    def __init__(self, tmp: Path, n: int, env: dict[str, str]) -> None:
        fake = tmp / "fake_worker.py"
        fake.write_text(_FAKE)
        self.out = tmp / "events.txt"
        self.out.touch()
        self.proc = subprocess.Popen(
            [sys.executable, "-c", _SUPERVISOR, str(n), str(fake), str(self.out)],
            env={**os.environ, **env},
            cwd=ROOT,
            stderr=subprocess.PIPE,
            text=True,
        )

    def events(self) -> list[str]:
        return self.out.read_text().splitlines()

    def has(self, n: int, word: str) -> bool:
        return sum(1 for e in self.events() if e.split()[1] == word) >= n

    def wait(self) -> tuple[int, str]:
        _, err = self.proc.communicate(timeout=DEADLINE)
        return self.proc.returncode, err


@pytest.fixture
def group_env(tmp_path: Path) -> Iterator[tuple[Upstream, dict[str, str]]]:
    up = Upstream(tmp_path / "systemd-notify.sock")
    env = {"NOTIFY_SOCKET": str(up.path), "WATCHDOG_USEC": "2000000", "PYTHONPATH": str(ROOT)}
    yield up, env
    up.sock.close()


def test_supervisor_relays_ready_forwards_hup_and_term(
    tmp_path: Path, group_env: tuple[Upstream, dict[str, str]]
) -> None:
    up, env = group_env
    g = Group(tmp_path, 3, env)
    try:
        assert wait_until(lambda: up.saw("READY=1"), DEADLINE), up.poll()
        starts = [e.split() for e in g.events() if e.split()[1] == "start"]
        assert sorted(int(s[0]) for s in starts) == [0, 1, 2]
        sockets = {s[2] for s in starts}
        assert len(sockets) == 3 and str(up.path) not in sockets  # each worker its own socket
        assert {s[3] for s in starts} == {"2000000"}  # the watchdog timeout reaches them
        assert up.count("READY=1") == 1
        assert wait_until(lambda: up.saw("WATCHDOG=1"), DEADLINE)

        g.proc.send_signal(signal.SIGHUP)
        assert wait_until(lambda: g.has(3, "HUP"), DEADLINE), g.events()
        # the fake workers reload like the MQTT daemon: RELOADING=1, then READY=1
        assert wait_until(lambda: up.saw("RELOADING=1"), DEADLINE)
        assert wait_until(lambda: up.count("READY=1") >= 2, DEADLINE), up.poll()

        g.proc.send_signal(signal.SIGTERM)
        code, err = g.wait()
        assert code == 0, err
        assert g.has(3, "TERM"), g.events()
        assert up.saw("STOPPING=1")
    finally:
        if g.proc.poll() is None:
            g.proc.kill()


def test_a_worker_that_dies_stops_the_group_with_status_1(
    tmp_path: Path, group_env: tuple[Upstream, dict[str, str]]
) -> None:
    _up, env = group_env
    env = {**env, "FAKE_DIE_AFTER_1": "0.5", "FAKE_EXIT_1": "3"}
    g = Group(tmp_path, 3, env)
    try:
        code, err = g.wait()
        assert code == 1, err
        assert "worker 1" in err and "exited with status 3" in err, err
        assert "restarts none" in err
        events = g.events()
        assert "1 dies" in events
        assert g.has(2, "TERM"), events  # the other two were stopped cleanly
    finally:
        if g.proc.poll() is None:
            g.proc.kill()


def test_workers_die_with_a_killed_supervisor(
    tmp_path: Path, group_env: tuple[Upstream, dict[str, str]]
) -> None:
    up, env = group_env
    g = Group(tmp_path, 2, env)
    try:
        assert wait_until(lambda: up.saw("READY=1"), DEADLINE), g.events()
        g.proc.kill()
        g.proc.wait(timeout=DEADLINE)
        # PR_SET_PDEATHSIG: the kernel sends each worker SIGTERM, which the fake records.
        assert wait_until(lambda: g.has(2, "TERM"), DEADLINE), g.events()
    finally:
        if g.proc.poll() is None:
            g.proc.kill()


# --------------------------------------------------------------------------------- the CLI


def _mqtt_config(tmp_path: Path) -> Path:
    path = tmp_path / "mqtt.toml"
    path.write_text(
        f'[[routes]]\nname = "water"\nsubscribe = ["sensors/+/flow"]\nbundle = "{MODEL}"\n'
    )
    return path


@pytest.mark.parametrize(
    ("args", "words"),
    [
        (["--workers", "2"], "--workers 2 needs the NATS transport"),
        (["--worker-id", "1"], "--worker-id 1 needs the NATS transport"),
        (["--workers", "0"], "--workers must be between 1 and"),
        (["--workers", "2", "--worker-id", "0"], "do not go together"),
    ],
)
def test_cli_refuses(tmp_path: Path, args: list[str], words: str) -> None:
    res = CliRunner().invoke(app, ["serve", "--config", str(_mqtt_config(tmp_path)), *args])
    assert res.exit_code == 2, res.output
    lines = [line for line in res.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and words in lines[0], res.output


# --------------------------------------------------------------------------------- real workers


def test_two_nats_workers_under_a_notify_socket(
    tmp_path: Path, group_env: tuple[Upstream, dict[str, str]]
) -> None:
    """``serve --workers 2`` on a real nats-server: READY=1 reaches "systemd" once both real
    workers are ready, each serves /metrics on base + i and half the partitions, and SIGTERM
    stops both cleanly (status 0)."""
    if shutil.which("nats-server") is None and not Path("/usr/sbin/nats-server").exists():
        pytest.skip("nats-server is not installed (scripts/system-deps.sh)")
    pytest.importorskip("nats", reason="nats-py is not installed (the 'nats' extra)")
    from forecaster.harness import DaemonProcess, local_config, parse_metric, write_config
    from forecaster.harness.nats import NatsServer
    from forecaster.serve.config import Config
    from forecaster.serve.nats.partitions import mappings_for

    up, env = group_env
    env["WATCHDOG_USEC"] = "20000000"
    with NatsServer(tmp_path / "nats", mappings=mappings_for(["sensors/+/flow"], 4)) as srv:
        base = local_config(
            1, bundle=MODEL, state_dir=tmp_path / "state", subscribe=("sensors/+/flow",)
        )
        data = base.model_dump(mode="json", exclude_none=True)
        data["transport"] = {"kind": "nats"}
        data["nats"] = {"servers": [srv.url], "partitions": 4}
        port = free_port_pair()
        data["metrics"] = {"port": port}
        cfg = write_config(Config.model_validate(data), tmp_path / "fleet.toml")
        log = tmp_path / "serve.log"
        with log.open("wb") as fh:  # a file, not a pipe: nobody reads a pipe until the end
            proc = subprocess.Popen(
                [sys.executable, "-m", "forecaster", "serve", f"--config={cfg}", "--workers=2"],
                env={**os.environ, **env},
                cwd=ROOT,
                stderr=fh,
            )
        try:
            assert wait_until(lambda: up.saw("READY=1") or proc.poll() is not None, DEADLINE)
            assert proc.poll() is None, log.read_text()
            workers = [
                DaemonProcess(
                    Config.model_validate({**data, "metrics": {"port": port + i}}),
                    tmp_path,
                    f"w{i}",
                )
                for i in range(2)
            ]

            def owned() -> list[float]:
                return [
                    parse_metric(w.metrics_text(), "forecaster_nats_partitions_owned")
                    for w in workers
                ]

            assert all(w.ready() for w in workers)
            assert wait_until(lambda: owned() == [2.0, 2.0], DEADLINE), owned()
            assert (tmp_path / "state" / "worker-1").is_dir()
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(timeout=DEADLINE) == 0, log.read_text()
            assert up.saw("STOPPING=1")
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()


def free_port_pair() -> int:
    """A port p with p + 1 free as well (worker i serves /metrics on p + i)."""
    from forecaster.harness import free_port

    for _ in range(50):
        p = free_port()
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", p + 1))
            except OSError:
                continue
        return p
    raise AssertionError("no two consecutive free ports")
