"""RouteSet: loading with restore, topic lookup, snapshots and reloads, on the real bundled models
(models/water-flow: a stateful LSTM; models/yahoo-anomaly: a window classifier, other shapes).
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import CollectorRegistry

from forecaster.serve.codec import Reading
from forecaster.serve.config import Config
from forecaster.serve.metrics import Metrics
from forecaster.serve.routes import RouteSet, compatible

ROOT = Path(__file__).resolve().parents[2]
WATER = ROOT / "models" / "water-flow"
YAHOO = ROOT / "models" / "yahoo-anomaly"


def config(state_dir: Path, water: Path = WATER, **route: Any) -> Config:
    return Config.model_validate(
        {
            "daemon": {"state_dir": str(state_dir)},
            "metrics": {"enabled": False},
            "routes": [
                {"name": "water", "subscribe": ["sensors/+/flow"], "bundle": str(water), **route},
                {"name": "yahoo", "subscribe": ["yahoo/#", "sensors/x/#"], "bundle": str(YAHOO)},
            ],
        }
    )


class Rig:
    def __init__(self, cfg: Config) -> None:
        self.registry = CollectorRegistry()
        self.routes = RouteSet(cfg, Metrics(self.registry), clock=lambda: 10.0)
        self.routes.load()

    def sample(self, metric: str, /, **labels: str) -> float:
        return self.registry.get_sample_value(metric, labels) or 0.0

    def step(self, route: str, streams: int) -> None:
        r = next(r for r in self.routes if r.name == route)
        readings = [Reading(f"s{k}", 100.0 + k, 1.0, 0.0, f"s{k}") for k in range(streams)]
        r.engine.step(readings, 10.0)

    def streams(self, route: str) -> int:
        return len(next(r for r in self.routes if r.name == route).engine.store)


def test_load_starts_fresh_without_a_snapshot_and_publishes_model_info(tmp_path: Path) -> None:
    rig = Rig(config(tmp_path))
    assert [r.name for r in rig.routes] == ["water", "yahoo"]
    assert rig.sample("forecaster_snapshot_restores_total", result="missing") == 2
    info = {"route": "water", "name": "water-flow", "version": "1.0.0"}
    sha = next(r for r in rig.routes if r.name == "water").engine.bundle.sha256
    assert rig.sample("forecaster_model_info", **info, sha256=sha) == 1


def test_route_for_matches_in_configuration_order_and_caches(tmp_path: Path) -> None:
    rig = Rig(config(tmp_path))
    found = rig.routes.route_for("sensors/x/flow")  # both routes match: the first wins
    assert found is not None and found.name == "water"
    assert rig.routes.route_for("sensors/x/flow") is found
    other = rig.routes.route_for("yahoo/a/b")
    assert other is not None and other.name == "yahoo"
    assert rig.routes.route_for("nowhere") is None
    assert rig.routes.filters == ["sensors/+/flow", "yahoo/#", "sensors/x/#"]


def test_snapshot_then_load_restores_the_streams(tmp_path: Path) -> None:
    rig = Rig(config(tmp_path))
    rig.step("water", 5)
    assert rig.routes.snapshot()
    assert rig.sample("forecaster_snapshots_total", result="ok") == 2

    again = Rig(config(tmp_path))
    assert again.streams("water") == 5
    assert again.sample("forecaster_snapshot_restores_total", result="ok") == 2


def test_snapshot_failure_is_counted_not_raised(tmp_path: Path) -> None:
    state = tmp_path / "state"
    rig = Rig(config(state))
    shutil.rmtree(state)
    state.write_text("")  # a file where the state directory must be
    assert not rig.routes.snapshot()
    assert rig.sample("forecaster_snapshots_total", result="failed") == 2


def test_reload_of_the_same_models_keeps_states_and_applies_route_options(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    rig = Rig(config(tmp_path))
    rig.step("water", 3)
    with caplog.at_level(logging.INFO, logger="forecaster.serve.routes"):
        assert rig.routes.reload(config(tmp_path, value_key="v"))
    assert rig.streams("water") == 3
    assert next(r for r in rig.routes if r.name == "water").spec.value_key == "v"
    assert rig.sample("forecaster_reloads_total", result="ok") == 1
    # No model changed, and the log still says the reload happened.
    assert "reload: done, 2 route(s) reloaded, 0 with a new model" in caplog.messages


def test_reload_to_a_model_with_other_shapes_resets_states(tmp_path: Path) -> None:
    rig = Rig(config(tmp_path))
    rig.step("water", 4)
    assert rig.routes.reload(config(tmp_path, water=YAHOO))
    water = next(r for r in rig.routes if r.name == "water")
    assert water.engine.bundle.manifest.name == "yahoo-anomaly"
    assert len(water.engine.store) == 0
    assert list(water.engine.store.shapes) == water.engine.bundle.state_shapes
    assert rig.sample("forecaster_state_resets_total", route="water", reason="model_changed") == 4
    old = {"route": "water", "name": "water-flow", "version": "1.0.0"}
    sha = Rig(config(tmp_path)).routes.routes[0].engine.bundle.sha256
    assert rig.sample("forecaster_model_info", **old, sha256=sha) == 0  # the old series is gone


def test_reload_with_a_bad_bundle_keeps_the_running_model(tmp_path: Path) -> None:
    rig = Rig(config(tmp_path))
    rig.step("water", 2)
    assert not rig.routes.reload(config(tmp_path, water=tmp_path / "no-such-bundle"))
    water = next(r for r in rig.routes if r.name == "water")
    assert water.engine.bundle.manifest.name == "water-flow" and len(water.engine.store) == 2
    assert rig.sample("forecaster_reloads_total", result="failed") == 1


def test_compatible_compares_shapes_and_inputs(tmp_path: Path) -> None:
    rig = Rig(config(tmp_path))
    water, yahoo = (r.engine.bundle for r in rig.routes)
    assert compatible(water, water) and compatible(yahoo, yahoo)
    assert not compatible(water, yahoo) and not compatible(yahoo, water)
