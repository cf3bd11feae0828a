"""The PyTorch forecaster: a stacked LSTM or GRU with scaling and the output head built in.

Everything the ONNX graph does happens in this module, in one place: standardise the reading,
step the RNN, map the last layer's output to the next reading in raw units. ``forward_seq``
unrolls a whole sequence (training, validation, the parity reference); ``SequenceModule`` wraps the
same weights as the sequence graph that is exported (format 3: ``x [B, T, F]`` with per-stream
lengths), ``StepModule`` as the one-step graph of format 2. In window mode ``forward_window`` runs a
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
    #: The linear path (stateful delta head only): coefficients per lag-buffer position and the
    #: bias of :mod:`forecaster.training.linear`; empty = no linear path (y = last + delta).
    ar_coef: tuple[float, ...] = ()
    ar_bias: float = 0.0
    ar_lags: tuple[int, ...] = ()
    ar_loss: str = ""

    @property
    def lag_buffer(self) -> int:
        """Readings the lag state keeps per stream (0: no lag state)."""
        return len(self.ar_coef)

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
    ar_coef: Tensor
    ar_bias: Tensor

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
        if spec.lag_buffer:
            self.register_buffer("ar_coef", torch.tensor(spec.ar_coef, dtype=torch.float32))
            self.register_buffer("ar_bias", torch.tensor(spec.ar_bias, dtype=torch.float32))

    @property
    def n_rnn_states(self) -> int:
        return 2 if self.spec.cell == "lstm" else 1

    def zero_state(self, batch: int) -> State:
        h = torch.zeros(self.spec.layers, batch, self.spec.hidden)
        rnn = (h, torch.zeros_like(h)) if self.spec.cell == "lstm" else (h,)
        if self.spec.lag_buffer:
            # The lag buffer (newest first) and a "filled" flag: [1, B, P + 1], zero = empty.
            return (*rnn, torch.zeros(1, batch, self.spec.lag_buffer + 1))
        return rnn

    def _lags(self, x0: Tensor, lags: Tensor) -> tuple[Tensor, Tensor]:
        """The linear path over a sequence ``x0`` ``[T, B]`` from lag state ``[1, B, P + 1]``.

        Returns the line's prediction ``[T, B]`` (raw units) and the new lag state. An empty
        buffer (flag 0: a new stream or one just reset) is filled with the first reading, the
        rule :func:`forecaster.training.linear.ar_segment` is the reference of."""
        p = self.spec.lag_buffer
        buf = lags[0, :, :p]
        filled = lags[0, :, p:]
        buf = torch.where(filled > 0.5, buf, x0[0].unsqueeze(-1).expand_as(buf))
        hist = torch.cat([buf.flip(-1).transpose(0, 1), x0], dim=0)  # [P + T, B], oldest first
        newest_first = hist.unfold(0, p, 1)[1:].flip(-1)  # [T, B, P]: row t = x_t, x_t-1, …
        ar = self._line(x0, newest_first)
        new_buf = newest_first[-1]
        return ar, torch.cat([new_buf, torch.ones_like(filled)], dim=-1).unsqueeze(0)

    def _line(self, cur: Tensor, newest_first: Tensor) -> Tensor:
        """``cur + bias + coef[0] cur + sum_k coef[k] (b[k] - cur)``: differences from the last
        reading keep float32 exact on series with large levels."""
        diffs = newest_first[..., 1:] - cur.unsqueeze(-1)
        return cur + self.ar_bias + self.ar_coef[0] * cur + (diffs * self.ar_coef[1:]).sum(-1)

    def step_lags(self, x0: Tensor, lags: Tensor) -> tuple[Tensor, Tensor]:
        """One step of :meth:`_lags` (``x0`` ``[B]``) without ``unfold``: the exported graph."""
        p = self.spec.lag_buffer
        buf = lags[0, :, :p]
        filled = lags[0, :, p:]
        buf = torch.where(filled > 0.5, buf, x0.unsqueeze(-1).expand_as(buf))
        new_buf = torch.cat([x0.unsqueeze(-1), buf[:, : p - 1]], dim=-1)
        ar = self._line(x0, new_buf)
        return ar, torch.cat([new_buf, torch.ones_like(filled)], dim=-1).unsqueeze(0)

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
        k = self.n_rnn_states
        out, rnn_state = self._rnn(xs, state[:k])
        o = self.head(out).squeeze(-1)
        if not self.spec.lag_buffer:
            return o, self.output(o, x[..., 0]), rnn_state
        ar, lags = self._lags(x[..., 0], state[k])
        return o, ar + o * self.delta_scale, (*rnn_state, lags)

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
        m = self.model
        if not m.spec.lag_buffer:
            _, y, new_state = m.forward_seq(x.unsqueeze(0), tuple(state))
            return (y[0].unsqueeze(-1), *new_state)
        k = m.n_rnn_states
        xs = ((x - m.mean) / m.std).unsqueeze(0)
        out, rnn_state = m._rnn(xs, tuple(state[:k]))
        o = m.head(out[0]).squeeze(-1)
        ar, lags = m.step_lags(x[:, 0], state[k])
        return ((ar + o * m.delta_scale).unsqueeze(-1), *rnn_state, lags)


class SequenceModule(nn.Module):
    """Several steps per stream in one call: the graph of bundle format 3.

    ``(x [B, T, F], lengths [B], *states) -> (y [B, T], *new_states)``. Stream ``b`` has
    ``lengths[b]`` (>= 1) valid readings, then padding. PyTorch's RNN here runs every step; the
    exporter's fused LSTM/GRU nodes get ``lengths`` as their ``sequence_lens`` afterwards (see
    ``export.py``), so in the graph the recurrent states out are those after each stream's last
    valid step. The lag state out is gathered at that step here. ``y`` at padded steps is
    meaningless (finite for finite inputs); readers ignore it."""

    def __init__(self, model: RNNForecaster) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: Tensor, lengths: Tensor, *state: Tensor) -> tuple[Tensor, ...]:
        m = self.model
        k = m.n_rnn_states
        xt = x.transpose(0, 1)  # [T, B, F]
        xs = (xt - m.mean) / m.std
        out, rnn_state = m._rnn(xs, tuple(state[:k]))
        o = m.head(out).squeeze(-1)  # [T, B]
        x0 = xt[..., 0]
        if not m.spec.lag_buffer:
            return (m.output(o, x0).transpose(0, 1), *rnn_state)
        ar, lags = self._seq_lags(x0, state[k], lengths)
        return ((ar + o * m.delta_scale).transpose(0, 1), *rnn_state, lags)

    def _seq_lags(self, x0: Tensor, lags: Tensor, lengths: Tensor) -> tuple[Tensor, Tensor]:
        """:meth:`RNNForecaster._lags` with gathers instead of ``unfold`` and ``flip`` (a
        dynamic ``T`` exports; ONNX Runtime's negative-step slice is slow): the window of step
        ``t`` is ``x_t, x_t-1, …`` from the readings ``x0`` ``[T, B]`` and, before them, the
        buffer (newest first); the new buffer is the window at each stream's last valid step."""
        m = self.model
        p = m.spec.lag_buffer
        buf = lags[0, :, :p]
        filled = lags[0, :, p:]
        buf = torch.where(filled > 0.5, buf, x0[0].unsqueeze(-1).expand_as(buf))
        n = x0.shape[0]
        hist = torch.cat([x0, buf.transpose(0, 1)], dim=0)  # [T + P, B]: readings, then buffer
        steps = torch.arange(n, device=x0.device).unsqueeze(-1)  # [T, 1]
        back = torch.arange(p, device=x0.device).unsqueeze(0)  # [1, P]
        # j steps back from t: reading t - j, or buffer entry j - t - 1 (row T + j - t - 1)
        where = torch.where(back <= steps, steps - back, n + back - steps - 1)  # [T, P]
        newest_first = hist[where].permute(0, 2, 1)  # [T, B, P]
        ar = m._line(x0, newest_first)
        batch = newest_first.shape[1]
        last = (lengths.to(torch.int64) - 1) * batch + torch.arange(batch, device=x0.device)
        new_buf = newest_first.reshape(-1, p)[last]  # [B, P]: row (len - 1, b) of [T * B, P]
        return ar, torch.cat([new_buf, torch.ones_like(filled)], dim=-1).unsqueeze(0)


class WindowModule(nn.Module):
    """A window-mode :class:`RNNForecaster` as the bundle's graph: ``x [B, W, F] -> y [B, 1]``."""

    def __init__(self, model: RNNForecaster) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: Tensor) -> Tensor:
        _, y = self.model.forward_window(x)
        return y.unsqueeze(-1)
