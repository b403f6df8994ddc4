"""Gaussian smoothing of the anomaly map, and each map level's own map, on synthetic defects (no test image).

PatchCore and anomalib blur the upsampled anomaly map with a Gaussian (sigma 4 px at the input size) before
reading pixel figures. Here: the shared synthetic split (:func:`bench.common.synthetic_split`; 80 % of
train/good fit the banks of ``--preset fast``, the other 20 % are scored as they are and with one small pasted
defect), the product's map (levels averaged on their common grid, upsampled to S x S) smoothed with sigma 0 (the
product) / 1 / 2 / 4 / 8 px, and, as a diagnostic, every map level's map alone. Figures: pixel AUROC against the
synthetic masks, image AUROC of the map maxima, localisation hit rate.

    python -m bench.experiments.map_smoothing --data ../shared/data/magnetic_tile [--seeds 0 1] [--json OUT]
"""

from __future__ import annotations


import numpy as np
from scipy.ndimage import gaussian_filter

from gaussad import GaussianAD
from gaussad.core import maps
from gaussad.tools.datasets import load_category
from gaussad.tools.evaluate import hit_rate, roc_auc

from bench.common import extract, run_seeds, split_masks, synthetic_split

SIGMAS = (0, 1, 2, 4, 8)


def figures(amaps: np.ndarray, masks: np.ndarray, labels: np.ndarray) -> dict:
    return {"pixel_auroc": roc_auc(masks.ravel(), amaps.ravel()),
            "map_max_auroc": roc_auc(labels, amaps.reshape(len(amaps), -1).max(axis=1)),
            "hit_rate": hit_rate(amaps, masks, labels)}


def run(data: str, seed: int) -> dict:
    cat = load_category(data)
    model = GaussianAD(preset="fast")
    extractor = model.feature_extractor()
    size = extractor.input_size
    fit, held, bad, bad_masks = synthetic_split(cat.train_files, seed)
    _, fit_maps = extract(model, fit, "fit", True)
    _, good_maps = extract(model, held, "held-out good", True)
    _, bad_maps = extract(model, bad, "synthetic", True)
    state = GaussianAD(preset="fast").fit_map_features(fit_maps).state_
    per_image = good_maps + bad_maps
    levels: list = [None] * len(per_image)  # per image, the (L, h, w) level maps on the common grid
    for idx, fm in maps.shape_groups(per_image):
        batch = state.level_maps([f.astype(np.float32) for f in fm])
        for j, i in enumerate(idx):
            levels[i] = [level[j] for level in batch]
    masks = split_masks(len(held), bad_masks, size)
    labels = np.r_[np.zeros(len(held)), np.ones(len(bad))]
    product = np.stack([maps.combine([m[None] for m in image], size)[0] for image in levels])
    report = {"data": cat.name, "seed": seed, "smoothing": {}, "levels": {}}
    for sigma in SIGMAS:
        amaps = product if sigma == 0 else np.stack([gaussian_filter(m, sigma) for m in product])
        report["smoothing"][sigma] = figures(amaps, masks, labels)
    for li, name in enumerate(extractor.map_level_names):
        amaps = np.stack([maps.combine([image[li][None]], size)[0] for image in levels])
        report["levels"][name] = figures(amaps, masks, labels)
    for part in ("smoothing", "levels"):
        for key, row in report[part].items():
            label = f"sigma {key}" if part == "smoothing" else f"{key} alone"
            print(f"{cat.name} seed {seed} {label}: " + ", ".join(
                f"{k} {'-' if v is None else f'{v:.4f}'}" for k, v in row.items()), flush=True)
    return report


def main() -> None:
    run_seeds(run)


if __name__ == "__main__":
    main()
