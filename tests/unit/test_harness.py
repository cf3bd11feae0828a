"""The test harness's own logic: strict metric reads, configs that round-trip, broker configs."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest
from pydantic import ValidationError

from forecaster.harness import Broker, MetricNotFound, local_config, parse_metric, write_config
from forecaster.serve.config import load_config

EXPOSITION = """\
# HELP forecaster_readings_rejected_total Readings dropped.
# TYPE forecaster_readings_rejected_total counter
forecaster_readings_rejected_total{reason="not_finite",route="water"} 2.0
forecaster_readings_rejected_total{reason="empty",route="water"} 3.0
# HELP forecaster_events_total Events.
# TYPE forecaster_events_total counter
# HELP forecaster_queue_depth Queue.
# TYPE forecaster_queue_depth gauge
forecaster_queue_depth 7.0
"""


def test_metric_sums_matching_series() -> None:
    assert parse_metric(EXPOSITION, "forecaster_readings_rejected_total") == 5.0
    assert parse_metric(EXPOSITION, "forecaster_readings_rejected_total", reason="empty") == 3.0
    assert parse_metric(EXPOSITION, "forecaster_queue_depth") == 7.0


def test_missing_series_is_an_error_unless_a_default_is_given() -> None:
    with pytest.raises(MetricNotFound, match="no such series"):
        parse_metric(EXPOSITION, "forecaster_events_total", outcome="tp")
    with pytest.raises(MetricNotFound, match="no such series"):
        parse_metric(EXPOSITION, "forecaster_readings_rejected_total", reason="too_deep")
    assert parse_metric(EXPOSITION, "forecaster_events_total", default=0.0, outcome="tp") == 0.0


def test_unknown_metric_is_an_error_even_with_a_default() -> None:
    # a misspelt or renamed metric must never read as zero
    with pytest.raises(MetricNotFound, match="no such metric"):
        parse_metric(EXPOSITION, "forecaster_readings_rejectd_total", default=0.0)


def test_written_config_loads_back_equal(tmp_path: Path) -> None:
    cfg = local_config(
        1883,
        bundle=tmp_path / "bundle",
        state_dir=tmp_path / "state",
        mqtt={"protocol": "3.1.1", "tls": {"enabled": True, "ca_file": str(tmp_path / "ca")}},
        daemon={"snapshot_interval": 0.5, "on_full": "drop_newest"},
        route={"reset_after": 7200, "qos": 0},
    )
    path = write_config(cfg, tmp_path / "forecaster.toml")
    assert load_config(path, env={}) == cfg
    raw = tomllib.loads(path.read_text())
    assert raw["daemon"]["snapshot_interval"] == 0.5 and raw["routes"][0]["qos"] == 0
    assert "password_file" not in raw["mqtt"]  # None is left out: TOML has no null


def test_bad_key_fails_in_the_caller(tmp_path: Path) -> None:
    with pytest.raises(ValidationError, match="snapshot_intervall"):
        local_config(1883, bundle=tmp_path, state_dir=tmp_path, daemon={"snapshot_intervall": 1})


def test_broker_conf_follows_its_fields(tmp_path: Path) -> None:
    b = Broker(tmp_path, port=1234, persistence=False, max_queued_messages=0, tcp_nodelay=True)
    lines = b.conf_text().splitlines()
    assert lines[0] == "listener 1234 127.0.0.1"
    assert "persistence false" in lines and "max_queued_messages 0" in lines
    assert "set_tcp_nodelay true" in lines
    auth = Broker(tmp_path, port=1, allow_anonymous=False, password_file=tmp_path / "pw")
    assert "allow_anonymous false" in auth.conf_text()
    assert f"password_file {tmp_path / 'pw'}" in auth.conf_text()


def test_free_ports_are_distinct() -> None:
    from forecaster.harness import free_ports

    for _ in range(50):
        ports = free_ports(8)
        assert len(set(ports)) == 8, ports
