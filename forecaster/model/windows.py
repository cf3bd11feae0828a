"""Sliding windows over a series: the input a window model sees, shared by training,
``evaluate`` and export (the daemon keeps the same windows as per-stream ring buffers)."""

from __future__ import annotations

import numpy as np


def windows(values: np.ndarray, window: int) -> np.ndarray:
    """Every window of ``window`` consecutive readings: ``[T]`` or ``[T, F]`` → ``[T-W+1, W, F]``.

    Window ``k`` ends at reading ``k + window - 1``; empty when there are fewer readings.
    """
    v = np.asarray(values)
    if v.ndim == 1:
        v = v[:, None]
    if len(v) < window:
        return np.empty((0, window, v.shape[1]), dtype=v.dtype)
    view = np.lib.stride_tricks.sliding_window_view(v, window, axis=0)  # [N, F, W]
    return np.ascontiguousarray(view.transpose(0, 2, 1))
