"""Tests of the chi-square thresholds and p-values."""

import numpy as np
import pytest
from scipy import stats

from gaussad.gaussian import LevelGaussian, MomentStats
from gaussad.threshold import chi2_pvalue, chi2_threshold


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
