"""Seasonal periods found from training data (pure numpy: no torch, so benchmarks can use it).

Method, in two steps:

1. **Evidence: autocorrelation of differences.** Differencing removes trends and turns a
   random walk into uncorrelated noise, so a random walk yields no period. Two estimates per lag
   ``p`` (see :class:`Evidence`): of first differences (sharp features such as a daily peak),
   and of differences over a quarter to half of ``p`` (smooth cycles, which first differences
   bury in noise). Differences are winsorised at 5 robust standard deviations (MAD) so an outage
   (a drop and a recovery) does not dominate, and missing values (NaN) are skipped pair by pair
   (the FFT of a 0/1 mask counts the pairs). A lag is significant when either estimate is above
   ``max(FLOOR, z · sd)``, ``sd`` being Bartlett's null standard deviation for that difference.

2. **Candidates: the timestamp cadence first, then the data.** With timestamps, the candidates
   are the calendar cycles expressed in steps of the median spacing: a day, a week and a year
   (half-hourly → 48 and 336; hourly → 24 and 168; daily → 7 and 365; weekly → 52; monthly → 12;
   quarterly → 4), tested with a modest ``z`` (few tests). Without timestamps, or when no calendar
   cycle is significant, the local maxima of the autocorrelation up to half the series are
   scanned with a stricter ``z`` (hundreds of lags are tested at once); the first period is the
   shortest peak within 10 % of the highest (ranked by the biased estimate, which shrinks long
   lags that rest on few pairs), so the multiples 24, 36, … of a period 12 are not reported in
   its place; only exact multiples of it compete for the second place. The chosen peak is then
   settled between its two neighbours by the smallest mean absolute seasonal difference.

A longer period that is a multiple of an accepted one (336 = 7 × 48) is kept only if it explains
the series clearly better: its mean absolute seasonal difference ``mean |x[t] - x[t-q]|`` (the
largest 10 % left out, for outages) is below 80 % of the shorter one's. Half-hourly electricity
demand passes (weekends differ from weekdays: 563 vs 1,850 MW); a pure daily cycle does not.
"""

from __future__ import annotations

import math

import numpy as np

SECONDS_PER_DAY = 86_400.0
CALENDAR_SECONDS = (SECONDS_PER_DAY, 7 * SECONDS_PER_DAY, 365.2425 * SECONDS_PER_DAY)
MIN_POINTS = 16
"""Fewer readings than this give no period: too few pairs for any lag to be significant."""
Z_CALENDAR = 3.0
"""One-sided significance for the few calendar candidates (false positive rate ~0.1 %)."""
Z_SCAN = 4.5
"""Stricter, for scanning hundreds of lags at once (a Bonferroni-like correction)."""
FLOOR = 0.1
"""Minimum autocorrelation of differences: weaker cycles are not worth a lag in a model."""
PEAK_TOLERANCE = 0.1
"""Peaks within this fraction of the highest one count as equally strong (prefer the shortest)."""
MULTIPLE_GAIN = 0.8
"""A multiple of an accepted period must cut the mean absolute seasonal difference below this."""


def calendar_candidates(timestamps: np.ndarray | None, n: int) -> list[int]:
    """Calendar cycles (day, week, year) in steps of the median spacing of ``timestamps``.

    Months vary from 28 to 31 days, so a spacing in that range is "monthly" (a year is 12
    steps), and 89-92 days is "quarterly" (4 steps). Otherwise a cycle counts when it is within
    2 % of a whole number of steps (or, from 10 steps up, rounded: 365.24 days / 7 days = 52).
    Cycles shorter than 2 steps or longer than half the series are left out.
    """
    if timestamps is None:
        return []
    t = np.asarray(timestamps, dtype=np.float64)
    t = t[np.isfinite(t)]
    if t.size < 3:
        return []
    steps = np.diff(np.sort(t))
    steps = steps[steps > 0]
    if steps.size == 0:
        return []
    dt = float(np.median(steps))
    days = dt / SECONDS_PER_DAY
    out: list[int] = []
    if 27.5 <= days <= 31.5:
        out = [12]
    elif 88.5 <= days <= 92.5:
        out = [4]
    else:
        for cycle in CALENDAR_SECONDS:
            ratio = cycle / dt
            whole = round(ratio)
            if whole >= 2 and (ratio >= 10 or abs(ratio - whole) <= 0.02 * ratio):
                out.append(int(whole))
    return sorted({p for p in out if 2 <= p <= (n - 1) // 2})


def difference_acf(
    values: np.ndarray, max_lag: int, step: int = 1
) -> tuple[np.ndarray, np.ndarray]:
    """Autocorrelation of winsorised ``step``-differences at lags 0..max_lag, and pairs per lag.

    NaN readings make their differences missing; each lag averages only over pairs where both
    differences exist (so an outage marked as missing does not bias the estimate).
    """
    x = np.asarray(values, dtype=np.float64)
    size = max_lag + 1
    if x.size <= step:
        return np.zeros(size), np.zeros(size)
    d = x[step:] - x[:-step]
    mask = np.isfinite(d)
    finite = d[mask]
    if finite.size < 2:
        return np.zeros(size), np.zeros(size)
    med = float(np.median(finite))
    spread = 1.4826 * float(np.median(np.abs(finite - med)))
    if spread <= 0:
        spread = float(np.std(finite))
    if spread > 0:
        finite = np.clip(finite, med - 5 * spread, med + 5 * spread)
    z = np.zeros_like(d)
    z[mask] = finite - finite.mean()
    m = mask.astype(np.float64)
    nfft = 1 << math.ceil(math.log2(max(2, 2 * d.size)))
    fz = np.fft.rfft(z, nfft)
    fm = np.fft.rfft(m, nfft)
    num = np.fft.irfft(fz * np.conj(fz), nfft)[:size]
    cnt = np.rint(np.fft.irfft(fm * np.conj(fm), nfft)[:size])
    cnt = np.concatenate([cnt, np.zeros(size - cnt.size)])
    num = np.concatenate([num, np.zeros(size - num.size)])
    cov = np.where(cnt > 0, num / np.maximum(cnt, 1), 0.0)
    if cov[0] <= 0:
        return np.zeros(size), cnt
    return cov / cov[0], cnt


def difference_step(lag: int) -> int:
    """The difference step used as evidence for ``lag``: a power of two in [lag/4, lag/2].

    First differences amplify noise: a smooth cycle of period 50 moves by only 2π/50 of its
    amplitude per step, so its share of the variance of first differences can be a few percent.
    A difference over a quarter to half a period keeps ≥ 70 % of the cycle's amplitude while a
    trend still becomes a constant and a random walk still becomes uncorrelated beyond ``step``.
    """
    return 1 << max(0, math.floor(math.log2(max(1, lag // 2))))


class Evidence:
    """For every lag 2..max_lag, two estimates of its autocorrelation (first differences, and
    ``difference_step`` differences), each with the lags either side (for peaks) and its null
    standard deviation.

    First differences see sharp daily features (water flow: 0.29 at lag 24, 0.15 with 8-step
    differences); longer differences see smooth cycles under noise. A lag counts when either
    estimate does. The null is "no cycle": an s-step difference of white noise or of a random
    walk is an MA(s-1) process, so Bartlett's variance ``(1 + 2 Σ_{j<s} r_j²) / m`` applies
    (summed only over the lags that the differencing itself correlates).
    """

    def __init__(self, values: np.ndarray, max_lag: int) -> None:
        size = max_lag + 2
        # layer 0: first differences; layer 1: difference_step(lag) differences
        self.r = np.zeros((2, size))
        self.left = np.zeros((2, size))
        self.right = np.zeros((2, size))
        self.sd = np.full((2, size), np.inf)
        lags = np.arange(2, max_lag + 1)
        steps = np.array([difference_step(int(p)) for p in lags])
        for s in sorted(set(steps.tolist())):
            layers = (0, 1) if s == 1 else (1,)
            group = lags if s == 1 else lags[steps == s]
            if group.size == 0:
                continue
            acf, pairs = difference_acf(values, int(group.max()) + 1, s)
            inflation = 1.0 + 2.0 * float(np.sum(acf[1:s] ** 2))
            sd = np.where(pairs >= 8, np.sqrt(inflation / np.maximum(pairs, 1)), np.inf)
            for layer in layers:
                chosen = group if layer == 0 or s != 1 else lags[steps == 1]
                if layer == 0 and s != 1:
                    continue
                self.r[layer, chosen] = acf[chosen]
                self.left[layer, chosen] = acf[chosen - 1]
                self.right[layer, chosen] = acf[chosen + 1]
                self.sd[layer, chosen] = sd[chosen]

    def _layers(self, lag: int, z: float) -> list[int]:
        return [k for k in (0, 1) if self.r[k, lag] > max(FLOOR, z * self.sd[k, lag])]

    def significant(self, lag: int, z: float) -> bool:
        """Whether either estimate at ``lag`` is above ``z`` null deviations and ``FLOOR``."""
        return bool(self._layers(lag, z))

    def peak_strength(self, lag: int, z: float) -> float:
        """The largest significant estimate at ``lag`` that is a local maximum there, else 0."""
        best = 0.0
        for k in self._layers(lag, z):
            if self.r[k, lag] > self.left[k, lag] and self.r[k, lag] >= self.right[k, lag]:
                best = max(best, float(self.r[k, lag]))
        return best


def seasonal_mad(values: np.ndarray, lag: int) -> float:
    """Mean absolute seasonal difference ``|x[t] - x[t-lag]|`` over pairs that exist, with the
    largest 10 % left out so that outages (a few long drops) do not decide between two lags.
    """
    x = np.asarray(values, dtype=np.float64)
    diff = np.abs(x[lag:] - x[:-lag])
    diff = np.sort(diff[np.isfinite(diff)])
    if diff.size == 0:
        return math.inf
    return float(np.mean(diff[: max(1, int(0.9 * diff.size))]))


def _select(values: np.ndarray, ordered: list[int], max_periods: int) -> list[int]:
    """Accept candidates in ascending order; a multiple must beat its divisor clearly."""
    accepted: list[int] = []
    for p in sorted(set(ordered)):
        divisors = [a for a in accepted if _is_multiple(p, a)]
        if divisors and not all(
            seasonal_mad(values, p) < MULTIPLE_GAIN * seasonal_mad(values, a) for a in divisors
        ):
            continue
        accepted.append(p)
        if len(accepted) == max_periods:
            break
    return accepted


def _is_multiple(q: int, p: int) -> bool:
    """Whether ``q`` is a whole multiple ``k·p`` with k ≥ 2."""
    return q >= 2 * p and q % p == 0


def detect_periods(
    values: np.ndarray, timestamps: np.ndarray | None = None, max_periods: int = 2
) -> list[int]:
    """Seasonal periods of ``values`` in steps, shortest first; ``[]`` when there is none.

    ``values`` are readings in time order (NaN = missing); ``timestamps`` (epoch seconds, same
    length, optional) supply calendar candidates from their median spacing. See the module
    docstring for the method. Random walks and white noise give ``[]``; series shorter than
    ``MIN_POINTS`` give ``[]``.
    """
    x = np.asarray(values, dtype=np.float64).ravel()
    n = x.size
    if n < MIN_POINTS or max_periods < 1 or np.count_nonzero(np.isfinite(x)) < MIN_POINTS:
        return []
    max_lag = (n - 1) // 2
    evidence = Evidence(x, max_lag)

    calendar = [p for p in calendar_candidates(timestamps, n) if p <= max_lag]
    found = [p for p in calendar if evidence.significant(p, Z_CALENDAR)]
    if found:
        return _select(x, found, max_periods)

    # The scan starts at lag 3: first differences of any smooth series put a spurious peak at
    # lag 2 (their lag-1 autocorrelation is pushed down by the differencing of the noise).
    raw = {lag: evidence.peak_strength(lag, Z_SCAN) for lag in range(3, max_lag + 1)}
    peaks = [lag for lag, value in raw.items() if value > 0]
    if not peaks:
        return []
    # Prefer short lags: scale by the share of pairs, as the biased estimator does; a long lag
    # rests on few pairs and its estimate is noisy enough to outrank the true period.
    strength = {p: raw[p] * (n - p) / n for p in peaks}
    top = max(strength.values())
    first = min(p for p in peaks if strength[p] >= (1 - PEAK_TOLERANCE) * top)
    # A peak's divisor that is itself a peak is the period unless the multiple clearly explains
    # the series better (a cycle of 3 is also one of 6; a week is not just a day).
    for d in sorted(p for p in peaks if p < first and first % p == 0):
        if seasonal_mad(x, first) >= MULTIPLE_GAIN * seasonal_mad(x, d):
            first = d
            break
    # A broad peak can be moved by one lag by noise; the seasonal difference of the levels is
    # sharper there, so it settles between neighbours.
    first = min((first - 1, first, first + 1), key=lambda q: seasonal_mad(x, max(q, 2)))
    first = max(first, 2)
    multiples = [p for p in range(2 * first, max_lag + 1, first)]
    if not multiples or max_periods == 1:
        return [first]
    # Only the multiple that best explains the series competes for the second place.
    best = min(multiples, key=lambda q: seasonal_mad(x, q))
    return _select(x, [first, best], max_periods)
