"""Intervals across run seeds (tasks/stats.py): Student's t, by hand and against scipy where installed."""

import math

import pytest

from tempflow_fast.tasks.stats import bootstrap_interval, paired_interval, seed_interval, t_quantile_975


def test_t_quantile_matches_the_tables_and_scipy():
    assert t_quantile_975(1) == pytest.approx(12.7062, abs=1e-4)
    assert t_quantile_975(4) == pytest.approx(2.7764, abs=1e-4)
    assert t_quantile_975(60) == pytest.approx(2.0003, abs=2e-4)  # past the table: the expansion
    assert t_quantile_975(10 ** 6) == pytest.approx(1.95996, abs=1e-4)
    with pytest.raises(ValueError, match="df"):
        t_quantile_975(0)
    scipy_stats = pytest.importorskip("scipy.stats")
    for df in range(1, 200):
        assert t_quantile_975(df) == pytest.approx(float(scipy_stats.t.ppf(0.975, df)), abs=2e-4)


def test_seed_interval_by_hand():
    mean, lo, hi = seed_interval([1, 2, 3, 4, 5])  # s = sqrt(2.5), half = 2.7764 * s / sqrt(5)
    assert mean == 3.0
    assert hi - mean == pytest.approx(2.7764 * math.sqrt(2.5) / math.sqrt(5), rel=1e-5)
    assert mean - lo == pytest.approx(hi - mean)
    mean, lo, hi = seed_interval([0.7])
    assert mean == 0.7 and math.isnan(lo) and math.isnan(hi)  # one run: no interval, not a zero-width one
    with pytest.raises(ValueError, match="xs"):
        seed_interval([])
    with pytest.raises(ValueError, match="xs"):
        seed_interval([0.1, float("nan")])
    with pytest.raises(ValueError, match="xs"):
        bootstrap_interval([0.1, float("inf")])


def test_paired_interval_removes_what_the_seeds_share():
    base = [0.60, 0.65, 0.55, 0.70, 0.62]  # seed effects much larger than the method's +0.01
    other = [x + 0.01 + d for x, d in zip(base, [0.002, -0.001, 0.001, -0.002, 0.0])]
    mean, lo, hi = paired_interval(other, base)
    assert mean == pytest.approx(0.01) and lo > 0  # paired: the +0.01 is resolved
    _, ulo, uhi = seed_interval(other)
    assert ulo < sum(base) / 5 < uhi  # unpaired, each method's own interval covers the other's mean
    with pytest.raises(ValueError, match="pair up"):
        paired_interval([1, 2], [1])


def test_bootstrap_interval_stays_inside_the_values():
    calls = [9600, 9600, 19200, 48000, 9600]  # first eval point at a target, per seed
    mean, lo, hi = bootstrap_interval(calls)
    assert mean == pytest.approx(19200)
    assert 9600 <= lo < mean < hi <= 48000  # a t interval here goes below zero calls
    assert seed_interval(calls)[1] < 0
    assert bootstrap_interval(calls) == (mean, lo, hi)  # fixed resampling seed: the same numbers every time
    # the percentile interval of the mean of a symmetric sample is near the normal one
    xs = [float(i) for i in range(100)]
    m, lo, hi = bootstrap_interval(xs, resamples=4000)
    se = (sum((x - m) ** 2 for x in xs) / 99) ** 0.5 / 10
    assert lo == pytest.approx(m - 1.96 * se, abs=0.25 * se) and hi == pytest.approx(m + 1.96 * se, abs=0.25 * se)
    assert bootstrap_interval([7.0])[0] == 7.0 and math.isnan(bootstrap_interval([7.0])[1])
    with pytest.raises(ValueError, match="xs"):
        bootstrap_interval([])
