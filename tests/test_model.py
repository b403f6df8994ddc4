import numpy as np
import pytest

import gaussad
from gaussad import DataError, GaussadError, GaussianAD
from gaussad.images import list_images

from .conftest import TINY


@pytest.fixture(scope="module")
def brick(tiny_category):
    train = list_images(tiny_category / "train" / "good")
    good = list_images(tiny_category / "test" / "good")
    bad = [p for d in sorted((tiny_category / "test").iterdir()) if d.name != "good" for p in list_images(d)]
    return train, good, bad


@pytest.fixture(scope="module")
def fitted(brick):
    return GaussianAD(**TINY).fit(brick[0])


def test_fit_learns_one_gaussian_per_level(fitted):
    assert fitted.levels_ == [0, 1, 2, 3]
    assert fitted.level_names_ == TINY["levels"]
    assert fitted.feature_dims_ == [32, 16, 24, 40]
    assert fitted.n_samples_ == 10 and fitted.input_size_ == 64


def test_score_is_mean_of_level_distances_and_matches_numpy(fitted, brick):
    """The image score equals the mean over levels of an explicit Mahalanobis distance with sklearn's LW."""
    from sklearn.covariance import LedoitWolf

    train_feats = fitted.extract_features(brick[0])
    test_feats = fitted.extract_features(brick[1])
    levels = fitted.level_scores(brick[1])
    for i, (tr, te) in enumerate(zip(train_feats, test_feats)):
        lw = LedoitWolf().fit(tr)
        diff = te - tr.mean(axis=0)
        expected = np.sqrt(np.einsum("ij,jk,ik->i", diff, np.linalg.inv(lw.covariance_), diff))
        np.testing.assert_allclose(levels[:, i], expected, rtol=1e-6)
    np.testing.assert_allclose(fitted.score_samples(brick[1]), levels.mean(axis=1))


def test_images_as_paths_pil_and_arrays_score_the_same(fitted, brick):
    from PIL import Image

    path = brick[1][0]
    pil = Image.open(path).convert("RGB")
    arr = np.asarray(pil)
    scores = fitted.score_samples([path, pil, arr])
    np.testing.assert_allclose(scores, scores[0], rtol=1e-6)


def test_partial_fit_in_chunks_equals_one_fit(fitted, brick):
    chunked = GaussianAD(**TINY)
    for start in (0, 3, 7):
        chunked.partial_fit(brick[0][start : {0: 3, 3: 7, 7: 10}[start]])
    np.testing.assert_allclose(chunked.level_scores(brick[1]), fitted.level_scores(brick[1]), rtol=1e-8)
    a = GaussianAD(**TINY).fit(brick[0][:4])
    b = GaussianAD(**TINY).fit(brick[0][4:])
    np.testing.assert_allclose(a.merge(b).level_scores(brick[1]), fitted.level_scores(brick[1]), rtol=1e-8)


def test_defects_score_higher_than_good_on_average(fitted, brick):
    good = fitted.score_samples(brick[1])
    bad = fitted.score_samples(brick[2])
    assert bad.mean() > good.mean()


def test_save_and_load_score_identically(fitted, brick, tmp_path):
    path = tmp_path / "m.gaussad"
    fitted.save(path)
    loaded = gaussad.load(path)
    assert loaded.level_names_ == fitted.level_names_ and loaded.estimator == fitted.estimator
    np.testing.assert_array_equal(loaded.level_scores(brick[1]), fitted.level_scores(brick[1]))
    assert [p.name for p in tmp_path.iterdir()] == ["m.gaussad"]


def test_predict_uses_bonferroni_chi2_thresholds(fitted, brick):
    from scipy.stats import chi2

    levels = fitted.level_scores(brick[1])
    decisions, pvalues = fitted.decide(levels, fpr=0.05)
    dofs = fitted.dofs_
    thresholds = np.sqrt([chi2.ppf(1 - 0.05 / len(dofs), k) for k in dofs])
    np.testing.assert_array_equal(decisions, (levels > thresholds).any(axis=1).astype(int))
    np.testing.assert_array_equal(fitted.predict(brick[1], fpr=0.05), decisions)
    assert np.all((pvalues >= 0) & (pvalues <= 1))


def test_plain_feature_arrays():
    rng = np.random.default_rng(0)
    train = [rng.normal(size=(50, 6)), rng.normal(size=(50, 3))]
    model = GaussianAD(backbone=None).fit_features(train)
    test = [rng.normal(size=(4, 6)), rng.normal(size=(4, 3))]
    assert model.level_scores_features(test).shape == (4, 2)
    with pytest.raises(GaussadError, match="plain feature arrays"):
        model.score_samples([np.zeros((8, 8, 3), np.uint8)])
    with pytest.raises(DataError, match="dimensions"):
        model.score_features([rng.normal(size=(4, 5)), rng.normal(size=(4, 3))])
    bad = [train[0].copy(), train[1]]
    bad[0][3, 1] = np.nan
    with pytest.raises(DataError, match="NaN"):
        GaussianAD(backbone=None).fit_features(bad)


@pytest.mark.parametrize("estimator", ["oas", "diagonal", "l2"])
def test_other_estimators_fit_and_score(estimator):
    rng = np.random.default_rng(1)
    train = [rng.normal(size=(40, 5))]
    model = GaussianAD(backbone=None, estimator=estimator).fit_features(train)
    far = model.score_features([np.full((1, 5), 10.0)])
    near = model.score_features([train[0].mean(axis=0, keepdims=True)])
    assert far[0] > near[0]


def test_parameters_validated_in_fit_not_constructor(brick):
    model = GaussianAD(estimator="banana")
    assert model.estimator == "banana"
    with pytest.raises(GaussadError, match="unknown estimator"):
        model.fit(brick[0])
    with pytest.raises(GaussadError, match="variance"):
        GaussianAD(reduction="npca", variance=1.5).fit_features([np.zeros((5, 2))])
    with pytest.raises(DataError, match="at least 2"):
        GaussianAD(**TINY).fit(brick[0][:1])
    with pytest.raises(GaussadError, match="not fitted"):
        GaussianAD().score_features([np.zeros((1, 2))])
