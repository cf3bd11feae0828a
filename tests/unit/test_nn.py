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


@pytest.mark.parametrize("cell", ["lstm", "gru"])
@pytest.mark.parametrize("lags", [0, 13])
def test_sequence_graph_in_ragged_batches_equals_pytorch_and_one_step(
    seed: int, cell: str, lags: int
) -> None:
    """Format 3: ORT runs the sequence graph in ragged micro-batches (random lengths, random
    subsets of streams, the state carried between calls) and one reading per call; both equal
    PyTorch's unroll (export's tolerance, scaled units) and each other."""
    import onnxruntime as ort

    from forecaster.training.export import (
        PARITY_TOLERANCE,
        check_parity,
        parity_inputs,
        ragged_runs,
        run_ragged,
        state_names,
        to_onnx,
    )

    rng = np.random.default_rng(seed)
    torch.manual_seed(seed)
    coef = tuple(float(c) for c in rng.normal(0, 0.1, lags)) if lags else ()
    spec = ModelSpec(
        cell,  # type: ignore[arg-type]
        2,
        8,
        1,
        "delta",
        0.0,
        (100.0,),
        (5.0,),
        0.7,
        ar_coef=coef,
        ar_bias=0.3 if lags else 0.0,
        ar_lags=tuple(range(1, lags + 1)),
    )
    m = RNNForecaster(spec).eval()
    with torch.no_grad():
        m.head.weight.normal_(0, 0.5)  # a head at zero would hide the network
        m.head.bias.fill_(0.1)
    blob = to_onnx(m)
    streams, steps = 5, 240
    x = parity_inputs(m, steps, streams, seed=seed)
    with torch.no_grad():
        _, ref, _ = m.forward_seq(torch.from_numpy(x), m.zero_state(streams))
    sess = ort.InferenceSession(blob, providers=["CPUExecutionProvider"])
    names = state_names(m)
    zero = [s.numpy() for s in m.zero_state(streams)]
    stepped = run_ragged(sess, names, x, zero, [np.ones(steps, dtype=np.int64)] * streams)
    runs = ragged_runs(steps, streams, rng, max_run=30)
    ragged = run_ragged(sess, names, x, zero, runs)
    scale = 5.0
    where = f"seed={seed} cell={cell} lags={lags}"
    assert np.abs(ragged - ref.numpy()).max() / scale <= PARITY_TOLERANCE, where
    assert np.abs(stepped - ref.numpy()).max() / scale <= PARITY_TOLERANCE, where
    assert np.abs(ragged - stepped).max() / scale <= 1e-5, where
    assert check_parity(m, blob, steps=120, streams=4, seed=seed) <= PARITY_TOLERANCE, where
