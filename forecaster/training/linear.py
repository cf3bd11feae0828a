"""The linear autoregressive path of the hybrid model, fitted in closed form (numpy only).

A recurrent network trained by gradient descent on a few hundred or thousand readings does not
reliably find what a least-squares line finds at once (a yearly cycle in 164 monthly points, an
AR(24) on a half-hourly load). So the forecaster is a *hybrid*: a linear autoregression over the
last readings and seasonal lags, plus the network's output, which learns only what the line
leaves (LSTNet's "highway", Smyl's ES-RNN hybrid). The line is fitted here by ridge regression on
the training part; candidate lag sets are compared on the validation part; the network then starts
with its head at zero, so the untrained hybrid *is* the chosen linear model, and the best-epoch
checkpoint can only keep the network where validation says it helps.

Parametrisation (what the graph computes; ``b`` is the stream's buffer, newest first, ``b[0]``
the reading just received, ``b[k]`` the one ``k`` readings before it)::

    y = b[0] + bias + coef[0] * b[0] + sum_{k >= 1} coef[k] * (b[k] - b[0])

Lag ``l`` (the reading ``l`` steps before the target) sits at buffer position ``l - 1``. All
coefficients zero is persistence; ridge shrinks towards it, not towards zero (the mean). Terms are
differences from the last reading, so float32 stays exact on series with large levels.

At a stream's start (or after a gap) the buffer is empty; it is filled with the first reading, as
if the stream had been flat before (the graph does the same with a "filled" flag in its state), so
early predictions are persistence-like rather than absurd. ``ar_segment`` is the reference of that
rule.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from forecaster.training import smoothing

#: Losses each lag set is fitted with.
LOSSES = ("squared", "huber")
#: Ridge penalty, relative to the number of training rows, on standardised features.
RIDGE = 1e-4
#: Huber threshold in robust standard deviations of the residuals, and IRLS iterations.
HUBER_K = 1.345
HUBER_ITERATIONS = 8
#: Plain autoregressive orders tried (lags 1..p), besides persistence (no line at all).
ORDERS = (1, 2, 3, 6, 12, 24, 48, 96)
#: Orders above 24 are tried only with at least this many training readings per lag.
ROWS_PER_LAG = 20
#: Seasons back a seasonal lag set reaches (lags s, 2s, …, SEASONS·s and each one after).
SEASONS = 4
#: Largest lag buffer considered (readings kept per stream): bounds memory and fitting time.
MAX_LAG = 1000


@dataclass(frozen=True)
class LinearAR:
    """A fitted line: ``coef`` per buffer position (``len(coef)`` readings kept), ``bias``."""

    lags: tuple[int, ...]
    coef: tuple[float, ...]
    bias: float
    loss: str = "squared"

    @property
    def size(self) -> int:
        """Readings the stream's buffer holds; 0 means no linear path (persistence)."""
        return len(self.coef)

    def as_dict(self) -> dict[str, object]:
        return {
            "lags": list(self.lags),
            "loss": self.loss,
            "coef": list(self.coef),
            "bias": self.bias,
        }


PERSISTENCE = LinearAR((), (), 0.0)


def buffers(values: np.ndarray, size: int) -> np.ndarray:
    """``[T, size]``: after each reading of one segment, the buffer newest first, with the
    positions before the segment's start filled with its first reading (the graph's rule)."""
    v = np.asarray(values, dtype=np.float64)
    padded = np.concatenate([np.full(size - 1, v[0]), v])
    # Row t is padded[t : t + size] reversed: readings t, t-1, ..., t-size+1.
    win = np.lib.stride_tricks.sliding_window_view(padded, size)
    return win[:, ::-1]


def ar_segment(values: np.ndarray, ar: LinearAR) -> np.ndarray:
    """The line's one-step predictions over one segment (``out[k]`` predicts ``values[k+1]``)."""
    v = np.asarray(values, dtype=np.float64)
    if ar.size == 0:
        return v.copy()
    b = buffers(v, ar.size)
    coef = np.asarray(ar.coef)
    return v + ar.bias + coef[0] * v + (b[:, 1:] - v[:, None]) @ coef[1:]


def _design(b: np.ndarray, positions: np.ndarray) -> np.ndarray:
    """Features ``[b0, b[k] - b0 for k in positions >= 1]`` of :func:`ar_segment`'s form."""
    cur = b[:, :1]
    return np.concatenate([cur, b[:, positions[positions > 0]] - cur], axis=1)


def fit(
    segments: Sequence[np.ndarray],
    lags: Sequence[int],
    loss: str = "squared",
    ridge: float = RIDGE,
) -> LinearAR:
    """Ridge regression of the next reading's change on the lagged readings, with a squared or a
    Huber loss (``loss="huber"``: robust to outages, which the validation part may prefer).

    ``segments`` are runs of consecutive finite readings. Targets are the next readings inside a
    segment whose lags all lie in it (the early, padded ones only when there are too few)."""
    lags = sorted({int(lag) for lag in lags})
    if not lags:
        return PERSISTENCE
    if loss.startswith("mean("):
        # A combination (see :func:`combine`): each part refitted as it was first fitted.
        parts = [
            fit(segments, part_lags, part_loss, ridge) for part_loss, part_lags in _parts(loss)
        ]
        return combine(parts)
    if loss.startswith("ETS("):
        # An exponential smoothing filter: refit its parameters, and cut the new filter where
        # its own weights become negligible. Keeping the first fit's buffer would cut a slower
        # refitted filter short (wine-sales: 83 readings fitted on 112, where the refit on 140
        # needs 145: held-out skill +0.726 instead of +0.733).
        return fit_ets(segments, smoothing.Form.parse(loss))
    size = max(lags)
    positions = np.asarray([lag - 1 for lag in lags])
    xs, ys = [], []
    for seg in segments:
        if len(seg) < 2:
            continue
        b = buffers(seg, size)[:-1]
        xs.append(_design(b, positions))
        ys.append(np.diff(seg))
    if not xs:
        return PERSISTENCE
    # Rows whose buffer is still padded with the segment's first reading are left out when the
    # complete ones suffice: padding is a start-up device (those predictions are not warm), and
    # hundreds of padded rows of a seasonal lag would bias every coefficient.
    complete = [np.arange(len(y)) >= size - 1 for y in ys]
    if sum(int(c.sum()) for c in complete) > 4 * (len(lags) + 1):
        xs = [x[c] for x, c in zip(xs, complete, strict=True)]
        ys = [y[c] for y, c in zip(ys, complete, strict=True)]
    x = np.concatenate(xs)
    y = np.concatenate(ys)
    # Standardise so one penalty fits every feature; the intercept is not penalised.
    mu = x.mean(axis=0)
    sd = x.std(axis=0)
    sd = np.where(sd > 1e-12, sd, 1.0)
    z = (x - mu) / sd
    n, k = z.shape
    a = np.concatenate([np.ones((n, 1)), z], axis=1)
    penalty = np.sqrt(ridge * n) * np.eye(k + 1)[1:]
    target = y - y.mean()
    weight = np.ones(n)
    sol = np.zeros(k + 1)
    for _ in range(HUBER_ITERATIONS if loss == "huber" else 1):
        # Huber by iteratively reweighted least squares: an outage's steps are tens of typical
        # steps, and squared loss would let a handful of them set every coefficient.
        # Normal equations of the weighted, penalised problem: a (k+1)-square solve. An SVD of
        # the tall design (lstsq) costs tens of seconds for AR(96) on a busy machine.
        aw = a * weight[:, None]
        gram = a.T @ aw + penalty.T @ penalty
        sol = np.linalg.solve(gram, aw.T @ target)
        resid = target - a @ sol
        spread = 1.4826 * float(np.median(np.abs(resid - np.median(resid))))
        if spread <= 1e-12:
            break
        weight = np.minimum(1.0, HUBER_K * spread / np.maximum(np.abs(resid), 1e-300))
    w = sol[1:] / sd
    bias = float(y.mean() + sol[0] - mu @ w)
    coef = np.zeros(size)
    coef[0] = w[0]
    coef[positions[positions > 0]] = w[1:]
    return LinearAR(tuple(lags), tuple(float(c) for c in coef), bias, loss)


def candidate_lag_sets(periods: Sequence[int], n_train: int) -> list[tuple[int, ...]]:
    """Lag sets to compare (:func:`select` adds persistence, no line at all): 1..p (orders above
    24 only with :data:`ROWS_PER_LAG` training readings per lag), each with a
    period's seasonal pair ``{s, s+1}`` (seasonal naive and seasonal differencing are both in that
    span), the pairs of up to ``SEASONS`` periods back, and AR(s+1). Lags reaching back more than
    a third of the training readings, and AR(s+1) with under 4 readings per lag, are skipped."""
    out: list[tuple[int, ...]] = []
    seasonal = [(s, s + 1) for s in periods if 2 <= s < min(MAX_LAG, n_train // 3)]
    for p in ORDERS:
        if p >= n_train // 4 or (p > 24 and p * ROWS_PER_LAG > n_train):
            continue
        base = tuple(range(1, p + 1))
        out.append(base)
        for pair in seasonal:
            out.append(tuple(sorted({*base, *pair})))
        if len(seasonal) > 1:
            out.append(tuple(sorted({*base, *(lag for pair in seasonal for lag in pair)})))
    for s in periods:
        # The same seasonal pair a few periods back: averaging several past seasons is what
        # seasonal exponential smoothing does, and a line over them can express much of it.
        multiples = [k * s for k in range(2, SEASONS + 1) if k * s + 1 < min(MAX_LAG, n_train // 3)]
        if multiples:
            far = {lag for m in [s, *multiples] for lag in (m, m + 1)}
            for p in (1, 2, 3):
                out.append(tuple(sorted({*range(1, p + 1), *far})))
    for s in periods:
        # Every lag up to one period and one more (AR(s+1) on levels), where the data affords it.
        if 2 <= s < MAX_LAG and (s + 1) * 4 <= n_train:
            out.append(tuple(range(1, s + 2)))
    return list(dict.fromkeys(out))


@dataclass(frozen=True)
class Candidate:
    """One fitted lag set and its validation RMSE."""

    ar: LinearAR
    val_rmse: float
    val_loss: float

    def as_dict(self) -> dict[str, object]:
        return {
            "lags": list(self.ar.lags),
            "loss": self.ar.loss,
            "val_rmse": self.val_rmse,
            "val_loss": self.val_loss,
        }


def robust_loss(err: np.ndarray, scale: float, k: float = 10.0) -> float:
    """Mean Huber loss of ``err`` in units of ``scale`` (a typical one-step change), threshold
    ``k``: how candidates are compared. A validation part with one outage would otherwise pick the
    model that best guesses the outage's recovery over the one that best predicts ordinary data."""
    if not err.size or not np.all(np.isfinite(err)):
        return float("inf")
    return float(np.mean(robust_losses(err, scale, k)))


def robust_losses(err: np.ndarray, scale: float, k: float = 10.0) -> np.ndarray:
    """:func:`robust_loss` of each error (for paired comparisons of two models)."""
    a = np.abs(err / scale)
    return np.where(a <= k, 0.5 * a**2, k * (a - 0.5 * k))


def select(
    train_segments: Sequence[np.ndarray],
    val_runs: Sequence[tuple[np.ndarray, int]],
    lag_sets: Sequence[Sequence[int]],
    scale: float,
) -> list[Candidate]:
    """Fit every lag set on the training segments; score on validation; best first.

    ``val_runs`` are ``(segment, first)``: the whole segment is unrolled (the buffer fills from
    its start, as in the daemon) and targets from index ``first`` on are scored."""
    fits = [fit(train_segments, lags, loss) for lags in lag_sets for loss in LOSSES if lags]
    out = [score(ar, val_runs, scale) for ar in [PERSISTENCE, *fits]]
    out.sort(key=_rank)
    return out


# --- Exponential smoothing filters and combinations -------------------------------------------

#: Seasons an ETS filter's buffer may reach back, and its size without a season.
ETS_SEASONS = 12
ETS_PLAIN = 128


def from_weights(c: np.ndarray, loss: str) -> LinearAR:
    """A line from forecast weights ``c[j]`` on the reading ``j`` steps back that sum to one:
    in the path's form ``coef[0] = sum(c) - 1 = 0``, ``coef[k] = c[k]``, no bias."""
    c = np.asarray(c, dtype=np.float64)
    coef = [float(c.sum() - 1.0), *(float(v) for v in c[1:])]
    return LinearAR(tuple(range(1, len(c) + 1)), tuple(coef), 0.0, loss)


def ets_cap(form: smoothing.Form) -> int:
    """Largest buffer an ETS filter of ``form`` gets: :data:`ETS_SEASONS` seasons, at least
    :data:`ETS_PLAIN` readings, at most :data:`MAX_LAG` (the filter is then cut where its dropped
    weight mass is negligible). It may exceed the training part: the filter needs no rows to be
    fitted, and a buffer longer than the history is the graph's start-up padding, which for a
    smoothing filter is a flat initial state."""
    return max(2, min(MAX_LAG, max(ETS_SEASONS * form.period + 1, ETS_PLAIN)))


def fit_ets(segments: Sequence[np.ndarray], form: smoothing.Form) -> LinearAR:
    """ETS of ``form`` fitted on the segments, as a truncated filter (see :mod:`smoothing`)."""
    segs = [np.asarray(s, dtype=np.float64) for s in segments]
    return from_weights(smoothing.fit_filter(form, segs, ets_cap(form)), form.label)


def combine(parts: Sequence[LinearAR]) -> LinearAR:
    """The average of several lines' forecasts: itself a line (coefficients and bias averaged,
    shorter buffers padded with zero terms). Its ``loss`` names the parts, so it can be refitted."""
    size = max(p.size for p in parts)
    coef = np.zeros(size)
    for p in parts:
        coef[: p.size] += np.asarray(p.coef) / len(parts)
    bias = float(np.mean([p.bias for p in parts]))
    lags = tuple(sorted({lag for p in parts for lag in p.lags}))
    label = "+".join(f"{p.loss}[{lags_text(p.lags)}]" for p in parts)
    return LinearAR(lags, tuple(float(c) for c in coef), bias, f"mean({label})")


def lags_text(lags: Sequence[int]) -> str:
    """``1-3,12-13``: runs of consecutive lags (the inverse of :func:`parse_lags`)."""
    out: list[str] = []
    lags = sorted(lags)
    i = 0
    while i < len(lags):
        j = i
        while j + 1 < len(lags) and lags[j + 1] == lags[j] + 1:
            j += 1
        out.append(str(lags[i]) if i == j else f"{lags[i]}-{lags[j]}")
        i = j + 1
    return ",".join(out)


def parse_lags(text: str) -> list[int]:
    out: list[int] = []
    for run in filter(None, text.split(",")):
        lo, _, hi = run.partition("-")
        out += range(int(lo), int(hi or lo) + 1)
    return out


def _parts(loss: str) -> list[tuple[str, list[int]]]:
    inner = re.fullmatch(r"mean\((.*)\)", loss)
    if inner is None:
        raise ValueError(f"not a combination: {loss!r}")
    return [
        (m.group(1), parse_lags(m.group(2)))
        for m in re.finditer(r"([^+\[]+)\[([0-9,\-]*)\]", inner.group(1))
    ]


def _kind(ar: LinearAR) -> str:
    return "ets" if ar.loss.startswith("ETS(") else "mean" if ar.loss.startswith("mean(") else "ols"


def score(ar: LinearAR, val_runs: Sequence[tuple[np.ndarray, int]], scale: float) -> Candidate:
    """``ar``'s validation RMSE and robust loss (the unroll :func:`select` uses)."""
    err: list[np.ndarray] = []
    for seg, first in val_runs:
        if len(seg) - 1 <= first:
            continue
        pred = ar_segment(seg, ar)[:-1]
        err.append((pred - seg[1:])[max(first - 1, 0) :])
    e = np.concatenate(err) if err else np.array([np.nan])
    return Candidate(ar, float(np.sqrt(np.mean(e**2))), robust_loss(e, scale))


def extend(
    candidates: Sequence[Candidate],
    train_segments: Sequence[np.ndarray],
    val_runs: Sequence[tuple[np.ndarray, int]],
    periods: Sequence[int],
    n_train: int,
    scale: float,
) -> list[Candidate]:
    """:func:`select`'s ranking with exponential smoothing filters (every form of
    :func:`smoothing.forms`) added, the average of the best ETS filter and the best
    least-squares line (forecast combination, which won the M competitions, is itself a linear
    filter), and, where all three classes exist, the average of the best least-squares line,
    the best seasonal and the best non-seasonal ETS filter. Best first, by the same validation
    loss (a combination ships only where validation prefers it to every single model)."""
    out = list(candidates)
    for form in smoothing.forms(periods, n_train):
        try:
            out.append(score(fit_ets(train_segments, form), val_runs, scale))
        except ValueError:
            continue
    ranked = sorted(out, key=_rank)
    best: dict[str, LinearAR] = {}
    for c in ranked:
        if c.ar.size and np.isfinite(c.val_loss):
            best.setdefault(_kind(c.ar), c.ar)
            best.setdefault(_family(c.ar), c.ar)
    if "ets" in best and "ols" in best:
        # Different model classes: their errors differ, so their average gains. (Averaging the
        # top least-squares fits, near copies of each other, mostly adds one more draw from the
        # validation noise: tried, it won validation and lost held out on taylor-demand.)
        out.append(score(combine([best["ols"], best["ets"]]), val_runs, scale))
    if all(f in best for f in FAMILIES):
        # One model of each class: a season that drifts (ETS), one that does not (the line's
        # seasonal lags) and a level without season. Chosen by validation on one of the twelve
        # public series tried (weekly CO2: held-out skill +0.235 against +0.218 for the pair).
        out.append(score(combine([best[f] for f in FAMILIES]), val_runs, scale))
    out.sort(key=_rank)
    return out


#: The classes one of each of which is averaged: least squares, seasonal and plain ETS.
FAMILIES = ("ols", "ets-seasonal", "ets-plain")


def _family(ar: LinearAR) -> str:
    """:func:`_kind`, with ETS filters split into seasonal and non-seasonal ones."""
    kind = _kind(ar)
    if kind != "ets":
        return kind
    return "ets-seasonal" if smoothing.Form.parse(ar.loss).period else "ets-plain"


def _rank(c: Candidate) -> tuple[bool, float, int]:
    return (not np.isfinite(c.val_loss), c.val_loss, c.ar.size)
