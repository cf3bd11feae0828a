"""Damaged snapshots at start: refused with a log line and a counter, never a crash.

One daemon with one route per kind of damage (each route has its own snapshot file, named after
the route), so a single start exercises every case. A refused snapshot means fresh states: a
reading older than the snapshot's last one is then predicted (a restored state would drop it as
out of order). A damaged newest generation with a sound ``.prev`` restores ``.prev``.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np

from forecaster.model.bundle import Bundle
from forecaster.serve.state import StateStore, previous_path

from .conftest import MODEL, Sink, log_text, mqtt_client, predictions, wait_until

SHA = json.loads((MODEL / "model.json").read_text())["onnx_sha256"]
SHAPES = Bundle.load(MODEL).state_shapes  # the bundle's own state tensors (h, c, lags)
LAST_TS = 1000.0


class Exploit:
    """Unpickling this creates a marker file: proof that a pickle was (not) loaded."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[object, ...]]:
        return (Path.touch, (self.marker,))


def write_snapshot(
    path: Path, route: str, sha: str = SHA, shapes: list[tuple[int, int]] = SHAPES
) -> None:
    store = StateStore(shapes, 100)
    slots = np.array([store.acquire(f"{route}/a", 0.0)[0], store.acquire(f"{route}/b", 0.0)[0]])
    states = tuple(np.full((la, 2, hi), 0.1, dtype=np.float32) for la, hi in shapes)
    store.scatter(slots, states)
    store.record(slots, np.full(2, LAST_TS), np.full(2, 100.0), np.full(2, 100.0), 0.0)
    store.snapshot(path, sha)


def damage(state: Path, marker: Path) -> dict[str, str]:
    """Write one damaged snapshot per route; returns route → the restore result expected."""
    state.mkdir(parents=True)
    expected: dict[str, str] = {}

    def sound(route: str) -> Path:
        p = state / f"{route}.npz"
        write_snapshot(p, route)
        return p

    p = sound("trunc")
    p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])
    expected["trunc"] = "corrupt"
    (state / "garbage.npz").write_bytes(np.random.default_rng(0).bytes(4096))
    expected["garbage"] = "corrupt"
    (state / "empty.npz").write_bytes(b"")
    expected["empty"] = "corrupt"
    p = sound("flipped")
    blob = bytearray(p.read_bytes())
    for i in range(len(blob) // 3, len(blob) // 3 + 64):
        blob[i] ^= 0xFF
    p.write_bytes(bytes(blob))
    expected["flipped"] = "corrupt"
    (state / "dir.npz").mkdir()
    expected["dir"] = "corrupt"
    np.save(state / "npy.npz", np.zeros(3))  # np.save appends .npy; move it into place
    shutil.move(state / "npy.npz.npy", state / "npy.npz")
    expected["npy"] = "corrupt"
    # a pickle where the stream ids belong: must be refused without being unpickled
    p = sound("pickle")
    with np.load(p) as npz:
        arrays = {k: npz[k] for k in npz.files}
    arrays["ids"] = np.array([Exploit(marker), "pickle/a"], dtype=object)
    with p.open("wb") as fh:
        np.savez(fh, **arrays)
    expected["pickle"] = "corrupt"
    # NaN smuggled into a state array (CRC recomputed: a "sound" but poisoned file)
    p = sound("nan")
    with np.load(p) as npz:
        arrays = {k: npz[k] for k in npz.files}
    arrays["state0"] = arrays["state0"].copy()
    arrays["state0"][0, 0, 0] = np.nan
    with p.open("wb") as fh:
        np.savez(fh, **arrays)
    expected["nan"] = "corrupt"
    # a zip claiming an unknown compression method (zipfile: NotImplementedError, found by
    # the fuzzer, once a start-up crash)
    p = sound("zipmethod")
    blob = bytearray(p.read_bytes())
    for sig, off in ((b"PK\x03\x04", 8), (b"PK\x01\x02", 10)):
        i = blob.find(sig)
        while i >= 0:
            blob[i + off : i + off + 2] = (99).to_bytes(2, "little")
            i = blob.find(sig, i + 4)
    p.write_bytes(bytes(blob))
    expected["zipmethod"] = "corrupt"
    write_snapshot(state / "foreign.npz", "foreign", sha="0" * 64)
    expected["foreign"] = "foreign"
    write_snapshot(state / "shapes.npz", "shapes", shapes=[(1, 16), (1, 16)])
    expected["shapes"] = "foreign"
    # newest generation truncated, previous one sound: restored from .prev
    p = sound("prev")
    write_snapshot(p, "prev")  # the second write keeps the first as prev.npz.prev
    assert previous_path(p).exists()
    p.write_bytes(p.read_bytes()[:100])
    expected["prev"] = "ok"
    return expected


def test_damaged_snapshots_are_refused_and_counted(broker, daemon, tmp_path: Path) -> None:
    marker = tmp_path / "pickle-was-loaded"
    expected = damage(tmp_path / "state", marker)
    d = daemon(
        routes=[{"name": r, "subscribe": [f"{r}/+"], "bundle": str(MODEL)} for r in expected]
    )
    d.start()  # started and ready: nothing was fatal
    log = log_text(d)
    for result in ("ok", "corrupt", "foreign"):
        want = sum(1 for v in expected.values() if v == result)
        got = d.metric("forecaster_snapshot_restores_total", result=result)
        assert got == want, (result, got, want, log)
    for route, result in expected.items():
        if result == "ok":
            assert (
                f"route {route}: restored 2 streams from {tmp_path}/state/{route}.npz.prev" in log
            )
        else:
            assert f"route {route}: snapshot refused ({result})" in log, route
    assert not marker.exists(), "a pickle in a snapshot was unpickled"
    # fresh states where refused: a reading older than the snapshot's is stepped, not dropped
    sink = Sink(broker.port)
    pub = mqtt_client(broker.port, "snap-pub")
    pub.loop_start()
    assert wait_until(pub.is_connected, 30)
    for route in expected:
        pub.publish(f"{route}/a", json.dumps({"value": 100.0, "ts": LAST_TS - 10}), qos=1)
    want_predicted = {f"{r}/a" for r, v in expected.items() if v != "ok"}
    assert wait_until(lambda: set(predictions(sink.snapshot())) >= want_predicted, 60), log_text(d)
    d.wait_metric("forecaster_readings_rejected_total", 1)
    assert d.metric("forecaster_readings_rejected_total", reason="out_of_order") == 1  # r=prev
    assert set(predictions(sink.snapshot())) == want_predicted
    pub.loop_stop()
    pub.disconnect()
    sink.close()
    assert d.stop() == 0
