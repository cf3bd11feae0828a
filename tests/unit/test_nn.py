"""Scaling inside the model round-trips, and an untrained delta head is exactly persistence."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from forecaster.training import linear
from forecaster.training.nn import ModelSpec, RNNForecaster, StepModule


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


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_untrained_hybrid_is_its_linear_path_in_every_unroll(seed: int, cell: str) -> None:
    """Head at zero: the hybrid's y is the closed-form line (numpy reference), whether unrolled
    whole, in chunks with the state carried, or one exported step at a time."""
    rng = np.random.default_rng(seed)
    v = 100 + np.cumsum(rng.normal(size=300)) + 5 * np.sin(np.arange(300) * 2 * np.pi / 12)
    ar = linear.fit([v[:200]], [1, 2, 3, 12, 13])
    spec = ModelSpec(
        cell,
        2,
        8,
        1,
        "delta",
        0.0,
        (100.0,),
        (5.0,),
        1.0,  # type: ignore[arg-type]
        ar_coef=ar.coef,
        ar_bias=ar.bias,
        ar_lags=ar.lags,
    )
    m = RNNForecaster(spec).eval()
    x = torch.tensor(v, dtype=torch.float32).reshape(-1, 1, 1)
    with torch.no_grad():
        _, whole, _ = m.forward_seq(x, m.zero_state(1))
        state, parts = m.zero_state(1), []
        for lo in range(0, 300, 37):
            _, y, state = m.forward_seq(x[lo : lo + 37], state)
            parts.append(y)
        step, state, steps = StepModule(m), m.zero_state(1), []
        for t in range(300):
            y, *state = step(x[t], *state)
            steps.append(y[:, 0])
    ref = linear.ar_segment(v, ar)
    scale = 5.0  # the series' std: parity is measured in scaled units, as in export
    assert np.abs(whole[:, 0].numpy() - ref).max() / scale < 1e-5, f"{seed=}"
    assert torch.equal(torch.cat(parts), whole), f"{seed=}"
    assert torch.allclose(torch.stack(steps), whole, rtol=0, atol=1e-4), f"{seed=}"


def test_persistence_fallback_is_exactly_persistence() -> None:
    """What ships when validation skill < 0: the network kept, the line dropped, head at zero."""
    from forecaster.training.stateful import persistence_of

    torch.manual_seed(0)
    spec = ModelSpec(
        "lstm",
        1,
        8,
        1,
        "delta",
        0.0,
        (50.0,),
        (7.0,),
        0.3,  # type: ignore[arg-type]
        ar_coef=(0.1, -0.2, 0.05),
        ar_bias=0.4,
        ar_lags=(1, 2, 3),
    )
    m = RNNForecaster(spec)
    torch.nn.init.normal_(m.head.weight)  # a "trained" head
    x = torch.randn(40, 2, 1) * 7 + 50
    fallback = persistence_of(m)
    assert fallback.spec.lag_buffer == 0 and len(fallback.zero_state(2)) == 2
    with torch.no_grad():
        _, y, _ = fallback.forward_seq(x, fallback.zero_state(2))
    assert torch.equal(y, x[..., 0])
