"""The PyTorch forecaster: a stacked LSTM or GRU with scaling and the output head built in.

Everything the ONNX graph does happens in this module, in one place: standardise the reading,
step the RNN, map the last layer's output to the next reading in raw units. ``forward_seq``
unrolls a whole sequence (training, validation, the parity reference); ``StepModule`` wraps the
same weights as the one-step graph that is exported. In window mode ``forward_window`` runs a
whole window from a zero state and ``WindowModule`` is the exported graph; with ``task="classify"``
the head's output is a logit and ``y`` its sigmoid, the event probability.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Literal

import torch
from torch import Tensor, nn

State = tuple[Tensor, ...]


@dataclass(frozen=True)
class ModelSpec:
    """What is needed to rebuild the network around saved weights."""

    cell: Literal["lstm", "gru"]
    layers: int
    hidden: int
    n_features: int
    head: Literal["delta", "level"]
    dropout: float
    mean: tuple[float, ...]
    std: tuple[float, ...]
    delta_scale: float
    mode: Literal["stateful", "window"] = "stateful"
    window: int | None = None
    bidirectional: bool = False
    task: Literal["regress", "classify"] = "regress"
    window_input: Literal["level", "diff"] = "level"

    def as_dict(self) -> dict[str, object]:
        return asdict(self)


class RNNForecaster(nn.Module):
    """Stacked RNN whose head predicts the next value of feature 0.

    With ``head="delta"`` the network predicts the change from the last reading in units of
    ``delta_scale`` and the head starts at zero, so an untrained model *is* persistence and
    training can only move it away from persistence where that helps. ``head="level"``
    predicts the standardised next value directly.
    """

    mean: Tensor
    std: Tensor
    delta_scale: Tensor

    def __init__(self, spec: ModelSpec) -> None:
        super().__init__()
        self.spec = spec
        rnn_cls = nn.LSTM if spec.cell == "lstm" else nn.GRU
        self.rnn = rnn_cls(
            input_size=spec.n_features,
            hidden_size=spec.hidden,
            num_layers=spec.layers,
            dropout=spec.dropout if spec.layers > 1 else 0.0,
            bidirectional=spec.bidirectional,
        )
        self.head = nn.Linear(spec.hidden * (2 if spec.bidirectional else 1), 1)
        if spec.head == "delta" and spec.task == "regress":
            nn.init.zeros_(self.head.weight)
            nn.init.zeros_(self.head.bias)
        self.register_buffer("mean", torch.tensor(spec.mean, dtype=torch.float32))
        self.register_buffer("std", torch.tensor(spec.std, dtype=torch.float32))
        self.register_buffer("delta_scale", torch.tensor(spec.delta_scale, dtype=torch.float32))

    def zero_state(self, batch: int) -> State:
        h = torch.zeros(self.spec.layers, batch, self.spec.hidden)
        return (h, torch.zeros_like(h)) if self.spec.cell == "lstm" else (h,)

    def _rnn(self, xs: Tensor, state: State) -> tuple[Tensor, State]:
        if self.spec.cell == "lstm":
            out, (h, c) = self.rnn(xs, (state[0], state[1]))
            return out, (h, c)
        out, h = self.rnn(xs, state[0])
        return out, (h,)

    def forward_seq(self, x: Tensor, state: State) -> tuple[Tensor, Tensor, State]:
        """Unroll ``x`` ``[T, B, F]`` (raw units).

        Returns the head's output ``[T, B]`` (its scaled units), ``y`` ``[T, B]`` (the next value
        in raw units) and the final state."""
        xs = (x - self.mean) / self.std
        out, state = self._rnn(xs, state)
        o = self.head(out).squeeze(-1)
        return o, self.output(o, x[..., 0]), state

    def forward_window(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Run windows ``x`` ``[B, W, F]`` (raw units), each from a zero state.

        ``window_input="level"`` standardises the readings; ``"diff"`` feeds the change from the
        previous reading (0 for the first) in units of ``delta_scale``, which an event detector
        needs when the series drifts out of the training range while its events (spikes, steps)
        keep their size.

        Returns the head's output ``[B]`` (scaled units, or the logit when classifying) and ``y``
        ``[B]``: the next value in raw units, or the event probability. The head reads the last
        output; bidirectional, that is the forward direction after the last reading beside the
        backward direction after the first, so both directions have seen the whole window."""
        if self.spec.window_input == "diff":
            # Level-free: each step's change in units of a typical step (``delta_scale``).
            steps = torch.cat([torch.zeros_like(x[:, :1]), x[:, 1:] - x[:, :-1]], dim=1)
            xs = (steps / self.delta_scale).transpose(0, 1)  # [W, B, F]
        else:
            xs = ((x - self.mean) / self.std).transpose(0, 1)
        out, _ = self.rnn(xs)  # zero initial state
        if self.spec.bidirectional:
            h = self.spec.hidden
            last = torch.cat([out[-1, :, :h], out[0, :, h:]], dim=-1)
        else:
            last = out[-1]
        o = self.head(last).squeeze(-1)
        return o, self.output(o, x[:, -1, 0])

    def output(self, o: Tensor, last: Tensor) -> Tensor:
        """The graph's ``y`` from the head's output: a probability or a raw-unit value."""
        if self.spec.task == "classify":
            return torch.sigmoid(o)
        return self.to_raw(o, last)

    def to_raw(self, o: Tensor, last: Tensor) -> Tensor:
        if self.spec.head == "delta":
            return last + o * self.delta_scale
        return self.mean[0] + o * self.std[0]

    def target(self, x_next: Tensor, x_last: Tensor) -> Tensor:
        """The head's training target for the next reading, in the head's scaled units."""
        if self.spec.head == "delta":
            return (x_next - x_last) / self.delta_scale
        return (x_next - self.mean[0]) / self.std[0]


class StepModule(nn.Module):
    """One step of a :class:`RNNForecaster` with the bundle's signature.

    ``(x, *states) -> (y, *new_states)``, exactly what ``model.onnx`` exposes."""

    def __init__(self, model: RNNForecaster) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: Tensor, *state: Tensor) -> tuple[Tensor, ...]:
        _, y, new_state = self.model.forward_seq(x.unsqueeze(0), tuple(state))
        return (y[0].unsqueeze(-1), *new_state)


class WindowModule(nn.Module):
    """A window-mode :class:`RNNForecaster` as the bundle's graph: ``x [B, W, F] -> y [B, 1]``."""

    def __init__(self, model: RNNForecaster) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: Tensor) -> Tensor:
        _, y = self.model.forward_window(x)
        return y.unsqueeze(-1)
