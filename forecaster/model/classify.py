"""Scores of an event classifier: ROC AUC, the threshold, and the counts behind precision/recall.

Pure numpy (the serving install has no scikit-learn): training reports these every epoch on the
validation part, the manifest records them with the chosen threshold, and ``evaluate`` prints them
for a bundle on any labelled CSV, so the three mean the same.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np

from forecaster.errors import DataError


def roc_auc(labels: np.ndarray, scores: np.ndarray) -> float:
    """Area under the ROC curve: the chance that a random positive scores above a random negative.

    Computed as the Mann-Whitney U statistic with average ranks, so tied scores count one half.
    NaN when only one class is present (the area is undefined).
    """
    y = np.asarray(labels, dtype=np.float64).ravel()
    s = np.asarray(scores, dtype=np.float64).ravel()
    if y.shape != s.shape:
        raise ValueError(f"labels {y.shape} and scores {s.shape} differ in shape")
    pos = y == 1.0
    n_pos = int(pos.sum())
    n_neg = len(y) - n_pos
    if n_pos == 0 or n_neg == 0:
        return math.nan
    order = np.argsort(s, kind="mergesort")
    ranks = np.empty(len(s), dtype=np.float64)
    sorted_s = s[order]
    # Average rank (1-based) over each run of equal scores.
    starts = np.flatnonzero(np.r_[True, sorted_s[1:] != sorted_s[:-1]])
    ends = np.r_[starts[1:], len(s)]
    for a, b in zip(starts.tolist(), ends.tolist(), strict=True):
        ranks[order[a:b]] = (a + 1 + b) / 2.0
    u = float(ranks[pos].sum()) - n_pos * (n_pos + 1) / 2.0
    return u / (n_pos * n_neg)


@dataclass(frozen=True)
class ClassScore:
    """Accuracy, precision, recall and F1 at ``threshold`` (event = probability ≥ threshold),
    and the threshold-free ROC AUC (None when the labels hold one class only)."""

    accuracy: float
    precision: float
    recall: float
    f1: float
    roc_auc: float | None
    n: int
    positives: int
    threshold: float

    def as_dict(self) -> dict[str, float | int | None]:
        return asdict(self)


def counts(labels: np.ndarray, events: np.ndarray) -> tuple[int, int, int, int]:
    """``(tp, fp, tn, fn)`` of boolean ``events`` against 0/1 ``labels``."""
    y = np.asarray(labels) == 1
    e = np.asarray(events, dtype=bool)
    return (
        int((y & e).sum()),
        int((~y & e).sum()),
        int((~y & ~e).sum()),
        int((y & ~e).sum()),
    )


def score_events(labels: np.ndarray, probs: np.ndarray, threshold: float) -> ClassScore:
    """Every figure at once; precision (recall) is 0 when nothing is flagged (nothing positive)."""
    y = np.asarray(labels, dtype=np.float64).ravel()
    p = np.asarray(probs, dtype=np.float64).ravel()
    if len(y) == 0:
        raise DataError("nothing to score: no labelled prediction falls after the start point")
    tp, fp, tn, fn = counts(y, p >= threshold)
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    auc = roc_auc(y, p)
    return ClassScore(
        accuracy=(tp + tn) / len(y),
        precision=precision,
        recall=recall,
        f1=f1,
        roc_auc=None if math.isnan(auc) else auc,
        n=len(y),
        positives=tp + fn,
        threshold=threshold,
    )


def choose_threshold(labels: np.ndarray, probs: np.ndarray) -> float:
    """The threshold with the best F1 on these labels (fewest alarms among equals).

    It is placed halfway between the lowest flagged probability and the next lower one, so a
    probability that differs in the last float32 digits (ONNX Runtime vs PyTorch) does not flip
    an event. Without a positive label, or when only one probability value occurs, it is 0.5.
    """
    y = np.asarray(labels, dtype=np.float64).ravel() == 1.0
    p = np.asarray(probs, dtype=np.float64).ravel()
    values = np.unique(p)[::-1]  # descending
    if not y.any() or len(values) < 2:
        return 0.5
    best_f1, best_k = -1.0, 0
    n_pos = int(y.sum())
    for k, t in enumerate(values.tolist()):
        flagged = p >= t
        tp = int((flagged & y).sum())
        f1 = 2 * tp / (int(flagged.sum()) + n_pos)
        if f1 > best_f1:
            best_f1, best_k = f1, k
    if best_k + 1 < len(values):
        return float((values[best_k] + values[best_k + 1]) / 2.0)
    return float(values[best_k] / 2.0)


def positive_weight(labels: np.ndarray) -> float:
    """BCE weight of the positive class: negatives per positive in the training labels."""
    y = np.asarray(labels, dtype=np.float64).ravel()
    n_pos = int((y == 1.0).sum())
    if n_pos == 0:
        raise DataError("the training part has no positive label: nothing to learn an event from")
    return (len(y) - n_pos) / n_pos
