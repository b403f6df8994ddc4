"""Cross-conformal calibration: the exact downdate of the moment statistics, out-of-fold scores equal to fits without
each fold, the default calibration, model files, one pass over the images, and the realised false-positive rate."""

import numpy as np
import pytest

import gaussad
from bench.experiments.conformal_fpr import realised_fpr
from gaussad import GaussianAD
from gaussad.detector import params
from gaussad.errors import DataError
from gaussad.detector.fitting import cv_folds
from gaussad.core.gaussian import LevelGaussian, MomentStats


def _levels(rng, n, dims=(4, 12)):
    return [rng.normal(size=(n, d)) * rng.uniform(0.5, 3.0, size=d) + rng.normal(size=d) * 50 for d in dims]


def _rel(a, b):
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-300))


@pytest.mark.parametrize("n, d, offset", [(40, 6, 0.0), (60, 30, 1e3), (25, 80, -7.0)])
def test_downdate_equals_a_fit_without_the_fold(n, d, offset):
    rng = np.random.default_rng(n + d)
    X = rng.normal(size=(n, d)) @ rng.normal(size=(d, d)) + offset
    fold = np.zeros(n, bool)
    fold[rng.choice(n, n // 5, replace=False)] = True
    # the full statistics as fit streams them (batches, shift of the first batch), the fold's from its own batches
    full = MomentStats.from_array(X[:7]).update(X[7:20]).update(X[20:])
    part = MomentStats.from_array(X[fold][:3]).update(X[fold][3:])
    down, direct = full.subtract(part), MomentStats.from_array(X[~fold])
    assert down.n == direct.n == n - n // 5
    assert _rel(down.mean(), direct.mean()) < 1e-8
    assert _rel(down.covariance(), direct.covariance()) < 1e-8
    assert abs(down.ledoit_wolf_shrinkage() - direct.ledoit_wolf_shrinkage()) < 1e-8 * direct.ledoit_wolf_shrinkage()
    assert abs(down.oas_shrinkage() - direct.oas_shrinkage()) <= 1e-8 * direct.oas_shrinkage()
    test = rng.normal(size=(10, d)) @ rng.normal(size=(d, d)) + offset
    assert _rel(LevelGaussian.fit(down).distances(test), LevelGaussian.fit(direct).distances(test)) < 1e-8


def test_downdate_edge_cases():
    rng = np.random.default_rng(1)
    a = MomentStats.from_array(rng.normal(size=(5, 3)))
    assert a.subtract(MomentStats.empty(3)).n == 5 and a.subtract(a).n == 0
    with pytest.raises(ValueError, match="cannot subtract 6 samples"):
        a.subtract(MomentStats.from_array(rng.normal(size=(6, 3))))
    with pytest.raises(ValueError, match="dimension"):
        a.subtract(MomentStats.from_array(rng.normal(size=(2, 4))))


def test_out_of_fold_scores_equal_fits_without_each_fold():
    rng = np.random.default_rng(2)
    train = _levels(rng, 37)
    model = GaussianAD(backbone=None, threshold="conformal", fpr=0.1, calibration="cv", calibration_folds=4,
                       random_state=3).fit_features(train)
    fold = cv_folds(37, 4, 3)
    assert sorted(np.bincount(fold)) == [9, 9, 9, 10]
    expected = np.empty(37)
    for f in range(4):
        alone = GaussianAD(backbone=None).fit_features([x[fold != f] for x in train])
        expected[fold == f] = alone.score_features([x[fold == f] for x in train])
    np.testing.assert_allclose(model.calibration_scores_, expected, rtol=1e-8)
    # the final model is fitted on all images, exactly as without calibration
    plain = GaussianAD(backbone=None).fit_features(train)
    test = _levels(rng, 5)
    np.testing.assert_array_equal(model.score_features(test), plain.score_features(test))
    # threshold: the ceil((n + 1)(1 - alpha))-th smallest of the n out-of-fold scores
    assert model.score_threshold() == pytest.approx(np.sort(expected)[int(np.ceil(38 * 0.9)) - 1], rel=1e-8)


def test_default_calibration_is_cv_below_500_images_and_a_split_above():
    rng = np.random.default_rng(3)
    small = GaussianAD(backbone=None, threshold="conformal").fit_features(_levels(rng, 50, (3,)))
    assert small.state_.calibration_method == "cv" and small.calibration_scores_.size == 50
    large = GaussianAD(backbone=None, threshold="conformal").fit_features(_levels(rng, params.CV_BELOW, (3,)))
    assert large.state_.calibration_method == "split" and large.calibration_scores_.size == params.CV_BELOW // 5
    assert GaussianAD(backbone=None, threshold="chi2").fit_features(_levels(rng, 50, (3,))).state_.calibration_scores is None
    # the default preset decides by the conformal law (issue 30), calibrated cross-conformally below 500 images
    assert GaussianAD(backbone=None).fit_features(_levels(rng, 50, (3,))).state_.calibration_method == "cv"
    assert params.calibration_for({"threshold": "chi2", "calibration": None}, 10) is None
    assert params.calibration_for({"threshold": "conformal", "calibration": 0.3}, 10) == 0.3


def test_fewer_images_than_folds_and_bad_values():
    rng = np.random.default_rng(4)
    model = GaussianAD(backbone=None, calibration="cv", calibration_folds=10).fit_features(_levels(rng, 6, (2,)))
    assert model.calibration_scores_.size == 6  # leave-one-out
    with pytest.raises(DataError, match="fewer than 3 images to fit each fold's model on"):
        GaussianAD(backbone=None, calibration="cv").fit_features(_levels(rng, 2, (2,)))
    for bad in ("CV", 1.0, 0, "0.2"):
        with pytest.raises(gaussad.InvalidParameterError, match="calibration"):
            GaussianAD(backbone=None, calibration=bad).fit_features(_levels(rng, 6, (2,)))
    with pytest.raises(gaussad.InvalidParameterError, match="calibration_folds"):
        GaussianAD(backbone=None, calibration="cv", calibration_folds=1).fit_features(_levels(rng, 6, (2,)))


def test_cv_model_saves_loads_and_summarises(tmp_path):
    rng = np.random.default_rng(5)
    model = GaussianAD(backbone=None, threshold="conformal", fpr=0.05, calibration_folds=3).fit_features(
        _levels(rng, 30))
    summary = model.summary()
    assert summary["calibration"] == {"method": "cv", "n_scores": 30, "min_fpr": pytest.approx(1 / 31), "fpr": 0.05,
                                      "score_threshold": pytest.approx(np.sort(model.calibration_scores_)[29])}
    assert summary["threshold"]["score_threshold"] == summary["calibration"]["score_threshold"]
    model.save(tmp_path / "m.gaussad")
    loaded = gaussad.load(tmp_path / "m.gaussad")
    np.testing.assert_array_equal(loaded.calibration_scores_, model.calibration_scores_)
    assert loaded.summary() == summary and loaded.calibration_folds == 3 and loaded.calibration is None
    at_01 = GaussianAD(backbone=None, threshold="conformal", fpr=0.01).fit_features(_levels(rng, 30)).summary()
    # 30 scores cannot support 0.01: the rule decides at 1/31, flagging what lies above every calibration score
    assert at_01["threshold"]["fpr"] == pytest.approx(1 / 31) and at_01["threshold"]["fpr_requested"] == 0.01
    assert at_01["calibration"]["score_threshold"] == at_01["threshold"]["score_threshold"] > 0


def test_images_are_read_once_and_give_the_features_scores(tiny_category):
    from .conftest import TINY

    files = sorted((tiny_category / "train" / "good").iterdir())
    model = GaussianAD(**TINY, threshold="conformal", fpr=0.2)
    seen = []
    original = model.iter_features

    def counting(images, *args, **kwargs):
        for idx, batch, fmaps in original(images, *args, **kwargs):
            seen.extend(images[i] for i in idx)
            yield idx, batch, fmaps

    model.iter_features = counting
    model.fit(files)
    assert sorted(seen) == files  # every image read once
    feats = GaussianAD(**TINY).extract_features(files)
    twin = GaussianAD(backbone=None, calibration="cv").fit_features(feats)
    np.testing.assert_allclose(model.calibration_scores_, twin.calibration_scores_, rtol=1e-9)


def test_cross_conformal_false_positive_rate_stays_below_twice_alpha():
    """Realised FPR over draws of Gaussian training sets of 30 (fixed seed): at most 2 alpha (Barber et al.'s worst
    case for CV+), measured here well below alpha (the fold models are fitted on 24 samples)."""
    result = realised_fpr(30, 0.05, draws=60, n_test=200, seed=11)
    assert result["infinite_share"] == 0.0
    assert result["mean_fpr"] <= 2 * 0.05
