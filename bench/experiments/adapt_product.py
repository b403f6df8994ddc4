"""Research for issue 33, session 13: the fine-grid map of ``bench.experiments.adapt_fine`` measured in the product's own pipeline.

``bench.experiments.adapt_fine`` works on square-resized inputs; the product (preset ``recommended``) keeps the aspect ratio
and decides the input size per set (``auto``: tile 224 px, bottle 384 px). This script runs ``gaussad evaluate
--protocol full`` as the product does (:func:`gaussad.tools.evaluate.evaluate_category`, the frozen baseline's figures
exactly as the acceptance measures them) and, from the same raw feature maps, a fine map for the chosen variant:
stage3, stage4 and stage5 of the product's maps through :func:`gaussad.core.maps.to_finest` (3 x 3 neighbourhoods;
the stage3 grid: 28 x 28 at 224 px square, other shapes for other aspect ratios), scored by

- ``fine-gauss``: one Ledoit-Wolf Gaussian over all training locations (Mahalanobis distance per cell), or
- ``fine-disc-s{sigma}``: ``bench.experiments.adapt_fine.FineDisc`` (SimpleNet's adaptor and discriminator, noise of std sigma),
  trained on all of train/good for ``--epochs`` epochs of ``--steps`` batches, the last epoch kept (no held-out
  validation: the epoch count is the one chosen on the split),

then upsampled to the product's map size (square, as ``anomaly_maps_of``) and combined with the product's coarse
map: each map standardised by the mean and standard deviation of its values on held-out good images (the seed's
validation part of train/good, 15 %, scored by models fitted on the other 85 %), averaged with weight ``--weight`` on
the coarse map. Figures: pixel AUROC over all test pixels, the map maximum's image AUROC, for the product's map, the
fine map and the combination; the product's image figures (global, fused) are unchanged when the combination only
replaces the map shown.

    PYTHONPATH=src:. OMP_NUM_THREADS=1 python -m bench.experiments.adapt_product --data ../shared/data/magnetic_tile \
        --variant fine-disc-s0.5 --epochs 12 --weight 0.25 [--seed 0] [--json F]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from bench.experiments import adapt as A
from bench.experiments import adapt_fine as F


def fine_maps_of(per_image: Sequence[Sequence[np.ndarray]], net: A.Network, names: Sequence[str]
                 ) -> list[np.ndarray]:
    """Per image (H3 * W3, 232) fine vectors and the grid shape, from the product's raw map levels."""
    from gaussad.core.maps import shape_groups, to_finest

    i3, i4, i5 = (list(names).index(n) for n in ("stage3", "stage4", "stage5"))
    out: list[Any] = [None] * len(per_image)
    for idx, fm in shape_groups(per_image):
        g = to_finest([fm[i3].astype(np.float32), fm[i4].astype(np.float32), fm[i5].astype(np.float32)], 3)[0]
        for j, k in enumerate(idx):
            out[k] = (np.ascontiguousarray(g[j].transpose(1, 2, 0).reshape(-1, g.shape[1])), g.shape[2:])
    return out


def upsample_all(cells: Sequence[np.ndarray], shapes: Sequence[tuple[int, int]], size: int) -> np.ndarray:
    from gaussad.core.maps import upsample

    return np.stack([upsample(c.reshape(s).astype(np.float32), (size, size)) for c, s in zip(cells, shapes)])


class Holder(A.Feats):
    pass


def save_extracted(path: Path, train: list, train_maps: list, test: list, test_maps: list) -> None:
    """The product's pooled features and raw maps (per image, per map level) in one npz (no pickle)."""
    arrays: dict[str, np.ndarray] = {}
    for part, pooled, fmaps in (("train", train, train_maps), ("test", test, test_maps)):
        arrays.update({f"{part}.pooled{i}": p for i, p in enumerate(pooled)})
        for k, image in enumerate(fmaps):
            arrays.update({f"{part}.map{k}.{j}": np.asarray(m, np.float32) for j, m in enumerate(image)})
    np.savez(path, **arrays)


def load_extracted(path: Path) -> tuple[list, list, list, list]:
    z = np.load(path)
    out = []
    for part in ("train", "test"):
        pooled = [z[f"{part}.pooled{i}"] for i in range(sum(1 for k in z.files if k.startswith(f"{part}.pooled")))]
        n = pooled[0].shape[0]
        levels = sum(1 for k in z.files if k.startswith(f"{part}.map0."))
        out += [pooled, [[z[f"{part}.map{k}.{j}"].astype(np.float32) for j in range(levels)] for k in range(n)]]
    return out[0], out[1], out[2], out[3]


def main(argv: Sequence[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", required=True, type=Path)
    ap.add_argument("--variant", default="fine-disc-s0.5")
    ap.add_argument("--epochs", type=int, default=8)
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--weight", type=float, default=0.25, help="weight of the product's coarse map")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", type=Path)
    ap.add_argument("--extract-only", action="store_true", help="cache the product's features and stop (no figures)")
    args = ap.parse_args(argv)
    import torch

    torch.set_num_threads(1)
    from gaussad.detector.model import GaussianAD
    from gaussad.intake.features import AUTO_SETTINGS, auto_settings
    from gaussad.detector import params as parameters
    from gaussad.tools.datasets import load_category
    from bench.common import extract
    from gaussad.tools.evaluate import evaluate_category, load_masks, roc_auc

    cat = load_category(args.data)
    row: dict[str, Any] = {"data": args.data.name, "variant": args.variant, "seed": args.seed, "epochs": args.epochs,
                           "steps": args.steps, "weight": args.weight}
    t0 = time.perf_counter()
    em = GaussianAD(verbose=False)
    given = {k: em.get_params()[k] for k in AUTO_SETTINGS}
    em.set_params(**given)
    em.set_params(**auto_settings(cat.train_files, parameters.resolved(em.get_params())))
    ex = em.feature_extractor()
    names = list(ex.map_level_names)
    path = Path("/tmp/adapt-cache") / f"product-{args.data.name}-{ex.input_size}.npz"
    if path.is_file():
        train, train_maps, test, test_maps = load_extracted(path)
    else:
        train, train_maps = extract(em, cat.train_files, "train", True)
        test, test_maps = extract(em, cat.test_files, "test", True)
        save_extracted(path, train, train_maps, test, test_maps)
    masks = load_masks(cat, ex.input_size)
    size = ex.input_size
    row["input_size"], row["map_levels"], row["extract_s"] = size, names, round(time.perf_counter() - t0, 1)
    print(f"extracted: input {size}, map levels {names}, {row['extract_s']} s", flush=True)
    if args.extract_only:
        return

    t0 = time.perf_counter()
    product = evaluate_category(cat, (train, test), {}, "full", feature_maps=(train_maps, test_maps, masks),
                                level_names=ex.level_names, map_size=size)
    row["product"] = {k: product.get(k) for k in ("image_auroc", "max_map_auroc", "fused_auroc", "pixel_auroc",
                                                  "hit_rate")}
    row["product_s"] = round(time.perf_counter() - t0, 1)
    print("product:", row["product"], flush=True)

    # the coarse map: all of train/good (test) and the 85 % without the validation goods (standardisation)
    t0 = time.perf_counter()
    n = len(train_maps)
    sp = A.split(n, args.seed)
    rest = np.setdiff1d(np.arange(n), sp.val)
    glob = {"image_score": "global", "threshold": "chi2", "calibration": None}
    coarse_all = GaussianAD(**{**em.get_params(), **glob}).fit_map_features(train_maps)
    coarse_rest = GaussianAD(**{**em.get_params(), **glob}).fit_map_features([train_maps[i] for i in rest])
    c_test = coarse_all.anomaly_map_features(test_maps, size)
    c_val = coarse_rest.anomaly_map_features([train_maps[i] for i in sp.val], size)
    row["coarse_s"] = round(time.perf_counter() - t0, 1)

    # the fine map
    t0 = time.perf_counter()
    net = A.Network(224, "native")  # only for the type; the features come from the product's maps
    tr = fine_maps_of(train_maps, net, names)
    te = fine_maps_of(test_maps, net, names)
    row["fine_features_s"] = round(time.perf_counter() - t0, 1)

    def scorer_on(idx: np.ndarray) -> Any:
        flat = np.concatenate([tr[i][0] for i in idx])
        if args.variant == "fine-gauss":
            from gaussad.core.gaussian import LevelGaussian, MomentStats

            s = F.FineGauss.__new__(F.FineGauss)
            s.gaussian = LevelGaussian.fit(MomentStats.from_array(flat.astype(np.float64)))
            return s
        sigma = float(args.variant[len("fine-disc-s"):])
        holder = Holder.__new__(Holder)
        holder.fine = flat[None]  # FineDisc reads fit.fine as (n, cells, dim); one pseudo-image of all cells
        return F.FineDisc(holder, None, None, args.seed, sigma, args.epochs, args.steps)

    t0 = time.perf_counter()
    s_all = scorer_on(np.arange(n))
    row["train_all_s"] = round(time.perf_counter() - t0, 1)
    t0 = time.perf_counter()
    s_rest = scorer_on(rest)
    row["train_rest_s"] = round(time.perf_counter() - t0, 1)
    f_test = upsample_all([s_all.cells(v) for v, _ in te], [s for _, s in te], size)
    f_val = upsample_all([s_rest.cells(tr[i][0]) for i in sp.val], [tr[i][1] for i in sp.val], size)
    cstat = (float(c_val.mean()), float(c_val.std()))
    fstat = (float(f_val.mean()), float(f_val.std()))
    combo = args.weight * (c_test - cstat[0]) / cstat[1] + (1 - args.weight) * (f_test - fstat[0]) / fstat[1]
    labels = cat.test_labels
    for name, m in (("coarse", c_test), ("fine", f_test), ("combo", combo)):
        row[name] = {"pixel": round(roc_auc(masks.ravel(), m.ravel()), 4),
                     "map_max": round(roc_auc(labels, m.reshape(len(m), -1).max(axis=1)), 4)}
    row["score_s"] = round(time.perf_counter() - t0, 1)
    A.emit(row, args.json)


if __name__ == "__main__":
    main()
