"""Do the heat maps show the defect, and leave good images alone? (issue 35). The default model
(``GaussianAD().fit(train/good)``) scores a category's test set with maps; each image's overlay is measured as
:mod:`gaussad.detector.heatmap` draws it, at the image's own size: the share of defective images with visible heat (blend
weight > 0) inside the ground-truth mask (per defect kind and overall), and the share of good images with no heat at
all. The colour's start level is the model's (the largest leave-one-image-out map peak of its training images); for
the record the same figures at two other start levels computed from the training peaks alone (their 99th
percentile) or from nothing (the fallback of models without peaks), and at the fixed range 1-4 of the overlay before
issue 35 (whose minimum blend of 0.15 tinted every pixel).

    python -m bench.experiments.heat_visibility --data ../shared/data/mvtec_ad/bottle [--examples docs/images]

``--examples DIR`` also writes the overlays of the first good, broken_small and contamination test images there,
downscaled to 300 px wide, 128 colours (the README's figures).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from PIL import Image

from gaussad import GaussianAD
from gaussad.tools.datasets import load_category
from gaussad.detector.heatmap import FALLBACK_LOW, FULL_AT, HeatScale, heat_level, heat_scale, heat_weight, render
from gaussad.intake.images import load_image
from gaussad.core.maps import upsample

EXAMPLES = ("good", "broken_small", "contamination")
EXAMPLE_WIDTH = 300


def visibility(amaps: np.ndarray, labels: np.ndarray, masks: list[np.ndarray | None], sizes: list[tuple[int, int]],
               weight_of) -> tuple[np.ndarray, np.ndarray]:
    """Per image: whether any overlay pixel inside the mask has weight > 0 (defective images), and whether the
    whole overlay has weight 0 (good images); ``weight_of(amap, size)`` gives an overlay's blend weights."""
    hit, clear = np.zeros(len(amaps), bool), np.zeros(len(amaps), bool)
    for i, (amap, size) in enumerate(zip(amaps, sizes)):
        weight = weight_of(amap, size)
        if labels[i]:
            hit[i] = bool((weight[masks[i]] > 0).any())
        else:
            clear[i] = not bool((weight > 0).any())
    return hit, clear


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.experiments.heat_visibility", description=__doc__)
    parser.add_argument("--data", required=True, help="one category in MVTec layout, with ground-truth masks")
    parser.add_argument("--examples", help="write three example overlays (PNG, 300 px wide) into this folder")
    args = parser.parse_args(argv)
    cat = load_category(args.data)
    if not cat.has_masks:
        parser.error(f"{args.data}: the defective test images need ground-truth masks")
    labels = np.asarray(cat.test_labels)
    model = GaussianAD().fit(cat.train_files)
    levels, peaks, amaps = model.score_images(cat.test_files, with_maps=True)
    scores = model.scores(levels, peaks)
    decisions = model.decide(levels, map_peaks=peaks)[0]
    sizes = [Image.open(f).size for f in cat.test_files]
    masks = [None if m is None else np.asarray(Image.open(m).convert("L")) > 127 for m in cat.mask_files]
    cal = model.map_calibration_
    chosen = heat_scale(cal)
    q99 = float(np.percentile(cal, 99))
    scales = {f"max of the training peaks (chosen): {chosen.low:.3f}": chosen,
              f"99th percentile of the training peaks: {q99:.3f}": HeatScale(q99, FULL_AT * q99, ""),
              f"fallback without peaks: {FALLBACK_LOW:g}": heat_scale(None)}
    weights = {name: (lambda amap, size, s=s: heat_weight(heat_level(amap, size, s))) for name, s in scales.items()}
    # Before issue 35: values 1..4 over the image at weight 0.5 * clip((m - 1) / 3, 0.15, 1): never 0.
    weights["before issue 35: fixed 1-4, minimum blend 0.15"] = lambda amap, size: 0.5 * np.clip(
        (upsample(amap, size) - 1.0) / 3.0, 0.15, 1.0)
    print(f"{cat.name}: {len(cat.train_files)} training images, {int((labels == 0).sum())} good and "
          f"{int(labels.sum())} defective test images; model input {model.input_size_} px; training map peaks "
          f"(leave one image out): median {np.median(cal):.3f}, 99th percentile {q99:.3f}, max {cal.max():.3f}")
    kinds = sorted({d for d, y in zip(cat.test_defects, labels) if y})
    print("start level | " + " | ".join(f"heat in mask: {k}" for k in kinds) + " | heat in mask: all defective | "
          "good without any tint")
    for name, weight_of in weights.items():
        hit, clear = visibility(amaps, labels, masks, sizes, weight_of)
        per_kind = [hit[[d == k and y == 1 for d, y in zip(cat.test_defects, labels)]] for k in kinds]
        cells = [f"{int(h.sum())}/{h.size}" for h in per_kind]
        print(f"{name} | " + " | ".join(cells) + f" | {hit[labels == 1].mean():.1%} | "
              f"{int(clear[labels == 0].sum())}/{int((labels == 0).sum())} = {clear[labels == 0].mean():.1%}")
    if args.examples:
        out = Path(args.examples)
        out.mkdir(parents=True, exist_ok=True)
        for kind in EXAMPLES:
            i = next(j for j, d in enumerate(cat.test_defects) if d == kind)
            image = render(load_image(cat.test_files[i]), amaps[i], chosen, float(scores[i]), bool(decisions[i]))
            image = image.resize((EXAMPLE_WIDTH, round(EXAMPLE_WIDTH * image.height / image.width)), Image.LANCZOS)
            path = out / f"{cat.name}_{kind}_{cat.test_files[i].stem}.png"
            image.quantize(128).save(path, optimize=True)  # a palette of 128 colours: a small file
            print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
