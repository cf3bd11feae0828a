"""The broker stopped (SIGTERM, persistence on) or killed (``kill -9``) under the daemon.

The daemon must notice (``/readyz`` false), reconnect within 5 s of the broker's return on the
same port (``/readyz`` true again), survive, and predict every reading published after the
return. With a clean broker stop nothing at all is lost (the broker persists the sessions);
after a ``kill -9`` the broker itself loses what it had not yet saved: reported, not asserted.
"""

from __future__ import annotations

import signal
import threading
import time
from dataclasses import dataclass, field

import pytest

from .conftest import (
    DaemonProcess,
    Feed,
    Sink,
    log_text,
    ready,
    report,
    verify,
    wait_until,
    water_items,
)

RECONNECT_LIMIT = 5.0


@dataclass
class ReadyWatch:
    """Polls ``/readyz`` every 20 ms and keeps the transitions as (monotonic time, ready)."""

    d: DaemonProcess
    changes: list[tuple[float, bool]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        last: bool | None = None
        while not self._stop.is_set():
            now = ready(self.d)
            if now != last:
                self.changes.append((time.monotonic(), now))
                last = now
            time.sleep(0.02)

    def first(self, value: bool, after: float) -> float | None:
        return next((t for t, v in self.changes if v is value and t >= after), None)

    def close(self) -> None:
        self._stop.set()
        self._thread.join()


def outage(broker, daemon, sig: int, down_for: float) -> dict[str, object]:
    d = daemon()
    d.start()
    sink = Sink(broker.port)
    items = water_items(streams=2, stop="700")
    feed = Feed(broker.port, items, rate=250)
    watch = ReadyWatch(d)
    feed.start()
    # the outage hits a daemon in full flow: it has predicted a good part of the first readings
    assert wait_until(lambda: sink.count() >= 200, 60), log_text(d)
    t_down = time.monotonic()
    broker.stop(sig)
    assert wait_until(lambda: watch.first(False, t_down) is not None, 30), "readyz stayed true"
    time.sleep(down_for)  # the outage itself: a duration, not a wait for a condition
    assert d.proc is not None and d.proc.poll() is None, log_text(d)
    t_up = time.monotonic()
    broker.start()  # same port, same config, same persistence directory
    assert wait_until(lambda: watch.first(True, t_up) is not None, 30), log_text(d)
    t_ready = watch.first(True, t_up)
    assert t_ready is not None
    # "after the return" starts once the observer is back too: a broker killed before its
    # autosave forgot the sink's session, and what the daemon predicted before the sink
    # subscribed again went to nobody (the broker's loss, not the daemon's)
    assert wait_until(lambda: sink.subscribed_since(t_up), 30), "the sink never came back"
    sent_at_ready = feed.sent
    feed.join()
    after = items[sent_at_ready:]
    if not wait_until(lambda: verify(after, sink.snapshot()).predicted == len(after), 120):
        missing = verify(after, sink.snapshot()).missing
        raise AssertionError(
            f"{len(missing)} of {len(after)} readings published after the return never "
            f"predicted, e.g. {[(m.topic, m.seq) for m in missing[:5]]}; "
            f"feed acked {len(set(feed.acked) & {m.seq for m in missing})} of them; "
            f"daemon readings {d.metric('forecaster_readings_total')}, predictions "
            f"{d.metric('forecaster_predictions_total')}; sink subscribed at "
            f"{[round(t - t_up, 3) for t in sink.subscribed_at]} s from the return\n" + log_text(d)
        )
    # then the rest (redeliveries): all of them, or (after a broker kill -9, which loses what
    # it had not saved) until nothing new arrives for two seconds
    wait_until(lambda: verify(items, sink.snapshot()).predicted == len(items), 15)
    sink.wait_quiet(2.0, timeout=60)
    v_all = verify(items, sink.snapshot())
    v_after = verify(after, sink.snapshot())
    assert d.proc.poll() is None and d.http("/healthz")[0] == 200
    reconnects = d.metric("forecaster_mqtt_reconnects_total")
    readings_in = d.metric("forecaster_readings_total")
    rejected = d.metric("forecaster_readings_rejected_total", default=0.0)
    predicted = d.metric("forecaster_predictions_total")
    acked = set(feed.acked)
    lost_acked = [it for it in v_all.missing if it.seq in acked]
    watch.close()
    feed.close()
    sink.close()
    assert d.stop() == 0
    return {
        "reconnect_s": t_ready - t_up,
        "v_all": v_all,
        "v_after": v_after,
        "after": len(after),
        "reconnects": reconnects,
        "lost_acked": len(lost_acked),
        "readings_in": readings_in,
        "predicted": predicted,
        "rejected": rejected,
        "changes": watch.changes,
    }


def test_broker_sigterm_and_restart(broker, daemon) -> None:
    out = outage(broker, daemon, signal.SIGTERM, down_for=1.0)
    assert out["reconnect_s"] <= RECONNECT_LIMIT  # type: ignore[operator]
    assert out["reconnects"] >= 2  # both links (readings in, predictions out) came back
    v_all, v_after = out["v_all"], out["v_after"]
    assert v_after.missing == []  # type: ignore[attr-defined]
    # the broker kept every session and message: nothing lost at all
    assert v_all.missing == [] and v_all.extra == 0  # type: ignore[attr-defined]
    report(
        "broker SIGTERM",
        reconnect_s=round(out["reconnect_s"], 2),  # type: ignore[call-overload]
        readings=v_all.readings,  # type: ignore[attr-defined]
        published_after_return=out["after"],
        lost=0,
        duplicates=v_all.duplicates,  # type: ignore[attr-defined]
    )


def test_broker_kill9_daemon_survives(broker, daemon) -> None:
    out = outage(broker, daemon, signal.SIGKILL, down_for=1.0)
    assert out["reconnect_s"] <= RECONNECT_LIMIT  # type: ignore[operator]
    v_all, v_after = out["v_all"], out["v_after"]
    assert v_after.missing == []  # type: ignore[attr-defined]
    report(
        "broker kill -9",
        reconnect_s=round(out["reconnect_s"], 2),  # type: ignore[call-overload]
        readings=v_all.readings,  # type: ignore[attr-defined]
        lost=len(v_all.missing),  # type: ignore[attr-defined]
        lost_after_broker_puback=out["lost_acked"],
        daemon_readings=out["readings_in"],
        daemon_predictions=out["predicted"],
        daemon_rejected_redeliveries=out["rejected"],
        duplicates=v_all.duplicates,  # type: ignore[attr-defined]
    )


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL])
def test_broker_long_outage(broker, daemon, sig: int) -> None:
    out = outage(broker, daemon, sig, down_for=8.0)
    assert out["reconnect_s"] <= RECONNECT_LIMIT  # type: ignore[operator]
    assert out["v_after"].missing == []  # type: ignore[attr-defined]
