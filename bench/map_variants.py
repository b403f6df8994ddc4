"""Compare anomaly-map variants (grid, levels, coreset) on features extracted once per data set.

Two figures per variant, so that settings can be chosen without defective images:

- ``synth``: 80 % of train/good fit the maps, the other 20 % are scored as they are (good) and with a synthetic
  small defect pasted in (a patch of another training image, a scratch, or a colour spot, 2-6 % of the side);
  image AUROC of the map maximum, pixel AUROC against the synthetic masks and the localisation hit rate;
- ``test`` (``--test``): the real test set, full protocol (maps fitted on all of train/good): pixel AUROC, image
  AUROC of the map maximum, localisation hit rate, and the time per image of the map scoring.

    python -m bench.map_variants --data ../shared/data/magnetic_tile [--test]
"""

from __future__ import annotations

import argparse
import json
import time
from typing import Callable

import numpy as np
from PIL import Image

from gaussad import GaussianAD
from gaussad.tools.datasets import load_category
from gaussad.tools.evaluate import extract, hit_rate, load_masks, roc_auc

ALL_MAP_LEVELS = ["stage2", "stage3", "stage4", "stage5", "stage6", "stage7"]
VARIANTS = [  # (name, map levels, grid, coreset)
    ("coarsest stage2-7 (recommended today)", ALL_MAP_LEVELS, "coarsest", 0.1),
    ("finest stage4-5", ["stage4", "stage5"], "finest", 0.1),
    ("finest stage4-7", ["stage4", "stage5", "stage6", "stage7"], "finest", 0.1),
    ("finest stage3-5", ["stage3", "stage4", "stage5"], "finest", 0.03),
    ("finest stage3-7", ["stage3", "stage4", "stage5", "stage6", "stage7"], "finest", 0.03),
    ("finest stage4-7, 3 % coreset", ["stage4", "stage5", "stage6", "stage7"], "finest", 0.03),
]


def synthetic_defect(img: Image.Image, donor: Image.Image, rng: np.random.Generator) -> tuple[Image.Image, np.ndarray]:
    """A small defect (2-6 % of the shorter side): a patch of ``donor``, a scratch or a colour spot; (image, mask)."""
    a = np.asarray(img.convert("RGB")).copy()
    h, w = a.shape[:2]
    side = max(4, int(min(h, w) * rng.uniform(0.02, 0.06)))
    y, x = int(rng.integers(h // 8, h - h // 8 - side)), int(rng.integers(w // 8, w - w // 8 - side))
    mask = np.zeros((h, w), bool)
    kind = rng.integers(3)
    if kind == 0:
        d = np.asarray(donor.convert("RGB").resize((w, h)))
        dy, dx = int(rng.integers(0, h - side)), int(rng.integers(0, w - side))
        mask[y:y + side, x:x + side] = True
        a[y:y + side, x:x + side] = d[dy:dy + side, dx:dx + side]
    elif kind == 1:
        length = side * 4
        t = np.linspace(0, 1, length * 2)
        ang = rng.uniform(0, np.pi)
        ys = np.clip((y + t * length * np.sin(ang)).astype(int), 0, h - 1)
        xs = np.clip((x + t * length * np.cos(ang)).astype(int), 0, w - 1)
        thick = max(1, side // 6)
        for oy in range(-thick, thick + 1):
            mask[np.clip(ys + oy, 0, h - 1), xs] = True
        a[mask] = rng.integers(0, 256, 3)
    else:
        yy, xx = np.mgrid[:h, :w]
        mask = (yy - y) ** 2 + (xx - x) ** 2 <= (side / 2) ** 2
        a[mask] = (0.5 * a[mask] + 0.5 * rng.integers(0, 256, 3)).astype(np.uint8)
    return Image.fromarray(a), mask


def synthetic_split(train_files: list, seed: int = 0) -> tuple[list, list, list, list[np.ndarray]]:
    """(fit files, held-out good files, synthetic defective images, their full-size masks): a seeded fifth of the
    training images held out, and one :func:`synthetic_defect` pasted into a copy of each, the donor another training
    image. The split and the defects every synthetic bench shares (map variants, backbones, coreset, fused evidence)."""
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(train_files))
    n_held = len(order) // 5
    held, fit = [train_files[i] for i in order[:n_held]], [train_files[i] for i in order[n_held:]]
    bad, bad_masks = [], []
    for i, path in enumerate(held):
        with Image.open(path) as im, Image.open(fit[i % len(fit)]) as donor:
            img, m = synthetic_defect(im, donor, rng)
        bad.append(img)
        bad_masks.append(m)
    return fit, held, bad, bad_masks


def resized_masks(masks: list[np.ndarray], size: int) -> list[np.ndarray]:
    """Masks resized (nearest) to ``size`` x ``size``, as the maps are."""
    return [np.asarray(Image.fromarray(m).resize((size, size), Image.NEAREST)) for m in masks]


def split_masks(n_good: int, bad_masks: list[np.ndarray], size: int) -> np.ndarray:
    """(n_good + len(bad_masks), size, size) boolean masks of the scored images in the order the benches score them:
    the held-out goods (empty), then the synthetic defects' masks resized as the maps are."""
    return np.concatenate([np.zeros((n_good, size, size), bool), np.asarray(resized_masks(bad_masks, size), bool)])


def run_seeds(run: Callable[[str, int], dict]) -> None:
    """The command line of a bench that measures one synthetic split per seed (``run(data, seed)`` -> its report):
    ``--data DATA [--seeds S ...] [--json OUT]``, the reports of every seed written to OUT as one list."""
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", required=True)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--json")
    args = ap.parse_args()
    reports = [run(args.data, seed) for seed in args.seeds]
    if args.json:
        with open(args.json, "w") as f:
            json.dump(reports, f, indent=1)


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
