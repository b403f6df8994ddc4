"""Tests of the moment statistics and per-level Gaussians against independent references (sklearn, numpy.linalg.inv)."""

import json

import numpy as np
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from sklearn.covariance import OAS, LedoitWolf, empirical_covariance, ledoit_wolf_shrinkage
from sklearn.decomposition import PCA

from gaussad.core.gaussian import ESTIMATORS, REDUCTIONS, LevelGaussian, MomentStats

RTOL = 1e-8


def rel_err(a, b):
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-300))


def make_data(n, d, seed=0, offset=0.0):
    """Correlated Gaussian data with a distinct, decaying spectrum and an optional common offset."""
    rng = np.random.default_rng(seed)
    Q, _ = np.linalg.qr(rng.standard_normal((d, d)))
    scales = np.geomspace(3.0, 0.1, d)
    mean = rng.standard_normal(d) + offset
    return rng.standard_normal((n, d)) * scales @ Q.T + mean


SHAPES = [(200, 10), (20, 50), (64, 64), (500, 3)]


@pytest.mark.parametrize("offset", [0.0, 100.0])
@pytest.mark.parametrize("n,d", SHAPES)
def test_ledoit_wolf_matches_sklearn(n, d, offset):
    X = make_data(n, d, seed=n + d, offset=offset)
    ref = LedoitWolf().fit(X)
    stats = MomentStats.from_array(X)
    assert stats.ledoit_wolf_shrinkage() == pytest.approx(ref.shrinkage_, rel=RTOL)
    assert stats.ledoit_wolf_shrinkage() == pytest.approx(ledoit_wolf_shrinkage(X), rel=RTOL)
    model = LevelGaussian.fit(stats, "ledoit-wolf")
    assert model.shrinkage == pytest.approx(ref.shrinkage_, rel=RTOL)
    assert rel_err(model.chol @ model.chol.T, ref.covariance_) < RTOL
    assert rel_err(model.mean, ref.location_) < RTOL


@pytest.mark.parametrize("offset", [0.0, 100.0])
@pytest.mark.parametrize("n,d", SHAPES)
def test_oas_matches_sklearn(n, d, offset):
    X = make_data(n, d, seed=n * d, offset=offset)
    ref = OAS().fit(X)
    stats = MomentStats.from_array(X)
    assert stats.oas_shrinkage() == pytest.approx(ref.shrinkage_, rel=RTOL)
    model = LevelGaussian.fit(stats, "oas")
    assert rel_err(model.chol @ model.chol.T, ref.covariance_) < RTOL


@pytest.mark.parametrize("offset", [0.0, 100.0])
def test_empirical_matches_sklearn(offset):
    X = make_data(300, 12, seed=3, offset=offset)
    stats = MomentStats.from_array(X)
    assert rel_err(stats.covariance(), empirical_covariance(X)) < RTOL
    assert rel_err(stats.mean(), X.mean(axis=0)) < 1e-12
    model = LevelGaussian.fit(stats, "empirical")
    assert rel_err(model.chol @ model.chol.T, empirical_covariance(X)) < RTOL


def test_single_feature_matches_sklearn():
    X = make_data(50, 1, seed=1)
    stats = MomentStats.from_array(X)
    assert stats.ledoit_wolf_shrinkage() == LedoitWolf().fit(X).shrinkage_ == 0.0
    assert stats.oas_shrinkage() == OAS().fit(X).shrinkage_ == 0.0


def assert_same_stats(a, b, Xtest):
    assert a.n == b.n
    assert rel_err(a.mean(), b.mean()) < RTOL
    assert rel_err(a.covariance(), b.covariance()) < RTOL
    assert a.ledoit_wolf_shrinkage() == pytest.approx(b.ledoit_wolf_shrinkage(), rel=RTOL)
    assert a.oas_shrinkage() == pytest.approx(b.oas_shrinkage(), rel=RTOL)
    for estimator in ESTIMATORS:
        for reduction in REDUCTIONS:
            if estimator == "empirical" and a.n <= a.dim:
                continue
            da = LevelGaussian.fit(a, estimator, reduction).distances(Xtest)
            db = LevelGaussian.fit(b, estimator, reduction).distances(Xtest)
            assert rel_err(da, db) < RTOL, (estimator, reduction)


@pytest.mark.parametrize("n,d,offset", [(300, 8, 100.0), (40, 30, 0.0), (40, 30, 100.0)])
def test_chunked_updates_equal_one_pass(n, d, offset):
    X = make_data(n, d, seed=7, offset=offset)
    Xtest = make_data(25, d, seed=8, offset=offset)
    whole = MomentStats.from_array(X)
    stats = MomentStats.empty(d)
    bounds = [0, 1, 4, 17, 18, n // 2, n]
    for lo, hi in zip(bounds[:-1], bounds[1:]):
        stats = stats.update(X[lo:hi])
    assert_same_stats(stats, whole, Xtest)


@pytest.mark.parametrize("n,d,offset", [(300, 8, 100.0), (40, 30, 0.0), (40, 30, 100.0)])
def test_merge_with_different_shifts_equals_one_pass(n, d, offset):
    X = make_data(n, d, seed=11, offset=offset)
    X[: n // 3] += 5.0  # first part has a different mean, so the two shifts differ clearly
    Xtest = make_data(25, d, seed=12, offset=offset)
    a = MomentStats.from_array(X[: n // 3])
    b = MomentStats.from_array(X[n // 3 :])
    assert not np.allclose(a.shift, b.shift)
    whole = MomentStats.from_array(X)
    assert_same_stats(a.merge(b), whole, Xtest)
    assert_same_stats(b.merge(a), whole, Xtest)


def test_update_and_merge_are_pure():
    X = make_data(30, 4, seed=2)
    a = MomentStats.from_array(X[:10])
    before = a.to_arrays("")
    a.update(X[10:])
    a.merge(MomentStats.from_array(X[10:]))
    after = a.to_arrays("")
    assert all(np.array_equal(before[k], after[k]) for k in before)


def test_merge_with_empty():
    X = make_data(30, 4, seed=2)
    a = MomentStats.from_array(X)
    e = MomentStats.empty(4)
    for m in (a.merge(e), e.merge(a), e.update(X)):
        assert m.n == 30
        assert rel_err(m.covariance(), a.covariance()) < 1e-14


def test_moment_stats_roundtrip():
    X = make_data(30, 4, seed=2)
    a = MomentStats.from_array(X)
    arrays = a.to_arrays("level1.")
    assert set(arrays) == {f"level1.{k}" for k in ("n", "shift", "s1", "s2", "s3", "s4")}
    assert arrays["level1.n"].dtype == np.int64
    b = MomentStats.from_arrays(arrays, "level1.")
    assert b.n == a.n and np.array_equal(b.s2, a.s2) and b.s4 == a.s4


@pytest.mark.parametrize("estimator", ["ledoit-wolf", "oas", "empirical"])
def test_squared_distances_match_explicit_inverse(estimator):
    X = make_data(150, 10, seed=5, offset=100.0)
    Xtest = make_data(40, 10, seed=6, offset=100.0) * 1.5
    model = LevelGaussian.fit(MomentStats.from_array(X), estimator)
    ref = {"ledoit-wolf": LedoitWolf, "oas": OAS}
    cov = ref[estimator]().fit(X).covariance_ if estimator in ref else np.cov(X, rowvar=False, bias=True)
    diff = Xtest - X.mean(axis=0)
    expected = np.einsum("ij,jk,ik->i", diff, np.linalg.inv(cov), diff)
    assert rel_err(model.squared_distances(Xtest), expected) < RTOL
    assert rel_err(model.distances(Xtest), np.sqrt(expected)) < RTOL
    assert model.dof == 10


def test_diagonal_and_l2_distances():
    X = make_data(150, 10, seed=5, offset=100.0)
    Xtest = make_data(40, 10, seed=6, offset=100.0)
    stats = MomentStats.from_array(X)
    diff = Xtest - X.mean(axis=0)
    diag = LevelGaussian.fit(stats, "diagonal")
    expected = np.sqrt(np.sum(diff**2 / X.var(axis=0), axis=1))
    assert rel_err(diag.distances(Xtest), expected) < RTOL
    l2 = LevelGaussian.fit(stats, "l2")
    assert rel_err(l2.distances(Xtest), np.linalg.norm(diff, axis=1)) < RTOL
    assert diag.shrinkage == 0.0 and l2.dof == 10


def reference_components(X, reduction, variance):
    """Kept components by the paper's rule, from sklearn PCA."""
    pca = PCA(n_components=None).fit(X)
    last = int(np.argmax(pca.explained_variance_ratio_.cumsum() > variance))
    if reduction == "pca":
        return pca.components_[: last + 1].T
    return pca.components_[max(last - 1, 0) :].T


def projector(V):
    return V @ V.T


@pytest.mark.parametrize("variance", [0.5, 0.9, 0.99])
@pytest.mark.parametrize("reduction", ["pca", "npca"])
def test_reduction_components_match_sklearn_pca(reduction, variance):
    X = make_data(300, 16, seed=21, offset=100.0)
    model = LevelGaussian.fit(MomentStats.from_array(X), "ledoit-wolf", reduction, variance)
    V = reference_components(X, reduction, variance)
    assert model.components.shape == V.shape
    assert model.dof == V.shape[1]
    assert np.abs(projector(model.components) - projector(V)).max() < 1e-8


def test_pca_components_match_sklearn_when_n_below_d():
    X = make_data(20, 50, seed=4)
    model = LevelGaussian.fit(MomentStats.from_array(X), "ledoit-wolf", "pca", 0.9)
    V = reference_components(X, "pca", 0.9)
    assert 1 < V.shape[1] < 19
    assert np.abs(projector(model.components) - projector(V)).max() < 1e-8


def test_npca_distance_by_hand():
    X = make_data(300, 16, seed=22, offset=100.0)
    Xtest = make_data(30, 16, seed=23, offset=100.0) * 1.2
    stats = MomentStats.from_array(X)
    V = reference_components(X, "npca", 0.95)
    diff = Xtest - X.mean(axis=0)
    S = np.cov(X, rowvar=False, bias=True)
    lam = np.einsum("ji,jk,ki->i", V, S, V)  # variance of the data along each kept direction

    empirical = LevelGaussian.fit(stats, "empirical", "npca", 0.95)
    expected = np.sum((diff @ V) ** 2 / lam, axis=1)
    assert rel_err(empirical.squared_distances(Xtest), expected) < RTOL
    diagonal = LevelGaussian.fit(stats, "diagonal", "npca", 0.95)
    assert rel_err(diagonal.squared_distances(Xtest), expected) < RTOL

    lw = LedoitWolf().fit(X)
    shrunk = LevelGaussian.fit(stats, "ledoit-wolf", "npca", 0.95)
    lw_var = np.einsum("ji,jk,ki->i", V, lw.covariance_, V)
    assert rel_err(shrunk.squared_distances(Xtest), np.sum((diff @ V) ** 2 / lw_var, axis=1)) < RTOL

    l2 = LevelGaussian.fit(stats, "l2", "npca", 0.95)
    assert rel_err(l2.squared_distances(Xtest), np.sum((diff @ V) ** 2, axis=1)) < RTOL


@pytest.mark.parametrize("estimator", ESTIMATORS)
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_level_gaussian_roundtrip(estimator, reduction):
    X = make_data(100, 6, seed=9)
    model = LevelGaussian.fit(MomentStats.from_array(X), estimator, reduction, 0.9)
    meta = json.loads(json.dumps(model.meta()))
    assert meta["dof"] == model.dof
    loaded = LevelGaussian.from_arrays(model.to_arrays("l0."), "l0.", meta)
    assert np.array_equal(loaded.distances(X), model.distances(X))
    assert loaded.meta() == model.meta()


def test_rejects_nan_rows():
    X = make_data(20, 3)
    X[2, 1] = np.nan
    X[5, 0] = np.inf
    X[5, 2] = np.nan
    with pytest.raises(ValueError, match="2 of 20 rows"):
        MomentStats.from_array(X)
    with pytest.raises(ValueError, match="2 of 20 rows"):
        MomentStats.empty(3).update(X)
    model = LevelGaussian.fit(MomentStats.from_array(make_data(20, 3)), "l2")
    with pytest.raises(ValueError, match="1 of 1 rows"):
        model.distances(X[2:3])


def test_rejects_bad_shapes():
    with pytest.raises(ValueError, match="2-D"):
        MomentStats.from_array(np.zeros(5))
    with pytest.raises(ValueError, match="expected 3 features"):
        MomentStats.from_array(make_data(10, 3)).update(make_data(10, 4))
    with pytest.raises(ValueError, match="dimension"):
        MomentStats.empty(3).merge(MomentStats.empty(4))
    model = LevelGaussian.fit(MomentStats.from_array(make_data(20, 3)), "ledoit-wolf")
    with pytest.raises(ValueError, match="expected 3 features"):
        model.distances(make_data(5, 4))


def test_rejects_too_few_samples():
    for X in (make_data(1, 3), np.zeros((0, 3))):
        with pytest.raises(ValueError, match="at least 2 samples"):
            LevelGaussian.fit(MomentStats.from_array(X))


def test_rejects_bad_options():
    stats = MomentStats.from_array(make_data(20, 3))
    with pytest.raises(ValueError, match="ledoit-wolf"):
        LevelGaussian.fit(stats, "ledoitwolf")
    with pytest.raises(ValueError, match="npca"):
        LevelGaussian.fit(stats, reduction="PCA")
    for variance in (0.0, 1.0, -0.1, 1.5, float("nan")):
        with pytest.raises(ValueError, match="variance"):
            LevelGaussian.fit(stats, reduction="pca", variance=variance)


def test_rejects_singular_empirical():
    with pytest.raises(ValueError, match=r"singular \(n=20, d=50\).*ledoit-wolf or oas"):
        LevelGaussian.fit(MomentStats.from_array(make_data(20, 50)), "empirical")
    X = make_data(100, 5)
    X[:, 4] = X[:, 0] - 2 * X[:, 1]  # exactly collinear although n > d
    with pytest.raises(ValueError, match="singular"):
        LevelGaussian.fit(MomentStats.from_array(X), "empirical")
    # ledoit-wolf copes with both
    LevelGaussian.fit(MomentStats.from_array(X), "ledoit-wolf").distances(X)


def test_rejects_zero_variance_components():
    X = make_data(20, 50)
    with pytest.raises(ValueError, match="zero variance"):
        LevelGaussian.fit(MomentStats.from_array(X), "empirical", "npca", 0.9)
    model = LevelGaussian.fit(MomentStats.from_array(X), "ledoit-wolf", "npca", 0.9)
    assert np.all(np.isfinite(model.distances(X)))


def test_rejects_degenerate_shrunk_covariance():
    # sklearn's Ledoit-Wolf shrinkage is exactly 0 for two samples, leaving a rank-1 covariance
    X = make_data(2, 4)
    assert LedoitWolf().fit(X).shrinkage_ == 0.0
    assert MomentStats.from_array(X).ledoit_wolf_shrinkage() == pytest.approx(0.0, abs=1e-12)
    with pytest.raises(ValueError, match=r"ledoit-wolf covariance is singular \(n=2, d=4"):
        LevelGaussian.fit(MomentStats.from_array(X), "ledoit-wolf")
    with pytest.raises(ValueError, match="ledoit-wolf covariance is singular"):
        LevelGaussian.fit(MomentStats.from_array(X), "ledoit-wolf", "npca")
    for reduction in (None, "pca"):
        with pytest.raises(ValueError, match="all 5 training samples are identical"):
            LevelGaussian.fit(MomentStats.from_array(np.ones((5, 3))), "oas", reduction)


def test_rejects_constant_features_for_diagonal():
    X = make_data(30, 5, offset=100.0)
    X[:, 1] = 100.3
    X[:, 3] = -7.1
    with pytest.raises(ValueError, match="2 of 5 features are constant"):
        LevelGaussian.fit(MomentStats.from_array(X), "diagonal")


small_arrays = st.tuples(st.integers(1, 12), st.integers(1, 12), st.integers(1, 12), st.integers(1, 5)).flatmap(
    lambda s: st.tuples(
        *(
            st.lists(
                st.lists(st.floats(-1e3, 1e3, allow_nan=False, allow_infinity=False), min_size=s[3], max_size=s[3]),
                min_size=k,
                max_size=k,
            ).map(lambda rows: np.array(rows, dtype=float).reshape(len(rows), s[3]))
            for k in s[:3]
        )
    )
)


@settings(max_examples=30, deadline=None, derandomize=True)
@given(small_arrays)
def test_merge_is_associative_and_commutative(parts):
    a, b, c = (MomentStats.from_array(p) for p in parts)
    X = np.concatenate(parts)
    whole = MomentStats.from_array(X)
    scale = max(np.abs(X).max(), 1.0)
    candidates = [a.merge(b).merge(c), a.merge(b.merge(c)), c.merge(a).merge(b), b.merge(c).merge(a)]
    for m in candidates:
        assert m.n == whole.n
        np.testing.assert_allclose(m.mean(), whole.mean(), rtol=RTOL, atol=RTOL * scale)
        np.testing.assert_allclose(m.covariance(), whole.covariance(), rtol=RTOL, atol=RTOL * scale**2)


@settings(max_examples=30, deadline=None, derandomize=True)
@given(
    st.integers(3, 40),
    st.integers(1, 8),
    st.integers(0, 2**32 - 1),
    st.sampled_from(["ledoit-wolf", "oas", "diagonal", "l2"]),
    st.sampled_from(REDUCTIONS),
)
def test_distances_nonnegative_and_zero_at_mean(n, d, seed, estimator, reduction):
    """Distances equal sqrt(diff^T inv(C) diff) with C built apart from the code: scikit-learn's LedoitWolf/OAS
    covariance, diag of numpy's covariance, or I; with a reduction, C restricted to the kept eigenvectors of
    numpy's covariance (the reference-code rule), where diagonal uses the projected data's own variances."""
    assume(estimator != "diagonal" or reduction is None or n > d)
    assume(reduction != "npca" or n > d)  # npca then keeps an arbitrary null-space direction (see gaussian.py)
    X = make_data(n, d, seed=seed, offset=float(seed % 7) * 10)
    S = np.atleast_2d(np.cov(X.T, bias=True))
    if reduction is not None:  # cuts too close to the variance threshold are decided by rounding
        lam_all = np.sort(np.linalg.eigvalsh(S))[::-1][: min(n, d)]
        assume(np.min(np.abs(np.cumsum(lam_all) / lam_all.sum() - 0.9)) > 1e-6)
    model = LevelGaussian.fit(MomentStats.from_array(X), estimator, reduction, 0.9)
    Y = np.concatenate([X, make_data(5, d, seed=seed + 1)])
    dist = model.distances(Y)
    assert np.all(dist >= 0.0) and np.all(np.isfinite(dist))
    assert model.distances(model.mean[None, :])[0] == pytest.approx(0.0, abs=1e-12)

    C = {"ledoit-wolf": lambda: LedoitWolf().fit(X).covariance_, "oas": lambda: OAS().fit(X).covariance_,
         "diagonal": lambda: np.diag(np.diag(S)), "l2": lambda: np.eye(d)}[estimator]()
    diff = Y - X.mean(axis=0)
    if reduction is not None:
        lam, vecs = np.linalg.eigh(S)
        lam, vecs = lam[::-1], vecs[:, ::-1]
        m = min(n, d)
        ratios = np.cumsum(lam[:m]) / lam[:m].sum()
        last = int(np.argmax(ratios > 0.9)) if (ratios > 0.9).any() else m - 1
        V = vecs[:, : last + 1] if reduction == "pca" else vecs[:, max(last - 1, 0) : m]
        C = V.T @ (S if estimator == "diagonal" else C) @ V
        diff = diff @ V
    expected = np.sqrt(np.einsum("ij,jk,ik->i", diff, np.linalg.inv(C), diff))
    np.testing.assert_allclose(dist, expected, rtol=1e-6, atol=1e-9)
