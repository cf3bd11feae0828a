"""Scaling inside the model round-trips, and an untrained delta head is exactly persistence."""

from __future__ import annotations

import torch

from forecaster.training.nn import ModelSpec, RNNForecaster


def make(head: str) -> RNNForecaster:
    return RNNForecaster(ModelSpec("gru", 1, 4, 1, head, 0.0, (50.0,), (7.0,), 0.3))  # type: ignore[arg-type]


def test_targets_map_back_to_raw_values() -> None:
    last = torch.tensor([48.0, 51.5, 60.0])
    nxt = torch.tensor([49.0, 50.0, 61.25])
    for head in ("delta", "level"):
        m = make(head)
        assert torch.allclose(m.to_raw(m.target(nxt, last), last), nxt, atol=1e-5)


def test_untrained_delta_head_is_persistence() -> None:
    m = make("delta")
    x = torch.randn(20, 3, 1) * 7 + 50
    _, y, _ = m.forward_seq(x, m.zero_state(3))
    assert torch.equal(y, x[..., 0])
