"""The threshold figures of the evaluation harness, on synthetic features (no backbone)."""

from pathlib import Path

import numpy as np
import pytest

from gaussad import GaussianAD
from gaussad.tools.datasets import Category, kfold_indices
from gaussad.tools.evaluate import evaluate_category, format_markdown, format_table


def _synthetic(seed: int = 0):
    rng = np.random.default_rng(seed)
    train = [rng.normal(size=(60, 4)), rng.normal(size=(60, 3))]
    good = [rng.normal(size=(30, 4)), rng.normal(size=(30, 3))]
    bad = [rng.normal(size=(20, 4)) + 2.5, rng.normal(size=(20, 3))]
    test = [np.concatenate([g, b]) for g, b in zip(good, bad)]
    labels = np.r_[np.zeros(30, int), np.ones(20, int)]
    cat = Category("synthetic", Path("."), [Path(f"{i}.png") for i in range(60)], [Path(f"t{i}.png") for i in range(50)],
                   labels, ["good"] * 30 + ["bump"] * 20)
    return cat, train, test, labels


def test_paper_protocol_calibrates_on_each_held_out_fold():
    cat, train, test, labels = _synthetic()
    result = evaluate_category(cat, (train, test), {"backbone": None}, "paper")
    conformal, chi2, hotelling = (result["thresholds"][m] for m in ("conformal", "chi2", "hotelling"))
    assert result["n_calibration_folds"] == [12] * 5
    for i, (keep, held) in enumerate(kfold_indices(60, 5, 0)):
        model = GaussianAD(backbone=None).fit_features([f[keep] for f in train])
        cal = np.sort(model.score_features([f[held] for f in train]))
        scores = model.score_features(test)
        for alpha in ("0.05", "0.1"):
            # 13 * 0.95 = 12.35 -> rank 13 > 12: 12 scores cannot support 0.05, the rule decides at 1/13 (the largest)
            k = min(int(np.ceil(13 * (1 - float(alpha)) - 1e-9)), 12)
            t = cal[k - 1]
            assert conformal[alpha]["fpr_folds"][i] == pytest.approx(np.mean(scores[labels == 0] > t))
            assert conformal[alpha]["tpr_folds"][i] == pytest.approx(np.mean(scores[labels == 1] > t))
        assert conformal["0.05"]["target_folds"][i] == pytest.approx(1 / 13)
        assert conformal["0.1"]["target_folds"][i] == 0.1
        level = model.level_scores_features(test)
        from scipy.stats import chi2 as chi2_law, f

        t_chi = np.sqrt(chi2_law.ppf(1 - 0.01 / 2, [4, 3]))
        assert chi2["0.01"]["fpr_folds"][i] == pytest.approx(np.mean((level[labels == 0] > t_chi).any(axis=1)))
        n = keep.size
        t_hot = np.sqrt([f.ppf(1 - 0.1 / 2, k, n - k) * k * (n + 1) / (n - k) for k in (4, 3)])
        assert hotelling["0.1"]["tpr_folds"][i] == pytest.approx(np.mean((level[labels == 1] > t_hot).any(axis=1)))
    for method in result["thresholds"].values():
        for cell in method.values():
            assert cell["fpr"] == pytest.approx(np.mean(cell["fpr_folds"]))
    report = {"protocol": "paper", "preset": None, "backbone": None, "input_size": None, "levels": ["a", "b"], "estimator": "ledoit-wolf",
              "reduction": None, "normalize": "imagenet", "categories": {"synthetic": result}, "n_categories": 1,
              "mean_image_auroc": result["image_auroc"], "sem": 0.0}
    assert ("synthetic conformal: decided at the smallest rate its calibration supports, 1/(n + 1), at alpha=0.01 in 5 "
            "of 5 folds (at 0.0769); alpha=0.05 in 5 of 5 folds (at 0.0769)" in format_table(report))
    assert "| synthetic | hotelling | 0.1 |" in format_markdown(report) and "(at 0.0769)" in format_markdown(report)


def test_full_protocol_holds_out_a_fifth_and_refits_on_all():
    cat, train, test, labels = _synthetic(1)
    result = evaluate_category(cat, (train, test), {"backbone": None}, "full")
    assert result["n_calibration_folds"] == [12]
    full = GaussianAD(backbone=None).fit_features(train)
    from sklearn.metrics import roc_auc_score

    expected = roc_auc_score(labels, full.score_features(test))
    assert 0.6 < expected < 1.0  # neither trivial nor perfect, so a wrong AUROC would show
    assert result["image_auroc"] == pytest.approx(expected, rel=1e-12)
    assert len(result["thresholds"]["conformal"]["0.1"]["fpr_folds"]) == 1


def test_a_full_protocol_report_of_one_category_reads_as_one_fit():
    """Issue 35: one fit and one category: no 'mean over folds' and no '+/- 0.0000' in the tables."""
    cat, train, test, labels = _synthetic()
    result = evaluate_category(cat, (train, test), {"backbone": None}, "full")
    report = {"protocol": "full", "preset": None, "backbone": None, "input_size": None, "levels": ["a", "b"],
              "estimator": "ledoit-wolf", "reduction": None, "normalize": "imagenet",
              "categories": {"synthetic": result}, "n_categories": 1, "mean_image_auroc": result["image_auroc"],
              "sem": 0.0}
    table, markdown = format_table(report), format_markdown(report)
    assert "(one fit on all of train/good)" in table and "mean over folds" not in table
    assert "+/-" not in table and "SEM" not in table and "+/-" not in markdown
