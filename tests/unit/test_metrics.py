"""Metrics: names pass Prometheus' own linter, the HTTP endpoint behaves, no global state."""

from __future__ import annotations

import shutil
import socket
import subprocess
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    ProcessCollector,
    generate_latest,
)
from prometheus_client.parser import text_string_to_metric_families

from forecaster.serve.http import Liveness, MetricsServer
from forecaster.serve.metrics import (
    EVICTION_REASONS,
    REJECT_REASONS,
    RESTORE_RESULTS,
    RESULTS,
    STATE_RESET_REASONS,
    BootClockProcessCollector,
    Metrics,
)


def _promtool() -> str:
    path = shutil.which("promtool")
    if path is None:
        pytest.fail("promtool not found: apt-get install prometheus (CI installs it)")
    return path


def _touch_everything(m: Metrics) -> None:
    """Create one child of every labelled metric, so the exposition shows every series shape."""
    for reason in REJECT_REASONS:
        m.reject("r1", reason)
    m.reject("", "no_route")
    m.readings.labels("r1").inc(3)
    m.predictions.labels("r1").inc(2)
    m.inference_seconds.observe(42e-6)
    m.batch_size.observe(17)
    m.end_to_end_seconds.observe(0.003)
    m.streams.labels("r1").set(5)
    for reason in STATE_RESET_REASONS:
        m.state_resets.labels("r1", reason).inc()
    for reason in EVICTION_REASONS:
        m.streams_evicted.labels("r1", reason).inc()
    m.queue_depth.set(7)
    m.mqtt_connected.set(1)
    m.mqtt_reconnects.inc()
    m.ready.set(1)
    m.set_model("r1", "temp-gru", "3", "ab" * 32)
    for result in RESULTS:
        m.reloads.labels(result).inc()
        m.snapshots.labels(result).inc()
    for result in RESTORE_RESULTS:
        m.snapshot_restores.labels(result).inc()
    m.callback_errors.labels("on_message").inc()
    m.publish_inflight.set(3)
    m.observe_errors("r1", np.array([0.5, 2.0]), np.array([1.0, 1.5]))
    m.count_events("r1", {"tp": 1, "fp": 1, "tn": 1, "fn": 1})


def test_exposition_passes_promtool_lint() -> None:
    promtool = _promtool()
    m = Metrics(CollectorRegistry())
    _touch_everything(m)
    text = generate_latest(m.registry)

    res = subprocess.run(
        [promtool, "check", "metrics"], input=text, capture_output=True, timeout=30, check=False
    )
    assert res.returncode == 0, res.stdout + res.stderr
    assert res.stdout == b"" and res.stderr == b"", res.stdout + res.stderr


def test_promtool_lint_is_not_vacuous() -> None:
    """The check above means something only if promtool flags a name we would get wrong."""
    bad = b"# HELP forecaster_x_total x\n# TYPE forecaster_x_total gauge\nforecaster_x_total 1\n"
    res = subprocess.run(
        [_promtool(), "check", "metrics"], input=bad, capture_output=True, timeout=30, check=False
    )
    assert res.returncode != 0
    assert b"_total" in res.stdout + res.stderr


def test_expected_names_and_process_metrics_exported() -> None:
    m = Metrics(CollectorRegistry())
    _touch_everything(m)
    names = {s.name for f in text_string_to_metric_families(generate_latest(m.registry).decode())
             for s in f.samples}  # fmt: skip
    for name in (
        "forecaster_readings_total",
        "forecaster_readings_rejected_total",
        "forecaster_predictions_total",
        "forecaster_inference_seconds_bucket",
        "forecaster_batch_size_bucket",
        "forecaster_end_to_end_seconds_bucket",
        "forecaster_streams",
        "forecaster_state_resets_total",
        "forecaster_streams_evicted_total",
        "forecaster_queue_depth",
        "forecaster_mqtt_connected",
        "forecaster_mqtt_reconnects_total",
        "forecaster_ready",
        "forecaster_model_info",
        "forecaster_reloads_total",
        "forecaster_snapshots_total",
        "forecaster_snapshot_restores_total",
        "forecaster_callback_errors_total",
        "forecaster_publish_inflight",
        "forecaster_prediction_abs_error_bucket",
        "forecaster_naive_abs_error_bucket",
        "forecaster_prediction_squared_error_total",
        "forecaster_naive_squared_error_total",
        "forecaster_events_total",
        "process_resident_memory_bytes",
        "process_cpu_seconds_total",
        "python_info",
    ):
        assert name in names, name


def test_process_metrics_survive_hidden_proc_stat(tmp_path: Path) -> None:
    """Under ProcSubset=pid only /proc/<pid>/ is visible; /proc/stat (boot time) is not."""
    fake_proc = tmp_path / "proc"
    fake_proc.mkdir()
    (fake_proc / "self").symlink_to("/proc/self")  # process dirs stay, /proc/stat is gone
    stock = CollectorRegistry()
    ProcessCollector(proc=str(fake_proc), registry=stock)
    assert stock.get_sample_value("process_resident_memory_bytes") is None  # the problem

    registry = CollectorRegistry()
    BootClockProcessCollector(proc=str(fake_proc), registry=registry)
    rss = registry.get_sample_value("process_resident_memory_bytes")
    assert rss is not None and rss > 0

    reference = CollectorRegistry()
    BootClockProcessCollector(registry=reference)  # real /proc/stat here
    start = registry.get_sample_value("process_start_time_seconds")
    assert start == pytest.approx(reference.get_sample_value("process_start_time_seconds"), abs=2)


def test_bucket_ranges() -> None:
    r = CollectorRegistry()
    Metrics(r)
    text = generate_latest(r).decode()

    def les(metric: str) -> list[str]:
        return [
            s.labels["le"]
            for f in text_string_to_metric_families(text)
            for s in f.samples
            if s.name == f"{metric}_bucket"
        ]

    inf = les("forecaster_inference_seconds")
    assert float(inf[0]) == pytest.approx(50e-6) and float(inf[-2]) == 1.0 and inf[-1] == "+Inf"
    assert [float(x) for x in les("forecaster_batch_size")[:-1]] == [2.0**i for i in range(13)]
    e2e = les("forecaster_end_to_end_seconds")
    assert float(e2e[0]) == pytest.approx(0.5e-3) and float(e2e[-2]) == 5.0


def test_rejected_route_none_and_unknown_reason() -> None:
    m = Metrics(CollectorRegistry())
    m.reject("", "bad_json", 2)
    assert (
        m.registry.get_sample_value(
            "forecaster_readings_rejected_total", {"route": "none", "reason": "bad_json"}
        )
        == 2.0
    )
    with pytest.raises(ValueError, match="bad_jsn"):
        m.reject("r", "bad_jsn")


def test_model_info_replaces_old_label_set() -> None:
    m = Metrics(CollectorRegistry())
    m.set_model("r1", "a", "1", "aa")
    m.set_model("r2", "b", "1", "bb")
    m.set_model("r1", "a", "2", "cc")
    get = m.registry.get_sample_value
    old = {"route": "r1", "name": "a", "version": "1", "sha256": "aa"}
    assert get("forecaster_model_info", old) is None
    assert (
        get("forecaster_model_info", {"route": "r1", "name": "a", "version": "2", "sha256": "cc"})
        == 1.0
    )
    assert (
        get("forecaster_model_info", {"route": "r2", "name": "b", "version": "1", "sha256": "bb"})
        == 1.0
    )
    m.clear_model("r2")
    assert (
        get("forecaster_model_info", {"route": "r2", "name": "b", "version": "1", "sha256": "bb"})
        is None
    )


def test_two_instances_do_not_conflict() -> None:
    # A module-level metric would raise "Duplicated timeseries" on the second construction.
    a, b = Metrics(CollectorRegistry()), Metrics(CollectorRegistry())
    a.readings.labels("r").inc(5)
    b.readings.labels("r").inc(1)
    assert a.registry.get_sample_value("forecaster_readings_total", {"route": "r"}) == 5.0
    assert b.registry.get_sample_value("forecaster_readings_total", {"route": "r"}) == 1.0


def test_observe_errors_accumulates() -> None:
    m = Metrics(CollectorRegistry())
    m.observe_errors("r", np.array([1.0, 2.0, 3.0]), np.array([2.0, 2.0, 2.0]))
    m.observe_errors("r", np.array([4.0], dtype=np.float32), np.array([0.5], dtype=np.float32))
    get = m.registry.get_sample_value
    # Hand-computed: 1 + 4 + 9 + 16 = 30 and 4 + 4 + 4 + 0.25 = 12.25.
    assert get("forecaster_prediction_squared_error_total", {"route": "r"}) == pytest.approx(30.0)
    assert get("forecaster_naive_squared_error_total", {"route": "r"}) == pytest.approx(12.25)
    assert get("forecaster_prediction_abs_error_count", {"route": "r"}) == 4.0
    assert get("forecaster_naive_abs_error_count", {"route": "r"}) == 4.0
    assert get("forecaster_prediction_abs_error_sum", {"route": "r"}) == pytest.approx(10.0)
    assert get("forecaster_prediction_abs_error_bucket", {"route": "r", "le": "2.5"}) == 2.0


def test_observe_errors_drops_non_finite_pairs_and_checks_shapes() -> None:
    m = Metrics(CollectorRegistry())
    m.observe_errors("r", np.array([1.0, np.nan, 2.0]), np.array([1.0, 1.0, np.inf]))
    get = m.registry.get_sample_value
    assert get("forecaster_prediction_squared_error_total", {"route": "r"}) == 1.0
    assert get("forecaster_naive_abs_error_count", {"route": "r"}) == 1.0
    m.observe_errors("r", np.array([]), np.array([]))
    assert get("forecaster_naive_abs_error_count", {"route": "r"}) == 1.0
    with pytest.raises(ValueError, match="shape"):
        m.observe_errors("r", np.zeros(2), np.zeros(3))


def test_observe_errors_keeps_finite_errors_whose_sums_overflow() -> None:
    """The quick screen (both sums finite) fails on huge finite errors; the entries are then
    checked one by one and all kept, and a NaN among many values is still dropped. (Errors
    this large cannot come from readings, which are within float32's range.)"""
    m = Metrics(CollectorRegistry())
    big = np.array([1e308, 1e308, 1.0, 2.0, 3.0, 4.0])
    with np.errstate(over="ignore"):  # their squares' sum, the counter's own concern
        m.observe_errors("r", big, big[::-1].copy())
    get = m.registry.get_sample_value
    assert get("forecaster_prediction_abs_error_count", {"route": "r"}) == 6.0
    assert get("forecaster_naive_abs_error_count", {"route": "r"}) == 6.0
    errs = np.arange(1.0, 11.0)
    errs[3] = np.nan
    m.observe_errors("r", errs, np.ones(10))
    assert get("forecaster_prediction_abs_error_count", {"route": "r"}) == 15.0
    assert get("forecaster_naive_abs_error_count", {"route": "r"}) == 15.0


def test_liveness() -> None:
    live = Liveness(now=100.0)
    assert live.alive(105.0, timeout=10.0)
    assert not live.alive(111.0, timeout=10.0)
    live.beat(110.0)
    assert live.alive(111.0, timeout=10.0)
    ok, reason = live.check(125.0, timeout=10.0)
    assert not ok and "15.0s" in reason


def test_liveness_note_says_what_a_healthy_loop_is_waiting_for() -> None:
    live = Liveness(now=0.0)
    live.beat(1.0, "waiting for the broker (5 in flight)")
    assert live.check(2.0, timeout=10.0) == (True, "ok: waiting for the broker (5 in flight)")
    live.beat(3.0)  # back to ordinary work: the note goes
    assert live.check(4.0, timeout=10.0) == (True, "ok")
    assert not live.check(30.0, timeout=10.0)[0]  # a note never hides a silent loop


def _get(url: str) -> tuple[int, str, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=5) as resp:  # noqa: S310 - http://127.0.0.1 only
            return resp.status, resp.headers["Content-Type"], resp.read()
    except urllib.error.HTTPError as err:
        return err.code, err.headers["Content-Type"], err.read()


def test_metrics_server_endpoints() -> None:
    m = Metrics(CollectorRegistry())
    m.readings.labels("r1").inc(7)
    state = {"alive": (True, "ok"), "ready": (False, "warming up")}

    def boom() -> tuple[bool, str]:
        raise RuntimeError("kaput")

    server = MetricsServer(
        m.registry, "127.0.0.1", 0, health=lambda: state["alive"], ready=lambda: state["ready"]
    )
    server.start()
    try:
        base = f"http://127.0.0.1:{server.port}"
        status, ctype, body = _get(base + "/metrics")
        assert status == 200 and ctype == CONTENT_TYPE_LATEST
        assert b'forecaster_readings_total{route="r1"} 7.0' in body

        assert _get(base + "/healthz")[::2] == (200, b"ok\n")
        assert _get(base + "/readyz")[::2] == (503, b"warming up\n")
        state["alive"] = (False, "inference loop silent")
        state["ready"] = (True, "ok")
        assert _get(base + "/healthz")[::2] == (503, b"inference loop silent\n")
        assert _get(base + "/readyz")[::2] == (200, b"ok\n")
        state["alive"] = (True, "ok: waiting for the broker (5 in flight)")
        state["ready"] = (True, "ready")
        assert _get(base + "/healthz")[::2] == (200, b"ok: waiting for the broker (5 in flight)\n")
        assert _get(base + "/readyz")[::2] == (200, b"ok\n")  # the body stays "ok"
        assert _get(base + "/")[0] == 404
        assert _get(base + "/metricsx")[0] == 404
        assert _get(base + "/metrics?name[]=x")[0] == 200
    finally:
        server.stop()
    server.stop()  # idempotent

    # The port is free again: binding it directly succeeds.
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("127.0.0.1", int(base.rsplit(":", 1)[1])))

    raising = MetricsServer(m.registry, "127.0.0.1", 0, health=boom, ready=boom)
    raising.start()
    try:
        status, _, body = _get(f"http://127.0.0.1:{raising.port}/healthz")
        assert status == 503 and b"RuntimeError: kaput" in body
    finally:
        raising.stop()


def test_metrics_server_port_in_use_fails_loudly() -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        server = MetricsServer(
            CollectorRegistry(), "127.0.0.1", port, lambda: (True, ""), lambda: (True, "")
        )
        with pytest.raises(OSError):
            server.start()
