"""Export a training run to a bundle and prove the ONNX graph steps exactly like PyTorch unrolls.

The proof is the contract the daemon depends on: PyTorch unrolls a long sequence for several
streams in one call; ONNX Runtime runs the exported graph as the daemon will. For the sequence
graph (bundle format 3, the default) that is twice: in ragged micro-batches (random lengths per
stream and call, random subsets of streams, the state carried between calls) and one reading
at a time (``T = 1``, the daemon's fallback path); for the one-step graph of format 2
(``graph="step"``) one reading at a time. If any of them drifts from PyTorch by more than
``tolerance`` (in the target's standardised units) anywhere, the export fails and no bundle is
written. A window graph
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
from typing import Any, Literal

import numpy as np
import onnx
import onnxruntime as ort
import torch

from forecaster import __version__
from forecaster.errors import ForecasterError
from forecaster.model.bundle import MANIFEST_FILE, MODEL_FILE, Bundle, Manifest
from forecaster.model.windows import windows
from forecaster.training.nn import RNNForecaster, SequenceModule, StepModule, WindowModule
from forecaster.training.report import load_run

OPSET = 17
PARITY_STEPS = 1000
PARITY_STREAMS = 8
PARITY_TOLERANCE = 1e-4
#: Longest run of one stream in one call of the ragged parity check.
PARITY_MAX_RUN = 40

Graph = Literal["sequence", "step"]


class ParityError(ForecasterError):
    """ONNX Runtime's stepped output differs from PyTorch's unroll beyond the tolerance."""


def to_onnx(model: RNNForecaster, graph: Graph = "sequence") -> bytes:
    """The bundle's graph as bytes (a single file, no external data).

    ``graph="sequence"`` (format 3): ``x [B, T, F]``, ``lengths [B]`` int64 and the states in,
    ``y [B, T]`` and the states after each stream's last valid step out; ``B`` and ``T``
    dynamic. ``graph="step"`` (format 2): ``x [B, F]`` and the states in, ``y [B, 1]`` and the
    new states out. A window model has its own graph either way."""
    if model.spec.mode == "window":
        return _window_onnx(model)
    if graph == "sequence":
        return _sequence_onnx(model)
    names = state_names(model)
    batch = 2
    args = (torch.zeros(batch, model.spec.n_features), *model.zero_state(batch))
    dynamic: dict[str, dict[int, str]] = {"x": {0: "B"}, "y": {0: "B"}}
    for n in names:  # every state tensor is [L, B, H]: batch in the middle
        dynamic[n] = {1: "B"}
        dynamic[f"{n}_out"] = {1: "B"}
    return _torchscript(StepModule(model), args, ["x", *names], names, dynamic)


def _torchscript(
    module: torch.nn.Module,
    args: tuple[torch.Tensor, ...],
    inputs: list[str],
    states: list[str],
    dynamic: dict[str, dict[int, str]],
) -> bytes:
    """``module`` as ONNX bytes from the TorchScript exporter; outputs ``y`` and ``<state>_out``.

    The TorchScript exporter is deprecated but emits a single fused LSTM/GRU node, which ONNX
    Runtime steps far faster than the unrolled graph of the dynamo exporter."""
    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            module.eval(),
            args,
            buf,  # type: ignore[arg-type]  # the TorchScript exporter writes to any file object
            input_names=inputs,
            output_names=["y", *(f"{n}_out" for n in states)],
            dynamic_axes=dynamic,
            opset_version=OPSET,
            dynamo=False,
        )
    return buf.getvalue()


def _sequence_onnx(model: RNNForecaster) -> bytes:
    """Export :class:`SequenceModule` over a dynamic ``T``, then give every fused LSTM/GRU node
    ``lengths`` as its ``sequence_lens``: ONNX Runtime then stops each stream's recurrence at
    its last valid step, so ``h_out``/``c_out`` are the states there (``Y_h``/``Y_c``)."""
    names = state_names(model)
    batch, steps = 3, 5
    args = (
        torch.zeros(batch, steps, model.spec.n_features),
        torch.full((batch,), steps, dtype=torch.int64),
        *model.zero_state(batch),
    )
    dynamic: dict[str, dict[int, str]] = {
        "x": {0: "B", 1: "T"},
        "lengths": {0: "B"},
        "y": {0: "B", 1: "T"},
    }
    for n in names:
        dynamic[n] = {1: "B"}
        dynamic[f"{n}_out"] = {1: "B"}
    blob = _torchscript(SequenceModule(model), args, ["x", "lengths", *names], names, dynamic)
    return _with_sequence_lens(blob, names)


def _with_sequence_lens(blob: bytes, names: list[str]) -> bytes:
    """Wire the graph input ``lengths`` (int64 ``[B]``) into every LSTM/GRU node's
    ``sequence_lens`` (input 4, int32), adding the input when the exporter dropped it as unused
    (no lag path), and put the inputs in the contract's order."""
    proto = onnx.load_from_string(blob)
    g = proto.graph
    rnn = [n for n in g.node if n.op_type in ("LSTM", "GRU")]
    if not rnn:
        raise ParityError("the exported sequence graph has no fused LSTM/GRU node")
    cast_out = "lengths_int32"
    for node in rnn:
        while len(node.input) < 5:
            node.input.append("")
        if node.input[4]:
            raise ParityError(f"{node.op_type} node {node.name} already has sequence_lens")
        node.input[4] = cast_out
    cast = onnx.helper.make_node(
        "Cast", ["lengths"], [cast_out], name="lengths_to_int32", to=onnx.TensorProto.INT32
    )
    g.node.insert(0, cast)
    inputs = {i.name: i for i in g.input}
    if "lengths" not in inputs:
        inputs["lengths"] = onnx.helper.make_tensor_value_info(
            "lengths", onnx.TensorProto.INT64, ["B"]
        )
    ordered = [onnx.ValueInfoProto() for _ in ("x", "lengths", *names)]
    for dst, name in zip(ordered, ("x", "lengths", *names), strict=True):
        dst.CopyFrom(inputs[name])
    del g.input[:]
    g.input.extend(ordered)
    onnx.checker.check_model(proto)
    return proto.SerializeToString()


def state_names(model: RNNForecaster) -> list[str]:
    """The graph's state inputs, in order (outputs are the same with ``_out``)."""
    names = ["h", "c"] if model.spec.cell == "lstm" else ["h"]
    return [*names, "lags"] if model.spec.lag_buffer else names


def _window_onnx(model: RNNForecaster) -> bytes:
    """The window graph ``x [B, W, F] -> y [B, 1]``, batch axis dynamic."""
    x = torch.zeros(2, model.spec.window or 1, model.spec.n_features)
    return _torchscript(WindowModule(model), (x,), ["x"], [], {"x": {0: "B"}, "y": {0: "B"}})


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
    graph: Graph = "sequence",
    seed: int = 0,
) -> float:
    """Max |ORT − PyTorch| over every step and stream, in the target's standardised units
    (probabilities for an event classifier). For the sequence graph, the worse of the ragged
    micro-batches and the one-reading calls; ``seed`` draws the ragged lengths."""
    scale = 1.0 if model.spec.task == "classify" else float(model.spec.std[0])
    if model.spec.mode == "window":
        return _window_parity(model, onnx_bytes, steps, streams, scale)
    x = parity_inputs(model, steps, streams)
    with torch.no_grad():
        _, ref, _ = model.forward_seq(torch.from_numpy(x), model.zero_state(streams))
    expected = ref.numpy()
    sess = ort.InferenceSession(onnx_bytes, providers=["CPUExecutionProvider"])
    names = state_names(model)
    zero = [s.numpy() for s in model.zero_state(streams)]
    if graph == "step":
        state = zero
        got = np.empty_like(expected)
        for t in range(steps):
            y, *state = sess.run(None, {"x": x[t], **dict(zip(names, state, strict=True))})
            got[t] = y[:, 0]
        return float(np.max(np.abs(got - expected)) / scale)
    ones = np.ones(steps, dtype=np.int64)
    stepped = run_ragged(sess, names, x, zero, [ones] * streams)
    runs = ragged_runs(steps, streams, np.random.default_rng(seed))
    ragged = run_ragged(sess, names, x, zero, runs)
    worst = max(
        np.max(np.abs(stepped - expected)),
        np.max(np.abs(ragged - expected)),
        np.max(np.abs(ragged - stepped)),  # the daemon's two paths agree with each other too
    )
    return float(worst / scale)


def ragged_runs(
    steps: int, streams: int, rng: np.random.Generator, max_run: int = PARITY_MAX_RUN
) -> list[np.ndarray]:
    """Per stream, random run lengths (1 … ``max_run``) that add up to ``steps``; a stream's
    k-th run goes into call k, so calls mix long runs, short runs and absent streams."""
    out = []
    for _ in range(streams):
        lens: list[int] = []
        left = steps
        while left:
            n = min(left, int(rng.integers(1, max_run + 1)))
            if rng.random() < 0.3:
                n = 1
            lens.append(n)
            left -= n
        out.append(np.asarray(lens, dtype=np.int64))
    return out


def run_ragged(
    sess: ort.InferenceSession,
    names: list[str],
    x: np.ndarray,
    zero: list[np.ndarray],
    runs: list[np.ndarray],
) -> np.ndarray:
    """Run ``x`` ``[T, S, F]`` through a sequence graph in calls of ragged runs, the state of
    each stream carried from one call to its next; returns ``y`` ``[T, S]``."""
    steps, streams, n_features = x.shape
    state = [z.copy() for z in zero]
    got = np.full((steps, streams), np.nan, dtype=np.float32)
    pos = np.zeros(streams, dtype=np.int64)
    for k in range(max(len(r) for r in runs)):
        rows = [b for b in range(streams) if k < len(runs[b])]
        lens = np.array([runs[b][k] for b in rows], dtype=np.int64)
        xb = np.zeros((len(rows), int(lens.max()), n_features), dtype=np.float32)
        for j, b in enumerate(rows):
            xb[j, : lens[j]] = x[pos[b] : pos[b] + lens[j], b]
        feeds = {"x": xb, "lengths": lens}
        feeds |= {n: s[:, rows] for n, s in zip(names, state, strict=True)}
        y, *new = sess.run(None, feeds)
        for j, b in enumerate(rows):
            got[pos[b] : pos[b] + lens[j], b] = y[j, : lens[j]]
            pos[b] += lens[j]
        for s, n in zip(state, new, strict=True):
            s[:, rows] = n
    return got


def manifest_for(
    model: RNNForecaster,
    report: dict[str, Any],
    sha: str,
    parity: float,
    name: str | None,
    version: str | None,
    graph: Graph = "sequence",
) -> Manifest:
    spec = model.spec
    cfg = report["config"]
    data = report["data"]
    val = report.get("validation")
    classify = spec.task == "classify"
    window_fields: dict[str, Any] = {}
    if spec.mode == "stateful":
        window_fields = (
            {"format_version": 3, "graph": "sequence"}
            if graph == "sequence"
            else {"format_version": 2}
        )
    if spec.mode == "window":
        window_fields = {
            "graph": "window",
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
            "clip": (report.get("clip") or {}).get("limit"),
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
    graph: Graph = "sequence",
) -> tuple[Manifest, float]:
    """Write ``out/model.onnx`` and ``out/model.json`` once the parity proof passes.

    ``graph="step"`` writes the one-step graph under format 2 (what this build wrote before
    format 3, for daemons that read only 1 and 2); window models have one graph either way."""
    model, report = load_run(Path(run_dir))
    blob = to_onnx(model, graph)
    parity = check_parity(model, blob, graph=graph)
    if not parity <= tolerance:
        raise ParityError(
            f"ONNX Runtime differs from PyTorch by {parity:.3g} (scaled units) over "
            f"{PARITY_STEPS} steps x {PARITY_STREAMS} streams; the limit is {tolerance:g}"
        )
    sha = hashlib.sha256(blob).hexdigest()
    manifest = manifest_for(model, report, sha, parity, name, version, graph)
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
