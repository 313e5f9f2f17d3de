"""Summaries of raw samples: median, IQR, bootstrap 95% intervals, and ratios between configs.

Two configs timed round by round (bench/runner.py interleaves and rotates them) are compared by
``paired_ratio``: one ratio per round, from the two sides' samples of that round, and a
t-interval over rounds on the log ratios. Drift between rounds then cancels instead of widening
the interval, and the interval is as wide as the rounds' agreement says (a percentile bootstrap
over five to seven rounds is too narrow). ``ratio_of_medians`` is for samples that were not taken
in pairs (pytest-benchmark's, one benchmark after another).
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

BOOTSTRAP_RESAMPLES = 2000


@dataclass(frozen=True)
class Summary:
    """A sample's median with its spread; ci_* is the bootstrap 95% interval of the median."""

    n: int
    median: float
    q1: float
    q3: float
    ci_low: float
    ci_high: float


def quartiles(samples: Sequence[float]) -> tuple[float, float, float]:
    if len(samples) == 1:
        return samples[0], samples[0], samples[0]
    q1, q2, q3 = statistics.quantiles(samples, n=4, method="inclusive")
    return q1, q2, q3


def summarize(samples: Sequence[float], seed: int = 0) -> Summary:
    if not samples:
        raise ValueError("cannot summarize an empty sample")
    q1, median, q3 = quartiles(samples)
    medians = np.sort(_bootstrap_medians(samples, np.random.default_rng(seed)))
    return Summary(len(samples), median, q1, q3, *_percentile_interval(medians))


def ratio_of_medians(numerator: Sequence[float], denominator: Sequence[float], seed: int = 0) -> Summary:
    """median(numerator) / median(denominator), with a bootstrap interval resampling both sides."""
    if not numerator or not denominator:
        raise ValueError("cannot form a ratio with an empty sample")
    rng = np.random.default_rng(seed)
    ratios = np.sort(_bootstrap_medians(numerator, rng) / _bootstrap_medians(denominator, rng))
    point = statistics.median(numerator) / statistics.median(denominator)
    return Summary(min(len(numerator), len(denominator)), point, float(ratios[len(ratios) // 4]),
                   float(ratios[(3 * len(ratios)) // 4]), *_percentile_interval(ratios))


def paired_ratio(numerator: dict[int, Sequence[float]], denominator: dict[int, Sequence[float]]) -> Summary:
    """numerator / denominator from samples keyed by round: per shared round, the ratio of the two
    sides' medians; the point is their geometric mean, q1/q3 the per-round ratios' quartiles, and
    ci_* the 95% t-interval of the mean log ratio (nan with fewer than two rounds)."""
    shared = sorted(set(numerator) & set(denominator))
    if not shared:
        raise ValueError("cannot pair samples that share no round")
    logs = [math.log(statistics.median(numerator[r]) / statistics.median(denominator[r])) for r in shared]
    mean = statistics.fmean(logs)
    q1, _, q3 = quartiles(sorted(math.exp(v) for v in logs))
    if len(logs) < 2:
        return Summary(1, math.exp(mean), q1, q3, math.nan, math.nan)
    from scipy.stats import t  # imported here: scipy's import is slow and most callers never pair

    half = t.ppf(0.975, len(logs) - 1) * statistics.stdev(logs) / math.sqrt(len(logs))
    return Summary(len(logs), math.exp(mean), q1, q3, math.exp(mean - half), math.exp(mean + half))


def paired_difference(a: Sequence[float], b: Sequence[float]) -> tuple[float, float, float]:
    """Mean of a[i] - b[i] over pairs (e.g. two training runs with the same seed) and its 95%
    t-interval (nan with fewer than two pairs)."""
    if len(a) != len(b) or not a:
        raise ValueError(f"paired_difference needs equally many values on each side, got {len(a)} and {len(b)}")
    differences = [x - y for x, y in zip(a, b)]
    mean = statistics.fmean(differences)
    if len(differences) < 2:
        return mean, math.nan, math.nan
    from scipy.stats import t

    half = t.ppf(0.975, len(differences) - 1) * statistics.stdev(differences) / math.sqrt(len(differences))
    return mean, mean - half, mean + half


def loglog_slope(xs: Sequence[float], ys: Sequence[float]) -> float:
    """Least-squares slope of log(y) against log(x): the exponent of a power law."""
    if len(xs) < 2:
        raise ValueError("a slope needs at least two points")
    lx, ly = [math.log(x) for x in xs], [math.log(y) for y in ys]
    mx, my = statistics.fmean(lx), statistics.fmean(ly)
    return sum((a - mx) * (b - my) for a, b in zip(lx, ly)) / sum((a - mx) ** 2 for a in lx)


def _bootstrap_medians(samples: Sequence[float], rng: np.random.Generator) -> np.ndarray:
    """The medians of BOOTSTRAP_RESAMPLES resamples (with replacement) of samples, all at once."""
    data = np.asarray(samples, dtype=float)
    return np.median(data[rng.integers(0, len(data), size=(BOOTSTRAP_RESAMPLES, len(data)))], axis=1)


def _percentile_interval(sorted_values: np.ndarray) -> tuple[float, float]:
    """The percentile bootstrap's 95% interval, by nearest rank (not scipy's default BCa)."""
    last = len(sorted_values) - 1
    return float(sorted_values[round(0.025 * last)]), float(sorted_values[round(0.975 * last)])
