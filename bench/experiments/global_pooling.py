"""How each level's feature map is pooled into the global features: variants of the image score compared on
synthetic defects and held-out good images, before any test figure (``--test`` adds them afterwards).

The recommended preset's network (native normalisation, aspect-kept resize, EfficientNet-Lite0) runs once over
train/good, the test set and three copies of train/good with one synthetic defect each
(:func:`gaussad.tools.synthetic.add_defect`, the kinds cycling, seeds 0-1-2); every level's raw map is pooled by its
channels' average, standard deviation, maximum and generalised mean (p = 3). Per variant (which pooled vectors make
each level's global features), 5-fold cross-fitting over train/good: each fold's Gaussians (Ledoit-Wolf, the
product's ``fit_features``) score its held-out goods and their defective copies. Figures: image AUROC of held-out
goods against their defective copies per seed and the mean, and the share of held-out goods the chi2 rule flags at
alpha 0.01 / 0.05 / 0.1 (a label-free check of how well the Gaussian law fits). ``--test``: the same variant fitted on
all of train/good, image AUROC on the test set and the chi2 rule's realised FPR / TPR at alpha 0.05.

    python -m bench.experiments.global_pooling --data ../shared/data/magnetic_tile [--test] [--json OUT]
    python -m bench.experiments.global_pooling --data DATA --backbone mobilenet_v2 --quick    # the paper's pooling and the kept one

``--backbone`` takes another network of the nine-level layout (EfficientNet-Lite, MobileNetV2); "the map levels" are
then its registry entry's (MobileNetV2: stage3-stage7).
"""

from __future__ import annotations

import argparse
import json
from typing import Callable

import numpy as np
from PIL import Image
from sklearn.model_selection import KFold

from gaussad import GaussianAD
from gaussad.intake.backbones import get_spec
from gaussad.tools.datasets import load_category
from gaussad.tools.evaluate import roc_auc
from gaussad.tools.synthetic import PASTED_DEFECTS, add_defect

LEVELS = ("stem", "stage1", "stage2", "stage3", "stage4", "stage5", "stage6", "stage7", "head")
MAP_LEVELS = list(range(2, 8))  # stage2-stage7: the recommended preset's map levels for EfficientNet (--backbone)
SEEDS = (0, 1, 2)
ALPHAS = (0.01, 0.05, 0.1)
Pooled = dict  # statistic name -> list over levels of (n, C) arrays


def _defective(files: list, seed: int) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    out = []
    for i, path in enumerate(files):
        with Image.open(path) as im, Image.open(files[(i + 7 + seed) % len(files)]) as donor:
            image, _ = add_defect(np.asarray(im.convert("RGB")), np.asarray(donor.convert("RGB")), rng,
                                  PASTED_DEFECTS[(i + seed) % len(PASTED_DEFECTS)])
        out.append(Image.fromarray(image))
    return out


def pooled_statistics(model: GaussianAD, images: list) -> Pooled:
    """Per level, each channel's average, standard deviation, maximum and generalised mean (p = 3) over its map."""
    stats: dict[str, list[list[np.ndarray]]] = {k: [[] for _ in LEVELS] for k in ("avg", "std", "max", "gem3")}
    for _, _, fmaps in model.iter_features(images, "pool", maps=True):
        for level, batch in enumerate(fmaps):
            flat = batch.reshape(*batch.shape[:2], -1).astype(np.float64)
            stats["avg"][level].append(flat.mean(axis=2))
            stats["std"][level].append(flat.std(axis=2))
            stats["max"][level].append(flat.max(axis=2))
            stats["gem3"][level].append(np.cbrt((np.clip(flat, 0, None) ** 3).mean(axis=2)))
    return {k: [np.concatenate(v) for v in levels] for k, levels in stats.items()}


def _spread(transform: Callable[[np.ndarray], np.ndarray], levels=MAP_LEVELS) -> Callable[[Pooled], list]:
    """Every level's average, and ``transform`` of the standard deviation after it at ``levels``."""
    return lambda p: [np.hstack([p["avg"][l], transform(p["std"][l])]) if l in levels else p["avg"][l]
                      for l in range(len(LEVELS))]


def _stack(keys: tuple[str, ...], levels=range(len(LEVELS))) -> Callable[[Pooled], list]:
    return lambda p: [np.hstack([p[k][l] for k in keys]) for l in levels]


VARIANTS: dict[str, Callable[[Pooled], list]] = {
    "avg, 9 levels (the paper's pooling)": _stack(("avg",)),
    "avg + std at the map levels": _spread(lambda s: s),
    "avg + sqrt(std) at the map levels (pool='avg+std')": _spread(np.sqrt),
    "avg + log(std) at the map levels": None,  # filled in main: its floor depends on the data
    "avg + max at the map levels": lambda p: [np.hstack([p["avg"][l], p["max"][l]]) if l in MAP_LEVELS
                                              else p["avg"][l] for l in range(len(LEVELS))],
    "avg|std, 9 levels": _stack(("avg", "std")),
    "avg|max, 9 levels": _stack(("avg", "max")),
    "avg|std|max, 9 levels": _stack(("avg", "std", "max")),
    "gem3, 9 levels": _stack(("gem3",)),
    "std, 9 levels": _stack(("std",)),
    "avg, stage2-7": _stack(("avg",), MAP_LEVELS),
    "std, stage2-7": _stack(("std",), MAP_LEVELS),
    "avg|std, stage2-7": _stack(("avg", "std"), MAP_LEVELS),
    "avg|std, stage3-7": _stack(("avg", "std"), range(3, 8)),
    "avg|std, stage2-head": _stack(("avg", "std"), range(2, 9)),
    "avg|std stage2-7 + head avg": lambda p: _stack(("avg", "std"), MAP_LEVELS)(p) + [p["avg"][8]],
}


def _fit(features: list[np.ndarray]) -> GaussianAD:
    return GaussianAD(preset="fast", verbose=False).fit_features(features)


def measure(train: list, defective: list[list], test: list | None, labels: np.ndarray) -> dict:
    n = len(train[0])
    folds = list(KFold(5, shuffle=True, random_state=1).split(np.arange(n)))
    aurocs, flagged = [], {a: [] for a in ALPHAS}
    for s, bad in enumerate(defective):
        good_scores, bad_scores = [], []
        for keep, held in folds:
            model = _fit([t[keep] for t in train])
            levels = model.level_scores_features([t[held] for t in train])
            good_scores.append(levels.mean(axis=1))
            bad_scores.append(model.score_features([b[held] for b in bad]))
            if s == 0:
                for a in ALPHAS:
                    flagged[a].append(model.decide(levels, a, "chi2")[0])
        g, b = np.concatenate(good_scores), np.concatenate(bad_scores)
        aurocs.append(roc_auc(np.r_[np.zeros(len(g)), np.ones(len(b))], np.r_[g, b]))
    out = {"synthetic_auroc": aurocs, "synthetic_mean": float(np.mean(aurocs)),
           "chi2_flagged_heldout_goods": {str(a): float(np.concatenate(f).mean()) for a, f in flagged.items()}}
    if test is not None:
        model = _fit(train)
        levels = model.level_scores_features(test)
        flags = model.decide(levels, 0.05, "chi2")[0].astype(bool)
        out.update(test_auroc=roc_auc(labels, levels.mean(axis=1)),
                   test_chi2_fpr=float(flags[labels == 0].mean()), test_chi2_tpr=float(flags[labels == 1].mean()))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", required=True, help="a category folder in MVTec layout")
    ap.add_argument("--test", action="store_true", help="also the test figures (read them after choosing)")
    ap.add_argument("--json", help="write the figures here")
    ap.add_argument("--backbone", default="efficientnet-lite0", help="a nine-level network (default: %(default)s)")
    ap.add_argument("--quick", action="store_true", help="only the paper's pooling and pool='avg+std'")
    args = ap.parse_args()
    spec = get_spec(args.backbone)
    if tuple(spec.level_names) != LEVELS:
        ap.error(f"{args.backbone} does not have the nine levels {', '.join(LEVELS)}")
    MAP_LEVELS[:] = [spec.level_names.index(name) for name in spec.map_levels]
    cat = load_category(args.data)
    model = GaussianAD(preset="fast", backbone=args.backbone, pool="avg", map_levels=LEVELS, verbose=True)
    train_files = list(cat.train_files)
    train = pooled_statistics(model, train_files)
    defective = [pooled_statistics(model, _defective(train_files, s)) for s in SEEDS]
    test = pooled_statistics(model, list(cat.test_files)) if args.test else None
    floor = [1e-3 * float(np.median(s)) + 1e-12 for s in train["std"]]
    VARIANTS["avg + log(std) at the map levels"] = lambda p: [
        np.hstack([p["avg"][l], np.log(p["std"][l] + floor[l])]) if l in MAP_LEVELS else p["avg"][l]
        for l in range(len(LEVELS))]
    report = {}
    chosen = list(VARIANTS)[0:3:2] if args.quick else list(VARIANTS)
    for name, variant in ((n, VARIANTS[n]) for n in chosen):
        r = measure(variant(train), [variant(d) for d in defective], None if test is None else variant(test),
                    cat.test_labels)
        report[name] = r
        line = (f"{name:52s} synthetic {' '.join(f'{a:.4f}' for a in r['synthetic_auroc'])} mean "
                f"{r['synthetic_mean']:.4f}  chi2 flags held-out goods "
                + " / ".join(f"{v:.3f}" for v in r["chi2_flagged_heldout_goods"].values()))
        if test is not None:
            line += f"  test {r['test_auroc']:.4f}, chi2 at 0.05 {r['test_chi2_fpr']:.3f} / {r['test_chi2_tpr']:.3f}"
        print(line, flush=True)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(report, fh, indent=1)


if __name__ == "__main__":
    main()
