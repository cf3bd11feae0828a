"""The fleet's deployment files (deploy/nats/, systemd/forecaster@.service), checked by the
tools that consume them: systemd-analyze, nats-server -t, promtool; and against each other (the
partition count and mapping, the metrics ports, the metric names the daemon exports).
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry

from forecaster.serve.config import load_config
from forecaster.serve.metrics import Metrics
from forecaster.serve.nats.partitions import mappings_for
from forecaster.serve.workers import WORKER_DIR_PREFIX, worker_metrics_port
from tests.test_deploy import MAX_EXPOSURE, _metric_names, _panels, _run, _tool, check_promql

ROOT = Path(__file__).resolve().parents[1]
TEMPLATE = ROOT / "systemd" / "forecaster@.service"
NATS = ROOT / "deploy" / "nats"
FLEET_TOML = NATS / "forecaster-fleet.toml"

# --------------------------------------------------------------------------------------------
# systemd template unit
# --------------------------------------------------------------------------------------------


@pytest.fixture
def instance_copy(tmp_path: Path) -> Path:
    """Instance 3 of the template, ExecStart's binary swapped for /bin/true (verify insists it
    exists). Verifying an instance file also expands %i."""
    text = TEMPLATE.read_text()
    swapped, n = re.subn(r"^ExecStart=/usr/local/bin/forecaster ", "ExecStart=/bin/true ", text,
                         flags=re.M)  # fmt: skip
    assert n == 1, "ExecStart=/usr/local/bin/forecaster ... not found in the template"
    path = tmp_path / "forecaster@3.service"
    path.write_text(swapped)
    return path


def test_template_verifies(instance_copy: Path) -> None:
    analyze = _tool("systemd-analyze", "systemd")
    for unit in (instance_copy, instance_copy.with_name("forecaster@.service")):
        if unit != instance_copy:
            shutil.copy(instance_copy, unit)
        res = _run(analyze, "verify", str(unit))
        # verify exits 0 even for unknown keys; it only prints them
        assert res.returncode == 0, res.stderr
        assert (res.stdout + res.stderr).strip() == "", res.stdout + res.stderr


def test_template_exposure(instance_copy: Path) -> None:
    analyze = _tool("systemd-analyze", "systemd")
    res = _run(analyze, "security", "--offline=yes", str(instance_copy))
    assert res.returncode == 0, res.stderr
    match = re.search(r"Overall exposure level for forecaster@3\.service: (\d+(?:\.\d+)?)",
                      res.stdout)  # fmt: skip
    assert match, res.stdout + res.stderr
    assert float(match.group(1)) <= MAX_EXPOSURE, res.stdout


def test_template_contract() -> None:
    """The worker id reaches the daemon, and the unit's state directory is the one the daemon
    derives from it (state_dir/worker-<i>), owned by this instance's dynamic user alone."""
    lines = set(TEMPLATE.read_text().splitlines())
    for line in (
        "Type=notify",
        "NotifyAccess=main",
        "WatchdogSec=30",
        "ExecStart=/usr/local/bin/forecaster serve --config "
        "${CONFIGURATION_DIRECTORY}/forecaster.toml --worker-id %i",
        "ExecReload=/bin/kill -HUP $MAINPID",
        "Restart=on-failure",
        "DynamicUser=yes",
        f"StateDirectory=forecaster/{WORKER_DIR_PREFIX}%i",
        "Environment=FORECASTER_DAEMON__STATE_DIR=%S/forecaster",
        "ConfigurationDirectory=forecaster",
        "Conflicts=forecaster.service",
        "MemoryDenyWriteExecute=yes",
    ):
        assert line in lines, line


# --------------------------------------------------------------------------------------------
# nats-server cluster config and the forecaster fleet config
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("node", [1, 2, 3])
def test_nats_node_config_is_accepted(node: int, tmp_path: Path) -> None:
    binary = _tool("nats-server", "nats-server")
    for f in NATS.glob("*.conf"):
        shutil.copy(f, tmp_path / f.name)
    res = _run(binary, "-t", "-c", str(tmp_path / f"nats-{node}.conf"))
    assert res.returncode == 0, res.stdout + res.stderr
    text = (NATS / f"nats-{node}.conf").read_text()
    assert f"server_name: nats-{node}\n" in text
    assert "include ./cluster-common.conf" in text
    assert len(re.findall(r"nats-route://", text)) == 3


def test_nats_config_check_is_strict(tmp_path: Path) -> None:
    """nats-server -t refuses what it does not know (so the test above means something)."""
    binary = _tool("nats-server", "nats-server")
    bad = tmp_path / "bad.conf"
    common = (NATS / "cluster-common.conf").read_text()
    bad.write_text(common.replace("partition(12,1)", "partition(12,2)"))
    res = _run(binary, "-t", "-c", str(bad))
    assert res.returncode != 0


def _mapping_block(text: str) -> dict[str, str]:
    block = re.search(r"^mappings = \{\n(.*?)^\}", text, flags=re.M | re.S)
    assert block, "no mappings block"
    return dict(re.findall(r'^\s*"([^"]+)":\s*"([^"]+)"', block.group(1), flags=re.M))


def test_fleet_config_matches_the_servers_mapping() -> None:
    cfg = load_config(FLEET_TOML)
    assert cfg.transport.kind == "nats"
    filters = [f for r in cfg.routes for f in r.subscribe]
    mapping = _mapping_block((NATS / "cluster-common.conf").read_text())
    assert mapping == mappings_for(filters, cfg.nats.partitions)
    assert cfg.nats.replicas == 3 and cfg.nats.publish == "jetstream"
    assert len(cfg.nats.servers) == 3


# --------------------------------------------------------------------------------------------
# Prometheus and Grafana
# --------------------------------------------------------------------------------------------


def _exported_names() -> set[str]:
    """Every sample name a process can expose: the daemon's metrics and the NATS ones."""
    from forecaster.serve.nats.metrics import NatsMetrics

    suffixes = {
        "counter": ("_total", "_created"),
        "histogram": ("_bucket", "_count", "_sum", "_created"),
        "gauge": ("",),
        "info": ("_info",),
    }
    registry = CollectorRegistry()
    Metrics(registry)
    NatsMetrics(registry)
    names = {"up"}  # Prometheus' own per-target series
    for family in registry.collect():
        names.update(family.name + s for s in suffixes.get(family.type, ("",)))
    return names


def test_promtool_check_fleet_config() -> None:
    promtool = _tool("promtool", "prometheus")
    res = _run(promtool, "check", "config", str(NATS / "prometheus.yml"))
    assert res.returncode == 0, res.stdout + res.stderr
    assert "2 rule files found" in res.stdout


def test_scrape_targets_are_every_workers_port() -> None:
    """Each machine's targets are 18090 + i for its workers, as --worker-id assigns them."""
    cfg = load_config(FLEET_TOML)
    text = (NATS / "prometheus.yml").read_text()
    targets = re.findall(r'\["([^"]+)", "([^"]+)"\]', text)
    assert len(targets) == 3
    for pair in targets:
        ports = [int(t.rsplit(":", 1)[1]) for t in pair]
        assert ports == [worker_metrics_port(cfg.metrics.port, i) for i in range(2)]


def test_fleet_alert_rules() -> None:
    promtool = _tool("promtool", "prometheus")
    res = _run(promtool, "check", "rules", str(NATS / "forecaster-fleet-alerts.yml"))
    assert res.returncode == 0, res.stdout + res.stderr
    res = _run(promtool, "test", "rules", str(NATS / "forecaster-fleet-alerts.test.yml"))
    assert res.returncode == 0, res.stdout + res.stderr
    assert "SUCCESS" in res.stdout
    rules = (NATS / "forecaster-fleet-alerts.yml").read_text()
    for alert in ("ForecasterPartitionUnowned", "ForecasterLeaseFlapping",
                  "ForecasterPartitionOwnedTwice", "ForecasterLeaseLost"):  # fmt: skip
        assert f"- alert: {alert}\n" in rules
    tests = (NATS / "forecaster-fleet-alerts.test.yml").read_text()
    for alert in ("ForecasterPartitionUnowned", "ForecasterLeaseFlapping"):
        assert f"alertname: {alert}" in tests


@pytest.mark.parametrize(
    "name", ["forecaster-fleet-alerts.yml", "forecaster-fleet-alerts.test.yml"]
)
def test_fleet_alerts_use_exported_metric_names(name: str) -> None:
    used = set(re.findall(r"\b((?:forecaster|process)_[a-z0-9_]+)", (NATS / name).read_text()))
    unknown = used - _exported_names()
    assert not unknown, f"{name} uses metrics the daemon does not define: {sorted(unknown)}"


_VARS = {"$__rate_interval": "5m", "$__range": "1h", "$instance": ".*", "$partition": ".*"}


def test_fleet_dashboard(tmp_path: Path) -> None:
    dash = json.loads((NATS / "grafana-fleet-dashboard.json").read_text())
    assert dash["schemaVersion"] >= 36
    assert [i["name"] for i in dash["__inputs"]] == ["DS_PROMETHEUS"]
    exported = _exported_names()
    exprs: list[str] = []
    titles: set[str] = set()
    ids = []
    for panel in _panels(dash):
        ids.append(panel["id"])
        if panel["type"] == "row":
            continue
        titles.add(str(panel["title"]))
        assert panel["datasource"] == {"type": "prometheus", "uid": "${DS_PROMETHEUS}"}
        for target in panel["targets"]:  # type: ignore[attr-defined]
            exprs.append(target["expr"])
            unknown = _metric_names(target["expr"]) - exported
            assert not unknown, f"panel {panel['title']!r} uses unknown metrics {unknown}"
    assert len(ids) == len(set(ids)), "duplicate panel ids"
    rows = [p["title"] for p in dash["panels"] if p["type"] == "row"]
    assert rows == ["Fleet", "Per partition", "Per process"]
    for title in (
        "Partitions without an owner",
        "Owner of each partition",
        "Backlog per partition",
        "Partitions owned per process",
        "Readings/s per process",
        "CPU per process",
    ):
        assert title in titles, title
    for var in dash["templating"]["list"]:
        metric = re.match(r"label_values\((\w+)", var["definition"])
        assert metric and metric.group(1) in exported, var["definition"]

    check_promql(exprs, _VARS, tmp_path)
