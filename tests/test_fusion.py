"""The fused image score: p-values of the global score and of the map peak against out-of-fold training scores,
combined by Fisher's method under full conformal prediction (the decision) and ranked by smooth p-values."""

import numpy as np
import pytest

from gaussad.core import fusion
from gaussad.core.threshold import conformal_pvalue


def test_conformal_pvalues_count_calibration_scores_at_or_above():
    cal = np.array([1.0, 2.0, 2.0, 5.0])
    np.testing.assert_allclose(conformal_pvalue([0.0, 2.0, 3.0, 5.0, 9.0], cal), [1.0, 0.8, 0.4, 0.4, 0.2])


def test_smooth_pvalues_are_continuous_non_increasing_and_keep_ordering_beyond_calibration():
    rng = np.random.default_rng(0)
    cal = rng.normal(size=50)
    s = np.linspace(-4, 10, 2001)
    p = fusion.smooth_pvalues(cal, s)
    assert np.all(np.diff(p) <= 1e-15) and p[0] == 1.0
    beyond = s > cal.max()
    assert np.all(np.diff(p[beyond]) < 0)  # no ties among images beyond every calibration score
    assert np.isclose(fusion.smooth_pvalues(cal, [cal.max()])[0], 1 / 51)
    # at calibration scores the smooth p-value is the conformal one of the next larger score (within one step)
    exact = conformal_pvalue(cal, cal)
    assert np.all(np.abs(fusion.smooth_pvalues(cal, cal) - exact) <= 1 / 51 + 1e-12)


def test_combinations():
    p = [np.array([0.01, 0.5]), np.array([0.2, 0.5])]
    np.testing.assert_allclose(fusion.combine(p), [0.02, 1.0])
    from scipy.stats import combine_pvalues

    np.testing.assert_allclose(fusion.combine(p, "fisher")[0], combine_pvalues([0.01, 0.2], "fisher")[1])
    with pytest.raises(ValueError, match="unknown fusion"):
        fusion.combine(p, "stouffer")


@pytest.mark.parametrize("alpha", [0.05, 0.1])
def test_fused_decision_keeps_the_conformal_guarantee(alpha):
    """Normal images exchangeable with the calibration images: over many draws of calibration and test sets the
    fused (full-conformal Fisher) decision flags at most alpha of them, with strongly dependent, non-Gaussian
    evidence, and not much less (its p-values are exact ranks: floor(alpha (n + 1)) / (n + 1) without ties)."""
    rng = np.random.default_rng(1)

    def normal(n):
        z = rng.standard_normal(n)
        return [np.exp(z + 0.3 * rng.standard_normal(n)), z ** 2 + rng.gamma(2.0, size=n)]  # dependent pieces

    rates = []
    for _ in range(400):
        cal, test = normal(60), normal(200)
        _, p = fusion.fused(cal, test)
        rates.append(np.mean(p <= alpha))
    assert np.mean(rates) <= alpha + 0.005  # 80,000 decisions: the Monte Carlo error is about 0.001
    assert np.mean(rates) >= alpha - 0.01


def _fisher_by_definition(calibrations, evidence):
    """Full-conformal Fisher p-values straight from the definition: for each test image, every value's rank p-value
    among the n + 1 values of its piece of evidence, -2 sum log p per image, the test image's share at or above."""
    n = len(calibrations[0])
    out = []
    for i in range(len(evidence[0])):
        stats = np.zeros(n + 1)
        for c, e in zip(calibrations, evidence):
            values = np.r_[c, e[i]]
            stats += -2.0 * np.log(np.array([(values >= v).sum() for v in values]) / (n + 1.0))
        out.append(np.sum(stats >= stats[-1] - 1e-9) / (n + 1.0))
    return np.array(out)


@pytest.mark.parametrize("seed", range(5))
def test_fisher_pvalue_is_the_full_conformal_definition(seed):
    """On heavily tied, dependent evidence (where exact ties of the statistics decide many p-values), in chunks."""
    rng = np.random.default_rng(seed)
    n, m = int(rng.integers(3, 40)), int(rng.integers(1, 30))
    z, zt = rng.normal(size=n), 1.5 * rng.normal(size=m)
    cals = [np.round(2 * z), np.round(z + rng.normal(size=n))]
    evidence = [np.round(2 * zt), np.round(zt + rng.normal(size=m))]
    np.testing.assert_allclose(fusion.fisher_pvalue(cals, evidence, rows=7), _fisher_by_definition(cals, evidence))
    assert fusion.fisher_pvalue(cals, [np.full(1, 1e9), np.full(1, 1e9)])[0] == pytest.approx(fusion.min_fpr(n))
    with pytest.raises(ValueError, match="paired"):
        fusion.fisher_pvalue([cals[0], cals[1][:-1]], evidence)


def test_fused_ranking_finds_defects_seen_by_either_piece_of_evidence():
    rng = np.random.default_rng(2)
    cal = [rng.normal(size=100), rng.normal(size=100)]
    good = [rng.normal(size=100), rng.normal(size=100)]
    bad = [np.r_[rng.normal(size=50) + 4, rng.normal(size=50)], np.r_[rng.normal(size=50), rng.normal(size=50) + 4]]
    score, p = fusion.fused(cal, [np.r_[g, b] for g, b in zip(good, bad)])
    from gaussad.tools.evaluate import roc_auc

    labels = np.r_[np.zeros(100), np.ones(100)]
    assert roc_auc(labels, score) > 0.95
    assert roc_auc(labels, np.r_[good[0], bad[0]]) < 0.8  # either piece alone misses half of the defects
