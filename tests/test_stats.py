import pytest

from bench.stats import loglog_slope, ratio_of_medians, summarize


def test_summary_of_a_known_sample():
    s = summarize([5.0, 1.0, 3.0, 2.0, 4.0])
    assert (s.n, s.median, s.q1, s.q3) == (5, 3.0, 2.0, 4.0)
    assert 1.0 <= s.ci_low <= s.median <= s.ci_high <= 5.0


def test_bootstrap_is_repeatable_and_collapses_on_constant_samples():
    samples = [0.9, 1.1, 1.0, 1.3, 0.8, 1.05]
    assert summarize(samples) == summarize(samples)
    assert summarize([2.0] * 5).ci_low == summarize([2.0] * 5).ci_high == 2.0


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
