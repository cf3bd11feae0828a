"""``python -m benchmarks.run [--quick]``: the whole benchmark, results to benchmarks/results/.

Each scenario starts its own mosquitto on 127.0.0.1; its contenders run one after the other on
that broker, so their figures are comparable (the machine is shared: compare ratios, not
absolute numbers across runs). The default matrix takes about 15-20 minutes on 2 cores;
``--quick`` runs the main scenario only with short trials (about 2 minutes).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from benchmarks.harness import (
    ROOT,
    Broker,
    Contender,
    Load,
    Settings,
    py_spy,
    run_trial,
    search,
    summarise_profile,
    thread_cpu,
    thread_names,
    window_for,
)
from benchmarks.procstat import host_info, memory_kb

RESULTS = ROOT / "benchmarks" / "results"
CACHE = ROOT / "benchmarks" / ".cache"
DEFAULT_MODEL = "lstm-2x64"
MAIN = ("ceiling", "naive", "forecaster")


@dataclass(frozen=True)
class Scenario:
    name: str
    mode: str  # single | batch
    qos: int
    streams: int
    model: str = DEFAULT_MODEL
    contenders: tuple[str, ...] = MAIN
    preload: bool = False  # one reading per stream before measuring (many streams)
    memory_point: bool = False  # RSS delta per stream across the preload
    profile: bool = False  # py-spy the daemon at saturation after the search
    note: str = ""


SCENARIOS: tuple[Scenario, ...] = (
    Scenario(
        "single-q1-1k",
        "single",
        1,
        1000,
        contenders=(
            *MAIN,
            "gmqtt",
            "ceiling-raw",
            "ceiling-plain",
            "forecaster-plain",
            "forecaster-defaultgc",
        ),
        profile=True,
        note="main scenario; gmqtt = the ceiling with gmqtt instead of paho; -plain = paho's "
        "own socket reads (mqtt.buffered_reads = false)",
    ),
    Scenario("single-q0-1k", "single", 0, 1000),
    Scenario(
        "batch-q1-1k",
        "batch",
        1,
        1000,
        contenders=(*MAIN, "forecaster-defaultgc"),
        profile=True,
        note="forecaster-defaultgc = the daemon with daemon.gc_tuning = false",
    ),
    Scenario(
        "single-q1-1",
        "single",
        1,
        1,
        contenders=("naive", "forecaster", "forecaster-defaultgc"),
        note="one stream: one padded row per micro-batch (sequence graph)",
    ),
    Scenario(
        "batch-q1-100k", "batch", 1, 100_000, contenders=("naive", "forecaster"), preload=True
    ),
    Scenario(
        "batch-q1-1M",
        "batch",
        1,
        1_000_000,
        contenders=("forecaster",),
        preload=True,
        memory_point=True,
        note="memory point: forecaster only",
    ),
    *(
        Scenario(f"batch-q1-1k-{m}", "batch", 1, 1000, model=m, contenders=("naive", "forecaster"))
        for m in ("lstm-1x64", "gru-1x64", "lstm-2x128", "gru-2x128")
    ),
)
QUICK = ("single-q1-1k",)


def bundle_for(model: str) -> Path | None:
    """The bundled model, or a small one trained on the bundled data set (cached)."""
    if model == DEFAULT_MODEL:
        return ROOT / "models" / "water-flow"
    out = CACHE / "bundles" / model
    if (out / "model.json").exists():
        return out
    cell, shape = model.split("-")
    layers, hidden = shape.split("x")
    cli = str(Path(sys.executable).parent / "forecaster")
    run = CACHE / "runs" / model
    try:
        subprocess.run(
            [
                *(cli, "train", str(ROOT / "data" / "water-flow.csv"), "--time-column", "Time"),
                *("--cell", cell, "--layers", layers, "--hidden", hidden, "--epochs", "1", "-q"),
                *("--out", str(run)),
            ],
            check=True,
            capture_output=True,
        )
        subprocess.run(
            [cli, "export", str(run), "--out", str(out)], check=True, capture_output=True
        )
    except (subprocess.CalledProcessError, OSError) as exc:
        print(f"  cannot train {model} (is the 'train' extra installed?): {exc}", flush=True)
        return None
    return out


#: A run that starts above this 1-minute load average does not overwrite the README figures.
QUIET_LOAD = 1.0


def machine() -> dict[str, Any]:
    binary = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
    try:
        mosq = subprocess.run([binary, "-h"], capture_output=True, text=True).stdout.splitlines()
        mosquitto = mosq[0] if mosq else "unknown"
    except OSError:
        mosquitto = "not found"
    info = host_info(("forecaster", "paho-mqtt", "onnxruntime", "numpy", "gmqtt"))
    return {**info, "mosquitto": mosquitto}


@dataclass
class Runner:
    settings: Settings
    workdir: Path
    log_lines: list[str] = field(default_factory=list)

    def log(self, msg: str) -> None:
        print(msg, flush=True)
        self.log_lines.append(msg)

    def scenario(self, sc: Scenario, contenders: tuple[str, ...]) -> dict[str, Any]:
        bundle = bundle_for(sc.model)
        result: dict[str, Any] = {
            "scenario": sc.name,
            "mode": sc.mode,
            "qos": sc.qos,
            "streams": sc.streams,
            "model": sc.model,
            "batch_size": 100 if sc.mode == "batch" else 1,
            "note": sc.note,
            "contenders": {},
        }
        if bundle is None:
            result["skipped"] = f"no bundle for {sc.model}"
            return result
        load = Load(sc.mode, sc.qos, sc.streams)
        broker = Broker(self.workdir / sc.name / "broker").start()
        try:
            for kind in contenders:
                if kind not in sc.contenders:
                    continue
                self.log(f"  {sc.name}: {kind}")
                try:
                    result["contenders"][kind] = self._contender(sc, kind, bundle, load, broker)
                except Exception as exc:  # one broken contender must not lose the whole run
                    self.log(f"    FAILED: {exc!r}")
                    result["contenders"][kind] = {"error": repr(exc)}
        finally:
            broker.stop()
        _ratios(result)
        return result

    def _contender(
        self, sc: Scenario, kind: str, bundle: Path, load: Load, broker: Broker
    ) -> dict[str, Any]:
        c = Contender(kind, self.workdir / sc.name / kind, broker.port, bundle, sc.qos)
        c.start()
        out: dict[str, Any] = {}
        try:
            rss_idle = memory_kb(c.pid).get("VmRSS", 0)
            warm = Load(load.mode, load.qos, min(load.streams, 1000))
            run_trial(c, broker, warm, duration=1.5, window=window_for(warm), kind="warmup")
            rss_warm = memory_kb(c.pid).get("VmRSS", 0)
            out["rss_kb_idle"] = rss_idle
            if sc.preload:
                started = time.monotonic()
                pre = run_trial(
                    c, broker, load, count=sc.streams, duration=600, window=5000, kind="preload"
                )
                rss_loaded = memory_kb(c.pid).get("VmRSS", 0)
                self.log(
                    f"    preload: {pre.received:,} readings for {sc.streams:,} streams in "
                    f"{time.monotonic() - started:.1f} s, RSS {rss_warm:,} -> {rss_loaded:,} KiB"
                )
                out["preload"] = {"received": pre.received, "rate": pre.delivered}
                if sc.memory_point:
                    added = sc.streams - warm.streams
                    out["memory"] = _memory_point(bundle, rss_warm, rss_loaded, added)
            out.update(search(c, broker, load, self.settings, self.log))
            if sc.profile and kind == "forecaster" and not self.settings.profile:
                out["profile"] = {"error": "not profiled (--no-report, or py-spy not installed)"}
            elif sc.profile and kind == "forecaster":
                prof = self.workdir / sc.name / "forecaster-profile.txt"
                profiled = run_trial(
                    c,
                    broker,
                    load,
                    duration=self.settings.probe_duration,
                    window=window_for(load),
                    kind="profile",
                    profile_to=prof,
                )
                out["profile"] = summarise_profile(prof)
                # Where the CPU went, by thread, at saturation (the profile samples the GIL).
                out["profile"]["readings_per_s"] = profiled.delivered
                out["profile"]["thread_cpu_us_per_reading"] = thread_cpu(
                    profiled, thread_names(prof)
                )
                saved = RESULTS / f"profile-{sc.name}.txt"
                if prof.exists():
                    saved.write_text(prof.read_text())
                    out["profile"]["collapsed_stacks"] = str(saved.relative_to(ROOT))
            out["peak_rss_kb"] = memory_kb(c.pid).get("VmHWM", 0)
        finally:
            c.stop()
        return out


def _memory_point(bundle: Path, rss_before: int, rss_after: int, added: int) -> dict[str, Any]:
    from forecaster.model.bundle import read_manifest, state_specs
    from forecaster.serve.state import StateStore

    specs = state_specs(read_manifest(bundle))
    store = StateStore([(s.layers, s.hidden) for s in specs], max_streams=10)
    return {
        "streams_added": added,
        "rss_kb_before": rss_before,
        "rss_kb_after": rss_after,
        "rss_bytes_per_stream": (rss_after - rss_before) * 1024 / added if added else None,
        "state_store_bytes_per_stream": store.bytes_per_stream,
    }


def _rate(result: dict[str, Any], kind: str) -> float:
    c = result["contenders"].get(kind) or {}
    return float(c.get("sustained_readings_per_s") or 0.0)


def _ratios(result: dict[str, Any]) -> None:
    f = _rate(result, "forecaster")
    ratios: dict[str, float | None] = {}
    for base in ("ceiling", "naive"):
        b = _rate(result, base)
        if f and b:
            ratios[f"forecaster/{base}"] = f / b
    g, p = _rate(result, "gmqtt"), _rate(result, "ceiling")
    if g and p:
        ratios["gmqtt/paho (ceiling)"] = g / p
    for kind in ("ceiling", "forecaster"):
        buffered, plain = _rate(result, kind), _rate(result, f"{kind}-plain")
        if buffered and plain:
            ratios[f"{kind}: buffered/plain reads"] = buffered / plain
    d = _rate(result, "forecaster-defaultgc")
    if f and d:
        ratios["forecaster: tuned/default gc"] = f / d
    result["ratios"] = ratios


def targets(scenarios: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """Issue 13's targets, each with the measured value and the margin."""
    out: list[dict[str, Any]] = []

    def add(name: str, value: float | None, target: float, higher_is_better: bool = True) -> None:
        if value is None:
            out.append({"target": name, "value": None, "met": None, "note": "not measured"})
            return
        met = value >= target if higher_is_better else value < target
        out.append(
            {
                "target": name,
                "value": value,
                "goal": target,
                "met": met,
                "value_over_goal": value / target if target else None,
            }
        )

    s = scenarios.get("single-q1-1k")
    if s:
        add("single-q1-1k: forecaster/ceiling >= 0.9", s["ratios"].get("forecaster/ceiling"), 0.9)
        add("single-q1-1k: ceiling >= 10,000 messages/s", _rate(s, "ceiling") or None, 10_000)
    b = scenarios.get("batch-q1-1k")
    if b:
        add(
            "batch-q1-1k: forecaster >= 150,000 readings/s", _rate(b, "forecaster") or None, 150_000
        )
        add("batch-q1-1k: forecaster/naive >= 7", b["ratios"].get("forecaster/naive"), 7)
        cpu = (b.get("contenders", {}).get("forecaster") or {}).get("cpu_s_per_million")
        add("batch-q1-1k: CPU <= 6 s per 1M readings", cpu, 6.0, higher_is_better=False)
    one = scenarios.get("single-q1-1")
    if one:
        add("single-q1-1: forecaster/naive >= 3", one["ratios"].get("forecaster/naive"), 3)
    for name, r in scenarios.items():
        fc = r.get("contenders", {}).get("forecaster") or {}
        p99 = (fc.get("latency_ms") or {}).get("50%", {}).get("p99")
        if p99 is not None and name in ("single-q1-1k", "single-q0-1k", "batch-q1-1k"):
            add(f"{name}: p99 at 50% of sustained < 20 ms", p99, 20.0, higher_is_better=False)
    m = scenarios.get("batch-q1-1M")
    if m:
        mem = (m["contenders"].get("forecaster") or {}).get("memory") or {}
        add(
            "1M streams: RSS per LSTM(2x64) stream <= 1.5 KiB (1,536 B)",
            mem.get("rss_bytes_per_stream"),
            1536,
            higher_is_better=False,
        )
        if b and _rate(b, "forecaster") and _rate(m, "forecaster"):
            add(
                "1M streams: throughput >= 0.75 x 1k streams",
                _rate(m, "forecaster") / _rate(b, "forecaster"),
                0.75,
            )
    for t in out:
        if t.get("met") is False and t["value"] is not None and t.get("goal"):
            # "<" targets are met at value < goal, so value > goal means missed by that much.
            t["missed_by_pct"] = abs(t["value"] - t["goal"]) / t["goal"] * 100
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.run", description=__doc__)
    p.add_argument("--quick", action="store_true", help="main scenario, short trials (~2 min)")
    p.add_argument("--scenarios", default="", help="comma-separated names (default: all)")
    p.add_argument("--contenders", default="", help="comma-separated (default: each scenario's)")
    p.add_argument("--duration", type=float, default=0.0, help="seconds per trial")
    p.add_argument("--max-trials", type=int, default=0, help="open-loop trials per search")
    p.add_argument("--no-latency", action="store_true", help="skip the 50%%/90%% points")
    p.add_argument("--out", type=Path, default=None, help="result JSON path")
    p.add_argument("--no-report", action="store_true", help="no plot, README or profiles")
    p.add_argument("--list", action="store_true", help="list scenarios and exit")
    p.add_argument(
        "--force",
        action="store_true",
        help=f"write the README tables even if the run started busy (load > {QUIET_LOAD:g})",
    )
    a = p.parse_args(argv)
    if a.list:
        for sc in SCENARIOS:
            print(f"{sc.name:24} {', '.join(sc.contenders)}")
        return 0
    names = [n for n in a.scenarios.split(",") if n] or (list(QUICK) if a.quick else None)
    chosen = [sc for sc in SCENARIOS if names is None or sc.name in names]
    unknown = set(names or []) - {sc.name for sc in SCENARIOS}
    if unknown:
        p.error(f"unknown scenario(s): {', '.join(sorted(unknown))} (see --list)")
    settings = Settings()
    if a.quick:
        settings.duration = settings.probe_duration = 2.0
        settings.max_trials = 3
    if a.duration:
        settings.duration = settings.probe_duration = a.duration
    if a.max_trials:
        settings.max_trials = a.max_trials
    if a.no_latency:
        settings.latency_points = ()
    # Profiles are saved into benchmarks/results/; a run that writes no report leaves them too.
    settings.profile = not a.no_report and py_spy() is not None
    wanted = tuple(c for c in a.contenders.split(",") if c)
    RESULTS.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    out_path = a.out or RESULTS / f"{'quick' if a.quick else 'run'}-{stamp}.json"
    argv_text = " ".join(sys.argv[1:] if argv is None else argv)
    report: dict[str, Any] = {
        "command": f".venv/bin/python -m benchmarks.run {argv_text}".strip(),
        "started": stamp,
        "machine": machine(),
        "settings": {
            "trial_seconds": settings.duration,
            "probe_seconds": settings.probe_duration,
            "search_fractions": list(settings.fractions[: settings.max_trials]),
            "search_up_fractions": list(settings.up_fractions),
            "latency_points": list(settings.latency_points),
            "sustained_rule": "open-loop rate with no loss and < 0.25 s of backlog at the end "
            "(descending from the probe's rate; above it while passing when it passes)",
        },
        "scenarios": {},
    }
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="forecaster-bench-") as tmp:
        runner = Runner(settings, Path(tmp))
        for sc in chosen:
            runner.log(
                f"scenario {sc.name} ({sc.mode}, QoS {sc.qos}, {sc.streams:,} streams, {sc.model})"
            )
            load_before = list(os.getloadavg())
            report["scenarios"][sc.name] = runner.scenario(sc, wanted or sc.contenders)
            report["scenarios"][sc.name]["load_average"] = {
                "before": load_before,
                "after": list(os.getloadavg()),
            }
            report["elapsed_s"] = time.monotonic() - started
            out_path.write_text(json.dumps(report, indent=1))  # partial results survive a crash
    report["machine"]["load_average_end"] = list(os.getloadavg())
    report["targets"] = targets(report["scenarios"])
    report["elapsed_s"] = time.monotonic() - started
    out_path.write_text(json.dumps(report, indent=1))
    print(f"results: {out_path} ({report['elapsed_s']:.0f} s)")
    if not a.no_report and not a.quick and not names:
        busy = report["machine"]["load_average_start"][0]
        if busy > QUIET_LOAD and not a.force:
            # Figures from a busy machine say more about the neighbours than about us.
            print(
                f"not writing the README tables: the run started at load average {busy:.2f} "
                f"(> {QUIET_LOAD:g}); rerun on a quiet machine or pass --force"
            )
            return 0
        from benchmarks.report import write_report

        write_report(report, out_path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
