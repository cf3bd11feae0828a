"""Config layering, error reporting, path resolution and password loading."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
from pydantic import BaseModel, ValidationError

from forecaster.errors import ConfigError
from forecaster.serve import codec
from forecaster.serve.config import (
    Config,
    DaemonConfig,
    MetricsConfig,
    MQTTConfig,
    RouteConfig,
    TLSConfig,
    config_summary,
    load_config,
    read_password,
)

REPO = Path(__file__).parents[2]

ROUTE = """
[[routes]]
name = "water"
subscribe = ["sensors/+/flow"]
bundle = "models/water"
"""


def write(tmp_path: Path, text: str, name: str = "forecaster.toml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def error_lines(exc: pytest.ExceptionInfo[ConfigError]) -> list[str]:
    return str(exc.value).splitlines()[1:]


def test_defaults_with_one_route(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    cfg = load_config(write(tmp_path, ROUTE), env={})
    assert cfg.mqtt == MQTTConfig()
    assert cfg.mqtt.tls.enabled is False
    assert cfg.metrics.port == 18090
    assert cfg.daemon.max_batch == 512
    assert cfg.daemon.state_dir == tmp_path / "state"  # defaults resolve against the CWD
    [route] = cfg.routes
    assert route.name == "water"
    assert route.prediction_topic == "forecast/{topic}"
    assert route.qos == 1
    assert route.payload_spec() == codec.PayloadSpec()


def test_relative_paths_in_file_resolve_against_its_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    conf_dir = tmp_path / "etc"
    conf_dir.mkdir()
    elsewhere = tmp_path / "cwd"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    text = (
        '[mqtt]\npassword_file = "secret/pw"\n'
        '[mqtt.tls]\nenabled = true\ncert_file = "c.pem"\nkey_file = "/abs/k.pem"\n'
        '[daemon]\nstate_dir = "var"\n' + ROUTE
    )
    cfg = load_config(write(conf_dir, text), env={})
    assert cfg.routes[0].bundle == conf_dir / "models/water"
    assert cfg.mqtt.password_file == conf_dir / "secret/pw"
    assert cfg.mqtt.tls.cert_file == conf_dir / "c.pem"
    assert cfg.mqtt.tls.key_file == Path("/abs/k.pem")
    assert cfg.daemon.state_dir == conf_dir / "var"


def test_relative_paths_from_env_and_overrides_resolve_against_cwd(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    cfg = load_config(
        write(tmp_path, ROUTE),
        env={"FORECASTER_DAEMON__STATE_DIR": "st"},
        overrides={"mqtt.password_file": "pw"},
    )
    assert cfg.daemon.state_dir == tmp_path / "st"
    assert cfg.mqtt.password_file == tmp_path / "pw"


def test_env_overrides(tmp_path: Path) -> None:
    env = {
        "FORECASTER_MQTT__HOST": "broker.example",
        "FORECASTER_MQTT__PORT": "8883",
        "FORECASTER_MQTT__TLS__ENABLED": "true",
        "forecaster_daemon__max_batch": "1024",  # case-insensitive
        "FORECASTER_DAEMON__ON_FULL": "drop_oldest",
        "FORECASTER_METRICS__ENABLED": "0",
        "FORECASTER_CONFIG": "/etc/forecaster/forecaster.toml",  # reserved, not a setting
        "PATH": "/usr/bin",  # not ours, ignored
    }
    cfg = load_config(write(tmp_path, ROUTE), env=env)
    assert cfg.mqtt.host == "broker.example"
    assert cfg.mqtt.port == 8883
    assert cfg.mqtt.tls.enabled is True
    assert cfg.daemon.max_batch == 1024
    assert cfg.daemon.on_full == "drop_oldest"
    assert cfg.metrics.enabled is False


def test_routes_from_env_json_without_file() -> None:
    routes = [{"name": "a", "subscribe": ["x/#"], "bundle": "/m/a", "qos": 2}]
    cfg = load_config(env={"FORECASTER_ROUTES": json.dumps(routes)})
    assert cfg.routes[0].subscribe == ["x/#"]
    assert cfg.routes[0].qos == 2


def test_env_routes_bad_json_is_reported() -> None:
    with pytest.raises(ConfigError, match="FORECASTER_ROUTES: invalid JSON"):
        load_config(env={"FORECASTER_ROUTES": "[{"})


@pytest.mark.parametrize(
    "name", ["FORECASTER_MQTT__HOTS", "FORECASTER_MQQT__HOST", "FORECASTER_MQTT", "FORECASTER_X"]
)
def test_env_typo_is_an_error_naming_the_variable(tmp_path: Path, name: str) -> None:
    with pytest.raises(ConfigError) as exc:
        load_config(write(tmp_path, ROUTE), env={name: "x"})
    assert f"{name}: not a known setting" in str(exc.value)


def test_unknown_override_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"mqtt\.hots: not a known setting"):
        load_config(write(tmp_path, ROUTE), env={}, overrides={"mqtt.hots": "x"})


def test_layers_overrides_beat_env_beat_file(tmp_path: Path) -> None:
    path = write(tmp_path, '[mqtt]\nhost = "file"\nport = 1000\nkeepalive = 10\n' + ROUTE)
    env = {"FORECASTER_MQTT__HOST": "env", "FORECASTER_MQTT__PORT": "2000"}
    assert load_config(path, env={}).mqtt.host == "file"
    assert load_config(path, env=env).mqtt.host == "env"
    cfg = load_config(path, env=env, overrides={"mqtt.host": "cli", "metrics.port": 9000})
    assert (cfg.mqtt.host, cfg.mqtt.port, cfg.mqtt.keepalive) == ("cli", 2000, 10)
    assert cfg.metrics.port == 9000
    # None means "option not given" and does not mask lower layers.
    assert load_config(path, env=env, overrides={"mqtt.host": None}).mqtt.host == "env"


def test_every_error_listed_with_its_key_path(tmp_path: Path) -> None:
    text = """
[mqtt]
port = 70000
keepalive = 1

[daemon]
on_full = "explode"

[[routes]]
name = "bad name"
subscribe = ["ok/+", "bad/#/x"]
"""
    with pytest.raises(ConfigError) as exc:
        load_config(write(tmp_path, text), env={"FORECASTER_METRICS__PORT": "-1"})
    lines = error_lines(exc)
    assert "mqtt.port: Input should be less than or equal to 65535" in lines
    assert "mqtt.keepalive: Input should be greater than or equal to 5" in lines
    assert any(line.startswith("daemon.on_full: Input should be 'block'") for line in lines)
    assert any(line.startswith("routes.0.name: String should match pattern") for line in lines)
    assert "routes.0.subscribe.1: '#' must be a whole level and the last one" in lines
    assert "routes.0.bundle: Field required" in lines
    assert (
        "metrics.port: Input should be greater than or equal to 0 (from FORECASTER_METRICS__PORT)"
        in lines
    )
    assert len(lines) == 7
    assert "7 errors" in str(exc.value).splitlines()[0]


def test_extra_key_forbidden_with_its_path(tmp_path: Path) -> None:
    text = '[mqtt]\nhots = "x"\npassword = "hunter2"\n[mqtt.tls]\nverify = false\n' + ROUTE
    with pytest.raises(ConfigError) as exc:
        load_config(write(tmp_path, text), env={})
    lines = error_lines(exc)
    assert "mqtt.hots: Extra inputs are not permitted" in lines
    assert "mqtt.password: Extra inputs are not permitted" in lines  # no password in the file
    assert "mqtt.tls.verify: Extra inputs are not permitted" in lines
    assert "hunter2" not in str(exc.value)


def test_routes_required(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="routes: Field required"):
        load_config(write(tmp_path, "[mqtt]\n"), env={})
    with pytest.raises(ConfigError, match="routes: List should have at least 1 item"):
        load_config(env={"FORECASTER_ROUTES": "[]"})


def test_toml_syntax_error_names_line(tmp_path: Path) -> None:
    path = write(tmp_path, "[mqtt]\nhost = \n")
    with pytest.raises(ConfigError, match=r"TOML syntax error.*line 2"):
        load_config(path, env={})


def test_unreadable_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read config file"):
        load_config(tmp_path / "missing.toml", env={})


def test_toml_integers_for_string_literals(tmp_path: Path) -> None:
    cfg = load_config(write(tmp_path, "[mqtt]\nprotocol = 5\n" + ROUTE), env={})
    assert cfg.mqtt.protocol == "5"


def test_tls_cert_needs_key() -> None:
    with pytest.raises(ValidationError, match="cert_file and key_file"):
        TLSConfig(enabled=True, cert_file=Path("c.pem"))


def test_reconnect_delays_ordered(tmp_path: Path) -> None:
    env = {"FORECASTER_MQTT__RECONNECT_MAX_DELAY": "0.5"}
    with pytest.raises(ConfigError, match="mqtt: reconnect_max_delay must be >="):
        load_config(write(tmp_path, ROUTE), env=env)


def route(**kw: Any) -> dict[str, Any]:
    return {"name": "r", "subscribe": ["in/+"], "bundle": "/m", **kw}


@pytest.mark.parametrize(
    ("routes", "message"),
    [
        ([route(), route(subscribe=["other"])], "routes 0 and 1 are both named 'r'"),
        ([route(), route(name="s")], "routes 0 and 1 both subscribe 'in/+'"),
        ([route(subscribe=["#"])], "feedback loop"),
        ([route(subscribe=["in/#"], prediction_topic="in/fc/{topic}")], "feedback loop"),
        ([route(), route(name="s", subscribe=["forecast/in/+"])], "route 1 subscribes"),
        ([route(subscribe=["in/+"], prediction_topic="{topic}")], "feedback loop"),
    ],
)
def test_route_set_rules(routes: list[dict[str, Any]], message: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_config(env={"FORECASTER_ROUTES": json.dumps(routes)})


@pytest.mark.parametrize(
    "routes",
    [
        [route(subscribe=["in/+"], prediction_topic="in/a/x/{topic}")],
        [route(subscribe=["in/+/flow"], prediction_topic="in/{topic}")],  # 4 levels vs 3
        [route(subscribe=["+/x"], prediction_topic="$fc/{topic}")],  # $ topics escape "+"
        [route(), route(name="s", subscribe=["forecast/other/+"])],
    ],
)
def test_route_sets_without_loops(routes: list[dict[str, Any]]) -> None:
    load_config(env={"FORECASTER_ROUTES": json.dumps(routes)})


def test_route_validation_messages() -> None:
    with pytest.raises(ValidationError, match="placeholder"):
        RouteConfig.model_validate(route(prediction_topic="fc/{stream}"))
    with pytest.raises(ValidationError, match="must differ"):
        RouteConfig.model_validate(route(ts_key="value"))
    assert RouteConfig.model_validate(route(qos="2")).qos == 2


def test_payload_spec_carries_route_settings() -> None:
    r = RouteConfig.model_validate(
        route(payload="batch", value_key="v", ts_key="t", stream_key="s", max_payload_bytes=10)
    )
    assert r.payload_spec() == codec.PayloadSpec(
        format="batch", value_key="v", ts_key="t", stream_key="s", max_bytes=10
    )


def test_input_limits_reach_the_codec_and_bound_the_prediction_topic() -> None:
    r = RouteConfig.model_validate(route(max_stream_bytes=1000, max_future_s=0))
    spec = r.payload_spec()
    assert (spec.max_stream_bytes, spec.max_future_s) == (1000, 0)
    # a topic of max_stream_bytes must still give a publishable prediction topic
    with pytest.raises(ValidationError, match="max_stream_bytes"):
        RouteConfig.model_validate(route(max_stream_bytes=65_535))
    assert RouteConfig.model_validate(route(max_stream_bytes=65_535 - 9)).max_stream_bytes
    with pytest.raises(ValidationError):
        RouteConfig.model_validate(route(max_future_s=-1))
    with pytest.raises(ValidationError):
        DaemonConfig.model_validate({"journal_fsync": "sometimes"})
    assert DaemonConfig().journal and DaemonConfig().journal_fsync == "never"


def test_every_field_has_a_description() -> None:
    models: list[type[BaseModel]] = [
        Config,
        MQTTConfig,
        TLSConfig,
        DaemonConfig,
        MetricsConfig,
        RouteConfig,
    ]
    for model in models:
        assert model.model_config.get("extra") == "forbid"
        for name, field in model.model_fields.items():
            assert field.description, f"{model.__name__}.{name}"


def test_deploy_example_loads(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(REPO)
    cfg = load_config(REPO / "deploy" / "forecaster.toml", env={})
    [water] = cfg.routes
    assert water.name == "water"
    assert water.subscribe == ["sensors/+/flow"]
    assert water.bundle == Path("/usr/share/forecaster/models/water-flow")


# --- passwords -----------------------------------------------------------------------------


def test_read_password_from_file(tmp_path: Path) -> None:
    pw = tmp_path / "pw"
    pw.write_text("s3cret\n\n")
    assert read_password(MQTTConfig(password_file=pw), env={}) == "s3cret\n"  # one newline only
    pw.write_text("s3cret\r\n")
    assert read_password(MQTTConfig(password_file=pw), env={}) == "s3cret"


def test_password_file_wins_over_credential(tmp_path: Path) -> None:
    (tmp_path / "mqtt-password").write_text("from-credential")
    pw = tmp_path / "pw"
    pw.write_text("from-file")
    env = {"CREDENTIALS_DIRECTORY": str(tmp_path)}
    assert read_password(MQTTConfig(password_file=pw), env=env) == "from-file"


def cred(name: str) -> MQTTConfig:
    return MQTTConfig.model_validate({"password_credential": name})


def test_read_password_from_credentials_directory(tmp_path: Path) -> None:
    (tmp_path / "mqtt-password").write_text("cred\n")
    (tmp_path / "other").write_text("other-cred")
    env = {"CREDENTIALS_DIRECTORY": str(tmp_path)}
    assert read_password(MQTTConfig(), env=env) == "cred"
    assert read_password(cred("other"), env=env) == "other-cred"
    assert read_password(cred("absent"), env=env) is None
    assert read_password(MQTTConfig(), env={}) is None


def test_unreadable_password_file_names_file_not_content(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"cannot read mqtt\.password_file"):
        read_password(MQTTConfig(password_file=tmp_path / "missing"), env={})
    bad = tmp_path / "bad"
    bad.write_bytes(b"topsecret\xff")
    with pytest.raises(ConfigError) as exc:
        read_password(MQTTConfig(password_file=bad), env={})
    assert "topsecret" not in str(exc.value)


def test_credential_name_must_be_a_plain_file_name() -> None:
    with pytest.raises(ValidationError, match="plain file name"):
        cred("../etc/shadow")


def test_config_summary_has_routes_and_no_secrets(tmp_path: Path) -> None:
    pw = tmp_path / "pw"
    pw.write_text("hunter2")
    cfg = load_config(
        write(tmp_path, ROUTE),
        env={"FORECASTER_MQTT__USERNAME": "bob", "FORECASTER_MQTT__HOST": "mq.example"},
        overrides={"mqtt.password_file": str(pw)},
    )
    text = config_summary(cfg)
    assert "mqtt://mq.example:1883" in text
    assert "water" in text
    assert "sensors/+/flow" in text
    assert str(tmp_path / "models/water") in text
    assert "forecast/{topic}" in text
    assert "hunter2" not in text
