"""Property-based tests (hypothesis) of the numeric core: invariances of the Mahalanobis distance, scaling laws,
chunked/merged statistics equal one pass, and distances that are always finite and non-negative."""

import numpy as np
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from gaussad.core.gaussian import REDUCTIONS, LevelGaussian, MomentStats

from .test_gaussian import make_data

PROPS = settings(max_examples=25, deadline=None, derandomize=True)  # the same 25 cases on every run
VARIANCE = 0.9

shapes = st.tuples(st.integers(3, 60), st.integers(1, 12))
seeds = st.integers(0, 2**32 - 1)
estimators = st.sampled_from(["ledoit-wolf", "oas", "empirical", "diagonal", "l2"])
reductions = st.sampled_from(REDUCTIONS)


def _usable(X, estimator, reduction):
    """Skip combinations that are singular by construction, and PCA cuts too close to the variance threshold."""
    n, d = X.shape
    if estimator == "empirical" and n <= d + 1:
        return False
    if estimator in ("empirical", "diagonal") and reduction is not None and n <= d:
        return False
    if reduction == "npca" and n <= d:  # npca then keeps a null-space direction of S, arbitrary by design (gaussian.py)
        return False
    if reduction is not None:
        lam = np.sort(np.linalg.eigvalsh(np.cov(X.T, bias=True).reshape(d, d)))[::-1][: min(n, d)]
        ratios = np.cumsum(lam) / lam.sum()
        if np.min(np.abs(ratios - VARIANCE)) < 1e-6:
            return False
    return True


def _dist(X, Y, estimator, reduction):
    return LevelGaussian.fit(MomentStats.from_array(X), estimator, reduction, VARIANCE).distances(Y)


@PROPS
@given(shapes, seeds, estimators, reductions, st.floats(-1e4, 1e4))
def test_translating_all_data_leaves_distances_unchanged(shape, seed, estimator, reduction, shift):
    n, d = shape
    X, Y = make_data(n, d, seed), make_data(7, d, seed + 1)
    assume(_usable(X, estimator, reduction))
    c = np.random.default_rng(seed).normal(size=d) * shift
    np.testing.assert_allclose(_dist(X + c, Y + c, estimator, reduction), _dist(X, Y, estimator, reduction),
                               rtol=1e-6, atol=1e-6)


@PROPS
@given(shapes, seeds, estimators, reductions, st.floats(-6, 6), st.booleans())
def test_scaling_all_data(shape, seed, estimator, reduction, log_scale, negate):
    """Mahalanobis distances are scale-free; the l2 baseline's scale with |a|."""
    n, d = shape
    X, Y = make_data(n, d, seed), make_data(7, d, seed + 1)
    assume(_usable(X, estimator, reduction))
    a = 10.0**log_scale * (-1 if negate else 1)
    factor = abs(a) if estimator == "l2" else 1.0
    np.testing.assert_allclose(_dist(a * X, a * Y, estimator, reduction), factor * _dist(X, Y, estimator, reduction),
                               rtol=1e-6, atol=1e-9)


@PROPS
@given(shapes, seeds, st.sampled_from(["ledoit-wolf", "oas", "empirical", "l2"]), reductions)
def test_rotating_all_data_leaves_distances_unchanged(shape, seed, estimator, reduction):
    """Every estimator but diagonal is rotation-equivariant (the shrinkage target mu*I is rotation-invariant)."""
    n, d = shape
    X, Y = make_data(n, d, seed), make_data(7, d, seed + 1)
    assume(_usable(X, estimator, reduction))
    Q, _ = np.linalg.qr(np.random.default_rng(seed + 2).normal(size=(d, d)))
    np.testing.assert_allclose(_dist(X @ Q, Y @ Q, estimator, reduction), _dist(X, Y, estimator, reduction),
                               rtol=1e-6, atol=1e-6)


@PROPS
@given(shapes, seeds, estimators, reductions)
def test_order_of_training_samples_does_not_matter(shape, seed, estimator, reduction):
    n, d = shape
    X, Y = make_data(n, d, seed), make_data(7, d, seed + 1)
    assume(_usable(X, estimator, reduction))
    perm = np.random.default_rng(seed).permutation(n)
    np.testing.assert_allclose(_dist(X[perm], Y, estimator, reduction), _dist(X, Y, estimator, reduction),
                               rtol=1e-7, atol=1e-9)


@PROPS
@given(shapes, seeds, st.lists(st.floats(0, 1), min_size=1, max_size=5), st.floats(-1e3, 1e3))
def test_updates_and_merges_of_chunks_equal_one_pass(shape, seed, cuts, offset):
    n, d = shape
    X = make_data(n, d, seed, offset=offset)
    Y = make_data(7, d, seed + 1, offset=offset)
    bounds = sorted({0, n, *(int(c * n) for c in cuts)})
    chunks = [X[lo:hi] for lo, hi in zip(bounds[:-1], bounds[1:])]
    whole = MomentStats.from_array(X)
    updated = MomentStats.empty(d)
    for chunk in chunks:
        updated = updated.update(chunk)
    parts = [MomentStats.from_array(c) for c in chunks]
    merged = parts[0]
    for part in parts[1:]:
        merged = part.merge(merged)  # merge in the other order as well
    scale = max(1.0, abs(offset)) ** 2
    for stats in (updated, merged):
        assert stats.n == n
        np.testing.assert_allclose(stats.mean(), whole.mean(), rtol=1e-9, atol=1e-9 * scale)
        np.testing.assert_allclose(stats.covariance(), whole.covariance(), rtol=1e-7, atol=1e-9 * scale)
        assert stats.ledoit_wolf_shrinkage() == pytest.approx(whole.ledoit_wolf_shrinkage(), rel=1e-6, abs=1e-9)
        np.testing.assert_allclose(LevelGaussian.fit(stats).distances(Y), LevelGaussian.fit(whole).distances(Y),
                                   rtol=1e-6)


@PROPS
@given(shapes, seeds, estimators, reductions, st.floats(-8, 8), st.floats(-8, 8))
def test_distances_are_finite_non_negative_and_homogeneous(shape, seed, estimator, reduction, log_scale, log_offset):
    """Across 16 decades of scale and offset: finite, >= 0, 0 at the mean, and d(mean + t v) = |t| d(mean + v).

    Offsets stay within 8 decades of the spread: beyond, the probes mean + t v themselves lose the digits tested.
    """
    n, d = shape
    assume(log_offset - log_scale <= 8)
    X = make_data(n, d, seed) * 10.0**log_scale + 10.0**log_offset
    assume(_usable(X, estimator, reduction))
    model = LevelGaussian.fit(MomentStats.from_array(X), estimator, reduction, VARIANCE)
    v = np.random.default_rng(seed).normal(size=d) * 10.0**log_scale
    probe = model.mean + np.outer([1.0, -2.5, 0.0, 7.0], v)
    dist = model.distances(np.concatenate([X, probe]))
    assert np.all(np.isfinite(dist)) and np.all(dist >= 0)
    base, minus, zero, seven = model.distances(probe)
    assert zero == pytest.approx(0.0, abs=1e-6 * max(base, 1e-300))
    assert minus == pytest.approx(2.5 * base, rel=1e-6) and seven == pytest.approx(7.0 * base, rel=1e-6)


@PROPS
@given(shapes, seeds, st.sampled_from([None, "pca"]))
def test_empirical_mean_squared_training_distance_is_the_dimension(shape, seed, reduction):
    """With the sample covariance S, mean_k (x_k - m)^T S^-1 (x_k - m) = trace(S^-1 S) = k (kept dimensions)."""
    n, d = shape
    X = make_data(n, d, seed, offset=float(seed % 100))
    assume(_usable(X, "empirical", reduction))
    model = LevelGaussian.fit(MomentStats.from_array(X), "empirical", reduction, VARIANCE)
    assert float(np.mean(model.squared_distances(X))) == pytest.approx(model.dof, rel=1e-7)


@PROPS
@given(shapes, seeds, st.floats(-1e3, 1e3))
def test_shrinkage_intensities_equal_scikit_learns(shape, seed, offset):
    """From the moments alone: Ledoit-Wolf's and OAS's intensities equal scikit-learn's on the same samples, and the
    relative spread is trace(S) over the mean squared norm."""
    from sklearn.covariance import ledoit_wolf_shrinkage, oas

    X = make_data(*shape, seed, offset=offset)
    stats = MomentStats.from_array(X)
    assert stats.ledoit_wolf_shrinkage() == pytest.approx(ledoit_wolf_shrinkage(X), rel=1e-6, abs=1e-9)
    assert stats.oas_shrinkage() == pytest.approx(oas(X)[1], rel=1e-6, abs=1e-9)
    spread = np.trace(np.atleast_2d(np.cov(X.T, bias=True))) / np.mean(np.sum(X**2, axis=1))
    assert stats.relative_spread() == pytest.approx(spread, rel=1e-6, abs=1e-12)
