"""Choose the fused score's map evidence (the peak or a top-k mean of the map's cells) and its ranking combination
(Bonferroni or Fisher) on synthetic defects, before reading any test figure.

80 % of train/good fit the model (Gaussians and memory banks, as ``--preset fast``); the other 20 % are scored as they
are (good) and with one small synthetic defect pasted in (:func:`bench.common.synthetic_defect`). Calibration,
as the fused score's: cross-conformal out-of-fold global scores (5 folds) and leave-one-image-out map evidence of the
fit images. Per evidence variant: image AUROC of the evidence alone, of the fused score with Bonferroni and Fisher
ranking, and the realised FPR / TPR of two fused decisions: the Bonferroni minimum of exact conformal p-values
(``rates``, the product's rule before the ninth session) and the full-conformal Fisher p-value
(``fisher_conformal_rates``, :func:`gaussad.core.fusion.fisher_pvalue`, the product's rule since).

Also the global score's own conformal decision (threshold at the cross-conformal quantile) for comparison. Each
``--seeds`` value draws another split and other defects.

    python -m bench.experiments.fused_evidence --data ../shared/data/magnetic_tile [--seeds 0 1 2] [--json OUT]
"""

from __future__ import annotations

import numpy as np

from gaussad import GaussianAD
from gaussad.core import fusion, maps
from gaussad.tools.datasets import load_category
from gaussad.tools.evaluate import roc_auc
from gaussad.detector.state import prepare_maps
from gaussad.core.threshold import conformal_pvalue

from bench.common import extract, run_seeds, synthetic_split

TOP_K = (1, 3, 5, 10)  # cells averaged: 1 = the peak
ALPHAS = (0.01, 0.05, 0.1)


def grids(state, per_image: list, image_ids: np.ndarray | None = None) -> list[np.ndarray]:
    """Per image the banks' mean map on the common grid, flattened (leave-one-image-out with ``image_ids``)."""
    out: list = [None] * len(per_image)
    for idx, fm in maps.shape_groups(per_image):
        f = prepare_maps([x.astype(np.float32) for x in fm], state.map_method, state.map_pool, state.map_grid)
        b, _, h, w = f[0].shape
        ids = None if image_ids is None else np.repeat(np.asarray(image_ids)[idx], h * w)
        g = np.mean([bank.distances(maps.patch_vectors(x, np.float32), ids) for bank, x in zip(state.map_banks, f)],
                    axis=0).reshape(b, h * w)
        for j, i in enumerate(idx):
            out[i] = g[j]
    return out


def top_mean(grid: list[np.ndarray], k: int) -> np.ndarray:
    return np.array([np.sort(g)[-k:].mean() for g in grid])


def main() -> None:
    run_seeds(run)


def run(data: str, seed: int) -> dict:
    cat = load_category(data)
    model = GaussianAD(preset="fast")
    fit, held, bad, _ = synthetic_split(cat.train_files, seed)
    fit_feats, fit_maps = extract(model, fit, "fit", True)
    good_feats, good_maps = extract(model, held, "held-out good", True)
    bad_feats, bad_maps = extract(model, bad, "synthetic", True)
    names = model.feature_extractor().level_names
    cv = GaussianAD(preset="fast", calibration="cv").fit_features(fit_feats, names)
    cv.fit_map_features(fit_maps)
    state = cv.state_
    labels = np.r_[np.zeros(len(held)), np.ones(len(bad))]
    glob = np.r_[cv.score_features(good_feats), cv.score_features(bad_feats)]
    cal_grids = grids(state, fit_maps, np.arange(len(fit_maps)))
    test_grids = grids(state, good_maps + bad_maps)
    gp = conformal_pvalue(glob, cv.calibration_scores_)
    report = {"seed": seed, "n_fit": len(fit), "n_good": len(held), "n_synthetic": len(bad),
              "global_auroc": roc_auc(labels, glob), "variants": {},
              "global_rates": {str(a): {"fpr": float((gp[labels == 0] <= a).mean()),
                                        "tpr": float((gp[labels == 1] <= a).mean())} for a in ALPHAS}}
    print(f"{cat.name} seed {seed}: {len(fit)} fit, {len(held)} good + {len(bad)} synthetic; global AUROC "
          f"{report['global_auroc']:.4f}; global conformal " + "  ".join(
              f"a={a}: {r['fpr']:.3f}/{r['tpr']:.3f}" for a, r in report["global_rates"].items()), flush=True)
    for k in TOP_K:
        cal, ev = top_mean(cal_grids, k), top_mean(test_grids, k)
        cals, evidence = [cv.calibration_scores_, cal], [glob, ev]
        bonf = fusion.ranking_score(cals, evidence, "bonferroni")
        fisher = fusion.ranking_score(cals, evidence, "fisher")
        pvalue = fusion.combine([conformal_pvalue(e, c) for c, e in zip(cals, evidence)], "bonferroni")
        fc = fusion.fisher_pvalue(cals, evidence)
        row = {"map_auroc": roc_auc(labels, ev), "fused_bonferroni_auroc": roc_auc(labels, bonf),
               "fused_fisher_auroc": roc_auc(labels, fisher),
               "rates": {str(a): {"fpr": float((pvalue[labels == 0] <= a).mean()),
                                  "tpr": float((pvalue[labels == 1] <= a).mean())} for a in ALPHAS},
               "fisher_conformal_rates": {str(a): {"fpr": float((fc[labels == 0] <= a).mean()),
                                                   "tpr": float((fc[labels == 1] <= a).mean())} for a in ALPHAS}}
        report["variants"][f"top{k}"] = row
        print(f"  top-{k}: map {row['map_auroc']:.4f}  fused bonferroni {row['fused_bonferroni_auroc']:.4f}  "
              f"fisher {row['fused_fisher_auroc']:.4f}  " + "  ".join(
                  f"a={a}: {r['fpr']:.3f}/{r['tpr']:.3f}" for a, r in row["rates"].items())
              + "  fisher-conformal " + "  ".join(f"a={a}: {r['fpr']:.3f}/{r['tpr']:.3f}"
                                                  for a, r in row["fisher_conformal_rates"].items()), flush=True)
    return report


if __name__ == "__main__":
    main()
