"""The model bundle (``model.onnx`` + ``model.json``) and the graph contract of the daemon.

A bundle is self-contained: the graph takes raw readings and returns raw predictions (scaling is
inside), so anything that can run ONNX can use it. This module needs only numpy, pydantic and
ONNX Runtime, never PyTorch.

Contract (format version 3, mode ``stateful``, manifest ``graph: "sequence"``): several readings
per stream in one call.

- inputs ``x`` ``[B, T, F]`` float32 in raw units (stream ``b``'s readings in order, then
  padding), ``lengths`` ``[B]`` int64 (valid readings per stream, each >= 1), and the states as
  in format 2 below;
- outputs ``y`` ``[B, T]`` (``y[b, t]``: the prediction after reading ``t``; padded steps are
  meaningless) and the states after each stream's last valid step (``h_out``, ``c_out``,
  ``lags_out``); ``B`` and ``T`` are dynamic. The fused LSTM/GRU nodes take ``lengths`` as their
  ``sequence_lens``. One step is ``T = 1``, ``lengths = 1`` (:meth:`Bundle.step` does that).

Format version 2 (mode ``stateful``, ``graph`` absent or ``"step"``): one reading per call.

- inputs ``x`` ``[B, F]`` float32 in raw units, ``h`` ``[L, B, H]`` (and ``c`` for LSTM), and,
  when the manifest's ``lag_buffer`` P > 0, ``lags`` ``[1, B, P + 1]``: the stream's last P
  readings, newest first, and a "filled" flag (0 = empty; the graph then fills the buffer with the
  reading it receives and shifts each new reading in itself);
- outputs ``y`` ``[B, 1]`` (the next reading, raw units), ``h_out`` (and ``c_out``, ``lags_out``);
- ``B`` is dynamic; a zero state (every tensor) is the start of every stream, so the daemon
  carries the lag buffer like any recurrent state: snapshots, eviction and gap resets included.

Versions 1 (no lag buffer, no interval) and 2 still load and are served one reading per call;
any other version is refused.

Mode ``window`` (any readable format version; the fields it adds are optional with defaults;
``graph`` is ``"window"`` or absent):

- input ``x`` ``[B, W, F]`` float32, the last ``W`` readings of each stream, oldest first; no
  state inputs or outputs: every call starts from a zero state;
- output ``y`` ``[B, 1]``, predicted from the output after the last reading.

Task ``classify`` (either mode): ``y`` is the probability of an event (the label of the last
reading, or of the next one with ``horizon`` 1) and ``threshold`` turns it into a yes/no.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import onnxruntime as ort
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from forecaster.errors import BundleError
from forecaster.model.spread import unit

FORMAT_VERSION = 3
#: Versions this build reads: 1 is 2 without the optional lag buffer, interval and seasonality;
#: 2 has the one-step graph, 3 the sequence graph (``graph`` in the manifest says which).
READABLE_VERSIONS = (1, 2, 3)
GraphKind = Literal["step", "sequence", "window"]
MODEL_FILE = "model.onnx"
MANIFEST_FILE = "model.json"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Scaler(_Strict):
    """Standardisation applied inside the graph: ``(x - mean) / std`` per feature."""

    mean: list[float]
    std: list[float]


class Scores(_Strict):
    """One-step scores on held-out data, model next to persistence (the last value)."""

    rmse: float
    mae: float
    naive_rmse: float
    naive_mae: float
    n: int


class ClassScores(_Strict):
    """Held-out scores of an event classifier at the manifest's threshold."""

    accuracy: float
    precision: float
    recall: float
    f1: float
    roc_auc: float | None = Field(description="None when the held-out labels hold one class")
    n: int
    positives: int = Field(description="held-out readings labelled 1")
    pos_weight: float = Field(description="BCE weight of the positive class used in training")


class Interval(_Strict):
    """A prediction interval at ``coverage``, split-conformal on the validation residuals
    (``actual - predicted``) of ``n`` one-step predictions.

    Without ``spread_weight`` the bounds are ``[y + lower, y + upper]`` (raw units). With it,
    ``lower``/``upper`` are in units of the stream's spread (:mod:`forecaster.model.spread`:
    the smoothed size of its recent changes, starting at ``spread_start``) and the bounds are
    ``y + lower * unit``, ``y + upper * unit``: the interval follows the stream's volatility."""

    coverage: float = Field(gt=0, lt=1)
    lower: float = Field(le=0, description="offset from the point forecast (raw or spread units)")
    upper: float = Field(ge=0, description="offset from the point forecast (raw or spread units)")
    n: int = Field(ge=2, description="validation residuals it was calibrated on")
    spread_weight: float | None = Field(
        default=None, gt=0, le=1, description="weight of the newest change in the spread"
    )
    spread_start: float | None = Field(
        default=None, gt=0, description="a new stream's spread (raw units per reading)"
    )

    @model_validator(mode="after")
    def _spread_fields(self) -> Interval:
        if (self.spread_weight is None) != (self.spread_start is None):
            raise ValueError("spread_weight and spread_start go together")
        return self

    @property
    def spreading(self) -> tuple[float, float] | None:
        """``(spread_weight, spread_start)`` when the bounds follow each stream's spread."""
        if self.spread_weight is None or self.spread_start is None:
            return None
        return self.spread_weight, self.spread_start

    @property
    def scaled(self) -> bool:
        """Whether the bounds follow each stream's spread."""
        return self.spreading is not None

    def bounds(
        self, y: np.ndarray | float, spread: np.ndarray | float | None
    ) -> tuple[np.ndarray, np.ndarray]:
        """``(lower, upper)`` for predictions ``y`` made at ``spread`` (ignored unscaled)."""
        y = np.asarray(y, dtype=np.float64)
        if self.spread_start is None or spread is None:
            return y + self.lower, y + self.upper
        u = unit(spread, self.spread_start)
        return y + self.lower * u, y + self.upper * u


class LinearPath(_Strict):
    """The closed-form linear path under the network (its coefficients are in the graph)."""

    lags: list[int] = Field(description="lag l = the reading l steps before the target")
    loss: str = Field(description="squared or huber: what the ridge fit minimised")


class TrainingData(_Strict):
    """Where the weights came from: enough to tell two training sets apart."""

    sha256: str = Field(description="sha256 of the CSV file the model was trained on")
    source: str = Field(description="file name of the training CSV")
    rows: int
    series: int
    column: list[str]
    time_column: str | None = None
    stream_column: str | None = None
    until: str | None = Field(default=None, description="rows at or after this were not used")


class Manifest(_Strict):
    """``model.json``: what the graph is, what it predicts and how it was checked."""

    format_version: int = FORMAT_VERSION
    graph: GraphKind | None = Field(
        default=None,
        description="the graph's signature: 'sequence' (format 3: x [B, T, F] + lengths), "
        "'step' (format 1-2: x [B, F]) or 'window'; absent = 'step', or 'window' in window mode",
    )
    name: str
    version: str
    mode: Literal["stateful", "window"] = Field(
        default="stateful",
        description="stateful: one step per reading, state carried; window: the last `window` "
        "readings per call, from a zero state",
    )
    window: int | None = Field(default=None, ge=1, description="readings per window (window mode)")
    bidirectional: bool = Field(default=False, description="bidirectional layers (window mode)")
    window_input: Literal["level", "diff"] | None = Field(
        default=None,
        description="window mode: 'level' = readings standardised with `scaler`; 'diff' = "
        "change from the previous reading (0 for the first) divided by `delta_scale`",
    )
    task: Literal["regress", "classify"] = Field(
        default="regress", description="regress: y is the next value; classify: y = P(event)"
    )
    horizon: int | None = Field(
        default=None,
        ge=0,
        le=1,
        description="classify: 0 = the label of the last reading, 1 = of the next reading",
    )
    label_column: str | None = Field(default=None, description="classify: the training labels")
    threshold: float | None = Field(
        default=None, description="classify: event = probability >= threshold (from validation)"
    )
    cell: Literal["lstm", "gru"]
    layers: int = Field(ge=1)
    hidden: int = Field(ge=1)
    features: list[str] = Field(min_length=1, description="input features, in x's column order")
    target: str = Field(description="the feature whose next value y predicts")
    head: Literal["delta", "level"] = Field(
        description="what the network itself predicts: 'delta' = change from the last reading "
        "(y = x + delta), 'level' = the next value directly; y is always the next value"
    )
    scaler: Scaler
    delta_scale: float = Field(gt=0, description="scale of the delta head, raw units")
    warmup: int = Field(ge=0, description="readings before a stream's predictions count as warm")
    opset: int
    onnx_sha256: str
    training_data: TrainingData
    validation: Scores | None = Field(default=None, description="regress: held-out scores")
    validation_classification: ClassScores | None = Field(
        default=None, description="classify: held-out scores at the threshold"
    )
    lag_buffer: int = Field(
        default=0, ge=0, description="readings of the per-stream lag state (0: no lag state)"
    )
    linear: LinearPath | None = Field(default=None, description="the linear path, if any")
    seasonality: list[int] = Field(
        default_factory=list, description="seasonal periods found in the training data (steps)"
    )
    interval: Interval | None = Field(default=None, description="prediction interval offsets")
    clip: float | None = Field(
        default=None,
        gt=0,
        description="a reading farther than `clip` spreads from its prediction enters the model "
        "clipped to that distance (model/clip.py); absent: no clipping",
    )
    fallback: str | None = Field(
        default=None, description="why the shipped model is persistence, when it is"
    )
    selection: dict[str, object] | None = Field(
        default=None, description="the model search: trials, the best one, whether the budget hit"
    )
    parity_max_abs_diff: float = Field(description="export-time PyTorch vs ORT, scaled units")
    package_version: str
    created: str

    @model_validator(mode="after")
    def _consistent(self) -> Manifest:
        if self.mode == "window" and self.window is None:
            raise ValueError("window mode needs `window`")
        if self.mode == "window" and self.window_input is None:
            raise ValueError("window mode needs `window_input`")
        if self.mode == "stateful" and (
            self.window is not None or self.bidirectional or self.window_input is not None
        ):
            raise ValueError("stateful mode takes no `window`, `window_input` or `bidirectional`")
        if self.task == "classify":
            if self.threshold is None or self.horizon is None:
                raise ValueError("classify needs `threshold` and `horizon`")
            if self.validation_classification is None:
                raise ValueError("classify needs `validation_classification`")
        elif self.validation is None:
            raise ValueError("regress needs `validation`")
        if self.clip is not None and (
            self.mode != "stateful" or self.interval is None or not self.interval.scaled
        ):
            raise ValueError("`clip` is for stateful regression with a spread-scaled interval")
        if self.lag_buffer and self.mode != "stateful":
            raise ValueError("`lag_buffer` is for stateful mode")
        if (self.graph == "window") != (self.mode == "window") and self.graph is not None:
            raise ValueError(f"graph {self.graph!r} does not fit mode {self.mode!r}")
        if self.graph == "sequence" and self.format_version < 3:
            raise ValueError("graph 'sequence' needs format_version 3")
        if self.format_version >= 3 and self.mode == "stateful" and self.graph != "sequence":
            raise ValueError("format_version 3 stateful bundles have graph 'sequence'")
        return self

    @property
    def graph_kind(self) -> GraphKind:
        """The graph's signature, with the defaults of older manifests filled in."""
        if self.graph is not None:
            return self.graph
        return "window" if self.mode == "window" else "step"


def restore_last(y: np.ndarray, last: np.ndarray) -> np.ndarray:
    """A delta-head prediction with the last reading the graph rounded put back, in float64:
    ``last + (y - float32(last))``.

    Why: the graph computes in float32, so a reading reaches it rounded to 24 significant bits,
    and its ``y = last + change`` carries that rounding: 1,000,000,123 becomes 1,000,000,128, and
    persistence itself is off by up to 32 units on a meter whose steps are 3 (measured: a
    cumulative counter near 1e9 scored a held-out skill of -4.4). What the graph added to the
    rounded reading, ``y - float32(last)``, is exact in float64; added to the reading itself it is
    the same change on the true level, and a model that is persistence predicts the reading
    exactly. Both the daemon and ``evaluate`` go through here, so they agree."""
    last = np.asarray(last, dtype=np.float64)
    rounded = last.astype(np.float32).astype(np.float64)
    return last + (np.asarray(y, dtype=np.float64) - rounded)


@dataclass(frozen=True)
class StateSpec:
    """One recurrent state tensor: input name, output name, and ``[L, H]`` (batch in between)."""

    name: str
    output: str
    layers: int
    hidden: int


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def read_manifest(bundle_dir: Path) -> Manifest:
    """Parse and validate ``model.json``; every problem becomes a :class:`BundleError`."""
    path = Path(bundle_dir) / MANIFEST_FILE
    if not Path(bundle_dir).is_dir():
        raise BundleError(f"bundle {bundle_dir} is not a directory")
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise BundleError(f"bundle {bundle_dir} has no {MANIFEST_FILE}") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise BundleError(f"{path}: not a readable JSON manifest ({exc})") from None
    if not isinstance(raw, dict):
        raise BundleError(f"{path}: manifest must be a JSON object")
    version = raw.get("format_version")
    if version not in READABLE_VERSIONS:
        raise BundleError(
            f"{path}: format_version {version!r} is not supported (this build reads "
            f"{', '.join(str(v) for v in READABLE_VERSIONS[:-1])} and {READABLE_VERSIONS[-1]}): "
            "upgrade forecaster or re-export"
        )
    try:
        return Manifest.model_validate(raw)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        raise BundleError(f"{path}: {where}: {first['msg']}") from None


def state_specs(manifest: Manifest) -> tuple[StateSpec, ...]:
    if manifest.mode == "window":
        return ()
    names = ("h", "c") if manifest.cell == "lstm" else ("h",)
    specs = tuple(StateSpec(n, f"{n}_out", manifest.layers, manifest.hidden) for n in names)
    if manifest.lag_buffer:
        specs += (StateSpec("lags", "lags_out", 1, manifest.lag_buffer + 1),)
    return specs


class Bundle:
    """A verified bundle with a live ONNX Runtime session.

    Loading reads the ONNX file once, checks its sha256 against the manifest and builds the
    session from those same bytes, so what was verified is what runs, and a graph that refers to
    external data files cannot load them (there is no base path to resolve them against).
    """

    def __init__(self, path: Path, manifest: Manifest, session: ort.InferenceSession) -> None:
        self.path = path
        self.manifest = manifest
        self.session = session
        self.states = state_specs(manifest)
        self.mode = manifest.mode
        #: True for a format-3 sequence graph: :meth:`run` steps many readings per stream.
        self.sequence = manifest.graph_kind == "sequence"
        self._output_names = ["y", *(s.output for s in self.states)]
        self._check_signature()

    @classmethod
    def load(cls, path: str | Path, *, intra_op_threads: int = 1) -> Bundle:
        bundle_dir = Path(path)
        manifest = read_manifest(bundle_dir)
        onnx_path = bundle_dir / MODEL_FILE
        try:
            blob = onnx_path.read_bytes()
        except OSError as exc:
            raise BundleError(
                f"bundle {bundle_dir}: cannot read {MODEL_FILE} ({exc.strerror})"
            ) from None
        digest = hashlib.sha256(blob).hexdigest()
        if digest != manifest.onnx_sha256:
            raise BundleError(
                f"bundle {bundle_dir}: {MODEL_FILE} sha256 {digest[:12]}… does not match the "
                f"manifest's {manifest.onnx_sha256[:12]}…"
            )
        options = ort.SessionOptions()
        options.intra_op_num_threads = intra_op_threads
        options.inter_op_num_threads = 1
        options.log_severity_level = 3
        try:
            session = ort.InferenceSession(blob, options, providers=["CPUExecutionProvider"])
        except Exception as exc:  # ORT raises its own untyped errors for bad graphs
            raise BundleError(
                f"bundle {bundle_dir}: ONNX Runtime cannot load the graph ({exc})"
            ) from None
        return cls(bundle_dir, manifest, session)

    @property
    def sha256(self) -> str:
        return self.manifest.onnx_sha256

    @property
    def interval(self) -> Interval | None:
        """Offsets of the prediction interval (``y + lower`` … ``y + upper``), or None."""
        return self.manifest.interval

    @property
    def n_features(self) -> int:
        return len(self.manifest.features)

    @property
    def restores_last(self) -> bool:
        """Whether ``y`` is the last reading plus a change (a stateful regression with a delta
        head), so that :func:`restore_last` applies to its predictions."""
        m = self.manifest
        return m.mode == "stateful" and m.task == "regress" and m.head == "delta"

    @property
    def window(self) -> int:
        """Readings per window; 1 for a stateful model (it reads one at a time)."""
        return self.manifest.window or 1

    @property
    def state_shapes(self) -> list[tuple[int, int]]:
        """``(L, H)`` of each per-stream tensor the daemon keeps: the recurrent states, or for a
        window model its last ``W`` readings as one ``(W, F)`` tensor (see ``window.py``)."""
        if self.mode == "window":
            return [(self.window, self.n_features)]
        return [(s.layers, s.hidden) for s in self.states]

    def _check_signature(self) -> None:
        m = self.manifest
        inputs = {i.name: i.shape for i in self.session.get_inputs()}
        outputs = {o.name: o.shape for o in self.session.get_outputs()}
        expected_in: dict[str, list[object]] = {"x": ["B", len(m.features)]}
        if m.mode == "window":
            expected_in["x"] = ["B", self.window, len(m.features)]
        elif self.sequence:
            expected_in["x"] = ["B", "T", len(m.features)]
            expected_in["lengths"] = ["B"]
        for s in self.states:
            expected_in[s.name] = [s.layers, "B", s.hidden]
        if set(inputs) != set(expected_in) or not {"y", *(s.output for s in self.states)} <= set(
            outputs
        ):
            raise BundleError(
                f"bundle {self.path}: graph inputs {sorted(inputs)} / outputs {sorted(outputs)} do "
                f"not match the manifest ({m.cell}: {sorted(expected_in)})"
            )
        for name, shape in expected_in.items():
            got = inputs[name]
            fixed = [d for d in shape if isinstance(d, int)]
            got_fixed = [d for d in got if isinstance(d, int)]
            if len(got) != len(shape) or fixed != got_fixed:
                raise BundleError(
                    f"bundle {self.path}: input {name} has shape {got}, manifest says {shape}"
                )

    def zero_state(self, batch: int) -> tuple[np.ndarray, ...]:
        return tuple(np.zeros((s.layers, batch, s.hidden), dtype=np.float32) for s in self.states)

    def step(
        self, x: np.ndarray, state: Sequence[np.ndarray]
    ) -> tuple[np.ndarray, tuple[np.ndarray, ...]]:
        """One step for a batch of streams: ``x`` ``[B, F]``, states ``[L, B, H]`` each.

        Returns the predictions ``[B]`` (raw units; see :meth:`run` for their precision) and the
        new states. ONNX Runtime releases the GIL while it runs, so the MQTT thread keeps
        receiving meanwhile. A sequence graph runs it as ``T = 1``.
        """
        if self.sequence:
            y, new = self.run(x[:, None, :], np.ones(x.shape[0], dtype=np.int64), state)
            return y[:, 0], new
        feeds = {"x": np.ascontiguousarray(x, dtype=np.float32)}
        for spec, value in zip(self.states, state, strict=True):
            feeds[spec.name] = value
        y, *new_state = self.session.run(self._output_names, feeds)
        return self._restored(y[:, 0], x[:, 0]), tuple(new_state)

    def run(
        self, x: np.ndarray, lengths: np.ndarray, state: Sequence[np.ndarray]
    ) -> tuple[np.ndarray, tuple[np.ndarray, ...]]:
        """Sequence graph only: ``x`` ``[B, T, F]`` (stream ``b``'s readings, oldest first, then
        padding), ``lengths`` ``[B]`` (>= 1), states ``[L, B, H]`` → ``y`` ``[B, T]`` (garbage at
        padded steps) and the states after each stream's last valid step.

        The graph computes in float32. For a delta head, ``y`` is float64 with the reading
        itself put back (:func:`restore_last`): pass ``x`` in float64 for that to count."""
        if not self.sequence:
            raise BundleError(f"bundle {self.path}: {self.manifest.graph_kind} graph, not sequence")
        feeds = {
            "x": np.ascontiguousarray(x, dtype=np.float32),
            "lengths": np.ascontiguousarray(lengths, dtype=np.int64),
        }
        for spec, value in zip(self.states, state, strict=True):
            feeds[spec.name] = value
        y, *new_state = self.session.run(self._output_names, feeds)
        return self._restored(y, x[..., 0]), tuple(new_state)

    def _restored(self, y: np.ndarray, last: np.ndarray) -> np.ndarray:
        return restore_last(y, last) if self.restores_last else y

    def predict_windows(self, x: np.ndarray) -> np.ndarray:
        """Window mode: ``x`` ``[B, W, F]`` raw readings, oldest first → ``y`` ``[B]`` float32."""
        (y,) = self.session.run(["y"], {"x": np.ascontiguousarray(x, dtype=np.float32)})
        return y[:, 0]

    def warm_up(self) -> None:
        """Run one zero input so the first real reading does not pay ORT's lazy initialisation."""
        if self.mode == "window":
            self.predict_windows(np.zeros((1, self.window, self.n_features), dtype=np.float32))
            return
        self.step(np.zeros((1, self.n_features), dtype=np.float32), self.zero_state(1))
