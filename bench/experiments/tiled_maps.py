"""Tiled anomaly maps (``map_tiles``, issue 14) on synthetic defects, before reading any test figure.

The shared synthetic split (:func:`bench.common.synthetic_split`): 80 % of train/good fit the model (the
recommended preset, plus ``map_tiles=k``) through ``fit`` itself; the other 20 % are scored as they are (good) and with
one small synthetic defect pasted in. Per k: image AUROC of the map maxima, pixel AUROC against the synthetic masks
(at S x S, as ``evaluate``), the localisation hit rate, the image AUROC of the global score (the same for every k: a
check), and the fit and scoring times (wall clock; on a shared machine they are a rough guide only).

    python -m bench.experiments.tiled_maps --data ../shared/data/mvtec_ad/bottle [--tiles 1 2 3] [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np

from gaussad import GaussianAD
from gaussad.tools.datasets import load_category
from gaussad.tools.evaluate import hit_rate, roc_auc

from bench.common import split_masks, synthetic_split


def measure(tiles: int, fit: list, scored: list, masks: np.ndarray, labels: np.ndarray) -> dict:
    """The figures of one ``map_tiles`` value: fit on ``fit``, maps and global scores of ``scored``."""
    model = GaussianAD(preset="recommended", map_tiles=tiles)
    t0 = time.perf_counter()
    model.fit(fit)
    t_fit = time.perf_counter() - t0
    t0 = time.perf_counter()
    levels, _, amaps = model.score_images(scored, with_maps=True)
    t_score = time.perf_counter() - t0
    return {"map_max_auroc": roc_auc(labels, amaps.reshape(len(amaps), -1).max(axis=1)),
            "pixel_auroc": roc_auc(masks.ravel(), amaps.ravel()), "hit_rate": hit_rate(amaps, masks, labels),
            "global_auroc": roc_auc(labels, levels.mean(axis=1)), "fit_s": t_fit,
            "score_s_per_image": t_score / len(scored)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", required=True)
    ap.add_argument("--tiles", type=int, nargs="+", default=[1, 2, 3])
    ap.add_argument("--json")
    args = ap.parse_args()
    cat = load_category(args.data)
    size = GaussianAD(preset="fast").feature_extractor().input_size
    fit, held, bad, bad_masks = synthetic_split(cat.train_files)
    masks = split_masks(len(held), bad_masks, size)
    labels = np.r_[np.zeros(len(held)), np.ones(len(bad))]
    print(f"{cat.name}: {len(fit)} fit, {len(held)} good + {len(bad)} synthetic", flush=True)
    report = {}
    for k in args.tiles:
        report[k] = measure(k, fit, held + bad, masks, labels)
        print(f"  map_tiles={k}: " + ", ".join(f"{name} {v:.3f}" for name, v in report[k].items()), flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)


if __name__ == "__main__":
    main()
