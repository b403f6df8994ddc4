"""The fused image score as the model's score and decision (image_score='fused'): its calibration learned at fit
(cross-conformal global scores, leave-one-image-out map peaks), the realised false-positive rate of its decision,
equality with :func:`gaussad.core.fusion.fused` on the stored calibration, model files, the command line and the
parameter checks."""

import json

import numpy as np
import pytest

import gaussad
from gaussad import GaussianAD
from gaussad.core import fusion
from gaussad.cli import main
from gaussad.errors import GaussadError, InvalidParameterError, ModelFormatError

from .conftest import TINY

FUSED = {"backbone": None, "preset": "paper", "map_method": "nearest", "image_score": "fused"}
TINY_FUSED = {**TINY, "map_levels": ["stage2", "stage3"], "map_method": "nearest", "image_score": "fused",
              "threshold": "conformal", "fpr": 0.2}


def _draw(rng, n, shift=0.0):
    """n normal images (or shifted ones): per image one (3, 4, 4) feature map, and two pooled levels, the first the
    map's spatial mean (so the two pieces of evidence depend on each other)."""
    maps = rng.standard_normal((n, 3, 4, 4)).astype(np.float32)
    maps[:, :, 1, 2] += shift  # a local defect
    pooled = [maps.mean(axis=(2, 3)).astype(np.float64) + 0.1 * rng.standard_normal((n, 3)),
              rng.standard_normal((n, 5))]
    return pooled, [[m] for m in maps]


def _fit(rng, n=40, **kw):
    pooled, maps = _draw(rng, n)
    return GaussianAD(**FUSED, **kw).fit_features(pooled).fit_map_features(maps), pooled, maps


def _brute_force_loo_peaks(model, maps):
    """Leave-one-image-out peaks from first principles: each location's distance to the nearest bank member of
    another image, divided by the bank's scale; the image's largest location."""
    bank = model.map_banks_[0]
    out = []
    for i, (m,) in enumerate(maps):
        v = m.reshape(m.shape[0], -1).T.astype(np.float64)
        members = bank.vectors[bank.ids != i].astype(np.float64)
        d = np.sqrt(((v[:, None, :] - members[None]) ** 2).sum(-1)).min(axis=1) / bank.scale
        out.append(d.max())
    return np.array(out)


def test_fit_learns_out_of_fold_calibrations_and_the_score_is_fusion_fused():
    rng = np.random.default_rng(0)
    model, pooled, maps = _fit(rng, fpr=0.1)
    assert model.setting("threshold") == "conformal" and model.state_.calibration_method == "cv"
    np.testing.assert_allclose(model.calibration_scores_,
                               GaussianAD(backbone=None, calibration="cv").fit_features(pooled).calibration_scores_)
    np.testing.assert_allclose(model.map_calibration_, _brute_force_loo_peaks(model, maps), rtol=1e-5)
    test_pooled, test_maps = _draw(rng, 30, shift=np.r_[np.zeros(15), np.full(15, 4.0)][:, None])
    levels = model.level_scores_features(test_pooled)
    peaks = model.state_.map_peaks_of(test_maps)
    cals = [model.calibration_scores_, model.map_calibration_]
    score, pvalue = fusion.fused(cals, [levels.mean(axis=1), peaks], "fisher")
    np.testing.assert_allclose(model.scores(levels, peaks), score)
    flagged, p = model.decide(levels, map_peaks=peaks)
    np.testing.assert_allclose(p, pvalue)
    np.testing.assert_array_equal(flagged, pvalue <= 0.1)
    assert flagged[15:].mean() > flagged[:15].mean()
    with pytest.raises(GaussadError, match="map peaks"):
        model.decide(levels)
    summary = model.summary()
    assert summary["image_score"] == "fused" and summary["threshold"]["pvalue_threshold"] == 0.1
    assert summary["calibration"]["fused"]["n_scores"] == [40, 40]
    assert summary["calibration"]["fused"]["min_fpr"] == pytest.approx(1 / 41)


@pytest.mark.parametrize("alpha", [0.05, 0.1])
def test_fused_decision_keeps_its_false_positive_rate(alpha):
    """Over many draws of a training set (40 images) and of fresh normal images, the fused decision of the fitted
    model flags at most alpha of them (the map peaks calibrated leave-one-image-out against a 10 % coreset)."""
    rng = np.random.default_rng(1)
    rates = []
    for _ in range(60):
        model, _, _ = _fit(rng, fpr=alpha)
        pooled, maps = _draw(rng, 100)
        flagged, _ = model.decide(model.level_scores_features(pooled), map_peaks=model.state_.map_peaks_of(maps))
        rates.append(flagged.mean())
    assert np.mean(rates) <= alpha + 0.01  # 6,000 decisions: Monte Carlo error about 0.003
    assert np.mean(rates) >= alpha / 4  # not trivially silent


def test_model_file_round_trip_and_checks(tmp_path):
    rng = np.random.default_rng(2)
    model, _, _ = _fit(rng, fpr=0.1)
    path = tmp_path / "m.gaussad"
    model.save(path)
    loaded = gaussad.load(path)
    assert loaded.image_score == "fused" and loaded.setting("threshold") == "conformal"
    np.testing.assert_array_equal(loaded.map_calibration_, model.map_calibration_)
    pooled, maps = _draw(rng, 10, shift=2.0)
    levels, peaks = loaded.level_scores_features(pooled), loaded.state_.map_peaks_of(maps)
    np.testing.assert_array_equal(loaded.scores(levels, peaks), model.scores(levels, peaks))
    assert loaded.summary() == model.summary()
    # a file whose metadata and arrays disagree on the map calibration is refused
    from gaussad.detector.persistence import read_model_file, save_model

    meta, arrays = read_model_file(path)
    save_model(tmp_path / "bad.gaussad", {**meta, "n_map_calibration": 3}, arrays)
    with pytest.raises(ModelFormatError, match="map calibration"):
        gaussad.load(tmp_path / "bad.gaussad")
    # ... and so is one whose two calibrations do not pair up, a global score and a map peak per training image
    short = {**arrays, "calibration.map_peaks": arrays["calibration.map_peaks"][:-1]}
    save_model(tmp_path / "unpaired.gaussad", {**meta, "n_map_calibration": meta["n_map_calibration"] - 1}, short)
    with pytest.raises(ModelFormatError, match="paired"):
        gaussad.load(tmp_path / "unpaired.gaussad")
    del arrays["calibration.map_peaks"]
    save_model(tmp_path / "none.gaussad", {k: v for k, v in meta.items() if k != "n_map_calibration"}, arrays)
    with pytest.raises(ModelFormatError, match="fused image score needs its calibration"):
        gaussad.load(tmp_path / "none.gaussad")


def test_old_model_files_load_with_the_global_score():
    from pathlib import Path

    from gaussad.detector.persistence import read_model_file

    for name in ("plain-0.1.0.gaussad", "image-0.1.0.gaussad"):
        path = Path(__file__).parent / "data" / name
        meta, _ = read_model_file(path)
        old = gaussad.load(path)
        assert "image_score" not in meta and old.image_score == "global" and old.state_.map_calibration is None
        assert old.setting("threshold") == meta["threshold"] and not old.rule().fused


@pytest.mark.parametrize("settings, needle", [
    ({"threshold": "chi2"}, "threshold='chi2' cannot apply"),
    ({"calibration": 0.2}, "calibration=0.2 cannot apply"),
    ({"map_method": "gaussian"}, "map_method='gaussian' cannot apply"),
])
def test_incompatible_settings_are_refused_at_fit_naming_both(settings, needle):
    rng = np.random.default_rng(3)
    pooled, _ = _draw(rng, 20)
    with pytest.raises(InvalidParameterError, match="image_score='fused'") as err:
        GaussianAD(**{**FUSED, **settings}).fit_features(pooled)
    assert needle in str(err.value)


def test_map_less_models_and_other_paths_are_refused_clearly(tiny_category):
    with pytest.raises(InvalidParameterError, match="map_levels is empty"):
        GaussianAD(**TINY, map_levels=[], map_method="nearest", image_score="fused").fit([])
    with pytest.raises(InvalidParameterError, match="unknown image_score"):
        GaussianAD(**{**FUSED, "image_score": "max"}).fit_features([np.zeros((3, 2))])
    rng = np.random.default_rng(4)
    model, pooled, _ = _fit(rng)
    with pytest.raises(GaussadError, match="calibrate\\(images\\)"):
        model.calibrate_features(pooled)
    no_maps = GaussianAD(**FUSED).fit_features(pooled)  # maps not fitted yet: no decision
    with pytest.raises(GaussadError, match="needs its calibration"):
        no_maps.decide(no_maps.level_scores_features(pooled), map_peaks=np.ones(40))


def test_fit_on_images_calibrates_in_one_pass_and_the_cli_scores_with_it(tiny_category, tmp_path, capsys):
    from gaussad.detector.resolve import features

    files = sorted((tiny_category / "train" / "good").iterdir())
    model = GaussianAD(**TINY_FUSED).fit(files)
    feats, fmaps = features(GaussianAD(**TINY_FUSED).feature_extractor(), files, "x", True)
    np.testing.assert_allclose(model.calibration_scores_,
                               GaussianAD(backbone=None, calibration="cv").fit_features(feats).calibration_scores_,
                               rtol=1e-9)
    np.testing.assert_allclose(model.map_calibration_, model.state_.map_peaks_of(fmaps, np.arange(len(files))),
                               rtol=1e-5)
    path = tmp_path / "fused.gaussad"
    args = ["--input-size", "64", "--levels", ",".join(TINY["levels"]), "--map-levels", "stage2,stage3",
            "--map-method", "nearest", "--image-score", "fused", "--threshold", "conformal", "--fpr", "0.2"]
    assert main(["fit", str(tiny_category / "train" / "good"), "-o", str(path), "--json", *args]) == 0
    fit_out = json.loads(capsys.readouterr().out)
    assert fit_out["image_score"] == "fused" and fit_out["calibration"]["fused"]["n_scores"] == [10, 10]
    test = sorted((tiny_category / "test" / "good").iterdir()) + sorted((tiny_category / "test" / "patch").iterdir())
    assert main(["score", str(path), *map(str, test), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["image_score"] == "fused" and out["score_threshold"] is None
    loaded = gaussad.load(path)
    levels, peaks, _ = loaded.score_images(test)
    score, pvalue = fusion.fused([loaded.calibration_scores_, loaded.map_calibration_], [levels.mean(axis=1), peaks],
                                 "fisher")
    rows = out["results"]
    np.testing.assert_allclose([r["score"] for r in rows], score, rtol=1e-9)
    np.testing.assert_allclose([r["pvalue"] for r in rows], pvalue, rtol=1e-9)
    assert [r["anomalous"] for r in rows] == list(pvalue <= 0.2)
    # each row names its evidence (issue 35): the conformal p-value of the global score and of the map peak, each
    # (1 + #{calibration >= value}) / (n + 1), and the combined one that decided
    n = loaded.calibration_scores_.size
    for r, s, m, p in zip(rows, levels.mean(axis=1), peaks, pvalue):
        why = r["evidence"]
        assert why["rule"] == "fused" and why["pvalue"] == pytest.approx(p, rel=1e-12)
        assert why["global"]["pvalue"] == pytest.approx((1 + np.sum(loaded.calibration_scores_ >= s)) / (n + 1))
        assert why["map_peak"]["pvalue"] == pytest.approx((1 + np.sum(loaded.map_calibration_ >= m)) / (n + 1))
        assert why["map_peak"]["value"] == pytest.approx(m, rel=1e-9) and "map peak" in why["text"]
    np.testing.assert_allclose(loaded.score_samples(test), score, rtol=1e-9)
    np.testing.assert_array_equal(loaded.predict(test), (pvalue <= 0.2).astype(int))
    assert main(["score", str(path), *map(str, test), "--threshold", "chi2"]) == 2
    assert "cannot apply" in capsys.readouterr().err
    assert main(["export", str(path), "-o", str(tmp_path / "m.onnx")]) == 0  # the map comes with a fused score
    assert "under fused at FPR 0.2" in capsys.readouterr().out


def test_service_rows_and_model_info_come_from_the_fused_rule(tiny_category):
    pytest.importorskip("fastapi")
    from gaussad.service.catalog import model_info
    from gaussad.service.uploads import Limits, score_uploads

    files = sorted((tiny_category / "train" / "good").iterdir())
    model = GaussianAD(**TINY_FUSED).fit(files)
    test = sorted((tiny_category / "test" / "good").iterdir())[:2] + sorted((tiny_category / "test" / "patch").iterdir())[:2]
    uploads = [(p.name, p.read_bytes()) for p in test]
    levels, peaks, _ = model.score_images(test)
    score, pvalue = fusion.fused([model.calibration_scores_, model.map_calibration_], [levels.mean(axis=1), peaks],
                                 "fisher")
    for with_maps in (False, True):
        rows = score_uploads(model, uploads, 0.3, Limits(), with_maps)
        np.testing.assert_allclose([r["score"] for r in rows], score, rtol=1e-9)
        np.testing.assert_allclose([r["pvalue"] for r in rows], pvalue, rtol=1e-9)
        assert [r["anomalous"] for r in rows] == list(pvalue <= 0.3)
    info = model_info("m", model, None)
    assert info["threshold"] == {"method": "conformal", "fpr": 0.2, "image_score": "fused", "pvalue_threshold": 0.2,
                                 "rule": "full-conformal Fisher combination of the global score and the map peak"}
    assert info["calibration"]["fused"]["n_scores"] == [10, 10]
    assert info["calibration"]["fused"]["min_fpr"] == pytest.approx(1 / 11)


def test_merge_joins_the_calibrations_and_partial_fit_asks_for_calibrate(tiny_category):
    """The default preset's fused score after merge: the two parts' calibrations joined, paired (each part's scores
    made against a model of fewer images: conservative against the merged one), so the merged model decides; after
    partial_fit the calibration is gone and a decision names what to do."""
    files = sorted((tiny_category / "train" / "good").iterdir())
    settings = {**TINY, "preset": "recommended", "map_levels": ["stage2", "stage3"]}
    a, b = GaussianAD(**settings).fit(files[:5]), GaussianAD(**settings).fit(files[5:])
    merged = a.merge(b)
    np.testing.assert_array_equal(merged.calibration_scores_, np.r_[a.calibration_scores_, b.calibration_scores_])
    np.testing.assert_array_equal(merged.map_calibration_, np.r_[a.map_calibration_, b.map_calibration_])
    test = sorted((tiny_category / "test").rglob("*.png"))
    levels, peaks, _ = merged.score_images(test)
    expected = fusion.fisher_pvalue([merged.calibration_scores_, merged.map_calibration_],
                                    [levels.mean(axis=1), peaks])
    np.testing.assert_allclose(merged.decide(levels, map_peaks=peaks)[1], expected, rtol=1e-12)
    assert merged.summary()["threshold"]["fpr"] == pytest.approx(1 / 11)  # 10 pairs cannot support 0.01
    grown = GaussianAD(**settings).fit(files[:5]).partial_fit(files[5:])
    with pytest.raises(GaussadError, match=r"needs its calibration .* call calibrate\(held-out normal images\)"):
        grown.predict(test)


@pytest.mark.parametrize("n", [30, 100, 300])
def test_the_default_decision_keeps_its_false_positive_rate_on_gaussian_draws(n):
    """Issue 30's acceptance: over 200 draws of n normal training images and 50 normal test images each, the default
    decision flags at most 1.2 alpha + 0.01 of the test images at alpha 0.05 and 0.01 where n supports alpha
    (1/(n + 1) <= alpha): the conformal decision on the global score (the default for plain features) and the fused
    one (the default for image models: the global score and the map peak, paired out-of-fold calibrations)."""
    from gaussad.detector.decision import DecisionRule

    plain = GaussianAD(backbone=None)
    assert plain.setting("image_score") == "global" and plain.setting("threshold") == "conformal"
    rng = np.random.default_rng(n)
    alphas = [a for a in (0.05, 0.01) if 1 / (n + 1) <= a]
    flagged = {(rule, a): [] for rule in ("global", "fused") for a in alphas}
    for _ in range(200):
        pooled, maps = _draw(rng, n)
        test_pooled, test_maps = _draw(rng, 50)
        # one fit for both rules: its global calibration is the plain default's (cross-conformal scores of the same
        # Gaussians), and the fused rule adds the map peaks
        fused = GaussianAD(**FUSED).fit_features(pooled).fit_map_features(maps)
        levels, peaks = fused.level_scores_features(test_pooled), fused.state_.map_peaks_of(test_maps)
        for a in alphas:
            flagged["global", a].append(DecisionRule("conformal", a).decide(fused.state_, levels)[0].mean())
            flagged["fused", a].append(fused.decide(levels, a, map_peaks=peaks)[0].mean())
    for (rule, a), rates in flagged.items():
        assert np.mean(rates) <= 1.2 * a + 0.01, (rule, a, np.mean(rates))
