"""Overload: a slow consumer and a flood of new topics.

Slow consumer: readings offered at about twice the rate the daemon sustains. With
``on_full = "block"`` the queue fills, the broker holds the backlog and nothing is lost; with
``drop_newest`` the excess is dropped and counted (``rejected{reason="queue_full"}``). Either way
the daemon stays up, its memory stays bounded, the backlog shows in ``forecaster_queue_depth``
and it catches up afterwards: every reading is either predicted or counted with a reason.

Topic flood: many distinct new streams against a small ``max_streams``: RSS bounded, LRU
evictions counted, and the long-lived streams keep exactly the uninterrupted predictions.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable

import pytest
from prometheus_client.parser import text_string_to_metric_families

from forecaster.replay import ReplayItem

from .conftest import (
    DaemonProcess,
    Feed,
    Sink,
    drift,
    log_text,
    report,
    rss_mb,
    verify,
    wait_until,
    water_items,
)


def accounted(d: DaemonProcess) -> float:
    """Readings predicted or dropped with a reason (each series absent until it first counts)."""
    return d.metric("forecaster_predictions_total", default=0.0) + d.metric(
        "forecaster_readings_rejected_total", default=0.0
    )


class Sampler(threading.Thread):
    """Samples the daemon's RSS and queue depth every 0.25 s."""

    def __init__(self, d: DaemonProcess) -> None:
        super().__init__(daemon=True)
        self.d = d
        self.rss: list[float] = []
        self.depth: list[float] = []
        self.stop_flag = threading.Event()

    def run(self) -> None:
        assert self.d.proc is not None
        while not self.stop_flag.wait(0.25):
            if self.d.proc.poll() is not None:
                return
            self.rss.append(rss_mb(self.d.proc.pid))
            self.depth.append(self.d.metric("forecaster_queue_depth"))

    def close(self) -> None:
        self.stop_flag.set()
        self.join()


def slow_consumer(broker, daemon, on_full: str, seconds: float) -> None:
    queue_size = 500
    d = daemon(max_batch=1, max_delay_ms=0, queue_size=queue_size, on_full=on_full)
    d.start()
    assert d.proc is not None
    rss0 = rss_mb(d.proc.pid)
    items = water_items(streams=80)
    # calibrate: the daemon's sustained rate on this machine, from a burst it must work through
    burst = 2000
    t0 = time.monotonic()
    feed = Feed(broker.port, items[:burst], rate=0, client_id="calibrate")
    feed.start()
    assert wait_until(lambda: accounted(d) >= burst, 60), log_text(d)
    sustained = d.metric("forecaster_predictions_total") / (time.monotonic() - t0)
    feed.close()
    # the calibration's own burst may overflow the queue: drops counted from here on
    dropped0 = d.metric("forecaster_readings_rejected_total", default=0.0, reason="queue_full")
    offered = 2 * sustained
    sampler = Sampler(d)
    sampler.start()
    # The calibration shares the machine with everything else: when it caught the daemon in a
    # slow moment, twice its rate is no overload (the daemon kept up, nothing queued or dropped).
    # Then the same phase runs again at twice the rate, a few times at most, before judging.
    total = burst  # readings published so far
    for attempt in range(4):
        n = min(len(items) - total, int(offered * seconds))
        rest = items[total : total + n]
        feed = Feed(broker.port, rest, rate=offered, client_id=f"overload-{attempt}")
        t1 = time.monotonic()
        feed.start()
        feed.join()
        publish_s = time.monotonic() - t1
        done_at_end = accounted(d) - total
        total += n
        caught_up = wait_until(lambda want=total: accounted(d) >= want, 4 * seconds + 30)
        catch_up_s = time.monotonic() - t1 - publish_s
        feed.close()
        assert caught_up, f"{accounted(d)} of {total} accounted for:\n{log_text(d)[-2000:]}"
        queue_full = d.metric(
            "forecaster_readings_rejected_total", default=0.0, reason="queue_full"
        )
        backlog = max(sampler.depth, default=0.0) >= queue_size * 0.5
        if (backlog if on_full == "block" else queue_full > dropped0) or total >= len(items):
            break
        offered *= 2
    sampler.close()
    assert d.proc.poll() is None and d.http("/healthz")[0] == 200
    processed_rate = done_at_end / publish_s
    predicted = d.metric("forecaster_predictions_total")
    report(
        f"slow consumer ({on_full})",
        sustained_per_s=round(sustained),
        overload_phases=attempt + 1,
        offered_per_s=round(n / publish_s),
        processed_during_overload_per_s=round(processed_rate),
        seconds=round(publish_s, 1),
        catch_up_s=round(catch_up_s, 1),
        queue_depth_max=max(sampler.depth, default=0),
        queue_full_drops=queue_full,
        rss_start_mb=round(rss0),
        rss_max_mb=round(max(sampler.rss, default=rss0)),
    )
    # it really was overloaded, and the metrics showed it: with "block" a backlog in the queue
    # (sampled every 0.25 s), with "drop_newest" the drops themselves (asserted below; a queue
    # that overflows in bursts between samples may never be seen full by the sampler)
    if on_full == "block":
        assert max(sampler.depth) >= queue_size * 0.5, (sampler.depth, offered)
    # memory bounded by the queue, not by the offered load
    assert max(sampler.rss) - rss0 < 80
    # (no bound on catch_up_s: the calibration shares the machine with everything else, so a
    # run whose offered rate turned out barely above what the daemon managed is still valid;
    # the queue depth above is the evidence of overload)
    if on_full == "block":
        assert queue_full == 0 and predicted == total  # the broker held the backlog
    else:
        assert queue_full > dropped0 and predicted + queue_full == total
    assert d.stop() == 0


@pytest.mark.parametrize("on_full", ["block", "drop_newest"])
def test_slow_consumer(broker, daemon, on_full: str) -> None:
    slow_consumer(broker, daemon, on_full, seconds=float(os.environ.get("FAULTS_SECONDS", "6")))


@pytest.mark.slow
@pytest.mark.parametrize("on_full", ["block", "drop_oldest"])
def test_slow_consumer_30s(broker, daemon, on_full: str) -> None:
    slow_consumer(broker, daemon, on_full, seconds=30)


def wait_progress(count: Callable[[], float], target: int, stall: float) -> bool:
    """Wait until ``count()`` reaches ``target``, failing only when it stops moving for ``stall``
    seconds: a slow shared machine is not a stuck daemon (the 1M flood ran at ~800 readings/s
    here with the publisher in this process)."""
    last, since = -1.0, time.monotonic()
    while True:
        n = count()
        if n >= target:
            return True
        if n != last:
            last, since = n, time.monotonic()
        elif time.monotonic() - since > stall:
            return False
        time.sleep(0.5)


def flood(broker, daemon, reference, flood_streams: int, max_streams: int) -> float:
    d = daemon(route={"max_streams": max_streams})
    d.start()
    assert d.proc is not None
    long_lived = water_items(streams=3, stop="400")
    per_row = flood_streams // 400
    items: list[ReplayItem] = []
    k = 0
    for i in range(0, len(long_lived), 3):
        items.extend(long_lived[i : i + 3])
        for _ in range(per_row):
            topic = f"sensors/f{k}/flow"
            items.append(ReplayItem(f"f{k}", topic, 100.0, 1.0e9, 10_000_000 + k, 0))
            k += 1
    sink = Sink(
        broker.port,
        topic="forecast/sensors/s0/flow,forecast/sensors/s1/flow,forecast/sensors/s2/flow",
    )
    sampler = Sampler(d)
    sampler.start()
    rss0 = rss_mb(d.proc.pid)
    feed = Feed(broker.port, items, rate=0)
    t0 = time.monotonic()
    feed.start()
    feed.join()
    ok = wait_progress(lambda: accounted(d), len(items), stall=60.0)
    took = time.monotonic() - t0
    sampler.close()
    assert ok, f"stalled at {accounted(d)} of {len(items)}:\n" + log_text(d)[-2000:]
    wait_until(lambda: verify(long_lived, sink.snapshot()).predicted == len(long_lived), 60)
    messages = sink.snapshot()
    v = verify(long_lived, messages)
    dr = drift(messages, reference, tol=1e-5)
    evicted = d.metric("forecaster_streams_evicted_total", default=0.0, reason="lru")
    streams = d.metric("forecaster_streams")
    report(
        f"topic flood {k} streams, max_streams {max_streams}",
        seconds=round(took, 1),
        evicted_lru=evicted,
        rss_start_mb=round(rss0),
        rss_max_mb=round(max(sampler.rss, default=rss0)),
    )
    assert v.missing == [] and v.duplicates == 0
    assert dr.steps == 0 and dr.compared >= 3 * 399  # exactly the uninterrupted predictions
    expected = k + 3 - max_streams
    if d.metric("forecaster_mqtt_reconnects_total") == 0:
        assert evicted == expected
    else:
        # A backlog that keeps the subscriber blocked past 1.5 x keepalive makes the broker drop
        # the connection; it redelivers the unacknowledged readings, which are dropped as
        # duplicates (counted) or, for streams already evicted, start them again: the count
        # moves by about the redelivered window. Seen once in the 1M run (898,352 of 900,003).
        rejected = "forecaster_readings_rejected_total"
        redelivered = d.metric(rejected, default=0.0, reason="duplicate")
        redelivered += d.metric(rejected, default=0.0, reason="out_of_order")
        assert abs(evicted - expected) <= max(redelivered, 1) + 5_000
    assert streams <= max_streams
    assert d.http("/healthz")[0] == 200
    # stream ids (the topics "sensors/f<k>/flow") never become label values; a substring check
    # for "f1" would also hit the model's sha256 label
    values = {
        v
        for fam in text_string_to_metric_families(d.metrics_text())
        for sample in fam.samples
        for v in sample.labels.values()
    }
    assert not [v for v in values if "sensors/" in v], values
    feed.close()
    sink.close()
    assert d.stop() == 0
    return max(sampler.rss, default=rss0) - rss0


def test_topic_flood(broker, daemon, reference) -> None:
    growth = flood(broker, daemon, reference, flood_streams=20_000, max_streams=2_000)
    assert growth < 60


@pytest.mark.slow
def test_topic_flood_million(broker, daemon, reference) -> None:
    # A million readings outrun the daemon and queue in the broker: above its per-client queue
    # limit mosquitto drops them silently (the broker's loss, not the daemon's), so lift it here.
    broker.max_queued_messages = 0
    broker.restart()
    growth = flood(broker, daemon, reference, flood_streams=1_000_000, max_streams=100_000)
    # 100,000 LSTM 2x64 states are ~110 MB; the id maps and the topic cache come on top
    assert growth < 400
