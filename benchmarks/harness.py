"""Broker, contender processes, trials and the sustained-rate search.

A *trial* is one load-generator run against a running contender: a subscriber process, then a
publisher process at a fixed offered rate (open loop) or with a bounded number of readings in
flight (closed loop, to find the saturation rate), then the subscriber's record of every
prediction it saw. A contender is *sustained* at a rate when, at the end of publishing, fewer
than 0.25 s worth of readings are still on their way and nothing was lost.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.procstat import cpu_seconds, memory_kb, thread_cpu_seconds
from benchmarks.rawmqtt import HOST, purge_session
from forecaster import harness
from forecaster.harness import DaemonProcess, HarnessError, wait_file, write_config
from forecaster.serve.config import Config

ROOT = Path(__file__).resolve().parents[1]
PY = sys.executable
LAG_LIMIT_S = 0.25  # backlog allowed at the end of an open-loop trial, in seconds of load
LAT_SKIP_S = 0.5  # latency statistics leave out the first half second of each trial

__all__ = ["Broker", "Contender", "Load", "Settings", "Trial", "run_trial", "search", "wait_file"]


# ---------------------------------------------------------------------------------- broker


class Broker(harness.Broker):
    """A private mosquitto on 127.0.0.1, tuned so the broker never drops silently: no
    persistence, per-client queues far beyond any trial's backlog, no in-flight limit."""

    def __init__(self, workdir: Path) -> None:
        super().__init__(
            workdir,
            host=HOST,
            persistence=False,
            max_queued_messages=2_000_000,
            max_queued_bytes=0,
            max_inflight_messages=0,
            tcp_nodelay=True,
        )


# ---------------------------------------------------------------------------------- contenders


def bench_config(port: int, client_id: str, bundle: Path, qos: int, state_dir: Path) -> Config:
    """The daemon config all contenders read: production defaults except what a benchmark must
    not measure (snapshots, INFO logging) and a stream limit no scenario reaches."""
    return Config.model_validate(
        {
            "mqtt": {"host": HOST, "port": port, "client_id": client_id},
            "daemon": {
                "state_dir": str(state_dir),
                "snapshot_interval": 0,
                "log_level": "WARNING",
            },
            "metrics": {"port": harness.free_port(HOST)},
            "routes": [
                {
                    "name": "bench",
                    "subscribe": ["sensors/+/flow", "gateway/batch"],
                    "bundle": str(bundle),
                    "qos": qos,
                    "max_streams": 2_000_000,
                }
            ],
        }
    )


#: Suffix of a contender run with ``mqtt.buffered_reads = false`` (paho's own socket reads).
PLAIN = "-plain"
#: The daemon with ``daemon.gc_tuning = false`` (CPython's default garbage-collector settings).
DEFAULT_GC = "forecaster-defaultgc"


@dataclass
class Contender:
    """One contender process for one scenario."""

    kind: str  # ceiling | naive | forecaster | gmqtt, ceiling-plain | forecaster-plain, DEFAULT_GC
    workdir: Path
    port: int
    bundle: Path
    qos: int
    proc: subprocess.Popen[bytes] | None = None
    client_id: str = ""

    def start(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.client_id = f"bench-{self.kind}-{os.getpid()}-{int(time.time() * 1000) % 10**8}"
        cfg = bench_config(self.port, self.client_id, self.bundle, self.qos, self.workdir / "state")
        if self.kind.endswith(PLAIN):  # the same contender on paho's own per-packet reads
            cfg.mqtt.buffered_reads = False
        if self.kind == DEFAULT_GC:
            cfg.daemon.gc_tuning = False
        if self.kind.removesuffix(PLAIN) == "forecaster" or self.kind == DEFAULT_GC:
            # the real daemon: started and waited for (/readyz) by the shared harness
            daemon = DaemonProcess(cfg, self.workdir, "contender", cwd=ROOT, python=PY)
            daemon.start()
            self.proc = daemon.proc
            return
        path = write_config(cfg, self.workdir / "contender.toml")
        ready = self.workdir / "ready"
        cmd = [PY, "-m", "benchmarks.contenders", self.kind, "--config", str(path)]
        cmd += ["--ready", str(ready)]
        with (self.workdir / "contender.log").open("ab") as log:
            self.proc = subprocess.Popen(cmd, stdout=log, stderr=log, cwd=ROOT)
        wait_file(ready, 60, self.proc)

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        # Persistent sessions would otherwise keep queueing readings for a contender that left.
        for cid in (self.client_id, f"{self.client_id}-gmqtt"):
            try:
                purge_session(self.port, cid)
            except OSError:
                pass


# ---------------------------------------------------------------------------------- trials


@dataclass
class Load:
    """What the publisher sends."""

    mode: str  # single | batch
    qos: int
    streams: int
    batch: int = 100

    @property
    def per_msg(self) -> int:
        return self.batch if self.mode == "batch" else 1


@dataclass
class Trial:
    kind: str  # probe | rate | preload
    offered: float  # readings/s asked for (0 = closed loop)
    sent: int = 0
    received: int = 0
    lost: int = 0
    duration_s: float = 0.0
    offered_actual: float = 0.0  # sent / publishing time
    delivered: float = 0.0  # readings/s received during the steady part of the window
    lag_end_s: float = 0.0  # backlog at the end of publishing, in seconds of offered load
    passed: bool = False
    latency_ms: dict[str, float] = field(default_factory=dict)
    cpu_s: float = 0.0  # contender CPU during the trial
    broker_cpu_s: float = 0.0
    cpu_s_per_million: float = 0.0
    rss_kb: int = 0
    curve: list[list[float]] = field(default_factory=list)  # (offered, p99 ms) for the plot
    thread_cpu_s: dict[int, float] = field(default_factory=dict)  # profiled trials: by thread id

    def summary(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("curve")
        return d


def run_trial(
    contender: Contender,
    broker: Broker,
    load: Load,
    *,
    rate: float = 0.0,
    duration: float = 4.0,
    window: int = 2000,
    count: int = 0,
    kind: str = "rate",
    profile_to: Path | None = None,
) -> Trial:
    with tempfile.TemporaryDirectory(prefix="bench-trial-") as tmp:
        t = Path(tmp)
        done, ready, out = t / "done.json", t / "ready", t / "sub.npz"
        counter = t / "counter"
        counter.write_bytes(b"\0" * 8)
        closed = rate <= 0
        timeout = duration + 120 if count else duration + 60
        sub = subprocess.Popen(
            [
                *(PY, "-m", "benchmarks.loadgen", "sub", "--port", str(broker.port)),
                *("--out", str(out), "--done", str(done), "--ready", str(ready)),
                *("--counter", str(counter), "--grace", str(max(5.0, duration * 2))),
                *("--timeout", str(timeout)),
            ],
            cwd=ROOT,
        )
        wait_file(ready, 15, sub)
        cpu0, bcpu0 = cpu_seconds(contender.pid), cpu_seconds(broker.pid)
        pub_cmd = [PY, "-m", "benchmarks.loadgen", "pub", "--port", str(broker.port)]
        pub_cmd += ["--mode", load.mode, "--batch", str(load.batch), "--qos", str(load.qos)]
        pub_cmd += ["--streams", str(load.streams), "--rate", str(rate)]
        pub_cmd += ["--duration", str(duration), "--count", str(count), "--done", str(done)]
        if closed:
            pub_cmd += ["--window", str(window), "--counter", str(counter)]
        pub = subprocess.Popen(pub_cmd, cwd=ROOT)
        spy: subprocess.Popen[bytes] | None = None
        threads0: dict[int, float] = {}
        if profile_to is not None:
            threads0 = thread_cpu_seconds(contender.pid)
            spy = start_profile(contender.pid, profile_to, duration)
        pub.wait(timeout=timeout)
        sub.wait(timeout=timeout + 30)
        cpu1, bcpu1 = cpu_seconds(contender.pid), cpu_seconds(broker.pid)
        threads1 = thread_cpu_seconds(contender.pid) if profile_to is not None else {}
        if spy is not None:
            spy.wait(timeout=60)
        info = json.loads(done.read_text())
        rec = np.load(out)
        trial = _analyse(kind, rate, info, rec)
    trial.cpu_s = cpu1 - cpu0
    trial.broker_cpu_s = bcpu1 - bcpu0
    trial.cpu_s_per_million = trial.cpu_s / trial.received * 1e6 if trial.received else 0.0
    trial.rss_kb = memory_kb(contender.pid).get("VmRSS", 0)
    trial.thread_cpu_s = {t: c - threads0.get(t, 0.0) for t, c in threads1.items()}
    return trial


def _analyse(kind: str, rate: float, info: dict[str, Any], rec: Any) -> Trial:
    t0, t1 = float(info["t_start"]), float(info["t_end"])
    span = max(t1 - t0, 1e-6)
    sent = int(info["sent"])
    received = int(rec["received"])
    chunk_t, chunk_n = rec["chunk_t"], rec["chunk_n"]
    by_end = int(chunk_n[chunk_t <= t1].sum())
    steady = (chunk_t >= t0 + 0.25 * span) & (chunk_t <= t1)
    delivered = float(chunk_n[steady].sum()) / (0.75 * span)
    offered_actual = sent / span
    lag = max(0, sent - by_end)
    lat_t, lat = rec["lat_t"], rec["lat"]
    sel = lat[lat_t >= t0 + LAT_SKIP_S] if span > 2 * LAT_SKIP_S else lat
    latency: dict[str, float] = {}
    if sel.size:
        latency = {
            "p50": float(np.percentile(sel, 50) * 1e3),
            "p99": float(np.percentile(sel, 99) * 1e3),
            "max": float(sel.max() * 1e3),
            "n": int(sel.size),
        }
    lost = max(0, sent - received)
    lag_s = lag / offered_actual if offered_actual else 0.0
    passed = lost <= 0.001 * sent and lag_s <= LAG_LIMIT_S and offered_actual >= 0.9 * rate
    return Trial(
        kind=kind,
        offered=rate,
        sent=sent,
        received=received,
        lost=lost,
        duration_s=span,
        offered_actual=offered_actual,
        delivered=delivered,
        lag_end_s=lag_s,
        passed=passed,
        latency_ms=latency,
    )


def py_spy() -> str | None:
    """The py-spy executable (the venv's first), or None when it is not installed."""
    return shutil.which("py-spy", path=str(Path(PY).parent)) or shutil.which("py-spy")


def start_profile(pid: int, out: Path, duration: float) -> subprocess.Popen[bytes]:
    """py-spy, sampling without pausing the target, collapsed stacks with thread names.

    Only the thread holding the GIL is sampled (``--gil``): one process runs one thread of
    Python at a time, so that is what bounds its throughput. ONNX Runtime, which lets the GIL
    go while it runs, and threads waiting for the GIL are left out (a profile without it
    counted a thread waiting for the GIL as busy in whatever line it waited at)."""
    spy = py_spy() or "py-spy"
    cmd = [spy, "record", "--pid", str(pid), "--duration", str(max(1, int(duration)))]
    cmd += [
        "--rate",
        "200",
        "--format",
        "raw",
        "--threads",
        "--nonblocking",
        "--gil",
        "-o",
        str(out),
    ]
    return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def thread_names(path: Path) -> dict[int, str]:
    """Thread id to name, from py-spy's collapsed stacks (``thread (ID): NAME;frame;...``)."""
    names: dict[int, str] = {}
    if path.exists():
        for line in path.read_text().splitlines():
            head = line.split(";", 1)[0]
            if head.startswith("thread (") and "): " in head:
                tid, _, name = head[len("thread (") :].partition("): ")
                if tid.isdigit():
                    names[int(tid)] = name
    return names


def thread_cpu(trial: Trial, names: dict[int, str]) -> dict[str, float]:
    """CPU µs per reading of each thread that used any in a profiled trial, busiest first
    (unnamed threads: ONNX Runtime's, the main thread, ... by id)."""
    if not trial.received:
        return {}
    per = {
        names.get(tid, f"thread {tid}"): round(cpu / trial.received * 1e6, 2)
        for tid, cpu in trial.thread_cpu_s.items()
        if cpu > 0
    }
    return dict(sorted(per.items(), key=lambda kv: -kv[1]))


def summarise_profile(path: Path, top: int = 12) -> dict[str, Any]:
    """Per thread: sample share; overall: the leaf functions and the inclusive hot frames."""
    if not path.exists():
        return {"error": "py-spy produced no profile (ptrace not permitted?)"}
    leaf: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    threads: Counter[str] = Counter()
    total = 0
    for line in path.read_text().splitlines():
        stack, _, n = line.rpartition(" ")
        if not stack or not n.isdigit():
            continue
        count = int(n)
        frames = stack.split(";")
        total += count
        threads[frames[0]] += count
        leaf[_short(frames[-1])] += count
        for f in set(map(_short, frames[1:])):
            inclusive[f] += count
    if not total:
        return {"error": "empty profile"}

    def share(c: Counter[str]) -> list[list[Any]]:
        return [[k, round(100.0 * v / total, 1)] for k, v in c.most_common(top)]

    return {
        "samples": total,
        "threads_pct": share(threads),
        "self_pct": share(leaf),
        "inclusive_pct": share(inclusive),
    }


def _short(frame: str) -> str:
    # py-spy raw frames look like "function (path/to/file.py:123)"; keep function and file.
    name, _, where = frame.partition(" (")
    file = where.rsplit("/", 1)[-1].split(":", 1)[0] if where else ""
    return f"{name} ({file})" if file else name


# ---------------------------------------------------------------------------------- search


@dataclass
class Settings:
    duration: float = 4.0
    probe_duration: float = 4.0
    fractions: tuple[float, ...] = (1.0, 0.9, 0.8, 0.65, 0.5, 0.35, 0.2)
    # When the probe's own rate passes, higher ones are tried while they pass: a probe that
    # stalled for a moment (seen: the naive daemon's at a third of its rate) must not cap it.
    up_fractions: tuple[float, ...] = (1.25, 1.5)
    latency_points: tuple[float, ...] = (0.5, 0.9)
    max_trials: int = 5  # open-loop trials in the search, at most
    profile: bool = True  # py-spy the daemon at saturation (where a scenario asks for it)


def _last_line(contender: Contender) -> str:
    """The last line of the contender's log, to say why it answered nothing."""
    path = contender.workdir / "contender.log"
    lines = path.read_text(errors="replace").strip().splitlines() if path.exists() else []
    return f": {lines[-1][:300]}" if lines else ""


def window_for(load: Load) -> int:
    return 3000 if load.mode == "batch" else 1000


def search(
    contender: Contender,
    broker: Broker,
    load: Load,
    s: Settings,
    log: Any = print,
    profile_to: Path | None = None,
) -> dict[str, Any]:
    """Saturation probe, a short descending search for the sustained rate, latency points."""
    probe = run_trial(
        contender,
        broker,
        load,
        duration=s.probe_duration,
        window=window_for(load),
        kind="probe",
        profile_to=profile_to,
    )
    log(
        f"    probe: {probe.delivered:,.0f} readings/s closed-loop "
        f"(p99 {probe.latency_ms.get('p99', float('nan')):.1f} ms)"
    )
    if probe.received == 0:  # every message failed (see the contender's log): not a rate
        raise HarnessError(f"{contender.kind} answered nothing in the probe{_last_line(contender)}")
    ceiling = probe.delivered
    trials = [probe]
    best: Trial | None = None
    for f in s.fractions[: s.max_trials]:
        rate = f * ceiling
        if rate < 10:
            break
        t = run_trial(contender, broker, load, rate=rate, duration=s.duration)
        trials.append(t)
        log(
            f"    {rate:>10,.0f}/s: {'ok ' if t.passed else 'NO '} lag {t.lag_end_s:.2f} s, "
            f"lost {t.lost}, p99 {t.latency_ms.get('p99', float('nan')):.1f} ms"
        )
        if t.passed:
            best = t
            break
    if best is not None and best is trials[1]:  # the probe's rate passed: look above it
        for f in s.up_fractions:
            t = run_trial(contender, broker, load, rate=f * ceiling, duration=s.duration)
            trials.append(t)
            log(
                f"    {f * ceiling:>10,.0f}/s: {'ok ' if t.passed else 'NO '} lag "
                f"{t.lag_end_s:.2f} s, lost {t.lost}, p99 "
                f"{t.latency_ms.get('p99', float('nan')):.1f} ms (above the probe)"
            )
            if not t.passed:
                break
            best = t
    sustained = best.offered_actual if best else 0.0
    points: dict[str, Any] = {}
    if best is not None:
        for frac in s.latency_points:
            t = run_trial(contender, broker, load, rate=frac * sustained, duration=s.duration)
            trials.append(t)
            points[f"{round(frac * 100)}%"] = {
                "rate": t.offered_actual,
                "passed": t.passed,
                **t.latency_ms,
            }
            log(
                f"    latency at {frac:.0%} ({t.offered_actual:,.0f}/s): "
                f"p50 {t.latency_ms.get('p50', float('nan')):.1f} / "
                f"p99 {t.latency_ms.get('p99', float('nan')):.1f} / "
                f"max {t.latency_ms.get('max', float('nan')):.1f} ms"
            )
    return {
        "probe_readings_per_s": ceiling,
        "sustained_readings_per_s": sustained,
        "latency_ms": points,
        "cpu_s_per_million": best.cpu_s_per_million if best else probe.cpu_s_per_million,
        "broker_cpu_s_per_million": (
            (best.broker_cpu_s / best.received * 1e6) if best and best.received else None
        ),
        "curve": [
            [t.offered_actual, t.delivered, t.latency_ms.get("p99", float("nan"))]
            for t in trials
            if t.kind == "rate"
        ],
        "trials": [t.summary() for t in trials],
    }
