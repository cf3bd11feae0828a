"""The daemon killed (``kill -9``) or stopped (SIGTERM) mid-stream while readings keep coming.

Promises checked: at-least-once processing of QoS 1 readings (every sequence-numbered reading
gets a prediction, duplicates allowed and counted); hidden states come back from a snapshot at
most ``snapshot_interval`` old; after a clean stop nothing is lost and nothing is duplicated.
"""

from __future__ import annotations

import json
import os
import random
import signal
import time
from pathlib import Path

import numpy as np
import pytest

from .conftest import (
    DaemonProc,
    Feed,
    Sink,
    drift,
    log_text,
    report,
    verify,
    wait_until,
    water_items,
)

SNAPSHOT_INTERVAL = 0.5


def snapshot_age(path: Path) -> float:
    """Seconds since the snapshot at ``path`` was taken (its header's ``created``)."""
    with np.load(path, allow_pickle=False) as npz:
        header = json.loads(npz["header"].tobytes())
    return time.time() - float(header["created"])


def _seed() -> int:
    return int(os.environ.get("FAULTS_SEED", str(random.SystemRandom().randrange(1 << 30))))


def run_with_kills(
    broker_port: int,
    d: DaemonProc,
    state_dir: Path,
    kills: int,
    streams: int,
    rate: float,
    sig: int,
) -> dict[str, object]:
    """Publish the water-flow series on ``streams`` streams at ``rate``/s and hit the daemon
    with ``sig`` ``kills`` times at random moments, restarting it each time."""
    seed = _seed()
    rng = random.Random(seed)
    items = water_items(streams=streams)
    duration = len(items) / rate
    # random moments in the publishing window, at least 1 s apart so each run gets work done
    moments: list[float] = []
    while len(moments) < kills:
        t = rng.uniform(0.5, duration - 0.5)
        if all(abs(t - m) > 1.0 for m in moments):
            moments.append(t)
    moments.sort()

    d.start()
    sink = Sink(broker_port)
    feed = Feed(broker_port, items, rate)
    started = time.monotonic()
    feed.start()
    ages: list[float] = []
    restarts: list[float] = []
    for m in moments:
        time.sleep(max(0.0, started + m - time.monotonic()))
        assert d.proc is not None and d.proc.poll() is None, log_text(d)
        d.proc.send_signal(sig)
        code = d.proc.wait(timeout=15)
        if sig == signal.SIGKILL:
            assert code == -signal.SIGKILL
            ages.append(snapshot_age(state_dir / "water.npz"))
        else:
            assert code == 0, log_text(d)
        t0 = time.monotonic()
        d.start()
        restarts.append(time.monotonic() - t0)
        # each start restored the last snapshot (and only that: no fresh start, no .prev)
        assert d.metric("forecaster_snapshot_restores_total", result="ok") == 1, log_text(d)
    feed.join()
    n = len(items)
    assert wait_until(lambda: verify(items, sink.snapshot()).predicted == n, 60), (
        f"{n - verify(items, sink.snapshot()).predicted} readings without a prediction"
    )
    time.sleep(0.5)  # late duplicates, if any, arrive now
    assert d.stop() == 0
    messages = sink.snapshot()
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


def test_kill9_five_times_loses_nothing(broker, daemon, reference, tmp_path: Path) -> None:
    d = daemon(snapshot_interval=SNAPSHOT_INTERVAL)
    out = run_with_kills(
        broker.port, d, tmp_path / "state", kills=5, streams=5, rate=700, sig=signal.SIGKILL
    )
    items, messages = out["items"], out["messages"]
    assert isinstance(items, list) and isinstance(messages, list)
    v = verify(items, messages)
    assert v.missing == [] and v.extra == 0
    # every restart restored all five streams from the newest snapshot (not .prev, not fresh)
    restored = log_text(d).count("restored 5 streams from " + str(tmp_path / "state" / "water.npz"))
    assert restored == 5, log_text(d)
    ages = [float(a) for a in out["ages"]]  # type: ignore[attr-defined]
    # a snapshot is taken between micro-batches every SNAPSHOT_INTERVAL; a busy batch or a slow
    # fsync on this shared machine may add a little
    assert max(ages) < SNAPSHOT_INTERVAL + 1.0, ages
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
    assert dr.max_abs < 10.0
    assert big.steps < 0.25 * big.compared
    assert big.longest_run < 60


def test_sigterm_mid_stream_loses_and_duplicates_nothing(
    broker, daemon, reference, tmp_path: Path
) -> None:
    d = daemon(snapshot_interval=SNAPSHOT_INTERVAL)
    out = run_with_kills(
        broker.port, d, tmp_path / "state", kills=2, streams=3, rate=900, sig=signal.SIGTERM
    )
    items, messages = out["items"], out["messages"]
    assert isinstance(items, list) and isinstance(messages, list)
    v = verify(items, messages)
    assert v.missing == [] and v.extra == 0
    assert v.duplicates == 0, f"{v.duplicates} duplicate predictions after a clean stop"
    dr = drift(messages, reference, tol=1e-5)
    assert dr.steps == 0, dr  # exactly the uninterrupted predictions
    report("SIGTERM x2 mid-stream", seed=out["seed"], readings=v.readings, duplicates=0)


@pytest.mark.slow
def test_kill9_twenty_times_many_streams(broker, daemon, reference, tmp_path: Path) -> None:
    d = daemon(snapshot_interval=SNAPSHOT_INTERVAL)
    out = run_with_kills(
        broker.port, d, tmp_path / "state", kills=20, streams=40, rate=1500, sig=signal.SIGKILL
    )
    items, messages = out["items"], out["messages"]
    assert isinstance(items, list) and isinstance(messages, list)
    v = verify(items, messages)
    assert v.missing == [] and v.extra == 0
    dr = drift(messages, reference)
    report(
        "kill -9 x20 (slow)",
        seed=out["seed"],
        readings=v.readings,
        duplicates=v.duplicates,
        drift_steps=dr.steps,
        drift_max_abs=f"{dr.max_abs:.4g}",
    )
    assert dr.max_abs < 50.0
