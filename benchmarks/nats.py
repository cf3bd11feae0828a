"""``python -m benchmarks.nats``: single-reading messages end to end through NATS JetStream
against the MQTT/paho path, and 1 forecaster process against 2, in the same run (issue 14).

Contenders, one after the other, each on a fresh private server on 127.0.0.1:

- ``paho``: ``forecaster serve`` on mosquitto, the daemon's MQTT path with its at-least-once
  semantics (QoS 1 in and out, a reading acknowledged after its prediction's PUBACK), loaded by
  the raw-socket MQTT generators of ``benchmarks.loadgen`` (the same as ``benchmarks.run``);
- ``nats-1``: one ``forecaster serve`` with ``transport.kind = "nats"`` on a nats-server with
  JetStream and the partition mapping, at-least-once settings (``nats.publish = "jetstream"``:
  predictions stored in JetStream before the readings are acknowledged); readings are published
  by a raw-socket core NATS publisher on ``sensors.<id>.flow`` (the server maps them to
  ``part.<k>.…`` and stores them in the readings stream), predictions are counted by a raw-socket
  core NATS subscriber on ``forecast.>``;
- ``nats-2``: the same with ``forecaster serve --workers 2`` (two processes sharing the
  partitions), measured once both own their share;
- ``nats-1-mqtt-in``: ``nats-1`` with the readings sent by the raw MQTT publisher into
  nats-server's MQTT listener at QoS 1 (what sensors do), predictions still read over core NATS;
- ``-core`` variants (``nats-1-core``, ``nats-2-core``): ``nats.publish = "core"``, a batch
  acknowledged once its predictions are flushed to the server (readings at-least-once,
  predictions at-most-once; no PubAck per prediction, nothing stored);
- ``-base`` variants (``nats-1-base``, ...): the same with ``forecaster/serve/nats`` as it was
  at git revision ``--baseline-rev`` (the rest of the package from this working tree, so the
  config and the shared modules are the same), to compare two versions of the transport in one
  run.

Names compose: ``nats-<1|2>[-core][-mqtt-in][-base]``. Ratios are computed for every NATS
contender against ``paho``, 2 processes against 1 of the same variant, and each variant against
its ``-base``. ``--profile`` records a py-spy profile of each NATS contender's first trial.

Measure: after a warm-up (every stream created), ``--repeats`` closed-loop trials of
``--duration`` s each with at most ``--window`` readings published and not yet answered; the
figure is the delivered readings/s in the steady part of each trial (``benchmarks.harness``'s
analysis), median over the repeats; nothing may be lost. CPU seconds of the contender, the server
and both generators are recorded per trial; their sum per million readings says
how fast the whole loop could go if it had every core of the machine ("cores' ceiling"): on a
small machine the load generators and the server share the cores with the forecaster. Results go to
``benchmarks/results/nats-<time>.{json,md}`` with the load average before and after every
contender. The machine is shared: compare the ratios of one run, not absolute figures across runs.

Then (unless ``--no-takeover``) the failure measurement: two independent workers
(``serve --worker-id 0`` and ``1``, as ``forecaster@.service`` runs them, ``snapshot_interval``
1 s) under an open-loop load of ``--takeover-rate`` readings/s for 20 s; worker 1 is killed with
-9 after 5 s. Recorded: the seconds until the survivor owns every partition, readings without a
prediction (distinct ``ts`` answered against readings sent), duplicate predictions, the longest
gap between predictions, readings the survivor stepped again.

``python -m benchmarks.nats pub|sub ...`` are the load-generator processes (internal).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.harness import ROOT, Broker, Contender, Load, _analyse, run_trial
from benchmarks.loadgen import _VALUES, Counter, Tally, _Stamp
from benchmarks.procstat import cpu_seconds, host_info, memory_kb
from benchmarks.rawmqtt import HOST
from forecaster.harness import free_port, wait_file, wait_until, write_config
from forecaster.harness.daemon import parse_metric
from forecaster.harness.nats import NatsServer, nats_server_binary
from forecaster.serve.config import Config, NATSConfig

RESULTS = ROOT / "benchmarks" / "results"
PY = sys.executable
FILTER = "sensors/+/flow"
BUNDLE = ROOT / "models" / "water-flow"
TARGETS = {"nats-1 readings/s": 20_000.0, "nats-1 / paho": 8.0, "nats-2 / nats-1": 1.6}

# ------------------------------------------------------------------------------ raw NATS client


def nats_open(port: int, name: str) -> socket.socket:
    """A core NATS connection on a raw socket: INFO read, CONNECT sent, PONG seen."""
    sock = socket.create_connection((HOST, port), timeout=30)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    buf = b""
    while b"\r\n" not in buf:
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError("nats-server closed the connection before INFO")
        buf += chunk
    if not buf.startswith(b"INFO "):
        raise ConnectionError(f"not a NATS server: {buf[:80]!r}")
    opts = {
        "verbose": False,
        "pedantic": False,
        "name": name,
        "lang": "python-raw",
        "version": "0",
        "protocol": 1,
        "headers": False,
    }
    sock.sendall(b"CONNECT " + json.dumps(opts).encode() + b"\r\nPING\r\n")
    buf = buf[buf.index(b"\r\n") + 2 :]
    while b"PONG\r\n" not in buf:
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError("nats-server closed the connection after CONNECT")
        if b"-ERR" in chunk:
            raise ConnectionError(chunk.decode(errors="replace"))
        buf += chunk
    return sock


class MsgReader:
    """Incremental parser of the server's side of the protocol: MSG, PING, +OK, -ERR, INFO."""

    def __init__(self) -> None:
        self.buf = b""

    def feed(self, data: bytes) -> tuple[list[tuple[bytes, bytes]], int]:
        """(subject, payload) of every complete MSG, and the number of PINGs seen."""
        buf = self.buf + data
        out: list[tuple[bytes, bytes]] = []
        pings = 0
        pos = 0
        n = len(buf)
        while pos < n:
            eol = buf.find(b"\r\n", pos)
            if eol < 0:
                break
            if buf.startswith(b"MSG ", pos):
                parts = buf[pos + 4 : eol].split(b" ")
                size = int(parts[-1])
                start = eol + 2
                if start + size + 2 > n:
                    break
                out.append((parts[0], buf[start : start + size]))
                pos = start + size + 2
                continue
            if buf.startswith(b"PING", pos):
                pings += 1
            elif buf.startswith(b"-ERR", pos):
                raise ConnectionError(buf[pos:eol].decode(errors="replace"))
            pos = eol + 2
        self.buf = buf[pos:]
        return out, pings


# ------------------------------------------------------------------------------ generators

_TS = re.compile(rb'"ts":\s*([0-9.eE+-]+)')


def run_pub(a: argparse.Namespace) -> None:
    """Publish single readings on ``sensors.s<i>.flow`` (core NATS), closed or open loop."""
    sock = nats_open(a.port, f"bench-pub-{os.getpid()}")
    sock.settimeout(None)
    pings = [0]
    reader = MsgReader()

    def drain() -> None:  # server PINGs are answered from the main loop (one writer)
        try:
            while True:
                data = sock.recv(1 << 16)
                if not data:
                    return
                pings[0] += reader.feed(data)[1]
        except OSError:
            return

    threading.Thread(target=drain, daemon=True).start()
    counter = Counter(Path(a.counter)) if a.counter else None
    subjects = [f"sensors.s{i}.flow".encode() for i in range(a.streams)]
    stamp = _Stamp()
    sent = 0
    k = 0
    answered_pings = 0
    started = time.time()
    end = started + a.duration
    limit = a.count if a.count > 0 else None
    cpu0 = time.process_time()  # the interpreter's start-up is not the load's cost
    while True:
        now = time.time()
        if limit is None and now >= end:
            break
        if limit is not None and sent >= limit:
            break
        due = int((now - started) * a.rate) - sent if a.rate > 0 else 512
        if counter is not None:
            due = min(due, a.window - (sent - counter.get()))
        if limit is not None:
            due = min(due, limit - sent)
        if due <= 0:
            time.sleep(0.0003)
            continue
        due = min(due, 512)
        now_us = int(now * 1e6)
        chunks = []
        for _ in range(due):
            payload = b'{"value":%s,"ts":%s}' % (_VALUES[k % 97], stamp.next(now_us))
            chunks.append(b"PUB %s %d\r\n%s\r\n" % (subjects[k % a.streams], len(payload), payload))
            k += 1
        if pings[0] > answered_pings:
            chunks.append(b"PONG\r\n" * (pings[0] - answered_pings))
            answered_pings = pings[0]
        sock.sendall(b"".join(chunks))
        sent += due
    finished = time.time()
    # A PING round trip: everything before it has been processed by the server.
    sock.sendall(b"PING\r\n")
    time.sleep(0.05)
    info = {"sent": sent, "sent_msgs": sent, "t_start": started, "t_end": finished}
    info["cpu_s"] = time.process_time() - cpu0
    Path(a.done).write_text(json.dumps(info))
    sock.close()


def run_sub(a: argparse.Namespace) -> None:
    """Count predictions on ``forecast.>`` and their latency (receive time − echoed ``ts``);
    the record has the format ``benchmarks.loadgen sub`` writes (the same :class:`Tally`), for
    the same analysis, plus the distinct readings answered and the subscriber's own CPU."""
    sock = nats_open(a.port, f"bench-sub-{os.getpid()}")
    sock.sendall(b"SUB forecast.> 1\r\nPING\r\n")
    reader = MsgReader()
    sock.settimeout(0.05)
    seen: set[bytes] = set()  # distinct readings answered (a ts is unique per reading)
    # Every reading must be answered: wait for the last prediction (a slow tail is not a loss),
    # up to `grace` after publishing or 8 s without any prediction.
    tally = Tally(a, quiet=8.0)
    cpu0 = time.process_time()
    Path(a.ready).write_text("ready")
    while True:
        try:
            data = sock.recv(1 << 20)
        except TimeoutError:
            data = b""
        except OSError:
            break
        now = time.time()
        if data:
            msgs, pings = reader.feed(data)
            if pings:
                sock.sendall(b"PONG\r\n" * pings)
            n = 0
            for _subject, payload in msgs:
                m = _TS.search(payload)
                if m is not None and tally.answer(now, float(m.group(1))):
                    n += 1
                    seen.add(m.group(1))
            tally.chunk(now, n, n)  # one prediction per message
        if tally.finished(now):
            break
    sock.close()
    tally.save(a.out, unique=np.array(len(seen)), cpu_s=np.array(time.process_time() - cpu0))


# ------------------------------------------------------------------------------ processes


def _children(pid: int) -> list[int]:
    """Direct children of ``pid`` (the workers of ``serve --workers``)."""
    out: list[int] = []
    with contextlib.suppress(OSError):
        for tid in os.listdir(f"/proc/{pid}/task"):
            text = Path(f"/proc/{pid}/task/{tid}/children").read_text()
            out += [int(x) for x in text.split()]
    return out


def tree_cpu(pid: int) -> float:
    return cpu_seconds(pid) + sum(cpu_seconds(c) for c in _children(pid))


def tree_rss_kb(pid: int) -> int:
    return sum(memory_kb(p).get("VmRSS", 0) for p in (pid, *_children(pid)))


def _metrics(port: int) -> str:
    import urllib.request

    with urllib.request.urlopen(f"http://{HOST}:{port}/metrics", timeout=5) as r:
        return str(r.read().decode())


def _ready(port: int) -> bool:
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(f"http://{HOST}:{port}/readyz", timeout=5) as r:
            return int(r.status) == 200
    except (OSError, urllib.error.HTTPError):
        return False


def _two_free_ports() -> int:
    """A port p with p and p + 1 free (worker i listens on p + i)."""
    for _ in range(50):
        p = free_port()
        with socket.socket() as s:
            try:
                s.bind((HOST, p + 1))
            except OSError:
                continue
        return p
    raise RuntimeError("no two consecutive free ports")


@dataclass
class NatsContender:
    """``forecaster serve`` (``workers`` processes) on a nats-server of its own."""

    name: str
    workdir: Path
    workers: int
    partitions: int
    publish: str = "jetstream"
    lease_ttl: float | None = None
    pull_batch: int | None = None
    #: the source tree the forecaster runs from (another checkout for a ``-base`` contender)
    src: Path = ROOT
    server: NatsServer | None = None
    proc: subprocess.Popen[bytes] | None = None
    metrics_port: int = 0
    owned: list[float] = field(default_factory=list)

    def start(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        from forecaster.serve.nats.partitions import mappings_for

        self.server = NatsServer(
            self.workdir / "nats", mappings=mappings_for([FILTER], self.partitions), mqtt=True
        ).start()
        self.metrics_port = _two_free_ports()
        cfg = Config.model_validate(
            {
                "transport": {"kind": "nats"},
                "nats": {
                    "servers": [self.server.url],
                    "partitions": self.partitions,
                    "publish": self.publish,
                    **({"lease_ttl": self.lease_ttl} if self.lease_ttl else {}),
                    **({"pull_batch": self.pull_batch} if self.pull_batch else {}),
                },
                "daemon": {
                    "state_dir": str(self.workdir / "state"),
                    "snapshot_interval": 0,
                    "log_level": "WARNING",
                },
                "metrics": {"port": self.metrics_port, "bind": HOST},
                "routes": [
                    {
                        "name": "bench",
                        "subscribe": [FILTER],
                        "bundle": str(BUNDLE),
                        "max_streams": 2_000_000,
                    }
                ],
            }
        )
        path = write_config(cfg, self.workdir / "forecaster.toml")
        cmd = [PY, "-m", "forecaster", "serve", "--config", str(path)]
        if self.workers > 1:
            cmd += ["--workers", str(self.workers)]
        env = {**os.environ, "PYTHONPATH": str(self.src)}
        with (self.workdir / "forecaster.log").open("ab") as log:
            self.proc = subprocess.Popen(cmd, stdout=log, stderr=log, cwd=self.src, env=env)
        ports = [self.metrics_port + i for i in range(self.workers)]
        if not wait_until(lambda: self._alive() and all(_ready(p) for p in ports), 120, 0.2):
            raise RuntimeError(f"{self.name} not ready: {self._log_tail()}")
        # Every partition owned, spread evenly (ceil(N / workers) at most each).
        share = -(-self.partitions // self.workers)

        def balanced() -> bool:
            self._alive()
            self.owned = [
                parse_metric(_metrics(p), "forecaster_nats_partitions_owned") for p in ports
            ]
            return sum(self.owned) == self.partitions and max(self.owned) <= share

        if not wait_until(balanced, 120, 0.5):
            raise RuntimeError(f"{self.name}: partitions not spread: {self.owned}")

    def _alive(self) -> bool:
        if self.proc is None or self.proc.poll() is not None:
            raise RuntimeError(f"{self.name} exited: {self._log_tail()}")
        return True

    def _log_tail(self) -> str:
        log = self.workdir / "forecaster.log"
        return log.read_text(errors="replace")[-3000:] if log.exists() else ""

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def stop(self) -> int | None:
        """SIGTERM (the supervisor forwards it to every worker); the exit status."""
        code = None
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                code = self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.server is not None:
            self.server.stop()
        return code


# ------------------------------------------------------------------------------ trials


def nats_trial(
    c: NatsContender,
    *,
    streams: int,
    duration: float,
    window: int,
    mqtt_in: bool = False,
    count: int = 0,
    kind: str = "probe",
) -> dict[str, Any]:
    """One closed-loop trial against a NATS contender; the :func:`_analyse` summary plus CPU."""
    assert c.server is not None
    with tempfile.TemporaryDirectory(prefix="bench-nats-") as tmp:
        t = Path(tmp)
        done, ready, out, counter = t / "done.json", t / "ready", t / "sub.npz", t / "counter"
        counter.write_bytes(b"\0" * 8)
        timeout = duration + 120
        sub = subprocess.Popen(
            [
                *(PY, "-m", "benchmarks.nats", "sub", "--port", str(c.server.port)),
                *("--out", str(out), "--done", str(done), "--ready", str(ready)),
                *("--counter", str(counter), "--grace", str(max(30.0, duration * 3))),
                *("--timeout", str(timeout)),
            ],
            cwd=ROOT,
        )
        wait_file(ready, 30, sub)
        time.sleep(0.2)  # the SUB reaches the server before the first reading does
        if mqtt_in:
            pub_cmd = [PY, "-m", "benchmarks.loadgen", "pub", "--port", str(c.server.mqtt_port)]
            pub_cmd += ["--mode", "single", "--qos", "1"]
        else:
            pub_cmd = [PY, "-m", "benchmarks.nats", "pub", "--port", str(c.server.port)]
        pub_cmd += ["--streams", str(streams), "--rate", "0", "--duration", str(duration)]
        pub_cmd += ["--count", str(count), "--done", str(done)]
        pub_cmd += ["--window", str(window), "--counter", str(counter)]
        server_pid = c.server.pid
        cpu0, scpu0 = tree_cpu(c.pid), cpu_seconds(server_pid)
        pub = subprocess.Popen(pub_cmd, cwd=ROOT)
        pcpu = 0.0
        while pub.poll() is None:
            pcpu = max(pcpu, cpu_seconds(pub.pid))
            time.sleep(0.1)
        sub_cpu = cpu_seconds(sub.pid)
        sub.wait(timeout=timeout + 30)
        cpu1, scpu1 = tree_cpu(c.pid), cpu_seconds(server_pid)
        info = json.loads(done.read_text())
        rec = np.load(out)
        trial = _analyse(kind, 0.0, info, rec)
        # the generators' own count, without their interpreters' start-up
        pcpu = float(info.get("cpu_s", pcpu))
        sub_cpu = float(rec["cpu_s"]) if "cpu_s" in rec.files else sub_cpu
    trial.cpu_s = cpu1 - cpu0
    trial.broker_cpu_s = scpu1 - scpu0
    trial.cpu_s_per_million = trial.cpu_s / trial.received * 1e6 if trial.received else 0.0
    trial.rss_kb = tree_rss_kb(c.pid)
    summary = trial.summary()
    summary["publisher_cpu_s"] = pcpu
    summary["subscriber_cpu_s_at_end"] = sub_cpu
    if trial.received:
        everything = trial.cpu_s + trial.broker_cpu_s + pcpu + sub_cpu
        summary["all_cpu_s_per_million"] = everything / trial.received * 1e6
    return summary


def paho_trial(
    c: Contender, broker: Broker, *, streams: int, duration: float, window: int, kind: str
) -> dict[str, Any]:
    t = run_trial(
        c, broker, Load("single", 1, streams), duration=duration, window=window, kind=kind
    )
    return t.summary()


@dataclass
class Settings:
    streams: int = 1000
    duration: float = 8.0
    repeats: int = 3
    window: int = 5000
    partitions: int = 12
    warmup: float = 3.0
    lease_ttl: float | None = None  # None: the config default
    interleave: bool = False
    takeover: bool = True
    takeover_rate: float = 1000.0
    takeover_duration: float = 20.0
    contenders: tuple[str, ...] = ("paho", "nats-1", "nats-2", "nats-1-mqtt-in")
    pull_batch: int | None = None  # None: the config default
    baseline_tree: Path | None = None
    #: py-spy the first trial of every NATS contender into <this stem>-profile-<name>.txt
    profile_to: Path | None = None


#: contender names: paho, or nats-<workers>[-core][-mqtt-in][-base]
CONTENDER = re.compile(r"^(paho|nats-[12](-core)?(-mqtt-in)?(-base)?)$")


def _median(trials: list[dict[str, Any]], key: str) -> float:
    return float(statistics.median(t[key] for t in trials)) if trials else 0.0


def _summarise(name: str, trials: list[dict[str, Any]], extra: dict[str, Any]) -> dict[str, Any]:
    rates = [t["delivered"] for t in trials]
    lost = sum(t["lost"] for t in trials)
    return {
        "readings_per_s": _median(trials, "delivered"),
        "readings_per_s_each": rates,
        "lost": lost,
        "cpu_s_per_million": _median(trials, "cpu_s_per_million"),
        "server_cpu_s_per_million": float(
            statistics.median(
                t["broker_cpu_s"] / t["received"] * 1e6 for t in trials if t["received"]
            )
        )
        if any(t["received"] for t in trials)
        else None,
        "p50_ms": _median([t for t in trials if t["latency_ms"]], "latency_ms_p50"),
        "p99_ms": _median([t for t in trials if t["latency_ms"]], "latency_ms_p99"),
        "rss_kb": max((t["rss_kb"] for t in trials), default=0),
        # the whole loop on this machine (forecaster, server, publisher, subscriber): what
        # bounds the rate when they all share the same cores
        "all_cpu_s_per_million": _median(
            [t for t in trials if "publisher_cpu_s" in t and t["received"]], "all_cpu_s_per_million"
        )
        or None,
        "trials": trials,
        **extra,
    }


def _flatten_latency(t: dict[str, Any]) -> dict[str, Any]:
    t["latency_ms_p50"] = t["latency_ms"].get("p50", float("nan"))
    t["latency_ms_p99"] = t["latency_ms"].get("p99", float("nan"))
    return t


class PahoContender:
    """``forecaster serve`` on a private mosquitto: the MQTT/paho path of ``benchmarks.run``."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.broker: Broker | None = None
        self.c: Contender | None = None
        self.extra: dict[str, Any] = {}

    def start(self) -> None:
        broker = Broker(self.workdir / "broker")
        broker.start()
        self.broker = broker
        self.c = Contender("forecaster", self.workdir / "forecaster", broker.port, BUNDLE, 1)
        self.c.start()

    def trial(self, s: Settings, duration: float, kind: str) -> dict[str, Any]:
        assert self.c is not None and self.broker is not None
        return paho_trial(
            self.c, self.broker, streams=s.streams, duration=duration, window=s.window, kind=kind
        )

    def stop(self) -> None:
        if self.c is not None:
            if self.c.proc is not None and self.c.proc.poll() is None:
                self.extra["peak_rss_kb"] = memory_kb(self.c.pid).get("VmHWM", 0)
            self.c.stop()
            self.c = None
        if self.broker is not None:
            self.broker.stop()
            self.broker = None


class NatsRunner:
    """A :class:`NatsContender` with the trial method of the rounds."""

    def __init__(self, workdir: Path, name: str, s: Settings) -> None:
        self.name = name
        self.mqtt_in = "-mqtt-in" in name
        workers = 2 if name.startswith("nats-2") else 1
        publish = "core" if "-core" in name else "jetstream"
        base = name.endswith("-base")
        if base and s.baseline_tree is None:
            raise ValueError(f"{name} needs --baseline-rev")
        self.c = NatsContender(
            name,
            workdir / name,
            workers,
            s.partitions,
            publish=publish,
            lease_ttl=s.lease_ttl,
            pull_batch=s.pull_batch,
            src=s.baseline_tree if base and s.baseline_tree else ROOT,
        )
        self.extra: dict[str, Any] = {
            "workers": workers,
            "partitions": s.partitions,
            "publish": publish,
            "source_tree": str(self.c.src),
        }

    def start(self) -> None:
        started = time.monotonic()
        self.c.start()
        self.extra["ready_and_balanced_s"] = time.monotonic() - started
        self.extra["owned_at_start"] = self.c.owned

    def trial(self, s: Settings, duration: float, kind: str) -> dict[str, Any]:
        spy = None
        if s.profile_to is not None and kind == "probe" and "profile" not in self.extra:
            out = s.profile_to.with_name(f"{s.profile_to.stem}-profile-{self.name}.txt")
            self.extra["profile"] = out.name
            spy = subprocess.Popen(
                [
                    *(str(Path(PY).parent / "py-spy"), "record", "-o", str(out), "-f", "raw"),
                    *("-r", "100", "-d", str(max(1, int(duration))), "--subprocesses"),
                    *("--pid", str(self.c.pid)),
                ],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
        try:
            return nats_trial(
                self.c,
                streams=s.streams,
                duration=duration,
                window=s.window,
                mqtt_in=self.mqtt_in,
                kind=kind,
            )
        finally:
            if spy is not None:
                try:
                    spy.wait(timeout=duration + 30)
                except subprocess.TimeoutExpired:
                    spy.kill()
                    spy.wait()

    def stop(self) -> None:
        if "exit_status" in self.extra:
            return
        # Lease health over the whole run, per worker: why readings waited, if they did.
        health: list[dict[str, float]] = []
        for i in range(self.c.workers):
            try:
                text = _metrics(self.c.metrics_port + i)
                health.append(
                    {
                        name: parse_metric(text, f"forecaster_nats_{name}", default=0.0)
                        for name in (
                            "lease_renew_failures_total",
                            "partitions_lost_total",
                            "takeovers_total",
                            "replayed_readings_total",
                            "partitions_owned",
                        )
                    }
                )
            except Exception as exc:  # a worker that died says so in exit_status
                health.append({"error": repr(exc)})  # type: ignore[dict-item]
        self.extra["lease_health"] = health
        self.extra["exit_status"] = self.c.stop()


def _make(name: str, work: Path, s: Settings) -> PahoContender | NatsRunner:
    return PahoContender(work / name) if name == "paho" else NatsRunner(work, name, s)


def _trial(
    r: PahoContender | NatsRunner, name: str, i: int, s: Settings, log: Any
) -> dict[str, Any]:
    before = list(os.getloadavg())
    try:
        t = _flatten_latency(r.trial(s, s.duration, "probe"))
    except Exception as exc:
        log(f"    {name} trial {i + 1} FAILED: {exc!r}")
        t = {"error": repr(exc)}
    t["load_average"] = {"before": before, "after": list(os.getloadavg())}
    if "error" not in t:
        log(
            f"    trial {i + 1} {name}: {t['delivered']:,.0f} readings/s, lost {t['lost']}, "
            f"p99 {t['latency_ms_p99']:.0f} ms, load {before[0]:.1f}"
        )
    return t


def run_rounds(s: Settings, work: Path, log: Any) -> dict[str, dict[str, Any]]:
    """Every contender's trials; the result per contender.

    Default: one contender at a time (start, warm up, ``repeats`` trials, stop), so the others'
    idle processes (a NATS forecaster polls and renews leases even when idle; measured ~8 % of
    a core each here) take nothing from it. ``interleave``: all started first, then ``repeats``
    rounds of one trial each in rotated order, so a neighbour's burst of load hits every
    contender alike, at the price of that idle background.
    """
    runners: dict[str, PahoContender | NatsRunner] = {}
    results: dict[str, dict[str, Any]] = {}
    trials: dict[str, list[dict[str, Any]]] = {}
    warm_load: dict[str, dict[str, list[float]]] = {}

    def start(name: str) -> PahoContender | NatsRunner | None:
        log(f"starting {name}")
        r = _make(name, work, s)
        try:
            r.start()
            before = list(os.getloadavg())
            r.trial(s, s.warmup, "warmup")
            warm_load[name] = {"before": before, "after": list(os.getloadavg())}
            log(f"    {name} ready and warm {r.extra.get('owned_at_start', '')}")
        except Exception as exc:  # one broken contender must not lose the others
            log(f"    FAILED: {exc!r}")
            results[name] = {"error": repr(exc)}
            r.stop()
            return None
        runners[name] = r
        trials[name] = []
        return r

    try:
        if s.interleave:
            for name in s.contenders:
                start(name)
            names = list(runners)
            for i in range(s.repeats):
                k = i % len(names) if names else 0
                for name in names[k:] + names[:k]:
                    trials[name].append(_trial(runners[name], name, i, s, log))
        else:
            for name in s.contenders:
                r = start(name)
                if r is None:
                    continue
                try:
                    for i in range(s.repeats):
                        trials[name].append(_trial(r, name, i, s, log))
                finally:
                    r.stop()
    finally:
        for r in runners.values():
            r.stop()
    for name, r in runners.items():
        good = [t for t in trials[name] if "error" not in t]
        results[name] = _summarise(name, good, r.extra)
        results[name]["failed_trials"] = [t for t in trials[name] if "error" in t]
        results[name]["load_average"] = {
            "before": trials[name][0]["load_average"]["before"] if trials[name] else [],
            "after": trials[name][-1]["load_average"]["after"] if trials[name] else [],
            "warmup": warm_load.get(name, {}),
        }
    return {n: results[n] for n in s.contenders if n in results}


def run_takeover(s: Settings, work: Path, log: Any) -> dict[str, Any]:
    """kill -9 of one of two independent workers (``serve --worker-id 0`` and ``1``, as the
    template unit runs them) under a steady open-loop load: how long until the survivor owns
    every partition, and whether every reading still gets a prediction."""
    from forecaster.serve.nats.partitions import mappings_for

    wd = work / "takeover"
    wd.mkdir(parents=True, exist_ok=True)
    server = NatsServer(wd / "nats", mappings=mappings_for([FILTER], s.partitions), mqtt=False)
    server.start()
    base = _two_free_ports()
    nats_cfg: dict[str, Any] = {"servers": [server.url], "partitions": s.partitions}
    if s.lease_ttl:
        nats_cfg["lease_ttl"] = s.lease_ttl
    cfg = Config.model_validate(
        {
            "transport": {"kind": "nats"},
            "nats": nats_cfg,
            "daemon": {
                "state_dir": str(wd / "state"),
                "snapshot_interval": 1.0,
                "log_level": "WARNING",
            },
            "metrics": {"port": base, "bind": HOST},
            "routes": [{"name": "bench", "subscribe": [FILTER], "bundle": str(BUNDLE)}],
        }
    )
    path = write_config(cfg, wd / "forecaster.toml")
    procs: list[subprocess.Popen[bytes]] = []
    out: dict[str, Any] = {
        "rate": s.takeover_rate,
        "duration_s": s.takeover_duration,
        "kill_after_s": s.takeover_duration / 4,
        "snapshot_interval": 1.0,
        "lease_ttl": nats_cfg.get("lease_ttl", NATSConfig().lease_ttl),
    }
    try:
        with (wd / "forecaster.log").open("ab") as fh:
            for i in range(2):
                cmd = [
                    PY,
                    "-m",
                    "forecaster",
                    "serve",
                    "--config",
                    str(path),
                    "--worker-id",
                    str(i),
                ]
                procs.append(subprocess.Popen(cmd, stdout=fh, stderr=fh, cwd=ROOT))

        def owned(i: int) -> float:
            try:
                return parse_metric(_metrics(base + i), "forecaster_nats_partitions_owned")
            except OSError:
                return -1.0

        half = s.partitions / 2
        if not wait_until(lambda: owned(0) == half and owned(1) == half, 120, 0.5):
            raise RuntimeError(f"not balanced: {owned(0)}, {owned(1)}")
        with tempfile.TemporaryDirectory(prefix="bench-takeover-") as tmp:
            t = Path(tmp)
            done, ready, rec_path = t / "done.json", t / "ready", t / "sub.npz"
            sub = subprocess.Popen(
                [
                    PY,
                    "-m",
                    "benchmarks.nats",
                    "sub",
                    "--port",
                    str(server.port),
                    "--out",
                    str(rec_path),
                    "--done",
                    str(done),
                    "--ready",
                    str(ready),
                    "--grace",
                    "90",
                    "--timeout",
                    str(s.takeover_duration + 150),
                ],
                cwd=ROOT,
            )
            wait_file(ready, 30, sub)
            time.sleep(0.2)
            pub = subprocess.Popen(
                [
                    PY,
                    "-m",
                    "benchmarks.nats",
                    "pub",
                    "--port",
                    str(server.port),
                    "--streams",
                    str(s.streams),
                    "--rate",
                    str(s.takeover_rate),
                    "--duration",
                    str(s.takeover_duration),
                    "--done",
                    str(done),
                ],
                cwd=ROOT,
            )
            time.sleep(s.takeover_duration / 4)
            procs[1].kill()
            killed = time.monotonic()
            log(f"    kill -9 of worker 1 (pid {procs[1].pid})")
            took = None
            if wait_until(lambda: owned(0) == s.partitions, 120, 0.1):
                took = time.monotonic() - killed
            out["takeover_s"] = took
            pub.wait(timeout=s.takeover_duration + 60)
            sub.wait(timeout=s.takeover_duration + 200)
            info = json.loads(done.read_text())
            rec = np.load(rec_path)
            sent, received, unique = int(info["sent"]), int(rec["received"]), int(rec["unique"])
            chunk_t = rec["chunk_t"]
            gap = float(np.diff(chunk_t).max()) if chunk_t.size > 1 else None
        m = _metrics(base)
        out.update(
            {
                "sent": sent,
                "predictions": received,
                "readings_answered": unique,
                "unanswered": sent - unique,
                "duplicate_predictions": received - unique,
                "longest_gap_between_predictions_s": gap,
                "survivor_takeovers": parse_metric(m, "forecaster_nats_takeovers_total"),
                "survivor_replayed": parse_metric(
                    m, "forecaster_nats_replayed_readings_total", default=0.0
                ),
            }
        )
        log(
            f"    takeover of {s.partitions // 2} partitions: "
            f"{'none' if took is None else f'{took:.1f} s'}; {sent:,} readings sent, "
            f"{sent - unique} unanswered, {received - unique} duplicate predictions, longest gap "
            f"{gap if gap is None else round(gap, 1)} s"
        )
    finally:
        for pr in procs:
            if pr.poll() is None:
                pr.send_signal(signal.SIGTERM)
                try:
                    pr.wait(timeout=60)
                except subprocess.TimeoutExpired:
                    pr.kill()
                    pr.wait()
        out["survivor_exit_status"] = procs[0].returncode if procs else None
        server.stop()
    return out


def ratios(results: dict[str, dict[str, Any]]) -> dict[str, float]:
    def rate(k: str) -> float:
        return float((results.get(k) or {}).get("readings_per_s") or 0.0)

    out: dict[str, float] = {}
    names = [n for n in results if n.startswith("nats-") and rate(n)]
    for n in names:  # every NATS variant against paho
        if rate("paho"):
            out[f"{n} / paho"] = rate(n) / rate("paho")
    for n in names:  # 2 processes against 1, same variant
        one = n.replace("nats-2", "nats-1", 1)
        if n.startswith("nats-2") and rate(one):
            out[f"{n} / {one}"] = rate(n) / rate(one)
    for n in names:  # this tree against the baseline tree, same variant
        base = f"{n}-base"
        if rate(base):
            out[f"{n} / {base}"] = rate(n) / rate(base)
    return out


def targets(results: dict[str, dict[str, Any]], r: dict[str, float]) -> list[dict[str, Any]]:
    values = {
        "nats-1 readings/s": (results.get("nats-1") or {}).get("readings_per_s"),
        "nats-1 / paho": r.get("nats-1 / paho"),
        "nats-2 / nats-1": r.get("nats-2 / nats-1"),
    }
    out = []
    for name, goal in TARGETS.items():
        v = values[name]
        out.append(
            {
                "target": f"{name} >= {goal:g}",
                "value": v,
                "goal": goal,
                "met": None if v is None else v >= goal,
            }
        )
    return out


def markdown(report: dict[str, Any]) -> str:
    m = report["machine"]
    lines = [
        f"# NATS benchmark {report['started']}",
        "",
        f"Command: `{report['command']}`. Machine: {m['cores']} cores, {m['cpu_model']}, "
        f"{m['nats_server']}; load average {m['load_average_start'][0]:.2f} at start, "
        f"{m.get('load_average_end', [float('nan')])[0]:.2f} at end (shared machine: compare "
        "the ratios of this run).",
        "",
        f"Single-reading JSON messages over {report['settings']['streams']:,} streams, closed "
        f"loop (at most {report['settings']['window']:,} readings unanswered), "
        f"{report['settings']['repeats']} trials of {report['settings']['duration']:g} s per "
        "contender, median; at-least-once settings everywhere.",
        "",
        "Unanswered at end: readings without a prediction when the subscriber gave up (8 s "
        "without any prediction, or 30 s after publishing ended): lost, or later than that.",
        "CPU s per 1M (all four): forecaster + nats-server + publisher + subscriber, per million "
        "readings; cores' ceiling: the rate at which they would use every core of this machine "
        "(NATS contenders; everything runs on the same cores).",
        "",
        "| contender | readings/s (median) | trials | unanswered at end | p50 / p99 ms "
        "| CPU s per 1M "
        "(forecaster) | CPU s per 1M (server) | CPU s per 1M (all four) | cores' ceiling "
        "| load avg before → after |",
        "|---|---:|---|---:|---|---:|---:|---:|---:|---|",
    ]
    for name, r in report["contenders"].items():
        if "error" in r:
            lines.append(f"| {name} | failed: {r['error'][:80]} | | | | | | | | |")
            continue
        la = r.get("load_average", {})
        each = ", ".join(f"{x:,.0f}" for x in r["readings_per_s_each"])
        server = r.get("server_cpu_s_per_million")
        every = r.get("all_cpu_s_per_million")
        ceiling = f"{m['cores'] * 1e6 / every:,.0f}" if every else ""
        lines.append(
            f"| {name} | {r['readings_per_s']:,.0f} | {each} | {r['lost']} | "
            f"{r['p50_ms']:.1f} / {r['p99_ms']:.1f} | {r['cpu_s_per_million']:.0f} | "
            f"{'' if server is None else f'{server:.0f}'} | "
            f"{'' if every is None else f'{every:.0f}'} | {ceiling} | "
            f"{la.get('before', [0])[0]:.2f} → {la.get('after', [0])[0]:.2f} |"
        )
    health = [
        (name, w)
        for name, r in report["contenders"].items()
        for w in r.get("lease_health", [])
        if "error" not in w
    ]
    if health:
        lines += [
            "",
            "Lease health over the run, per NATS process (a lost lease stops its partition; its "
            "readings wait for the next owner):",
            "",
            "| contender | lease renewal failures | partitions lost | takeovers | replayed |",
            "|---|---:|---:|---:|---:|",
        ]
        lines += [
            f"| {name} | {w['lease_renew_failures_total']:.0f} | "
            f"{w['partitions_lost_total']:.0f} | {w['takeovers_total']:.0f} | "
            f"{w['replayed_readings_total']:.0f} |"
            for name, w in health
        ]
    lines += ["", "| ratio (same run) | value |", "|---|---:|"]
    lines += [f"| {k} | {v:.2f} |" for k, v in report["ratios"].items()]
    lines += ["", "| target (issue 14) | measured | met |", "|---|---:|---|"]
    for t in report["targets"]:
        v = t["value"]
        met = "not measured" if t["met"] is None else ("yes" if t["met"] else "**no**")
        lines.append(f"| {t['target']} | {'—' if v is None else f'{v:,.2f}'} | {met} |")
    tk = report.get("takeover")
    if tk:
        lines += ["", "## Takeover after kill -9 (two workers, open-loop load)", ""]
        if "error" in tk:
            lines.append(f"failed: {tk['error']}")
        else:
            took = tk.get("takeover_s")
            lines += [
                f"{tk['rate']:,.0f} readings/s offered for {tk['duration_s']:g} s, worker 1 "
                f"killed after {tk['kill_after_s']:g} s (lease_ttl {tk['lease_ttl']:g} s, "
                f"snapshot_interval {tk['snapshot_interval']:g} s).",
                "",
                "| takeover (survivor owns every partition) | readings sent | unanswered | "
                "duplicate predictions | longest gap between predictions | replayed |",
                "|---:|---:|---:|---:|---:|---:|",
                f"| {'never' if took is None else f'{took:.1f} s'} | {tk['sent']:,} | "
                f"{tk['unanswered']} | {tk['duplicate_predictions']} | "
                f"{tk['longest_gap_between_predictions_s'] or 0:.1f} s | "
                f"{tk['survivor_replayed']:,.0f} |",
            ]
    return "\n".join(lines) + "\n"


def baseline_tree(rev: str, dest: Path) -> Path:
    """This working tree's ``forecaster`` package with ``forecaster/serve/nats`` from ``rev``."""
    shutil.copytree(
        ROOT / "forecaster", dest / "forecaster", ignore=shutil.ignore_patterns("__pycache__")
    )
    shutil.rmtree(dest / "forecaster" / "serve" / "nats")
    archive = subprocess.run(
        ["git", "archive", rev, "forecaster/serve/nats"], cwd=ROOT, capture_output=True, check=True
    )
    subprocess.run(["tar", "-x", "-C", str(dest)], input=archive.stdout, check=True)
    return dest


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if args and args[0] in ("pub", "sub"):
        return _generator(args)
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.nats",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--streams", type=int, default=1000)
    p.add_argument("--duration", type=float, default=8.0, help="seconds per trial")
    p.add_argument("--repeats", type=int, default=3, help="trials per contender (median)")
    p.add_argument("--window", type=int, default=5000, help="readings unanswered at most")
    p.add_argument("--partitions", type=int, default=12)
    p.add_argument("--contenders", default="paho,nats-1,nats-2,nats-1-mqtt-in")
    p.add_argument(
        "--lease-ttl", type=float, default=None, help="nats.lease_ttl (default: the config's)"
    )
    p.add_argument(
        "--interleave",
        action="store_true",
        help="all contenders up at once, trials in rotated rounds (default: one at a time)",
    )
    p.add_argument(
        "--no-takeover", action="store_true", help="skip the kill -9 takeover measurement"
    )
    p.add_argument("--takeover-rate", type=float, default=1000.0, help="readings/s offered")
    p.add_argument(
        "--pull-batch", type=int, default=None, help="nats.pull_batch (default: the config's)"
    )
    p.add_argument(
        "--profile",
        action="store_true",
        help="py-spy the first trial of each NATS contender (raw stacks beside the results)",
    )
    p.add_argument(
        "--baseline-rev",
        default=None,
        help="git revision whose forecaster/serve/nats the `-base` contenders run (on this "
        "working tree's other modules), to compare two versions of the transport in one run",
    )
    p.add_argument("--quick", action="store_true", help="1 trial of 3 s each (a smoke run)")
    p.add_argument("--out", type=Path, default=None, help="result JSON path (.md beside it)")
    a = p.parse_args(args)
    s = Settings(
        streams=a.streams,
        duration=a.duration,
        repeats=a.repeats,
        window=a.window,
        partitions=a.partitions,
        contenders=tuple(c for c in a.contenders.split(",") if c),
        lease_ttl=a.lease_ttl,
        interleave=a.interleave,
        takeover=not a.no_takeover,
        takeover_rate=a.takeover_rate,
        pull_batch=a.pull_batch,
    )
    if a.quick:
        s.duration, s.repeats, s.warmup = 3.0, 1, 1.5
    unknown = {c for c in s.contenders if not CONTENDER.match(c)}
    if any(c.endswith("-base") for c in s.contenders) and a.baseline_rev is None:
        p.error("-base contenders need --baseline-rev")
    if unknown:
        p.error(f"unknown contender(s): {', '.join(sorted(unknown))}")
    nats_server_binary()  # fail early, with the install hint
    RESULTS.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    out = a.out or RESULTS / f"nats-{stamp}.json"
    if a.profile:
        if not (Path(PY).parent / "py-spy").exists():
            p.error(f"--profile needs py-spy beside {PY} (pip install py-spy)")
        s.profile_to = out
    version = subprocess.run([nats_server_binary(), "--version"], capture_output=True, text=True)
    report: dict[str, Any] = {
        "command": " ".join([".venv/bin/python -m benchmarks.nats", *args]).strip(),
        "started": stamp,
        "machine": {
            **host_info(("forecaster", "nats-py", "paho-mqtt", "onnxruntime", "numpy")),
            "nats_server": version.stdout.strip() or version.stderr.strip(),
        },
        "settings": {
            "streams": s.streams,
            "duration": s.duration,
            "repeats": s.repeats,
            "window": s.window,
            "partitions": s.partitions,
            "warmup_s": s.warmup,
            "nats_lease_ttl": s.lease_ttl or NATSConfig().lease_ttl,
            "order": "interleaved rounds" if s.interleave else "one contender at a time",
            "measure": "closed loop; delivered readings/s in the steady 75 % of each trial",
            "at_least_once": {
                "paho": "QoS 1 in and out; a reading acked after its prediction's PUBACK",
                "nats": "nats.publish = 'jetstream': a batch acked (AckPolicy ALL) after its "
                "predictions' PubAcks",
                "nats-*-core": "nats.publish = 'core': a batch acked after its predictions were "
                "flushed to the server (readings at-least-once, predictions at-most-once)",
            },
            "pull_batch": s.pull_batch or NATSConfig().pull_batch,
            "baseline": f"forecaster/serve/nats at {a.baseline_rev}, the rest of this tree"
            if a.baseline_rev
            else None,
        },
        "contenders": {},
    }
    started = time.monotonic()

    def log(msg: str) -> None:
        print(msg, flush=True)

    with tempfile.TemporaryDirectory(prefix="forecaster-bench-nats-") as tmp:
        if a.baseline_rev:
            s.baseline_tree = baseline_tree(a.baseline_rev, Path(tmp) / "baseline")
        report["contenders"] = run_rounds(s, Path(tmp), log)
        if s.takeover:
            log("takeover: two workers, kill -9 of one under load")
            try:
                report["takeover"] = run_takeover(s, Path(tmp), log)
            except Exception as exc:
                log(f"    FAILED: {exc!r}")
                report["takeover"] = {"error": repr(exc)}
    report["machine"]["load_average_end"] = list(os.getloadavg())
    report["ratios"] = ratios(report["contenders"])
    report["targets"] = targets(report["contenders"], report["ratios"])
    report["elapsed_s"] = time.monotonic() - started
    out.write_text(json.dumps(report, indent=1))
    md = out.with_suffix(".md")
    md.write_text(markdown(report))
    print(markdown(report))
    print(f"results: {out} and {md.name} ({report['elapsed_s']:.0f} s)")
    failed = [n for n, r in report["contenders"].items() if "error" in r]
    return 1 if failed else 0


def _generator(args: list[str]) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.nats")
    sp = p.add_subparsers(dest="cmd", required=True)
    pub = sp.add_parser("pub")
    pub.add_argument("--port", type=int, required=True)
    pub.add_argument("--streams", type=int, default=1000)
    pub.add_argument("--rate", type=float, default=0.0, help="readings/s; 0 = closed loop")
    pub.add_argument("--duration", type=float, default=4.0)
    pub.add_argument("--count", type=int, default=0)
    pub.add_argument("--window", type=int, default=5000)
    pub.add_argument("--counter", default="")
    pub.add_argument("--done", required=True)
    sub = sp.add_parser("sub")
    sub.add_argument("--port", type=int, required=True)
    sub.add_argument("--out", required=True)
    sub.add_argument("--done", required=True)
    sub.add_argument("--ready", required=True)
    sub.add_argument("--counter", default="")
    sub.add_argument("--grace", type=float, default=10.0)
    sub.add_argument("--timeout", type=float, default=120.0)
    a = p.parse_args(args)
    if a.cmd == "pub":
        run_pub(a)
    else:
        run_sub(a)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
