"""Window models: the last W readings of each stream, kept in the ordinary state store.

A window model has no recurrent state to carry between calls: each call runs the last W readings
from a zero state. What a stream must remember is therefore those W readings, and that fits the
:class:`~forecaster.serve.state.StateStore` exactly as one "state tensor" of shape ``[L=W, H=F]``:
``store.gather(slots)`` returns ``[W, B, F]``, the buffers of a wave in chronological order.
Reusing the store (rather than a second store class) gives window streams the same slot map, LRU
cap, idle TTL, gap resets, duplicate/out-of-order checks, snapshots and metrics as recurrent ones,
with no new code to get wrong.

The buffer is *rolled*, not indexed as a ring: :func:`push` shifts the W×F values by one and
writes the new reading last. At W=10, F=1 that is ten floats per reading, cheaper than keeping and
applying a per-stream head index, and it keeps every stored buffer (and snapshot) in time order,
which is the order the graph wants. ``seen`` (readings since the start or the last reset) tells
when a buffer is full: a stream's first W−1 readings give no prediction.
"""

from __future__ import annotations

import numpy as np

from forecaster.serve.state import StateStore


def window_store(
    window: int,
    n_features: int,
    max_streams: int,
    reset_after: float = 0.0,
    idle_ttl: float = 0.0,
) -> StateStore:
    """A state store whose one state tensor per stream is its last ``window`` readings."""
    return StateStore([(window, n_features)], max_streams, reset_after, idle_ttl)


def push(buffers: np.ndarray, x: np.ndarray) -> np.ndarray:
    """``[W, B, F]`` buffers with reading ``x`` ``[B, F]`` appended and the oldest dropped."""
    out = np.empty_like(buffers)
    out[:-1] = buffers[1:]
    out[-1] = x
    return out


def as_batch(buffers: np.ndarray) -> np.ndarray:
    """``[W, B, F]`` store layout to the graph's contiguous ``[B, W, F]`` float32 input."""
    return np.ascontiguousarray(buffers.transpose(1, 0, 2), dtype=np.float32)
