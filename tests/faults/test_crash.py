"""The daemon killed (``kill -9``) or stopped (SIGTERM) mid-stream while readings keep coming.

Promises checked: at-least-once processing of QoS 1 readings (every sequence-numbered reading
gets a prediction, duplicates allowed and counted); hidden states come back from a recent
snapshot (about ``snapshot_interval`` old); after a clean stop nothing is lost and nothing is
duplicated.

The kill moments are random: the ``seed`` fixture draws them, a failure report prints the seed
and ``TEST_SEED=<seed>`` replays the same schedule. Nothing here depends on the machine being
fast: each kill waits until the daemon has written a snapshot, and the final wait fails only
when predictions stop arriving for a whole minute.
"""

from __future__ import annotations

import json
import random
import re
import signal
import time
from pathlib import Path

import numpy as np
import pytest

from forecaster.harness import wait_file

from .conftest import (
    STALL_S,
    DaemonProcess,
    Feed,
    Sink,
    drift,
    kill_moments,
    log_text,
    report,
    verify,
    wait_all_predicted,
    water_items,
)

SNAPSHOT_INTERVAL = 0.5
#: How much older than ``SNAPSHOT_INTERVAL`` the restored snapshot may be: a snapshot is taken
#: between micro-batches, so a busy batch, a slow fsync or a starved CPU on a loaded machine
#: delays it (2.07 s was seen with load 4-6 on 2 cores). The promise checked is "recent", not
#: a real-time deadline.
SNAPSHOT_SLACK = 10.0


def snapshot_age(path: Path) -> float:
    """Seconds since the snapshot at ``path`` was taken (its header's ``created``)."""
    with np.load(path, allow_pickle=False) as npz:
        header = json.loads(npz["header"].tobytes())
    return time.time() - float(header["created"])


def run_with_kills(
    broker_port: int,
    d: DaemonProcess,
    state_dir: Path,
    kills: int,
    streams: int,
    rate: float,
    sig: int,
    seed: int,
) -> dict[str, object]:
    """Publish the water-flow series on ``streams`` streams at ``rate``/s and hit the daemon
    with ``sig`` ``kills`` times at random moments (drawn from ``seed``), restarting it each
    time."""
    rng = random.Random(seed)
    items = water_items(streams=streams)
    duration = len(items) / rate
    moments = kill_moments(rng, duration, kills, edge=0.5, gap=1.0)

    d.start()
    sink = Sink(broker_port)
    feed = Feed(broker_port, items, rate)
    started = time.monotonic()
    feed.start()
    ages: list[float] = []
    restarts: list[float] = []
    snapshot = state_dir / "water.npz"
    for m in moments:
        # the schedule, not a condition: the kill lands at a random moment of the stream
        time.sleep(max(0.0, started + m - time.monotonic()))
        # but never before the daemon has written its first snapshot: the restart below must
        # restore one (on a slow machine the previous restart may have eaten the gap)
        wait_file(snapshot, 60, d.proc)
        assert d.running, log_text(d)
        code = d.stop(sig)
        if sig == signal.SIGKILL:
            assert code == -signal.SIGKILL
            ages.append(snapshot_age(snapshot))
        else:
            assert code == 0, log_text(d)
        t0 = time.monotonic()
        d.start()
        restarts.append(time.monotonic() - t0)
        # each start restored the last snapshot (and only that: no fresh start, no .prev)
        assert d.metric("forecaster_snapshot_restores_total", result="ok") == 1, log_text(d)
    feed.join()
    n = len(items)
    assert wait_all_predicted(items, sink), (
        f"seed {seed}: {n - verify(items, sink.snapshot()).predicted} of {n} readings without "
        f"a prediction (none arrived for {STALL_S} s); kills at {moments}"
    )
    messages = sink.wait_quiet(1.0)  # late duplicates, if any, arrive meanwhile
    assert d.stop() == 0
    feed.close()
    sink.close()
    return {
        "seed": seed,
        "items": items,
        "messages": messages,
        "ages": ages,
        "restarts": restarts,
        "moments": moments,
    }


def test_kill9_five_times_loses_nothing(
    broker, daemon, reference, tmp_path: Path, seed: int
) -> None:
    d = daemon(snapshot_interval=SNAPSHOT_INTERVAL)
    out = run_with_kills(
        broker.port, d, tmp_path / "state", 5, streams=5, rate=700, sig=signal.SIGKILL, seed=seed
    )
    items, messages = out["items"], out["messages"]
    assert isinstance(items, list) and isinstance(messages, list)
    v = verify(items, messages)
    assert v.missing == [] and v.extra == 0, (
        f"seed {seed}: {len(v.missing)} missing, {v.extra} extra"
    )
    # every restart restored the newest snapshot (not .prev, not a fresh start); how many
    # streams it held depends on when the kill came (the journal replays the rest)
    newest = re.escape(str(tmp_path / "state" / "water.npz")) + "$"
    restored = re.findall(r"restored \d+ streams from " + newest, log_text(d), flags=re.M)
    assert len(restored) == 5, f"seed {seed}:\n{log_text(d)}"
    ages = [float(a) for a in out["ages"]]  # type: ignore[attr-defined]
    # snapshots kept being taken while the daemon ran: the one restored was recent
    assert max(ages) < SNAPSHOT_INTERVAL + SNAPSHOT_SLACK, f"seed {seed}: snapshot ages {ages}"
    dr = drift(messages, reference)
    big = drift(messages, reference, tol=0.1)
    report(
        "kill -9 x5",
        seed=out["seed"],
        readings=v.readings,
        duplicates=v.duplicates,
        snapshot_age_max_s=round(max(ages), 3),
        restart_s_max=round(max(out["restarts"]), 2),  # type: ignore[call-overload]
        drift_steps=dr.steps,
        drift_compared=dr.compared,
        drift_max_abs=f"{dr.max_abs:.4g}",
        drift_longest_run=dr.longest_run,
        drift_steps_over_0_1=big.steps,
        longest_run_over_0_1=big.longest_run,
    )
    # Loose bounds: a restore from a snapshot ≤ 0.5 s old skips the readings processed and
    # acknowledged after it, so predictions drift for a while; they must not run away.
    assert dr.max_abs < 10.0, f"seed {seed}: {dr}"
    assert big.steps < 0.25 * big.compared, f"seed {seed}: {big}"
    assert big.longest_run < 60, f"seed {seed}: {big}"


def test_sigterm_mid_stream_loses_and_duplicates_nothing(
    broker, daemon, reference, tmp_path: Path, seed: int
) -> None:
    d = daemon(snapshot_interval=SNAPSHOT_INTERVAL)
    out = run_with_kills(
        broker.port, d, tmp_path / "state", 2, streams=3, rate=900, sig=signal.SIGTERM, seed=seed
    )
    items, messages = out["items"], out["messages"]
    assert isinstance(items, list) and isinstance(messages, list)
    v = verify(items, messages)
    assert v.missing == [] and v.extra == 0, (
        f"seed {seed}: {len(v.missing)} missing, {v.extra} extra"
    )
    assert v.duplicates == 0, (
        f"seed {seed}: {v.duplicates} duplicate predictions after a clean stop"
    )
    dr = drift(messages, reference, tol=1e-5)
    assert dr.steps == 0, f"seed {seed}: {dr}"  # exactly the uninterrupted predictions
    report("SIGTERM x2 mid-stream", seed=out["seed"], readings=v.readings, duplicates=0)


@pytest.mark.slow
def test_kill9_twenty_times_many_streams(
    broker, daemon, reference, tmp_path: Path, seed: int
) -> None:
    d = daemon(snapshot_interval=SNAPSHOT_INTERVAL)
    out = run_with_kills(
        broker.port, d, tmp_path / "state", 20, streams=40, rate=1500, sig=signal.SIGKILL, seed=seed
    )
    items, messages = out["items"], out["messages"]
    assert isinstance(items, list) and isinstance(messages, list)
    v = verify(items, messages)
    assert v.missing == [] and v.extra == 0, (
        f"seed {seed}: {len(v.missing)} missing, {v.extra} extra"
    )
    dr = drift(messages, reference)
    report(
        "kill -9 x20 (slow)",
        seed=out["seed"],
        readings=v.readings,
        duplicates=v.duplicates,
        drift_steps=dr.steps,
        drift_max_abs=f"{dr.max_abs:.4g}",
    )
    assert dr.max_abs < 50.0, f"seed {seed}: {dr}"
