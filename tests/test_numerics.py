"""Numerics that fail loudly: bad features, too few or identical samples raise DataError; degenerate but usable
data (constant images, n < d) give finite scores that agree with scikit-learn. See RELIABILITY.md."""

import numpy as np
import pytest

from gaussad import DataError, GaussadError, GaussianAD

from .conftest import TINY


def _texture(seed, size=64):
    return np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_nan_or_inf_features_are_refused_in_fit_and_score(bad):
    rng = np.random.default_rng(1)
    X = rng.normal(size=(20, 4))
    X[7, 2] = bad
    with pytest.raises(DataError, match="level 0: 1 sample\\(s\\) have NaN or infinite features"):
        GaussianAD(backbone=None).fit_features([X])
    model = GaussianAD(backbone=None).fit_features([rng.normal(size=(20, 4))])
    with pytest.raises(DataError, match="NaN or infinite"):
        model.score_features([X])


def test_overflowing_feature_magnitudes_are_refused():
    rng = np.random.default_rng(2)
    X = rng.normal(size=(20, 4)) * 1e70
    with pytest.raises(DataError, match="exceed 1e\\+60, where the moment statistics would overflow"):
        GaussianAD(backbone=None).fit_features([X])
    big = rng.normal(size=(20, 4)) * 1e58  # just below: fits, and scores are scale-free
    scores = GaussianAD(backbone=None).fit_features([big]).score_features([big[:5]])
    ref = GaussianAD(backbone=None).fit_features([big / 1e58]).score_features([big[:5] / 1e58])
    np.testing.assert_allclose(scores, ref, rtol=1e-8)


def test_nan_features_from_the_backbone_name_the_image():
    """Damaged network weights (here: one NaN weight) make the features NaN; the fit stops and names an image."""
    import torch

    model = GaussianAD(**TINY, engine="torch")  # the damage is done to the torch network in memory
    with torch.no_grad():
        next(model.feature_extractor().module.parameters()).view(-1)[0] = float("nan")
    with pytest.raises(DataError, match="array #0: the backbone gave NaN or infinite features for 3 image"):
        model.partial_fit([_texture(i) for i in range(3)])  # fit() would rebuild the network; both share _accumulate


def test_a_single_training_image_is_refused():
    rng = np.random.default_rng(3)
    with pytest.raises(DataError, match="need at least 2 training images, got 1"):
        GaussianAD(**TINY).fit([_texture(0)])
    with pytest.raises(DataError, match="need at least 2 training samples, got 1"):
        GaussianAD(backbone=None).fit_features([rng.normal(size=(1, 4))])
    partial = GaussianAD(backbone=None).partial_fit_features([rng.normal(size=(1, 4))])
    with pytest.raises(GaussadError, match="not fitted yet"):
        partial.score_features([rng.normal(size=(1, 4))])


def test_two_samples_cannot_shrink():
    """Ledoit-Wolf's shrinkage is exactly 0 for two samples (as sklearn), leaving a singular covariance."""
    rng = np.random.default_rng(4)
    from sklearn.covariance import LedoitWolf

    X = rng.normal(size=(2, 6))
    assert LedoitWolf().fit(X).shrinkage_ == pytest.approx(0.0, abs=1e-12)
    with pytest.raises(DataError, match="ledoit-wolf covariance is singular \\(n=2, d=6"):
        GaussianAD(backbone=None, threshold="chi2").fit_features([X])


def test_identical_training_images_are_refused():
    img = _texture(3)
    with pytest.raises(DataError, match="the 4 training images give identical features at level stem"):
        GaussianAD(**TINY, reduction="npca").fit([img.copy() for _ in range(4)])


def test_identical_images_with_l2_score_by_plain_distance():
    """The l2 baseline needs no covariance: identical training images are a valid (if narrow) model."""
    img, other = _texture(3), _texture(4)
    model = GaussianAD(**TINY, estimator="l2").fit([img] * 3)
    feats = model.extract_features([img, other])
    levels = model.level_scores_features(feats)
    assert np.all(np.isfinite(levels)) and np.all(levels[0] == 0) and np.all(levels[1] > 0)
    expected = [np.linalg.norm(f[1] - f[0]) for f in feats]
    np.testing.assert_allclose(levels[1], expected, rtol=1e-6)


@pytest.mark.parametrize("noise, fits", [(0.0, False), (1e-16, False), (1e-15, False), (1e-10, True)])
def test_identical_up_to_rounding(noise, fits):
    """Rows equal up to float64 rounding are identical; real (if tiny) variation still fits."""
    rng = np.random.default_rng(5)
    x = rng.normal(size=16) * 3 + 1
    X = np.tile(x, (20, 1)) * (1 + noise * np.random.default_rng(1).normal(size=(20, 16)))
    if not fits:
        with pytest.raises(DataError, match="all 20 training samples are identical \\(up to rounding\\)"):
            GaussianAD(backbone=None, threshold="chi2").fit_features([X])
        return
    scores = GaussianAD(backbone=None).fit_features([X]).score_features([X[:3]])
    assert np.all(np.isfinite(scores))


def test_constant_images_fit_and_score_finitely():
    """Flat grey images of different levels vary along one direction only: shrinkage still gives a model."""
    flats = [np.full((64, 64, 3), v, np.uint8) for v in range(20, 240, 40)]
    model = GaussianAD(**TINY).fit(flats)
    scores = model.score_samples([flats[0], np.full((64, 64, 3), 130, np.uint8), _texture(9)])
    assert np.all(np.isfinite(scores)) and scores[2] > scores[1]


def test_fewer_images_than_dimensions_works_through_shrinkage():
    """Three images against 32..40 feature dimensions: Ledoit-Wolf equals scikit-learn's on the same features."""
    from sklearn.covariance import OAS, LedoitWolf

    train = [_texture(i) for i in range(3)]
    test = [_texture(10 + i) for i in range(2)]
    model = GaussianAD(**TINY).fit(train)
    assert min(model.feature_dims_) > model.n_samples_ == 3
    train_feats, test_feats = model.extract_features(train), model.extract_features(test)
    for estimator, ref_cls in (("ledoit-wolf", LedoitWolf), ("oas", OAS)):
        fitted = model if estimator == "ledoit-wolf" else GaussianAD(backbone=None, estimator="oas",
                                                                     threshold="chi2").fit_features(train_feats)
        levels = fitted.level_scores_features(test_feats)
        assert np.all(np.isfinite(levels))
        for i, (tr, te) in enumerate(zip(train_feats, test_feats)):
            ref = ref_cls().fit(tr)
            diff = te - ref.location_
            expected = np.sqrt(np.einsum("ij,jk,ik->i", diff, np.linalg.inv(ref.covariance_), diff))
            np.testing.assert_allclose(levels[:, i], expected, rtol=1e-5)


def test_far_fewer_samples_than_dimensions_in_plain_features():
    rng = np.random.default_rng(6)
    from sklearn.covariance import LedoitWolf

    X = rng.normal(size=(5, 300))
    Y = rng.normal(size=(4, 300))
    scores = GaussianAD(backbone=None).fit_features([X]).score_features([Y])
    ref = LedoitWolf().fit(X)
    diff = Y - ref.location_
    np.testing.assert_allclose(scores, np.sqrt(np.einsum("ij,jk,ik->i", diff, np.linalg.inv(ref.covariance_), diff)),
                               rtol=1e-6)


def test_nan_distances_from_a_damaged_model_are_refused():
    rng = np.random.default_rng(7)
    model = GaussianAD(backbone=None).fit_features([rng.normal(size=(20, 3))])
    model.gaussians_[0].mean = np.array([np.inf, 0.0, 0.0])  # the loader refuses this; here it is planted
    with pytest.raises(DataError, match="NaN distances"):
        model.score_features([np.zeros((1, 3))])
