"""The demo's orchestration: broker, daemon, watcher, replay, view, clean stop, summary.

Everything it starts comes from :mod:`forecaster.harness` (the same plumbing the tests and the
benchmarks use): a private mosquitto on a free loopback port, ``forecaster serve`` with two
routes written from the :class:`~forecaster.serve.config.Config` model, and a subscriber on
``forecast/#`` that feeds the :class:`~forecaster.demo.scoreboard.Scoreboard`. It stops on
Ctrl-C, on SIGTERM, after ``seconds``, or when the held-out rows run out: the replay first, then
the daemon with SIGTERM (its exit code must be 0), then the broker; the work folder is removed.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Any

import paho.mqtt.client as paho

from forecaster.demo.scenario import FEEDS, DemoError, Stream, find_root, interleave, load
from forecaster.demo.scoreboard import Scoreboard, Snapshot
from forecaster.demo.view import Frame, anomaly_text, render, spark_width, status_line
from forecaster.errors import ForecasterError
from forecaster.harness import (
    Broker,
    Collector,
    DaemonProcess,
    HarnessError,
    local_config,
    parse_metric,
)
from forecaster.replay import ReplayItem, connect, replay

FORECAST_PREFIX = "forecast/"
WARM_TIMEOUT = 120.0
STOP_TIMEOUT = 30.0
METRICS = {
    "forecaster_predictions_total": "predictions",
    "forecaster_readings_total": "readings",
    "forecaster_readings_rejected_total": "rejected",
    "forecaster_queue_depth": "queue",
}


@dataclass(frozen=True)
class Options:
    seconds: float = 60.0
    rate: float = 12.0
    plain: bool = False
    root: Path | None = None


class Watcher(Collector):
    """The harness's collector, also handing every prediction to the scoreboard as it comes."""

    def __init__(self, port: int, board: Scoreboard) -> None:
        self.board = board  # set first: messages may arrive while the base class subscribes
        super().__init__(port, "forecast/#")

    def _on_message(self, c: object, u: object, msg: paho.MQTTMessage) -> None:
        super()._on_message(c, u, msg)
        now = time.time()
        topic = msg.topic.removeprefix(FORECAST_PREFIX)
        try:
            doc = json.loads(msg.payload)
        except ValueError:
            return  # not a prediction; the view only counts what it can read
        for p in doc if isinstance(doc, list) else [doc]:
            if isinstance(p, dict):
                ts, value = p.get("ts"), p.get("value")
                self.board.on_prediction(
                    topic,
                    float(ts) if isinstance(ts, int | float) else None,
                    float(value) if isinstance(value, int | float) else None,
                    now,
                )


def scrape(daemon: DaemonProcess | None) -> dict[str, float] | None:
    """The daemon's counters the view shows, summed over labels; None when unreachable."""
    if daemon is None:
        return None
    try:
        text = daemon.metrics_text()
        return {key: parse_metric(text, name, default=0.0) for name, key in METRICS.items()}
    except (OSError, HarnessError):
        return None


class Feeder(threading.Thread):
    """Replays the training rows as fast as possible, waits until every stream is warm, then
    replays the held-out rows at the chosen total rate, through :mod:`forecaster.replay`."""

    def __init__(
        self,
        port: int,
        board: Scoreboard,
        warm_items: list[ReplayItem],
        live_items: list[ReplayItem],
        rate: float,
    ) -> None:
        super().__init__(name="demo-replay", daemon=True)
        self._port = port
        self._board = board
        self._warm = warm_items
        self._live = live_items
        self._rate = rate
        self.stop_event = threading.Event()
        self.error: BaseException | None = None

    def _sent(self, items: list[ReplayItem]) -> Callable[[int], None]:
        return lambda n: self._board.on_sent(items[n - 1], time.time())

    def run(self) -> None:
        try:
            client = connect(
                "127.0.0.1", self._port, client_id=f"forecaster-demo-replay-{os.getpid()}"
            )
        except BaseException as exc:
            self.error = exc
            return
        try:
            stop = self.stop_event.is_set
            self._board.set_phase("warm-up")
            replay(
                client, self._warm, "json", 1, 0.0, should_stop=stop, on_sent=self._sent(self._warm)
            )
            if not stop() and not self._board.wait_warm(WARM_TIMEOUT, self.stop_event):
                if not stop():
                    raise DemoError(
                        f"no prediction for the last training reading after {WARM_TIMEOUT:g} s"
                    )
            if stop():
                return
            self._board.set_phase("live")
            replay(
                client,
                self._live,
                "json",
                1,
                self._rate,
                should_stop=stop,
                on_sent=self._sent(self._live),
            )
            if not stop():
                self._board.set_phase("done")
        except BaseException as exc:
            self.error = exc
        finally:
            client.loop_stop()
            client.disconnect()


@contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """SIGTERM stops the demo the way Ctrl-C does: through the same finally blocks."""

    def handler(_signum: int, _frame: FrameType | None) -> None:
        raise KeyboardInterrupt

    old = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, old)


def offline_skill(streams: list[Stream]) -> dict[str, float]:
    """What ``forecaster evaluate --from <cut>`` says on each stream's held-out rows (without
    the injected anomaly): a full live run of a clean stream should match it exactly."""
    from forecaster.evaluation.unroll import evaluate_bundle
    from forecaster.model.bundle import Bundle

    out: dict[str, float] = {}
    for s in streams:
        try:
            b = Bundle.load(s.bundle_dir)
            res = evaluate_bundle(b, s.data, None, s.manifest.training_data.until)
            out[s.feed.name] = float(res.score().as_dict()["skill"])
        except (ForecasterError, ValueError):
            continue
    return out


def summary(
    snap: Snapshot,
    daemon: dict[str, float] | None,
    rc: int | None,
    offline: dict[str, float],
    streams: list[Stream],
) -> str:
    p50, p99 = snap.latency_ms
    d = daemon or {}
    injected = {s.feed.name: s.injected_rows for s in streams}

    def num(x: float, fmt: str) -> str:
        return format(x, fmt) if math.isfinite(x) else "n/a"

    lines = [
        "demo summary",
        f"  readings     {snap.sent_warm + snap.sent_live} published "
        f"({snap.sent_warm} training rows + {snap.sent_live} held-out rows)",
        f"  predictions  {snap.received} received; daemon counted "
        f"{d.get('predictions', math.nan):.0f} predictions, {d.get('rejected', math.nan):.0f} "
        "rejected readings",
        f"  scored       {snap.scored} held-out one-step predictions",
        f"  skill        {num(snap.skill, '+.3f')} vs persistence, all streams",
    ]
    for v in snap.streams:
        off = offline.get(v.name)
        off_text = "" if off is None else f", offline evaluate {off:+.3f}"
        inj = injected.get(v.name) or []
        inj_text = f" (burst injected at rows {inj[0]}–{inj[-1]})" if inj else ""
        lines.append(
            f"  stream {v.name:<14} route {v.route:<7} skill {num(v.skill, '+.3f')} live{off_text}"
            f" (n={v.n}); anomalies flagged {len(v.anomalies)}{inj_text}"
        )
        lines += [f"    anomaly row {a.row}: {anomaly_text(a)}" for a in v.anomalies]
    lines += [
        f"  latency      p50 {num(p50, '.1f')} ms, p99 {num(p99, '.1f')} ms "
        f"(n={snap.latency_n}, reading published -> prediction received)",
        f"  daemon exit  {'killed (did not stop in time)' if rc is None else rc}",
    ]
    return "\n".join(lines)


def run(opts: Options) -> int:
    """The whole demo; the exit code (0 when the daemon stopped cleanly)."""
    root = find_root(opts.root)
    streams = load(root)
    warm_items = interleave([s.warm for s in streams])
    live_items = interleave([s.live for s in streams])
    routes = {s.feed.topic: s.feed.route for s in streams}
    offline = offline_skill(streams)
    board = Scoreboard(warm_items, live_items, routes)
    workdir = Path(tempfile.mkdtemp(prefix="forecaster-demo-"))
    feeder: Feeder | None = None
    daemon: DaemonProcess | None = None
    daemon_rc: int | None = None
    final_metrics: dict[str, float] | None = None
    # The user's FORECASTER_* settings must not leak into a self-contained demo.
    env = {k: v for k, v in os.environ.items() if not k.upper().startswith("FORECASTER_")}
    try:
        with sigterm_as_interrupt(), ExitStack() as stack:
            try:
                # Children in their own session: Ctrl-C reaches only the demo, which stops them
                # in order; and SIGTERM to them if the demo itself is killed (Linux).
                broker = stack.enter_context(
                    Broker(
                        workdir / "broker",
                        persistence=False,
                        new_session=True,
                        die_with_parent=True,
                    )
                )
                cfg = local_config(
                    broker.port,
                    bundle=streams[0].bundle_dir,
                    state_dir=workdir / "state",
                    client_id=f"forecaster-demo-{broker.port}",
                    routes=[
                        {
                            "name": s.feed.route,
                            "subscribe": [s.feed.filter],
                            "bundle": str(s.bundle_dir),
                        }
                        for s in {s.feed.route: s for s in streams}.values()
                    ],
                )
                daemon = DaemonProcess(
                    cfg, workdir, env=env, cwd=workdir, new_session=True, die_with_parent=True
                )
                stack.callback(daemon.close)
                daemon.start()
                print(
                    f"demo: workdir {workdir}; mosquitto pid {broker.pid} on "
                    f"127.0.0.1:{broker.port}; daemon pid {daemon.pid}, metrics "
                    f"http://127.0.0.1:{daemon.metrics_port}/metrics; "
                    + ", ".join(f"{s.feed.name} ({s.feed.route})" for s in streams),
                    flush=True,
                )
                watcher = Watcher(broker.port, board)
                stack.callback(watcher.close)
                feeder = Feeder(
                    broker.port, board, warm_items, live_items, opts.rate * len(streams)
                )
                feeder.start()
                watch(opts, board, feeder, daemon, offline, streams)
            except KeyboardInterrupt:
                pass
            finally:
                if feeder is not None:
                    feeder.stop_event.set()
                    feeder.join(timeout=10)
                    _drain(board)
                board.set_phase("stopping")
                final_metrics = scrape(daemon)
                if daemon is not None and daemon.proc is not None:
                    try:
                        daemon_rc = daemon.stop(timeout=STOP_TIMEOUT)
                    except Exception:  # the process did not stop in time: killed below
                        daemon_rc = None
    except HarnessError as exc:
        raise DemoError(str(exc).splitlines()[0]) from None
    finally:
        daemon_log = daemon.log_text()[-3000:] if daemon is not None else ""
        shutil.rmtree(workdir, ignore_errors=True)
    if feeder is not None and feeder.error is not None:
        if not isinstance(feeder.error, KeyboardInterrupt):
            raise DemoError(f"the replay failed: {feeder.error}")
    print(summary(board.snapshot(), final_metrics, daemon_rc, offline, streams), flush=True)
    if daemon_rc != 0:
        print(f"error: the daemon did not exit cleanly:\n{daemon_log}", file=sys.stderr)
        return 1
    return 0


def _drain(board: Scoreboard, quiet: float = 0.5, limit: float = 3.0) -> None:
    """Wait until predictions stop arriving (quiet for ``quiet`` s), at most ``limit`` s."""
    deadline = time.monotonic() + limit
    last, since = board.snapshot().received, time.monotonic()
    while time.monotonic() < deadline and time.monotonic() - since < quiet:
        time.sleep(0.1)
        now = board.snapshot().received
        if now != last:
            last, since = now, time.monotonic()


def watch(
    opts: Options,
    board: Scoreboard,
    feeder: Feeder,
    daemon: DaemonProcess,
    offline: dict[str, float],
    streams: list[Stream],
) -> None:
    """Show the live view until --seconds, the end of the data, Ctrl-C or a failure."""
    from forecaster.demo.scoreboard import RateMeter

    started = time.monotonic()
    sent_rate, pred_rate = RateMeter(), RateMeter()
    metrics: dict[str, float] | None = None
    last_scrape = 0.0
    done_at: float | None = None
    injected = {s.feed.name: tuple(s.injected_rows) for s in streams}
    title = "forecaster demo · " + " · ".join(sorted({f"{f.route}: {f.bundle}" for f in FEEDS}))

    def frame() -> Frame:
        nonlocal metrics, last_scrape
        now = time.monotonic()
        if now - last_scrape >= 1.0:
            metrics, last_scrape = scrape(daemon), now
        snap = board.snapshot()
        return Frame(
            snap=snap,
            elapsed=now - started,
            readings_per_s=sent_rate.update(now, snap.sent_warm + snap.sent_live),
            predictions_per_s=pred_rate.update(now, snap.received),
            daemon=metrics,
            seconds=opts.seconds,
            offline_skill=offline,
            title=title,
            injected=injected,
        )

    def finished() -> bool:
        nonlocal done_at
        now = time.monotonic()
        if not daemon.running:
            code = None if daemon.proc is None else daemon.proc.returncode
            raise DemoError(f"the daemon exited unexpectedly with code {code}")
        if feeder.error is not None:
            return True
        if opts.seconds and now - started >= opts.seconds:
            return True
        if not feeder.is_alive() and opts.seconds:
            # Data ran out: give the last predictions a moment, then end.
            done_at = done_at or now
            return now - done_at >= 1.0
        return False

    if opts.plain:
        while not finished():
            print(status_line(frame()), flush=True)
            elapsed = time.monotonic() - started
            time.sleep(1.0 - elapsed % 1.0)
        return

    from rich.console import Console
    from rich.live import Live

    console = Console()

    def draw() -> Any:
        return render(frame(), spark_width(console.width))

    with Live(draw(), console=console, auto_refresh=False, transient=False) as live:
        try:
            while not finished():
                time.sleep(0.25)
                live.update(draw(), refresh=True)
        finally:
            board.set_phase("stopping")
            live.update(draw(), refresh=True)
