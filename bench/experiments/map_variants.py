"""Compare anomaly-map variants (grid, levels, coreset) on features extracted once per data set.

Two figures per variant, so that settings can be chosen without defective images:

- ``synth``: 80 % of train/good fit the maps, the other 20 % are scored as they are (good) and with a synthetic
  small defect pasted in (a patch of another training image, a scratch, or a colour spot, 2-6 % of the side);
  image AUROC of the map maximum, pixel AUROC against the synthetic masks and the localisation hit rate;
- ``test`` (``--test``): the real test set, full protocol (maps fitted on all of train/good): pixel AUROC, image
  AUROC of the map maximum, localisation hit rate, and the time per image of the map scoring.

    python -m bench.experiments.map_variants --data ../shared/data/magnetic_tile [--test]
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np

from gaussad import GaussianAD
from gaussad.tools.datasets import load_category
from gaussad.tools.evaluate import hit_rate, load_masks, roc_auc

from bench.common import extract, split_masks, synthetic_split

ALL_MAP_LEVELS = ["stage2", "stage3", "stage4", "stage5", "stage6", "stage7"]
VARIANTS = [  # (name, map levels, grid, coreset)
    ("coarsest stage2-7 (recommended today)", ALL_MAP_LEVELS, "coarsest", 0.1),
    ("finest stage4-5", ["stage4", "stage5"], "finest", 0.1),
    ("finest stage4-7", ["stage4", "stage5", "stage6", "stage7"], "finest", 0.1),
    ("finest stage3-5", ["stage3", "stage4", "stage5"], "finest", 0.03),
    ("finest stage3-7", ["stage3", "stage4", "stage5", "stage6", "stage7"], "finest", 0.03),
    ("finest stage4-7, 3 % coreset", ["stage4", "stage5", "stage6", "stage7"], "finest", 0.03),
]


def score_variants(fit_maps, good_maps, bad_maps, masks, labels, size):
    out = {}
    per_image = good_maps + bad_maps
    for name, levels, grid, coreset in VARIANTS:
        idx = [ALL_MAP_LEVELS.index(lv) for lv in levels]
        model = GaussianAD(preset="fast", map_levels=levels, map_grid=grid, map_coreset=coreset)
        t0 = time.perf_counter()
        model.fit_map_features([[m[i] for i in idx] for m in fit_maps])
        t_fit = time.perf_counter() - t0
        t0 = time.perf_counter()
        amaps = model.anomaly_map_features([[m[i] for i in idx] for m in per_image], size)
        t_map = (time.perf_counter() - t0) / len(per_image) * 1000
        out[name] = {"pixel": roc_auc(masks.ravel(), amaps.ravel()),
                     "max": roc_auc(labels, amaps.reshape(len(amaps), -1).max(axis=1)),
                     "hit": hit_rate(amaps, masks, labels), "fit_s": t_fit, "ms_per_image": t_map}
        print(f"  {name}: " + ", ".join(f"{k} {v:.3f}" for k, v in out[name].items()), flush=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", required=True)
    ap.add_argument("--test", action="store_true")
    ap.add_argument("--json")
    args = ap.parse_args()
    cat = load_category(args.data)
    model = GaussianAD(preset="fast", map_levels=ALL_MAP_LEVELS)
    size = model.feature_extractor().input_size
    fit, held, bad, bad_masks = synthetic_split(cat.train_files)
    _, fit_maps = extract(model, fit, "fit", True)
    _, good_maps = extract(model, held, "held-out good", True)
    _, bad_maps = extract(model, bad, "synthetic", True)
    masks = split_masks(len(held), bad_masks, size)
    labels = np.r_[np.zeros(len(held)), np.ones(len(bad))]
    print(f"synthetic ({cat.name}: {len(fit)} fit, {len(held)} good + {len(bad)} synthetic)", flush=True)
    report = {"synth": score_variants(fit_maps, good_maps, bad_maps, masks, labels, size)}
    if args.test:
        del good_maps, bad_maps
        _, held_maps = extract(model, held, "held-out", True)
        _, test_maps = extract(model, cat.test_files, "test", True)
        tmasks = load_masks(cat, size)
        print(f"test ({cat.name}, full protocol)", flush=True)
        report["test"] = score_variants(fit_maps + held_maps, test_maps, [], tmasks, cat.test_labels, size)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)


if __name__ == "__main__":
    main()
