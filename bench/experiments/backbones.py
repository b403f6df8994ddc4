"""Compare backbones and their anomaly-map levels on synthetic defects, without any test image.

As :mod:`bench.experiments.map_variants`: 80 % of train/good fit the model; the other 20 % are scored as they are (good) and with
one synthetic small defect pasted in (masks known). Per backbone, recommended preset (native normalisation,
aspect-kept resize, nearest-neighbour maps on the stage7 grid with 3 x 3 averaging and 10 % coresets):

- ``global``: image AUROC of the paper's global score (a Gaussian per pooled level, all 9 levels);
- per map-level variant: pixel AUROC against the synthetic masks, image AUROC of the map maximum, hit rate.

The features of each image are extracted once per backbone; every map level's memory bank is built once, from all
the candidate levels put on the stage7 grid together, and a variant's map is the mean of its levels' maps, as the
product combines them. This equals fitting each variant on its own for variants whose coarsest level is stride 32
(all of :data:`VARIANTS`), except that each level's coreset is drawn once, not per variant.

    python -m bench.experiments.backbones --data ../shared/data/magnetic_tile [--backbones a,b] [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np

from bench.common import split_masks, synthetic_split
from gaussad import GaussianAD
from gaussad.tools.datasets import load_category
from gaussad.tools.evaluate import hit_rate, roc_auc
from gaussad.core.maps import combine, to_grid

LEVELS = ["stage2", "stage3", "stage4", "stage5", "stage6", "stage7", "head"]  # candidate map levels
VARIANTS = {  # name -> map levels (each includes a stride-32 level, so each is on the stage7 grid)
    "stage2-7": LEVELS[0:6],
    "stage3-7": LEVELS[1:6],
    "stage4-7": LEVELS[2:6],
    "stage5-7": LEVELS[3:6],
    "stage6-7": LEVELS[4:6],
    "stage2-head": LEVELS[0:7],
    "stage4-head": LEVELS[2:7],
}
BACKBONES = ("efficientnet-lite0", "efficientnet-lite1", "efficientnet-lite2", "mobilenet_v2")


def features(model: GaussianAD, images: list, desc: str) -> tuple[list[np.ndarray], list[list[np.ndarray]]]:
    """Pooled features (one (n, C) array per level) and, per image, its map levels already averaged 3 x 3 and put on
    the image's stage7 grid (one (C, h, w) array per level), so that only the small grids are kept."""
    pooled, gridded = [], []
    for _, batch, fm in model.iter_features(images, desc):
        pooled.append(batch)
        for image in zip(*fm):
            gridded.append([g[0] for g in to_grid([f[None].astype(np.float32) for f in image], 3)])
    return [np.concatenate(p) for p in zip(*pooled)], gridded


def run_backbone(backbone: str, fit: list, held: list, bad: list, masks: np.ndarray) -> dict:
    model = GaussianAD(backbone=backbone, preset="fast", pool="avg", map_levels=LEVELS, verbose=False)
    size = model.feature_extractor().input_size
    t0 = time.perf_counter()
    fit_pooled, fit_grids = features(model, fit, "fit")
    good_pooled, good_grids = features(model, held, "good")
    bad_pooled, bad_grids = features(model, bad, "synthetic")
    t_features = time.perf_counter() - t0
    labels = np.r_[np.zeros(len(held)), np.ones(len(bad))]
    scorer = GaussianAD(preset="fast", backbone=None).fit_features(fit_pooled)
    out = {"input_size": size, "features_s": t_features,
           "global": roc_auc(labels, np.r_[scorer.score_features(good_pooled), scorer.score_features(bad_pooled)])}
    t0 = time.perf_counter()
    maps = GaussianAD(preset="fast", backbone=None, map_pool=1).fit_map_features(fit_grids)
    out["banks_s"] = time.perf_counter() - t0
    per_image = [maps.state_.level_maps([g[None] for g in grids]) for grids in good_grids + bad_grids]
    for name, levels in VARIANTS.items():
        idx = [LEVELS.index(lv) for lv in levels]
        amaps = np.concatenate([combine([lm[i] for i in idx], size) for lm in per_image])
        out[name] = {"pixel": roc_auc(masks.ravel(), amaps.ravel()),
                     "max": roc_auc(labels, amaps.reshape(len(amaps), -1).max(axis=1)),
                     "hit": hit_rate(amaps, masks, labels)}
    print(f"{backbone}: global {out['global']:.3f}; " + "; ".join(
        f"{n} pixel {out[n]['pixel']:.3f} max {out[n]['max']:.3f} hit {out[n]['hit']:.3f}" for n in VARIANTS)
        + f" (features {t_features:.0f} s, banks {out['banks_s']:.0f} s)", flush=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", required=True)
    ap.add_argument("--backbones", default=",".join(BACKBONES))
    ap.add_argument("--json")
    args = ap.parse_args()
    cat = load_category(args.data)
    fit, held, bad, bad_masks = synthetic_split(cat.train_files)  # the split and the defects of bench.experiments.map_variants
    print(f"{cat.name}: {len(fit)} fit, {len(held)} good + {len(bad)} synthetic", flush=True)
    report = {}
    for backbone in args.backbones.split(","):
        size = GaussianAD(backbone=backbone, preset="fast").feature_extractor().input_size
        masks = split_masks(len(held), bad_masks, size)
        report[backbone] = run_backbone(backbone, fit, held, bad, masks)
        if args.json:
            with open(args.json, "w") as f:
                json.dump(report, f, indent=1)


if __name__ == "__main__":
    main()
