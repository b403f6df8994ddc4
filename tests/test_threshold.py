"""Tests of the chi-square, Hotelling and conformal thresholds and p-values."""

import numpy as np
import pytest
from scipy import stats

from gaussad.core.gaussian import LevelGaussian, MomentStats
from gaussad.core.threshold import (chi2_pvalue, chi2_threshold, conformal_pvalue, conformal_rank,
                                    conformal_threshold, hotelling_pvalue, hotelling_threshold)


@pytest.mark.parametrize("dof", [1, 2, 5, 64, 1000])
@pytest.mark.parametrize("fpr", [0.5, 0.05, 0.01, 1e-4])
def test_chi2_threshold_matches_scipy(dof, fpr):
    assert chi2_threshold(dof, fpr) == pytest.approx(np.sqrt(stats.chi2.ppf(1 - fpr, dof)), rel=1e-9)


def test_chi2_pvalue_inverts_threshold():
    t = chi2_threshold(7, 0.05)
    assert chi2_pvalue(np.array([t]), 7)[0] == pytest.approx(0.05, rel=1e-9)
    d = np.array([0.0, 0.5, 2.0, 10.0])
    np.testing.assert_allclose(chi2_pvalue(d, 3), stats.chi2.sf(d**2, 3), rtol=1e-12)
    assert chi2_pvalue(d, 3)[0] == 1.0


def test_monte_carlo_false_positive_rate():
    rng = np.random.default_rng(1234)
    d = 5
    A = rng.standard_normal((d, d))
    cov = A @ A.T + np.eye(d)
    mean = rng.standard_normal(d) * 10
    train = rng.multivariate_normal(mean, cov, size=5000)
    fresh = rng.multivariate_normal(mean, cov, size=20000)
    model = LevelGaussian.fit(MomentStats.from_array(train), "empirical")
    rate = float(np.mean(model.distances(fresh) > chi2_threshold(model.dof, 0.05)))
    assert abs(rate - 0.05) <= 0.01


@pytest.mark.parametrize("fpr", [0.0, 1.0, -0.1, 2.0, float("nan")])
def test_rejects_bad_fpr(fpr):
    with pytest.raises(ValueError, match="fpr"):
        chi2_threshold(3, fpr)


@pytest.mark.parametrize("dof", [0, -1, 2.5, True])
def test_rejects_bad_dof(dof):
    with pytest.raises(ValueError, match="dof"):
        chi2_threshold(dof, 0.05)
    with pytest.raises(ValueError, match="dof"):
        chi2_pvalue(np.array([1.0]), dof)


def test_accepts_numpy_integer_dof():
    assert chi2_threshold(np.int64(4), 0.1) == chi2_threshold(4, 0.1)


def test_rejects_negative_distances():
    with pytest.raises(ValueError, match="non-negative"):
        chi2_pvalue(np.array([1.0, -0.5]), 2)


# ----- Hotelling (finite-sample F law) -------------------------------------------------------------------


@pytest.mark.parametrize("dof, n", [(1, 2), (3, 10), (40, 41), (64, 1000)])
@pytest.mark.parametrize("fpr", [0.5, 0.05, 0.01, 1e-4])
def test_hotelling_threshold_matches_scipy_f(dof, n, fpr):
    expected = np.sqrt(stats.f.ppf(1 - fpr, dof, n - dof) * dof * (n + 1) / (n - dof))
    assert hotelling_threshold(dof, n, fpr) == pytest.approx(expected, rel=1e-9)
    assert hotelling_pvalue(np.array([expected]), dof, n)[0] == pytest.approx(fpr, rel=1e-6)


def test_hotelling_tends_to_chi2_and_is_always_larger():
    for n in (20, 200, 2000):
        assert hotelling_threshold(5, n, 0.01) > chi2_threshold(5, 0.01)
    assert hotelling_threshold(5, 10**7, 0.01) == pytest.approx(chi2_threshold(5, 0.01), rel=1e-5)


def test_hotelling_refuses_too_few_samples():
    with pytest.raises(ValueError, match=r"more training samples than dimensions \(n=5, dof=5\)"):
        hotelling_threshold(5, 5, 0.05)
    with pytest.raises(ValueError, match="n=3"):
        hotelling_pvalue(np.array([1.0]), 8, 3)


def test_empirical_distance_uses_the_biased_covariance():
    """The F law below is stated for S divided by n, which is what the empirical estimator uses."""
    rng = np.random.default_rng(5)
    train, test = rng.standard_normal((12, 4)), rng.standard_normal((3, 4))
    g = LevelGaussian.fit(MomentStats.from_array(train), "empirical")
    diff = test - train.mean(axis=0)
    expected = np.einsum("ij,jk,ik->i", diff, np.linalg.inv(np.cov(train.T, bias=True)), diff)
    np.testing.assert_allclose(g.squared_distances(test), expected, rtol=1e-9)


def _repeated_fpr(threshold: float, n: int, dim: int, reps: int, m: int, seed: int) -> tuple[float, float]:
    """Mean and standard error over training draws of the realised FPR of a Gaussian fitted with S / n."""
    rng = np.random.default_rng(seed)
    scale = np.arange(1, dim + 1)
    train = rng.standard_normal((reps, n, dim)) * scale + 3.0
    test = rng.standard_normal((reps, m, dim)) * scale + 3.0
    mean = train.mean(axis=1, keepdims=True)
    cov = np.einsum("rni,rnj->rij", train - mean, train - mean) / n
    diff = test - mean
    d2 = np.einsum("rmi,rmi->rm", diff, np.linalg.solve(cov, diff.transpose(0, 2, 1)).transpose(0, 2, 1))
    rates = np.mean(np.sqrt(d2) > threshold, axis=1)
    return float(rates.mean()), float(rates.std(ddof=1) / np.sqrt(reps))


def test_hotelling_realises_its_fpr_where_chi2_does_not():
    """With n=12 samples in 4 dimensions the F law is exact over training draws; chi-square over-rejects."""
    alpha = 0.05
    mean, se = _repeated_fpr(hotelling_threshold(4, 12, alpha), 12, 4, 4000, 20, seed=7)
    assert abs(mean - alpha) <= 3 * se
    chi_mean, chi_se = _repeated_fpr(chi2_threshold(4, alpha), 12, 4, 4000, 20, seed=7)
    assert chi_mean > alpha + 3 * chi_se


# ----- split conformal ----------------------------------------------------------------------------------


@pytest.mark.parametrize("n", [1, 9, 19, 42, 100])
@pytest.mark.parametrize("fpr", [0.01, 0.05, 0.1, 0.3])
def test_conformal_threshold_is_the_order_statistic(n, fpr):
    cal = np.random.default_rng(n).standard_normal(n)
    k = int(np.ceil((n + 1) * (1 - fpr) - 1e-12))
    expected = np.inf if k > n else np.sort(cal)[k - 1]
    assert conformal_threshold(cal, fpr) == expected
    assert conformal_rank(n, fpr) == k


def test_conformal_rank_is_exact_at_boundaries():
    # (n + 1)(1 - fpr) is an integer here; binary rounding must not push the rank up by one.
    assert conformal_rank(19, 0.05) == 19
    assert conformal_rank(99, 0.01) == 99
    assert conformal_rank(9, 0.1) == 9
    assert conformal_rank(98, 0.01) == 99  # 99 * 0.99 = 98.01: above n, no finite threshold
    assert conformal_threshold(np.arange(98.0), 0.01) == np.inf


def test_conformal_pvalue_counts_and_agrees_with_threshold():
    rng = np.random.default_rng(3)
    cal = np.round(rng.standard_normal(30), 1)  # ties on purpose
    scores = np.concatenate([np.round(rng.standard_normal(200) * 1.5, 1), cal[:5]])
    expected = np.array([(1 + np.sum(cal >= s)) / 31 for s in scores])
    pv = conformal_pvalue(scores, cal)
    np.testing.assert_allclose(pv, expected, rtol=0, atol=0)
    for fpr in [1 / 31, 2 / 31, 0.05, 0.1, 3 / 31, 0.2, 0.5]:
        np.testing.assert_array_equal(pv <= fpr, scores > conformal_threshold(cal, fpr))


def test_conformal_rejects_empty_or_nonfinite_calibration():
    with pytest.raises(ValueError, match="no calibration"):
        conformal_threshold(np.array([]), 0.1)
    with pytest.raises(ValueError, match="finite"):
        conformal_pvalue(np.array([1.0]), np.array([1.0, np.nan]))
    with pytest.raises(ValueError, match="fpr"):
        conformal_threshold(np.array([1.0]), 0.0)


@pytest.mark.parametrize("n_cal, alpha", [(19, 0.05), (42, 0.05), (42, 0.1), (150, 0.01)])
def test_conformal_fpr_is_exact_for_exchangeable_scores(n_cal, alpha):
    """Over many draws the realised FPR equals (n + 1 - k) / (n + 1) <= alpha for continuous scores."""
    rng = np.random.default_rng(n_cal)
    reps, m = 4000, 10
    g = LevelGaussian.fit(MomentStats.from_array(rng.standard_normal((50, 3))), "ledoit-wolf")
    cal = g.distances(rng.standard_normal((reps * n_cal, 3))).reshape(reps, n_cal)
    test = g.distances(rng.standard_normal((reps * m, 3))).reshape(reps, m)
    rates = np.array([np.mean(t > conformal_threshold(c, alpha)) for c, t in zip(cal, test)])
    exact = (n_cal + 1 - conformal_rank(n_cal, alpha)) / (n_cal + 1)
    se = rates.std(ddof=1) / np.sqrt(reps)
    assert exact <= alpha
    assert abs(rates.mean() - exact) <= 3 * se
