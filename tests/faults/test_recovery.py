"""Exact recovery: ``kill -9`` at any moment, then every prediction is still the uninterrupted one.

Promises checked (docs/reliability.md, "Exact recovery"):

- after ``kill -9`` at random moments (mid-batch, mid-snapshot, mid-journal-write, and during the
  restart's own recovery) and a restart, every reading gets at least one prediction;
- *every* prediction received, duplicates included, equals ``forecaster evaluate``'s for the
  same reading within 1e-5 (no drift: the journal replay rebuilds the exact states);
- a duplicated prediction (a reading the broker redelivered after the crash) equals the
  original, bit for bit (it is answered from the recent-predictions cache, not stepped again);
- a damaged journal (torn, bit-flipped, another model's, a gap, garbage, a directory) is refused
  from the damaged record on, counted by reason and logged; the daemon starts and serves.

The kill moments come from the ``seed`` fixture: a failure prints it, ``TEST_SEED=<seed>``
replays the schedule.
"""

from __future__ import annotations

import json
import random
import signal
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from forecaster.harness import wait_file
from forecaster.model.bundle import Bundle
from forecaster.serve.codec import Prediction, Reading
from forecaster.serve.journal import KIND_WAVE, Journal, encode_wave, journal_prev_path
from forecaster.serve.state import StateStore

from .conftest import (
    MODEL,
    STALL_S,
    DaemonProcess,
    Feed,
    Sink,
    kill_moments,
    log_text,
    mqtt_client,
    predictions,
    report,
    verify,
    wait_all_predicted,
    wait_until,
    water_items,
)

SNAPSHOT_INTERVAL = 0.5
TOL = 1e-5
SHA = json.loads((MODEL / "model.json").read_text())["onnx_sha256"]
SHAPES = Bundle.load(MODEL).state_shapes  # the bundle's own state tensors (h, c, lags)


def restart_counters(d: DaemonProcess) -> dict[str, float]:
    """What this run's recovery did, from its own metrics (they start at zero each run)."""
    out = {
        "replayed": d.metric("forecaster_journal_replayed_records_total", default=0.0),
        "repeated": d.metric("forecaster_predictions_repeated_total", default=0.0),
    }
    for reason in ("torn", "corrupt", "gap", "foreign"):
        out[reason] = d.metric("forecaster_journal_refused_total", default=0.0, reason=reason)
    return out


def test_kill9_at_any_moment_recovers_exactly(broker, daemon, reference, seed: int) -> None:
    kill_and_check(broker, daemon, reference, seed, kills=6, streams=4, rate=800.0)


@pytest.mark.slow
def test_kill9_twenty_times_many_streams_recovers_exactly(
    broker, daemon, reference, seed: int
) -> None:
    kill_and_check(broker, daemon, reference, seed, kills=20, streams=20, rate=1500.0)


def kill_and_check(
    broker: Any,
    daemon: Any,
    reference: dict[float, float],
    seed: int,
    kills: int,
    streams: int,
    rate: float,
) -> None:
    """Feed ``streams`` copies of the water-flow series at ``rate``/s, ``kill -9`` the daemon
    ``kills`` times at seeded random moments (every other time once more during the restart)
    and check every prediction against the reference."""
    rng = random.Random(seed)
    items = water_items(streams=streams)
    duration = len(items) / rate
    moments = kill_moments(rng, duration, kills, edge=0.3, gap=0.6)
    # every other kill also hits the restart itself, before it is ready: mid-recovery
    during_restart = [rng.uniform(0.0, 1.5) if k % 2 else None for k in range(kills)]

    d = daemon(snapshot_interval=SNAPSHOT_INTERVAL)
    d.start()
    sink = Sink(broker.port)
    feed = Feed(broker.port, items, rate)
    started = time.monotonic()
    feed.start()
    restarts: list[float] = []
    runs: list[dict[str, float]] = []
    for k, m in enumerate(moments):
        # the schedule, not a condition: the kill lands at a random moment of the stream
        time.sleep(max(0.0, started + m - time.monotonic()))
        assert d.running, log_text(d)
        runs.append(restart_counters(d))
        assert d.kill() == -signal.SIGKILL
        extra = during_restart[k]
        if extra is not None:
            d.start(wait_ready=False)
            time.sleep(extra)  # a random moment of start-up: loading, restoring, replaying
            d.kill()
        t0 = time.monotonic()
        d.start()
        restarts.append(time.monotonic() - t0)
    feed.join()
    n = len(items)
    assert wait_all_predicted(items, sink), (
        f"seed {seed}: {n - verify(items, sink.snapshot()).predicted} of {n} readings without "
        f"a prediction (none arrived for {STALL_S} s); kills at {moments}\n" + log_text(d)[-3000:]
    )
    messages = sink.wait_quiet(1.0)
    runs.append(restart_counters(d))
    assert d.stop() == 0
    feed.close()
    sink.close()

    v = verify(items, messages)
    assert v.missing == [] and v.extra == 0, f"seed {seed}"
    # every prediction, duplicates included, against the uninterrupted reference: none skipped
    compared = off = 0
    worst = 0.0
    spread = 0.0
    dup_keys = 0
    for stream, preds in predictions(messages).items():
        by_ts: dict[float, list[tuple[float, bool]]] = {}
        for p in preds:
            ts = float(p["ts"])
            assert ts in reference, f"seed {seed}: {stream} ts {ts} has no reference"
            by_ts.setdefault(ts, []).append((float(p["value"]), bool(p["warm"])))
        for ts, got in by_ts.items():
            for value, _warm in got:
                compared += 1
                diff = abs(value - reference[ts])
                worst = max(worst, diff)
                off += diff > TOL
            if len(got) > 1:
                dup_keys += 1
                spread = max(spread, max(v for v, _ in got) - min(v for v, _ in got))
                assert len(set(got)) == 1, f"seed {seed}: {stream}@{ts}: duplicates differ {got}"
    assert compared == v.predicted + v.duplicates
    totals = {key: sum(r[key] for r in runs) for key in runs[0]}
    report(
        f"kill -9 exact recovery x{kills}, {streams} streams",
        seed=seed,
        kills=kills,
        kills_during_restart=sum(x is not None for x in during_restart),
        readings=n,
        predictions=compared,
        duplicates=v.duplicates,
        max_abs_diff=f"{worst:.3g}",
        predictions_over_tol=off,
        duplicate_spread=spread,
        journal_records_replayed=int(totals["replayed"]),
        repeated_from_cache=int(totals["repeated"]),
        refused_torn=int(totals["torn"]),
        refused_other=int(totals["corrupt"] + totals["gap"] + totals["foreign"]),
        restart_s_max=round(max(restarts), 2),
    )
    assert off == 0, f"seed {seed}: {off} of {compared} predictions drift (max {worst:.3g})"
    # the journal was really used (a restore from the snapshot alone would drift)
    assert totals["replayed"] > 0, f"seed {seed}: no journal record replayed"
    # a kill can tear the record being written; nothing else may be refused
    assert totals["corrupt"] + totals["gap"] + totals["foreign"] == 0, (seed, log_text(d))


# ------------------------------------------------------------------ damaged journals

LAST_TS = 1000.0
LOGGED = 42.5  # the prediction the journal says was made: a redelivery must get exactly this


def write_state(state: Path, route: str, journal_seq: int) -> None:
    store = StateStore(SHAPES, 100)
    slot = np.array([store.acquire(f"{route}/a", 0.0)[0]])
    store.scatter(slot, tuple(np.full((la, 1, hi), 0.1, dtype=np.float32) for la, hi in SHAPES))
    store.record(slot, np.array([LAST_TS]), np.array([100.0]), np.array([100.0]), 0.0)
    store.snapshot(state / f"{route}.npz", SHA, journal_seq=journal_seq)


def write_journal(state: Path, route: str, base: int, sha: str = SHA, records: int = 2) -> Path:
    path = state / f"{route}.journal"
    j = Journal(path, sha, base, fsync=False)
    for k in range(1, records + 1):
        r = Reading(f"{route}/a", 100.0 + k, LAST_TS + k, 0.0, f"{route}/a")
        j.append(KIND_WAVE, encode_wave([r], [Prediction(r.stream, r.ts, LOGGED + k, True)]))
    j.close()
    journal_prev_path(path).unlink(missing_ok=True)
    return path


def damage(state: Path) -> dict[str, tuple[str | None, int]]:
    """One route per kind of damage; returns route → (refusal reason, records replayed)."""
    state.mkdir(parents=True)
    expected: dict[str, tuple[str | None, int]] = {}
    for route in ("sound", "torn", "flipped", "foreign", "gap", "garbage", "dir"):
        write_state(state, route, journal_seq=7)
    write_journal(state, "sound", 7)
    expected["sound"] = (None, 2)
    p = write_journal(state, "torn", 7)
    p.write_bytes(p.read_bytes()[:-5])  # the last record cut short, as a kill mid-write leaves it
    expected["torn"] = ("torn", 1)
    p = write_journal(state, "flipped", 7)
    blob = bytearray(p.read_bytes())
    blob[-3] ^= 0x10  # inside the last record's payload
    p.write_bytes(bytes(blob))
    expected["flipped"] = ("corrupt", 1)
    write_journal(state, "foreign", 7, sha="0" * 64)
    expected["foreign"] = ("foreign", 0)
    write_journal(state, "gap", 9)  # records 10, 11: 8 and 9 are missing
    expected["gap"] = ("gap", 0)
    (state / "garbage.journal").write_bytes(random.Random(0).randbytes(500))
    expected["garbage"] = ("corrupt", 0)
    (state / "dir.journal").mkdir()
    expected["dir"] = ("corrupt", 0)
    return expected


def test_damaged_journals_are_refused_counted_and_never_fatal(
    broker, daemon, tmp_path: Path
) -> None:
    expected = damage(tmp_path / "state")
    d = daemon(
        routes=[{"name": r, "subscribe": [f"{r}/+"], "bundle": str(MODEL)} for r in expected]
    )
    d.start()  # started and ready: nothing was fatal
    log = log_text(d)
    for route, (reason, replayed) in expected.items():
        got = d.metric("forecaster_journal_replayed_records_total", default=0.0, route=route)
        assert got == replayed, (route, got, log)
        for why in ("torn", "corrupt", "gap", "foreign"):
            n = d.metric("forecaster_journal_refused_total", default=0.0, route=route, reason=why)
            assert n == (1 if why == reason else 0), (route, why, n, log)
        if reason is not None:
            assert f"route {route}: journal refused from there on ({reason})" in log, route
        assert d.metric("forecaster_snapshot_restores_total", result="ok") == len(expected)
    # What was replayed is in the states: the replayed reading, redelivered, gets the logged
    # prediction back (not a new one); the first reading the journal could not give is stepped.
    sink = Sink(broker.port)
    pub = mqtt_client(broker.port, "journal-pub")
    pub.loop_start()
    assert wait_until(pub.is_connected, 30)
    for route in expected:
        pub.publish(f"{route}/a", json.dumps({"value": 101.0, "ts": LAST_TS + 1}), qos=1)
    want = set(expected)
    assert wait_until(
        lambda: {s.split("/")[0] for s in predictions(sink.snapshot())} >= want, 60
    ), log_text(d)
    got = {s.split("/")[0]: p[0] for s, p in predictions(sink.wait_quiet(1.0)).items()}
    for route, (_reason, replayed) in expected.items():
        if replayed >= 1:
            assert got[route]["value"] == LOGGED + 1, (route, got[route])
        else:
            assert got[route]["value"] != LOGGED + 1, (route, got[route])
    assert d.metric("forecaster_predictions_repeated_total") == sum(
        1 for _r, n in expected.values() if n >= 1
    )
    pub.loop_stop()
    pub.disconnect()
    sink.close()
    assert d.stop() == 0


def test_sigterm_leaves_nothing_to_replay(broker, daemon, tmp_path: Path) -> None:
    """A clean stop snapshots after its last batch: the next start replays nothing and refuses
    nothing (the journal then only protects against crashes)."""
    d = daemon(snapshot_interval=60)
    d.start()
    items = water_items(streams=2)[:400]
    sink = Sink(broker.port)
    feed = Feed(broker.port, items, rate=0)
    feed.start()
    feed.join()
    assert wait_all_predicted(items, sink)
    assert d.stop() == 0
    wait_file(tmp_path / "state" / "water.journal", 10)
    d2 = daemon(snapshot_interval=60)
    d2.start()
    assert d2.metric("forecaster_journal_replayed_records_total", default=0.0) == 0
    assert d2.metric("forecaster_journal_refused_total", default=0.0) == 0
    assert "restored 2 streams" in log_text(d2)
    assert d2.stop() == 0
    feed.close()
    sink.close()
