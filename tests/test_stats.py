import math

import numpy as np
import pytest

from bench.stats import BOOTSTRAP_RESAMPLES, loglog_slope, paired_ratio, ratio_of_medians, summarize


def test_summary_of_a_known_sample():
    s = summarize([5.0, 1.0, 3.0, 2.0, 4.0])
    assert (s.n, s.median, s.q1, s.q3) == (5, 3.0, 2.0, 4.0)
    assert 1.0 <= s.ci_low <= s.median <= s.ci_high <= 5.0


def test_bootstrap_is_repeatable_and_collapses_on_constant_samples():
    samples = [0.9, 1.1, 1.0, 1.3, 0.8, 1.05]
    assert summarize(samples) == summarize(samples)
    assert summarize([2.0] * 5).ci_low == summarize([2.0] * 5).ci_high == 2.0


def test_the_interval_is_the_percentile_bootstrap_of_the_median_by_nearest_rank():
    import statistics

    samples = [0.9, 1.1, 1.0, 1.3, 0.8, 1.05, 1.2]
    picks = np.random.default_rng(7).integers(0, len(samples), size=(BOOTSTRAP_RESAMPLES, len(samples)))
    medians = sorted(statistics.median([samples[i] for i in row]) for row in picks)
    last = BOOTSTRAP_RESAMPLES - 1
    s = summarize(samples, seed=7)
    assert (s.ci_low, s.ci_high) == (medians[round(0.025 * last)], medians[round(0.975 * last)])


def test_ratio_of_medians_with_interval():
    r = ratio_of_medians([2.0, 2.0, 2.0], [1.0, 1.0, 1.0])
    assert (r.median, r.ci_low, r.ci_high) == (2.0, 2.0, 2.0)
    noisy = ratio_of_medians([2.0, 2.2, 1.8, 2.1], [1.0, 1.1, 0.9, 1.0])
    assert noisy.ci_low < noisy.median < noisy.ci_high
    assert noisy.median == pytest.approx(2.05 / 1.0)


def test_loglog_slope_recovers_the_exponent():
    cs = [16, 32, 64, 128]
    assert loglog_slope(cs, [3 * c**2 for c in cs]) == pytest.approx(2.0)
    assert loglog_slope(cs, [0.5 * c**3 for c in cs]) == pytest.approx(3.0)


def test_empty_samples_are_refused():
    with pytest.raises(ValueError):
        summarize([])
    with pytest.raises(ValueError):
        ratio_of_medians([], [1.0])


def test_a_paired_ratio_cancels_drift_that_an_unpaired_one_counts_as_noise():
    # the machine slows down round by round; B is 1.10x A's time in every round
    a = {r: [1.0 + 0.1 * r] for r in range(8)}
    b = {r: [1.1 * (1.0 + 0.1 * r)] for r in range(8)}
    paired = paired_ratio(b, a)
    assert paired.median == pytest.approx(1.1) and paired.n == 8
    assert paired.ci_low == pytest.approx(1.1) and paired.ci_high == pytest.approx(1.1)
    unpaired = ratio_of_medians([v for vs in b.values() for v in vs], [v for vs in a.values() for v in vs])
    assert unpaired.ci_high - unpaired.ci_low > 0.3


def test_a_paired_interval_is_the_t_interval_of_the_mean_log_ratio():
    import math
    import statistics

    ratios = [1.02, 0.97, 1.05, 1.00, 0.99]
    s = paired_ratio({r: [x] for r, x in enumerate(ratios)}, {r: [1.0] for r in range(5)})
    logs = [math.log(x) for x in ratios]
    half = 2.7764451051977987 * statistics.stdev(logs) / math.sqrt(5)  # t(0.975, 4 degrees of freedom)
    assert s.median == pytest.approx(math.exp(statistics.fmean(logs)))
    assert (s.ci_low, s.ci_high) == pytest.approx((math.exp(statistics.fmean(logs) - half),
                                                  math.exp(statistics.fmean(logs) + half)))


def test_pairing_uses_each_rounds_medians_and_only_shared_rounds():
    s = paired_ratio({0: [2.0, 2.2, 9.0], 1: [2.0], 5: [3.0]}, {0: [1.1, 1.0, 1.2], 1: [1.0], 2: [7.0]})
    assert s.n == 2 and s.median == pytest.approx(2.0)
    one = paired_ratio({0: [2.0]}, {0: [1.0]})
    assert one.median == 2.0 and math.isnan(one.ci_low) and math.isnan(one.ci_high)
    with pytest.raises(ValueError, match="share no round"):
        paired_ratio({0: [1.0]}, {1: [1.0]})
