"""Interval math checked against independently computed exact values."""
import math

import numpy as np
import pytest
from scipy.optimize import brentq
from scipy.stats import binom

from cytometry.counts import bead_count, clopper_pearson, poisson_ratio_interval


def exact_binomial_bounds(k, n, alpha=0.05):
    """Clopper–Pearson by root-finding on the binomial CDF (not the beta quantile)."""
    lower = 0.0 if k == 0 else brentq(lambda p: binom.sf(k - 1, n, p) - alpha / 2, 1e-15, 1 - 1e-15)
    upper = 1.0 if k == n else brentq(lambda p: binom.cdf(k, n, p) - alpha / 2, 1e-15, 1 - 1e-15)
    return lower, upper


@pytest.mark.parametrize("k,n", [(0, 10), (1, 10), (5, 10), (10, 10), (27, 5027), (612, 5612), (3, 4000)])
def test_clopper_pearson_matches_cdf_root_finding(k, n):
    lo, hi = clopper_pearson(k, n)
    ref_lo, ref_hi = exact_binomial_bounds(k, n)
    assert lo == pytest.approx(ref_lo, rel=1e-7, abs=1e-12)
    assert hi == pytest.approx(ref_hi, rel=1e-7, abs=1e-12)


def test_clopper_pearson_known_value():
    # Textbook value: 0 of 10 gives an upper bound of 1 - 0.025**(1/10).
    assert clopper_pearson(0, 10)[1] == pytest.approx(1 - 0.025 ** 0.1, rel=1e-9)


def test_ratio_interval_maps_binomial_bounds():
    lo, hi = poisson_ratio_interval(50, 5000)
    p_lo, p_hi = exact_binomial_bounds(50, 5050)
    assert lo == pytest.approx(p_lo / (1 - p_lo), rel=1e-7)
    assert hi == pytest.approx(p_hi / (1 - p_hi), rel=1e-7)
    assert lo < 50 / 5000 < hi


def test_ratio_interval_covers_at_nominal_rate():
    """Simulated Poisson pairs: the exact interval covers the true ratio >= 95% of the time."""
    rng = np.random.default_rng(7)
    true_cells, true_beads = 30.0, 2000.0
    hits = 0
    trials = 2000
    for _ in range(trials):
        c, b = rng.poisson(true_cells), rng.poisson(true_beads)
        lo, hi = poisson_ratio_interval(int(c), int(b))
        hits += lo <= true_cells / true_beads <= hi
    assert hits / trials >= 0.94  # exact intervals are conservative: nominal 0.95 or more


def test_bead_count_formula_hand_computed():
    # 250 B-cell events, 5000 beads, 50,000 beads per test in 50 uL: 250/5000*1000 = 50 cells/uL.
    count = bead_count(250, 5000, 50000, 50.0)
    assert count.cells_per_ul == pytest.approx(50.0)
    assert count.ci95[0] < 50.0 < count.ci95[1]
    assert not count.below_lloq
    # Relative half-width close to 1.96/sqrt(250) for a large bead count.
    half_width = (count.ci95[1] - count.ci95[0]) / 2 / 50.0
    assert half_width == pytest.approx(1.96 * math.sqrt(1 / 250 + 1 / 5000), rel=0.05)


def test_bead_count_below_lloq_and_zero_events():
    low = bead_count(24, 5000, 50000, 50.0)
    assert low.below_lloq
    assert not bead_count(25, 5000, 50000, 50.0).below_lloq
    zero = bead_count(0, 5000, 50000, 50.0)
    assert zero.cells_per_ul == 0.0 and zero.ci95[0] == 0.0
    # Upper bound for 0 events: the exact Poisson bound of 3.689 events, over 5000 beads, times 1000.
    assert zero.ci95[1] == pytest.approx(3.689 / 5000 * 1000, rel=0.01)


def test_bead_count_refuses_no_beads():
    with pytest.raises(ValueError, match="bead"):
        bead_count(10, 0, 50000, 50.0)


def test_poisson_interval_against_chi2_free_reference():
    from scipy.stats import poisson

    from cytometry.counts import poisson_interval

    for k in (0, 1, 7, 50, 400):
        lo, hi = poisson_interval(k)
        # Garwood bounds: P(X >= k | lo) = 2.5% and P(X <= k | hi) = 2.5%.
        if k:
            assert poisson.sf(k - 1, lo) == pytest.approx(0.025, abs=1e-9)
        assert poisson.cdf(k, hi) == pytest.approx(0.025, abs=1e-9)


def test_volumetric_count_hand_computed():
    from cytometry.counts import volumetric_count

    # 312 events in 52,000 nL of a 10.4x diluted sample: 312 / 52 uL * 10.4 = 62.4 cells/uL.
    c = volumetric_count(312, 52000.0, 10.4)
    assert c.cells_per_ul == pytest.approx(62.4)
    assert c.ci95[0] < 62.4 < c.ci95[1] and c.method == "volumetric"
    with pytest.raises(ValueError, match="VOL"):
        volumetric_count(10, 0.0)


def test_dual_platform_count_and_cbc_uncertainty():
    from cytometry.counts import clopper_pearson, dual_platform_count

    exact = dual_platform_count(120, 3000, 1200.0)
    assert exact.cells_per_ul == pytest.approx(48.0)
    lo, hi = clopper_pearson(120, 3000)
    assert exact.ci95 == pytest.approx((lo * 1200, hi * 1200))
    assert "taken as exact" in exact.method
    with_cv = dual_platform_count(120, 3000, 1200.0, lymphocytes_cv=0.05)
    assert with_cv.ci95[0] < exact.ci95[0] and with_cv.ci95[1] > exact.ci95[1]
    assert "CV 0.05" in with_cv.method
