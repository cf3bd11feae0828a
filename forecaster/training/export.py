"""Export a training run to a bundle and prove the ONNX graph steps exactly like PyTorch unrolls.

The proof is the contract the daemon depends on: PyTorch unrolls a long sequence for several
streams in one call; ONNX Runtime steps the exported one-step graph one reading at a time with
the state carried, as the daemon will. If they drift apart by more than ``tolerance`` (in the
target's standardised units) anywhere, the export fails and no bundle is written. A window graph
is proved the same way on every window of those streams (``PARITY_STEPS`` windows per stream, run
in daemon-like batches of one window per stream); an event classifier's probabilities are compared
directly (they have no scale).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import warnings
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import torch

from forecaster import __version__
from forecaster.errors import ForecasterError
from forecaster.model.bundle import MANIFEST_FILE, MODEL_FILE, Bundle, Manifest
from forecaster.model.windows import windows
from forecaster.training.nn import RNNForecaster, StepModule, WindowModule
from forecaster.training.report import load_run

OPSET = 17
PARITY_STEPS = 1000
PARITY_STREAMS = 8
PARITY_TOLERANCE = 1e-4


class ParityError(ForecasterError):
    """ONNX Runtime's stepped output differs from PyTorch's unroll beyond the tolerance."""


def to_onnx(model: RNNForecaster) -> bytes:
    """The one-step graph with a dynamic batch axis, as bytes (a single file, no external data)."""
    if model.spec.mode == "window":
        return _window_onnx(model)
    step = StepModule(model).eval()
    names = state_names(model)
    batch = 2
    args = (torch.zeros(batch, model.spec.n_features), *model.zero_state(batch))
    dynamic: dict[str, dict[int, str]] = {"x": {0: "B"}, "y": {0: "B"}}
    for n in names:  # every state tensor is [L, B, H]: batch in the middle
        dynamic[n] = {1: "B"}
        dynamic[f"{n}_out"] = {1: "B"}
    buf = io.BytesIO()
    with warnings.catch_warnings():
        # The TorchScript exporter is deprecated but emits a single fused LSTM/GRU node, which
        # ONNX Runtime steps far faster than the unrolled graph of the dynamo exporter.
        warnings.simplefilter("ignore")
        torch.onnx.export(
            step,
            args,
            buf,  # type: ignore[arg-type]  # the TorchScript exporter writes to any file object
            input_names=["x", *names],
            output_names=["y", *(f"{n}_out" for n in names)],
            dynamic_axes=dynamic,
            opset_version=OPSET,
            dynamo=False,
        )
    return buf.getvalue()


def state_names(model: RNNForecaster) -> list[str]:
    """The graph's state inputs, in order (outputs are the same with ``_out``)."""
    names = ["h", "c"] if model.spec.cell == "lstm" else ["h"]
    return [*names, "lags"] if model.spec.lag_buffer else names


def _window_onnx(model: RNNForecaster) -> bytes:
    """The window graph ``x [B, W, F] -> y [B, 1]``, batch axis dynamic."""
    module = WindowModule(model).eval()
    x = torch.zeros(2, model.spec.window or 1, model.spec.n_features)
    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            module,
            (x,),
            buf,  # type: ignore[arg-type]  # the TorchScript exporter writes to any file object
            input_names=["x"],
            output_names=["y"],
            dynamic_axes={"x": {0: "B"}, "y": {0: "B"}},
            opset_version=OPSET,
            dynamo=False,
        )
    return buf.getvalue()


def _window_parity(
    model: RNNForecaster, onnx_bytes: bytes, steps: int, streams: int, scale: float
) -> float:
    w = model.spec.window or 1
    x = parity_inputs(model, steps + w - 1, streams)  # [T, B, F]
    per_stream = np.stack([windows(x[:, b], w) for b in range(streams)], axis=1)  # [N, B, W, F]
    with torch.no_grad():
        flat = torch.from_numpy(per_stream.reshape(-1, w, model.spec.n_features))
        _, ref = model.forward_window(flat)
    expected = ref.numpy().reshape(steps, streams)
    sess = ort.InferenceSession(onnx_bytes, providers=["CPUExecutionProvider"])
    got = np.empty_like(expected)
    for t in range(steps):
        (y,) = sess.run(None, {"x": per_stream[t]})
        got[t] = y[:, 0]
    return float(np.max(np.abs(got - expected)) / scale)


def parity_inputs(model: RNNForecaster, steps: int, streams: int, seed: int = 0) -> np.ndarray:
    """``[T, B, F]`` raw readings: AR(1) walks around the training mean with the training spread,
    plus occasional jumps, so the check covers the range the model will see."""
    rng = np.random.default_rng(seed)
    mean = np.asarray(model.spec.mean)
    std = np.asarray(model.spec.std)
    z = np.zeros((steps, streams, model.spec.n_features))
    for t in range(1, steps):
        z[t] = 0.97 * z[t - 1] + 0.25 * rng.standard_normal(z.shape[1:])
    jumps = rng.random(z.shape) < 0.01
    z = z + jumps * rng.normal(0, 2.0, z.shape)
    return (mean + std * z).astype(np.float32)


def check_parity(
    model: RNNForecaster,
    onnx_bytes: bytes,
    steps: int = PARITY_STEPS,
    streams: int = PARITY_STREAMS,
) -> float:
    """Max |ORT − PyTorch| over every step and stream, in the target's standardised units
    (probabilities for an event classifier)."""
    scale = 1.0 if model.spec.task == "classify" else float(model.spec.std[0])
    if model.spec.mode == "window":
        return _window_parity(model, onnx_bytes, steps, streams, scale)
    x = parity_inputs(model, steps, streams)
    with torch.no_grad():
        _, ref, _ = model.forward_seq(torch.from_numpy(x), model.zero_state(streams))
    expected = ref.numpy()
    sess = ort.InferenceSession(onnx_bytes, providers=["CPUExecutionProvider"])
    names = state_names(model)
    state = [s.numpy() for s in model.zero_state(streams)]
    got = np.empty_like(expected)
    for t in range(steps):
        y, *state = sess.run(None, {"x": x[t], **dict(zip(names, state, strict=True))})
        got[t] = y[:, 0]
    return float(np.max(np.abs(got - expected)) / scale)


def manifest_for(
    model: RNNForecaster,
    report: dict[str, Any],
    sha: str,
    parity: float,
    name: str | None,
    version: str | None,
) -> Manifest:
    spec = model.spec
    cfg = report["config"]
    data = report["data"]
    val = report.get("validation")
    classify = spec.task == "classify"
    window_fields: dict[str, Any] = {}
    if spec.mode == "window":
        window_fields = {
            "mode": "window",
            "window": spec.window,
            "bidirectional": spec.bidirectional,
            "window_input": spec.window_input,
        }
    if classify:
        window_fields |= {
            "task": "classify",
            "horizon": cfg["horizon"],
            "label_column": cfg["label_column"],
            "threshold": report["threshold"],
            "validation_classification": report["validation_classification"],
        }
    return Manifest.model_validate(
        {
            **window_fields,
            "name": name or cfg["name"],
            "version": version or cfg["version"],
            "cell": spec.cell,
            "layers": spec.layers,
            "hidden": spec.hidden,
            "features": ["value"],
            "target": "value",
            "head": spec.head,
            "scaler": {"mean": list(spec.mean), "std": list(spec.std)},
            "delta_scale": spec.delta_scale,
            "warmup": report["warmup"],
            "opset": OPSET,
            "onnx_sha256": sha,
            "training_data": {
                "sha256": data["sha256"],
                "source": data["source"],
                "rows": data["rows"],
                "series": data["series"],
                "column": data["column"],
                "time_column": data["time_column"],
                "stream_column": data["stream_column"],
                "until": data["until"],
            },
            "validation": None
            if val is None
            else {k: val[k] for k in ("rmse", "mae", "naive_rmse", "naive_mae", "n")},
            "lag_buffer": spec.lag_buffer,
            "linear": {"lags": list(spec.ar_lags), "loss": report["linear"]["loss"]}
            if spec.ar_lags
            else None,
            "seasonality": report.get("seasonality", {}).get("periods", []),
            "interval": report.get("interval"),
            "fallback": (report.get("fallback") or {}).get("reason"),
            "selection": _selection(report.get("search")),
            "parity_max_abs_diff": parity,
            "package_version": __version__,
            "created": datetime.now(UTC).isoformat(timespec="seconds"),
        }
    )


def _selection(search: dict[str, Any] | None) -> dict[str, object] | None:
    """The search in brief for the manifest (every trial stays in ``report.json``)."""
    if not search:
        return None
    keys = ("library", "trials_asked", "budget_seconds", "budget_hit", "searched", "best_trial")
    return {k: search[k] for k in keys} | {"trials_run": len(search["trials"])}


def export(
    run_dir: Path,
    out: Path,
    name: str | None = None,
    version: str | None = None,
    tolerance: float = PARITY_TOLERANCE,
) -> tuple[Manifest, float]:
    """Write ``out/model.onnx`` and ``out/model.json`` once the parity proof passes."""
    model, report = load_run(Path(run_dir))
    blob = to_onnx(model)
    parity = check_parity(model, blob)
    if not parity <= tolerance:
        raise ParityError(
            f"ONNX Runtime differs from PyTorch by {parity:.3g} (scaled units) over "
            f"{PARITY_STEPS} steps x {PARITY_STREAMS} streams; the limit is {tolerance:g}"
        )
    sha = hashlib.sha256(blob).hexdigest()
    manifest = manifest_for(model, report, sha, parity, name, version)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    _write_atomic(out / MODEL_FILE, blob)
    _write_atomic(out / MANIFEST_FILE, (manifest.model_dump_json(indent=2) + "\n").encode())
    Bundle.load(out)  # the bundle as written must load and verify
    return manifest, parity


def _write_atomic(path: Path, blob: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("wb") as fh:
        fh.write(blob)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def describe(manifest: Manifest) -> str:
    return json.dumps(manifest.model_dump(), indent=2)
