"""The daemon's configuration: one pydantic model fed from a TOML file, the environment and the CLI.

Layers, later wins: defaults < file < ``FORECASTER_*`` environment < CLI overrides. Every
problem is collected and reported at once with its key path, because fixing a config one error
per restart is miserable. Passwords never live in the config text or argv: ``read_password``
takes them from a file or a systemd credential.
"""

from __future__ import annotations

import json
import os
import tomllib
import types
from collections.abc import Mapping
from functools import cache, lru_cache
from pathlib import Path
from typing import Annotated, Any, Literal, Union, get_args, get_origin

from annotated_types import MinLen
from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from forecaster.errors import ConfigError
from forecaster.serve import codec

ENV_PREFIX = "FORECASTER_"
RESERVED_ENV = frozenset({"FORECASTER_CONFIG"})
"""Variables under the prefix that are not settings (the CLI may use them to find the file)."""

CREDENTIALS_ENV = "CREDENTIALS_DIRECTORY"


def _filter(value: str) -> str:
    codec.validate_filter(value)
    return value


def _template(value: str) -> str:
    codec.validate_topic_template(value)
    return value


def _str_from_number(value: Any) -> Any:
    # TOML users write `protocol = 5`; the Literal wants the string "5".
    if isinstance(value, int | float) and not isinstance(value, bool):
        return str(value)
    return value


def _int_from_str(value: Any) -> Any:
    # Environment values are strings and pydantic does not coerce "1" into Literal[0, 1, 2].
    if isinstance(value, str) and value.strip().isdigit():
        return int(value)
    return value


def _credential_name(value: str) -> str:
    if "/" in value or "\0" in value or value in (".", ".."):
        raise ValueError("must be a plain file name inside $CREDENTIALS_DIRECTORY")
    return value


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


class TLSConfig(_Section):
    """TLS towards the broker; verification is on unless explicitly switched off."""

    enabled: bool = Field(default=False, description="Connect with TLS.")
    ca_file: Path | None = Field(
        default=None,
        description="CA bundle that signs the broker certificate; system store if unset.",
    )
    cert_file: Path | None = Field(default=None, description="Client certificate (mutual TLS).")
    key_file: Path | None = Field(
        default=None, description="Private key of the client certificate."
    )
    insecure: bool = Field(
        default=False,
        description="Skip the broker hostname check (testing only; the chain is checked).",
    )

    @model_validator(mode="after")
    def _cert_and_key_together(self) -> TLSConfig:
        if (self.cert_file is None) != (self.key_file is None):
            raise ValueError("cert_file and key_file must be given together")
        return self


class MQTTConfig(_Section):
    """Broker connection. There is deliberately no password field: see ``read_password``."""

    host: str = Field(default="localhost", min_length=1, description="Broker host name or address.")
    port: int = Field(
        default=1883, ge=1, le=65535, description="Broker port (8883 is usual with TLS)."
    )
    client_id: str = Field(
        default="forecaster",
        min_length=1,
        max_length=128,
        description="MQTT client id; unique per daemon, since the broker keeps the session by it.",
    )
    protocol: Annotated[Literal["5", "3.1.1"], BeforeValidator(_str_from_number)] = Field(
        default="5", description="MQTT protocol version."
    )
    keepalive: int = Field(default=30, ge=5, le=3600, description="Keep-alive interval, seconds.")
    session_expiry: int = Field(
        default=86400,
        ge=0,
        le=4294967295,
        description="MQTT 5 session expiry, seconds: how long the broker queues QoS>0 messages "
        "while the daemon is away.",
    )
    receive_maximum: int = Field(
        default=1000,
        ge=1,
        le=65535,
        description="MQTT 5 receive maximum: QoS>0 messages in flight to us.",
    )
    username: str | None = Field(default=None, description="User name, if the broker wants one.")
    password_file: Path | None = Field(
        default=None, description="File holding the password (one line); wins over the credential."
    )
    password_credential: Annotated[str, AfterValidator(_credential_name)] = Field(
        default="mqtt-password",
        min_length=1,
        description="File name under $CREDENTIALS_DIRECTORY (systemd LoadCredential=) holding "
        "the password, used when password_file is unset.",
    )
    tls: TLSConfig = Field(default_factory=lambda: TLSConfig(), description="TLS settings.")
    status_topic: Annotated[str, AfterValidator(_template)] = Field(
        default="forecaster/status",
        description="Retained availability topic: 'online' on connect, 'offline' as last will.",
    )
    reconnect_min_delay: float = Field(
        default=1.0, gt=0, description="First reconnect back-off, seconds."
    )
    reconnect_max_delay: float = Field(
        default=30.0, gt=0, description="Longest reconnect back-off."
    )
    max_inflight: int = Field(
        default=1000, ge=1, le=65535, description="QoS 1/2 publishes awaiting acknowledgement."
    )
    buffered_reads: bool = Field(
        default=True,
        description="Read the socket in large chunks and hand paho whole packets from a buffer "
        "(forecaster.serve.sockbuf); false falls back to paho's own per-packet reads.",
    )

    @model_validator(mode="after")
    def _delays_ordered(self) -> MQTTConfig:
        if self.reconnect_max_delay < self.reconnect_min_delay:
            raise ValueError("reconnect_max_delay must be >= reconnect_min_delay")
        return self


class DaemonConfig(_Section):
    """Batching, back-pressure and persistence of the serving loop."""

    max_batch: int = Field(
        default=512, ge=1, le=65536, description="Most readings per inference call."
    )
    max_delay_ms: float = Field(
        default=5.0, ge=0, le=1000, description="Longest a reading waits for its batch to fill, ms."
    )
    queue_size: int = Field(
        default=10000, ge=1, description="Readings buffered between MQTT and model."
    )
    on_full: Literal["block", "drop_newest", "drop_oldest"] = Field(
        default="block",
        description="When the queue is full: 'block' stops reading from the broker, which then "
        "holds the backlog (back-pressure, nothing lost); 'drop_newest' / 'drop_oldest' drop "
        "readings (counted as queue_full) to keep latency bounded.",
    )
    state_dir: Path = Field(
        default=Path("state"), description="Where per-stream state snapshots are written."
    )
    snapshot_interval: float = Field(
        default=60.0, ge=0, description="Seconds between state snapshots; 0 = only at stop."
    )
    journal: bool = Field(
        default=True,
        description="Write-ahead journal of stepped readings in state_dir, replayed over the "
        "newest snapshot at start, so states after a crash are exact (docs/reliability.md).",
    )
    journal_fsync: Literal["never", "always"] = Field(
        default="never",
        description="'never': a journal record reaches the OS before its predictions are "
        "published (survives kill -9, not a power loss); 'always': also fdatasync'ed first "
        "(survives a power loss; one disk flush per micro-batch).",
    )
    journal_max_bytes: int = Field(
        default=64 * 1024 * 1024,
        ge=4096,
        description="A route's journal segment size that forces a snapshot (and a new "
        "segment); on disk a route's journal never exceeds twice this plus one record.",
    )
    intra_op_threads: int = Field(
        default=1,
        ge=1,
        le=64,
        description="ONNX Runtime intra-op threads. 1 keeps the model on one core; 2 raised "
        "gateway-batch throughput ~16 % on 2 cores for ~50 % more CPU per reading "
        "(benchmarks/README.md, 2026-12-03).",
    )
    gc_tuning: bool = Field(
        default=True,
        description="At start, freeze the objects that exist and collect Python's young "
        "generation every 5,000 allocations instead of 700, so no long garbage collection "
        "stalls the readings (forecaster/serve/gcsettings.py); false keeps CPython's defaults.",
    )
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = Field(
        default="INFO", description="Log level."
    )


class MetricsConfig(_Section):
    """Prometheus endpoint; loopback by default because metrics reveal stream names."""

    enabled: bool = Field(default=True, description="Serve /metrics.")
    bind: str = Field(default="127.0.0.1", description="Address to bind the metrics server to.")
    port: int = Field(
        default=18090, ge=0, le=65535, description="Metrics port; 0 picks a free one."
    )


class TransportConfig(_Section):
    """Which transport carries readings in and predictions out."""

    kind: Literal["mqtt", "nats"] = Field(
        default="mqtt",
        description="'mqtt': one process on an MQTT broker (the [mqtt] section); 'nats': "
        "partitioned serving on NATS JetStream (the [nats] section, the 'nats' extra).",
    )


class NATSConfig(_Section):
    """NATS JetStream transport (``transport.kind = "nats"``); see docs/reliability.md."""

    servers: list[Annotated[str, MinLen(1)]] = Field(
        default_factory=lambda: ["nats://127.0.0.1:4222"],
        min_length=1,
        description="Server URLs (nats://host:port); any of a cluster's nodes.",
    )
    credentials_file: Path | None = Field(
        default=None, description="NATS .creds file (JWT + NKey seed) for the connection."
    )
    partitions: int = Field(
        default=12,
        ge=1,
        le=1024,
        description="Partitions N; must equal the N in the server's mapping "
        "(forecaster.serve.nats.partitions.mappings_for). Changing it moves every stream.",
    )
    stream: str = Field(
        default="FORECASTER_READINGS",
        pattern=r"^[A-Za-z0-9_-]{1,64}$",
        description="JetStream stream of readings (subjects part.>), created if missing.",
    )
    replicas: int = Field(
        default=1, ge=1, le=5, description="Replicas of the streams and buckets we create."
    )
    max_age: float = Field(
        default=7 * 86400.0,
        gt=0,
        description="Seconds readings stay in the stream: must exceed the time between "
        "snapshots by far, since a takeover replays from the last snapshot.",
    )
    member: str = Field(
        default="",
        pattern=r"^[A-Za-z0-9_-]{0,64}$",
        description="This process's name in the leases; '' = <hostname>-<pid>. Unique per "
        "live process.",
    )
    lease_bucket: str = Field(
        default="forecaster_leases",
        pattern=r"^[A-Za-z0-9_-]{1,64}$",
        description="KV bucket of partition leases and member heartbeats.",
    )
    snapshot_bucket: str = Field(
        default="forecaster_snapshots",
        pattern=r"^[A-Za-z0-9_-]{1,64}$",
        description="Object store bucket of per-partition state snapshots.",
    )
    lease_ttl: float = Field(
        default=4.0,
        ge=1.0,
        le=300.0,
        description="Seconds a lease lives without renewal (renewed every ttl/3): the bound on "
        "how long a dead process's partitions stay unserved.",
    )
    publish: Literal["jetstream", "core"] = Field(
        default="jetstream",
        description="'jetstream': predictions stored in prediction_stream and readings acked "
        "after the PubAcks (at-least-once end to end); 'core': acked after the publish is "
        "flushed (faster; predictions in flight are lost if the server dies).",
    )
    prediction_stream: str = Field(
        default="FORECASTER_PREDICTIONS",
        pattern=r"^[A-Za-z0-9_-]{1,64}$",
        description="Stream holding predictions when publish = 'jetstream', created if missing.",
    )
    prediction_max_age: float = Field(
        default=86400.0, gt=0, description="Seconds predictions stay in prediction_stream."
    )
    pull_batch: int = Field(
        default=256, ge=1, le=10000, description="Messages asked for per pull request."
    )
    max_ack_pending: int = Field(
        default=4096, ge=1, description="Unacknowledged readings per partition at most."
    )
    ack_wait: float = Field(
        default=30.0, ge=1.0, description="Seconds before an unacknowledged reading is resent."
    )


class RouteConfig(_Section):
    """A set of topics served by one model bundle."""

    name: str = Field(
        pattern=r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,63}$",
        description="Route name; a metric label and a file name, hence the narrow alphabet.",
    )
    subscribe: list[Annotated[str, AfterValidator(_filter)]] = Field(
        min_length=1, description="MQTT topic filters; the topic is the stream id."
    )
    bundle: Path = Field(description="Model bundle directory (model.onnx + model.json).")
    prediction_topic: Annotated[str, AfterValidator(_template)] = Field(
        default="forecast/{topic}",
        description="Where predictions go; {topic} is the reading's topic.",
    )
    payload: Literal["auto", "number", "json", "batch"] = Field(
        default="auto", description="Payload form; auto tells by the first character."
    )
    value_key: str = Field(default="value", min_length=1, description="JSON key of the reading.")
    ts_key: str = Field(
        default="ts", min_length=1, description="JSON key of the event time (epoch s or ISO 8601)."
    )
    stream_key: str = Field(
        default="stream", min_length=1, description="JSON key of the stream id."
    )
    max_payload_bytes: int = Field(
        default=65536, ge=1, le=268435455, description="Larger payloads are rejected unread."
    )
    qos: Annotated[Literal[0, 1, 2], BeforeValidator(_int_from_str)] = Field(
        default=1, description="QoS of published predictions."
    )
    retain: bool = Field(default=False, description="Publish predictions retained.")
    reset_after: float = Field(
        default=0, ge=0, description="Event-time gap (s) that resets a stream's state; 0 = never."
    )
    idle_ttl: float = Field(
        default=0,
        ge=0,
        description="Seconds without readings before a stream is forgotten; 0 = never.",
    )
    max_streams: int = Field(
        default=100000, ge=1, description="Most streams this route keeps state for."
    )
    max_stream_bytes: int = Field(
        default=codec.MAX_STREAM_LEN,
        ge=1,
        le=codec.MAX_TOPIC_BYTES,
        description="Longest stream id in UTF-8 bytes, for topics (refused whole) and batch "
        "'stream' fields (that item refused): counted as bad_stream.",
    )
    max_future_s: float = Field(
        default=codec.MAX_FUTURE_S,
        ge=0,
        description="How far (s) a reading's timestamp may be ahead of its receive time; later "
        "ones are refused as future_timestamp, so one bad clock cannot poison a stream. 0 = "
        "no limit.",
    )
    recent_predictions: int = Field(
        default=65536,
        ge=0,
        description="Recent predictions kept (and snapshotted) per route, so a reading the "
        "broker redelivers after a crash gets its original prediction again instead of being "
        "dropped as a duplicate; cover the readings that can await acknowledgement at once. "
        "About 360 bytes each (measured: 22 MiB for 65,536).",
    )

    @model_validator(mode="after")
    def _distinct_keys(self) -> RouteConfig:
        if len({self.value_key, self.ts_key, self.stream_key}) != 3:
            raise ValueError("value_key, ts_key and stream_key must differ")
        return self

    @model_validator(mode="after")
    def _prediction_topic_fits(self) -> RouteConfig:
        # Every reading's topic is at most max_stream_bytes, so this bounds every prediction
        # topic: one that MQTT cannot carry would fail at publish time, for one reading only.
        fixed = len(self.prediction_topic.replace("{topic}", "").encode("utf-8", "surrogatepass"))
        uses = self.prediction_topic.count("{topic}")
        if fixed + uses * self.max_stream_bytes > codec.MAX_TOPIC_BYTES:
            raise ValueError(
                f"prediction_topic with a topic of max_stream_bytes ({self.max_stream_bytes}) "
                f"can exceed MQTT's {codec.MAX_TOPIC_BYTES} bytes; lower max_stream_bytes"
            )
        return self

    def payload_spec(self) -> codec.PayloadSpec:
        """The codec's view of this route, built once rather than per message."""
        return codec.PayloadSpec(
            format=self.payload,
            value_key=self.value_key,
            ts_key=self.ts_key,
            stream_key=self.stream_key,
            max_bytes=self.max_payload_bytes,
            max_stream_bytes=self.max_stream_bytes,
            max_future_s=self.max_future_s,
        )


class Config(_Section):
    """The whole daemon configuration."""

    mqtt: MQTTConfig = Field(default_factory=lambda: MQTTConfig(), description="Broker connection.")
    daemon: DaemonConfig = Field(
        default_factory=lambda: DaemonConfig(), description="Serving loop."
    )
    metrics: MetricsConfig = Field(
        default_factory=lambda: MetricsConfig(), description="Prometheus."
    )
    routes: list[RouteConfig] = Field(min_length=1, description="Topic-to-model routes.")
    transport: TransportConfig = Field(
        default_factory=lambda: TransportConfig(), description="Transport choice."
    )
    nats: NATSConfig = Field(
        default_factory=lambda: NATSConfig(), description="NATS JetStream transport."
    )

    @model_validator(mode="after")
    def _nats_partitionable(self) -> Config:
        if self.transport.kind != "nats":
            return self
        from forecaster.serve.nats.partitions import check_partitionable

        problems = []
        for i, route in enumerate(self.routes):
            for f in route.subscribe:
                try:
                    check_partitionable(f)
                except ValueError as exc:
                    problems.append(f"routes.{i}.subscribe: {exc}")
        if problems:
            raise ValueError("; ".join(problems))
        return self

    @field_validator("routes")
    @classmethod
    def _routes_consistent(cls, routes: list[RouteConfig]) -> list[RouteConfig]:
        problems: list[str] = []
        names: dict[str, int] = {}
        filters: dict[str, int] = {}
        for i, route in enumerate(routes):
            if route.name in names:
                problems.append(f"routes {names[route.name]} and {i} are both named {route.name!r}")
            names.setdefault(route.name, i)
            for f in route.subscribe:
                if f in filters and filters[f] != i:
                    problems.append(f"routes {filters[f]} and {i} both subscribe {f!r}")
                filters.setdefault(f, i)
        # A prediction topic that one of our own filters matches would feed predictions back in
        # as readings, forever.
        for i, route in enumerate(routes):
            for f in route.subscribe:
                produced = _produced_levels(route.prediction_topic, f)
                if produced is None:
                    continue
                for j, other in enumerate(routes):
                    for g in other.subscribe:
                        if _levels_overlap(produced, _filter_levels(g)):
                            problems.append(
                                f"route {i} publishes predictions for {f!r} to "
                                f"{route.prediction_topic!r}, which route {j} subscribes "
                                f"({g!r}): a feedback loop"
                            )
        if problems:
            raise ValueError("; ".join(problems))
        return routes


_ANY1 = "\0+"  # one level (NUL cannot occur in a real level, so these cannot clash)
_ANYN = "\0#"  # zero or more levels


def _filter_levels(f: str) -> list[str]:
    inner = f.split("/", 2)[2] if f.startswith("$share/") else f
    return [{"+": _ANY1, "#": _ANYN}.get(level, level) for level in inner.split("/")]


def _produced_levels(template: str, f: str) -> list[str] | None:
    """Levels of the topics ``template`` yields for readings matching ``f``.

    None when ``{topic}`` shares a level with other text (``fc-{topic}``): checking that
    exactly needs glob intersection, and such templates are rare enough to go unchecked.
    """
    out: list[str] = []
    for level in template.split("/"):
        if level == "{topic}":
            out.extend(_filter_levels(f))
        elif "{topic}" in level:
            return None
        else:
            out.append(level)
    return out


def _levels_overlap(a: list[str], b: list[str]) -> bool:
    """Whether some topic matches both level patterns (literal, one level, or any levels)."""

    @cache
    def walk(i: int, j: int) -> bool:
        if i == len(a) and j == len(b):
            return True
        if i < len(a) and a[i] == _ANYN and (walk(i + 1, j) or (j < len(b) and walk(i, j + 1))):
            return True
        if j < len(b) and b[j] == _ANYN and (walk(i, j + 1) or (i < len(a) and walk(i + 1, j))):
            return True
        if i < len(a) and j < len(b) and _ANYN not in (a[i], b[j]):
            if a[i] == b[j] or _ANY1 in (a[i], b[j]):
                return walk(i + 1, j + 1)
        return False

    if a and b and _dollar_shielded(a[0], b[0]):
        return False
    return walk(0, 0)


def _dollar_shielded(a: str, b: str) -> bool:
    # Leading wildcards never match "$..." topics (MQTT 4.7.2).
    wild = (_ANY1, _ANYN)
    return (a.startswith("$") and b in wild) or (b.startswith("$") and a in wild)


# --- loading -------------------------------------------------------------------------------


def load_config(
    path: Path | None = None,
    env: Mapping[str, str] | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> Config:
    """Build the config from its layers; raise ConfigError listing every problem by key path.

    ``overrides`` are CLI flags as dotted keys (``{"mqtt.host": "x"}``); None values are
    skipped so the CLI can pass its options unfiltered. Relative paths from the file resolve
    against the file's directory, all others against the current directory, and the result
    holds absolute paths only, so a later chdir cannot change their meaning.
    """
    env = os.environ if env is None else env
    data: dict[str, Any] = {}
    sources: dict[tuple[str, ...], str] = {}
    problems: list[str] = []
    if path is not None:
        data = _resolve_paths(_read_toml(path), Config, path.absolute().parent)
    for key, value in sorted(env.items()):
        if not key.upper().startswith(ENV_PREFIX) or key.upper() in RESERVED_ENV:
            continue
        keys = tuple(key[len(ENV_PREFIX) :].lower().split("__"))
        if keys not in _leaf_keys():
            problems.append(f"{key}: not a known setting")
            continue
        parsed: Any = value
        if keys == ("routes",):
            try:
                parsed = json.loads(value)
            except ValueError as exc:
                problems.append(f"{key}: invalid JSON ({exc})")
                continue
        _set(data, keys, parsed)
        sources[keys] = key
    for dotted, value in (overrides or {}).items():
        if value is None:
            continue
        keys = tuple(dotted.split("."))
        if keys not in _leaf_keys():
            problems.append(f"{dotted}: not a known setting")
            continue
        _set(data, keys, value)
        sources[keys] = f"option {dotted}"

    cfg: Config | None = None
    try:
        cfg = Config.model_validate(data)
    except ValidationError as exc:
        problems.extend(_format_error(err, sources) for err in exc.errors())
    if problems or cfg is None:
        where = f" ({path})" if path is not None else ""
        count = f"{len(problems)} error" + ("s" if len(problems) != 1 else "")
        raise ConfigError(f"invalid configuration{where}, {count}:\n" + "\n".join(problems))
    resolved = _resolve_paths(cfg.model_dump(), Config, Path.cwd())
    return Config.model_validate(resolved)


def _read_toml(path: Path) -> dict[str, Any]:
    try:
        with path.open("rb") as fh:
            return tomllib.load(fh)
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc.strerror or exc}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: TOML syntax error: {exc}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not valid UTF-8") from None


def _format_error(err: Any, sources: Mapping[tuple[str, ...], str]) -> str:
    loc = tuple(str(part) for part in err["loc"])
    msg = str(err["msg"]).removeprefix("Value error, ")
    line = f"{'.'.join(loc) or '(top level)'}: {msg}"
    for n in range(len(loc), 0, -1):
        if loc[:n] in sources:
            return f"{line} (from {sources[loc[:n]]})"
    return line


def _set(data: dict[str, Any], keys: tuple[str, ...], value: Any) -> None:
    node = data
    for key in keys[:-1]:
        child = node.get(key)
        if not isinstance(child, dict):
            child = {}
            node[key] = child
        node = child
    node[keys[-1]] = value


def _model_of(annotation: Any) -> type[BaseModel] | None:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    return None


@lru_cache(maxsize=1)
def _leaf_keys() -> frozenset[tuple[str, ...]]:
    """Every settable key path: what the environment and CLI may name."""
    out: set[tuple[str, ...]] = set()

    def walk(model: type[BaseModel], prefix: tuple[str, ...]) -> None:
        for name, field in model.model_fields.items():
            sub = _model_of(field.annotation)
            if sub is not None:
                walk(sub, (*prefix, name))
            else:
                out.add((*prefix, name))

    walk(Config, ())
    return frozenset(out)


def _is_path_field(annotation: Any) -> bool:
    if annotation is Path:
        return True
    if get_origin(annotation) in (Union, types.UnionType):
        return Path in get_args(annotation)
    return False


def _resolve_paths(raw: Any, model: type[BaseModel], base: Path) -> Any:
    """Anchor relative path values in a raw (unvalidated) mapping at ``base``."""
    if not isinstance(raw, dict):
        return raw
    out = dict(raw)
    for name, field in model.model_fields.items():
        if name not in out:
            continue
        value = out[name]
        sub = _model_of(field.annotation)
        if _is_path_field(field.annotation):
            if isinstance(value, str | Path) and str(value) and not Path(value).is_absolute():
                out[name] = base / value
        elif sub is not None:
            out[name] = _resolve_paths(value, sub, base)
        elif get_origin(field.annotation) is list and isinstance(value, list):
            item = _model_of(get_args(field.annotation)[0])
            if item is not None:
                out[name] = [_resolve_paths(v, item, base) for v in value]
    return out


# --- secrets and summary -------------------------------------------------------------------


def read_password(cfg: MQTTConfig, env: Mapping[str, str] | None = None) -> str | None:
    """The broker password from ``password_file``, else the systemd credential, else None.

    One trailing newline is dropped (editors add one). Error messages name the file, never
    its content.
    """
    env = os.environ if env is None else env
    if cfg.password_file is not None:
        return _read_secret(cfg.password_file, "mqtt.password_file")
    directory = env.get(CREDENTIALS_ENV)
    if directory:
        candidate = Path(directory) / cfg.password_credential
        if candidate.exists():
            return _read_secret(candidate, "credential")
    return None


def _read_secret(path: Path, what: str) -> str:
    try:
        text = path.read_bytes().decode("utf-8")
    except OSError as exc:
        raise ConfigError(f"cannot read {what} {path}: {exc.strerror or 'error'}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{what} {path} is not valid UTF-8") from None
    if text.endswith("\n"):
        text = text[:-1]
        if text.endswith("\r"):
            text = text[:-1]
    return text


def config_summary(cfg: Config) -> str:
    """A few lines for ``check-config``: what will be connected and served, never secrets."""
    m = cfg.mqtt
    scheme = "mqtts" if m.tls.enabled else "mqtt"
    if m.password_file is not None:
        password = f"password from {m.password_file}"
    else:
        password = f"password from credential {m.password_credential!r} if present"
    auth = f"user {m.username!r}, {password}" if m.username else password
    lines = [
        f"broker: {scheme}://{m.host}:{m.port} (MQTT {m.protocol}, client id {m.client_id!r}, "
        f"{auth})",
    ]
    if m.tls.enabled:
        lines.append(
            f"tls: ca {m.tls.ca_file or 'system store'}"
            + (f", client cert {m.tls.cert_file}" if m.tls.cert_file else "")
            + (", HOSTNAME NOT VERIFIED" if m.tls.insecure else "")
        )
    if cfg.transport.kind == "nats":
        n = cfg.nats
        creds = f", credentials {n.credentials_file}" if n.credentials_file else ""
        lines = [
            f"transport: nats {', '.join(n.servers)}{creds} (the [mqtt] section is not used)",
            f"nats: stream {n.stream}, {n.partitions} partitions, lease ttl {n.lease_ttl} s, "
            f"publish {n.publish}, replicas {n.replicas}, member {n.member or '<hostname>-<pid>'}",
        ]
    d = cfg.daemon
    lines.append(
        f"daemon: max_batch {d.max_batch}, max_delay {d.max_delay_ms} ms, queue {d.queue_size} "
        f"({d.on_full}), state {d.state_dir}"
    )
    mt = cfg.metrics
    lines.append(f"metrics: http://{mt.bind}:{mt.port}/metrics" if mt.enabled else "metrics: off")
    lines.append(f"routes: {len(cfg.routes)}")
    for r in cfg.routes:
        lines.append(f"  {r.name}: bundle {r.bundle}")
        lines.append(f"    subscribe {', '.join(r.subscribe)} (payload {r.payload})")
        lines.append(f"    publish {r.prediction_topic} (qos {r.qos}, retain {r.retain})")
    return "\n".join(lines)
