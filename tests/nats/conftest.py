"""The NATS transport against real nats-servers (forecaster.harness.nats), real daemons as
subprocesses, paho MQTT 3.1.1 publishers into nats-server's MQTT listener, and the predictions
read back from the prediction stream (lossless, unlike a live subscriber).

Those tests are skipped where nats-server or nats-py is missing (``needs_nats``); the pure ones
(hash, mapping, leases, resume rule, envelope, config) run everywhere.
"""

from __future__ import annotations

import asyncio
import importlib.util
import json
import shutil
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from forecaster.data import load_csv
from forecaster.harness import DaemonProcess, local_config, wait_until
from forecaster.serve.config import Config

ROOT = Path(__file__).resolve().parents[2]
MODEL = ROOT / "models" / "water-flow"
WATER = ROOT / "data" / "water-flow.csv"
FILTER = "sensors/+/flow"


def _missing() -> str | None:
    if shutil.which("nats-server") is None and not Path("/usr/sbin/nats-server").exists():
        return "nats-server is not installed (scripts/system-deps.sh)"
    if importlib.util.find_spec("nats") is None:
        return "nats-py is not installed (the 'nats' extra)"
    return None


#: for the modules that start real servers; the pure tests run everywhere
needs_nats = pytest.mark.skipif(_missing() is not None, reason=str(_missing()))


def nats_config(
    servers: list[str],
    state_dir: Path,
    partitions: int,
    *,
    metrics_port: int = 0,
    nats: dict[str, Any] | None = None,
    daemon: dict[str, Any] | None = None,
) -> Config:
    base = local_config(
        1, bundle=MODEL, state_dir=state_dir, subscribe=(FILTER,), metrics_port=metrics_port
    )
    data = base.model_dump(mode="json", exclude_none=True)
    data["transport"] = {"kind": "nats"}
    data["nats"] = {"servers": servers, "partitions": partitions, "lease_ttl": 3.0, **(nats or {})}
    data["daemon"].update(daemon or {})
    return Config.model_validate(data)


def readings(streams: int, rows: int, start: int = 0) -> list[tuple[str, bytes]]:
    """(topic, payload) of ``rows`` water-flow readings for each of ``streams`` streams, row by
    row: every stream sees the same series, so one reference serves them all."""
    series = load_csv(WATER, time_column="Time").series[0]
    assert series.times is not None
    out = []
    for i in range(start, start + rows):
        if not np.isfinite(series.values[i]):
            continue
        for s in range(streams):
            doc = {"value": float(series.values[i]), "ts": float(series.times[i])}
            out.append((f"sensors/s{s}/flow", json.dumps(doc).encode()))
    return out


def mqtt_publish(port: int, items: list[tuple[str, bytes]], client_id: str = "") -> None:
    """Publish at QoS 1 over MQTT 3.1.1 (nats-server 2.9 speaks no MQTT 5) and wait for every
    PUBACK, in order, from one connection (so per-stream order holds)."""
    import paho.mqtt.client as paho
    from paho.mqtt.enums import CallbackAPIVersion

    client = paho.Client(
        callback_api_version=CallbackAPIVersion.VERSION2,
        client_id=client_id,
        protocol=paho.MQTTv311,
    )
    client.max_inflight_messages_set(200)
    client.connect("127.0.0.1", port)
    client.loop_start()
    try:
        infos = [client.publish(t, p, qos=1) for t, p in items]
        for info in infos:
            info.wait_for_publish(timeout=120)
            if not info.is_published():
                raise AssertionError("a reading was not acknowledged by the MQTT listener")
    finally:
        client.disconnect()
        client.loop_stop()


async def _read_stream(url: str, stream: str) -> list[tuple[str, bytes]]:
    import nats

    nc = await nats.connect(url)
    try:
        js = nc.jetstream()
        total = (await js.stream_info(stream)).state.messages
        out: list[tuple[str, bytes]] = []
        if not total:
            return out
        # an ordered consumer: ephemeral, no acks, gaps detected and recovered by nats-py
        sub = await js.subscribe(">", stream=stream, ordered_consumer=True)
        try:
            while len(out) < total:
                m = await sub.next_msg(timeout=10)
                out.append((m.subject, m.data))
        finally:
            await sub.unsubscribe()
        return out
    finally:
        await nc.close()


def read_stream(url: str, stream: str = "FORECASTER_PREDICTIONS") -> list[tuple[str, bytes]]:
    """Every message in ``stream`` now (subject, payload), in stream order."""
    box: list[list[tuple[str, bytes]]] = []
    errors: list[str] = []

    def run() -> None:  # own thread: pytest may run inside an event loop one day
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            try:  # a cluster in an election times requests out for a few seconds
                box.append(asyncio.run(_read_stream(url, stream)))
                return
            except Exception as exc:
                errors.append(f"{type(exc).__name__}: {exc}")
                time.sleep(0.5)

    t = threading.Thread(target=run)
    t.start()
    t.join(120)
    if not box:
        raise AssertionError(f"could not read {stream} from {url}: {errors[-3:]}")
    return box[0]


async def _count(url: str, stream: str) -> int:
    import nats

    nc = await nats.connect(url)
    try:
        try:
            info = await nc.jetstream().stream_info(stream)
        except Exception:
            return 0
        return int(info.state.messages)
    finally:
        await nc.close()


def stream_count(url: str, stream: str = "FORECASTER_PREDICTIONS") -> int:
    return asyncio.run(_count(url, stream))


def start_owning(d: DaemonProcess, parts: int, timeout: float = 60) -> None:
    """Start ``d`` and wait until it owns all ``parts`` partitions (the only process)."""
    d.start()
    assert wait_until(lambda: d.metric("forecaster_nats_partitions_owned") == parts, timeout), (
        f"{d.name} never owned all {parts} partitions:\n{d.log_text()[-3000:]}"
    )


def publish_stored(srv: Any, items: list[tuple[str, bytes]], total: int, timeout: float) -> None:
    """Publish ``items`` over MQTT and wait until the predictions stream holds ``total``."""
    mqtt_publish(srv.mqtt_port, items)
    assert wait_until(lambda: stream_count(srv.url) >= total, timeout), (
        f"fewer than {total} predictions stored after {timeout} s"
    )


def by_stream(messages: list[tuple[str, bytes]]) -> dict[str, list[dict[str, Any]]]:
    out: dict[str, list[dict[str, Any]]] = {}
    for _subject, payload in messages:
        doc = json.loads(payload)
        for p in doc if isinstance(doc, list) else [doc]:
            out.setdefault(p["stream"], []).append(p)
    return out


def check_exact(
    preds: dict[str, list[dict[str, Any]]], reference: dict[float, float], per_stream: int
) -> None:
    """Every reading has a prediction (duplicates allowed, at-least-once), each equal to
    evaluate's for the same reading (≤ 1e-5)."""
    for stream, ps in preds.items():
        distinct = {p["ts"] for p in ps}
        assert len(distinct) == per_stream, f"{stream}: {len(distinct)} of {per_stream} readings"
        got = np.array([p["value"] for p in ps])
        want = np.array([reference[p["ts"]] for p in ps])
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-5, err_msg=stream)


@pytest.fixture
def daemons() -> Iterator[list[DaemonProcess]]:
    procs: list[DaemonProcess] = []
    yield procs
    for d in procs:
        d.close()
