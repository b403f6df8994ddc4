"""Research for issue 33, session 14: does matching each image's brightness (and contrast) to the training images'
before the network help, as a preprocessing step beside adapting the features?

Magnetic tile's goods vary in brightness from photo to photo (train/good: per-image mean grey level 62-163 between
the 5th and 95th percentiles); a Gaussian on features that carry that variation spends its spread on
lighting. Three transforms of every image
(fit, held-out and defective alike), on the luminance (ITU-R 601 grey of the RGB image):

- ``none``: the image as it is (the product today);
- ``gain``: every channel multiplied by ``M / mean(grey)``, ``M`` the median over the fit images of their mean grey
  (brightness matched, contrast kept relative to brightness);
- ``std``: ``(x - mean(grey)) / std(grey) * S + M`` (brightness and contrast matched; ``S`` the fit images' median
  grey standard deviation);
- ``gain-fixed``: ``gain`` towards a fixed grey level (117, ImageNet's mean colour) instead of the fit images' ``M``:
  the same invariance to a photo's brightness (the output depends on ``x / mean(grey)`` alone, up to clipping), with
  no statistic to learn.

Figures (what chooses): the synthetic split every synthetic bench shares (:func:`bench.common.synthetic_split`: a
seeded fifth of train/good held out, one small pasted defect in a copy of each, the transform applied after pasting,
as a camera's image would be) scored by the recommended preset fitted on the other four fifths: image AUROC of the
model's score (the fused one), of the global score (mean of the level distances), pixel AUROC of the maps (224 x 224),
per seed. ``--test``: the real test set, full protocol (``gaussad evaluate``'s :func:`evaluate_category` on features
of transformed images), for the record after the choice.

    PYTHONPATH=src:. python -m bench.experiments.photometric --data ../shared/data/magnetic_tile --seeds 0 1 2 \
        [--modes none gain std] [--test | --lighting] [--json F]

``--lighting``: the held-out goods alone under brighter and darker light (:func:`lighting`), the product's
``--brightness keep`` against ``match``: what the setting is for, measured without any defect.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from PIL import Image

from bench.common import split_masks, synthetic_split
from bench.experiments.adapt import emit

MODES = ("none", "gain", "std", "gain-fixed")
FIXED_GREY = 117.0  # the grey level of ImageNet's mean colour (0.485, 0.456, 0.406) * 255: a target known without data


def grey(a: np.ndarray) -> np.ndarray:
    """ITU-R 601 luminance of an (H, W, 3) array, as PIL's ``convert('L')`` computes it (in float)."""
    return a[..., 0] * 0.299 + a[..., 1] * 0.587 + a[..., 2] * 0.114


def targets(images: Sequence[Image.Image]) -> tuple[float, float]:
    """(M, S): medians over ``images`` of their mean and standard deviation of grey."""
    st = np.array([(g.mean(), g.std()) for g in (grey(np.asarray(im.convert("RGB"), np.float64)) for im in images)])
    return float(np.median(st[:, 0])), float(np.median(st[:, 1]))


def transform(im: Image.Image, mode: str, m: float, s: float) -> Image.Image:
    """``im`` (as RGB) with its brightness (``gain``) or brightness and contrast (``std``) matched to (m, s)."""
    a = np.asarray(im.convert("RGB"), np.float64)
    if mode == "none":
        return im.convert("RGB")
    g = grey(a)
    if mode in ("gain", "gain-fixed"):
        b = a * ((m if mode == "gain" else FIXED_GREY) / max(g.mean(), 1e-6))
    else:
        b = (a - g.mean()) / max(g.std(), 1e-6) * s + m
    return Image.fromarray(np.clip(b + 0.5, 0, 255).astype(np.uint8))


def load(paths: Sequence[Path]) -> list[Image.Image]:
    out = []
    for p in paths:
        with Image.open(p) as im:
            out.append(im.convert("RGB"))
    return out


def synthetic(data: Path, seed: int, modes: Sequence[str]) -> list[dict[str, Any]]:
    from gaussad import GaussianAD
    from gaussad.tools.datasets import load_category
    from gaussad.tools.evaluate import roc_auc

    cat = load_category(data)
    fit_files, held_files, bad, bad_masks = synthetic_split(cat.train_files, seed)
    fit, held = load(fit_files), load(held_files)
    m, s = targets(fit)
    labels = np.r_[np.zeros(len(held)), np.ones(len(bad))]
    rows = []
    for mode in modes:
        t0 = time.perf_counter()
        model = GaussianAD(verbose=False, random_state=seed, brightness="keep")  # the bench's transform alone
        model.fit([transform(im, mode, m, s) for im in fit])
        scored = [transform(im, mode, m, s) for im in held + bad]
        levels, peaks, maps = model.score_images(scored, with_maps=True)
        size = maps.shape[-1]
        masks = split_masks(len(held), bad_masks, size)
        row = {"data": data.name, "seed": seed, "mode": mode, "target": [round(m, 1), round(s, 1)],
               "model_score": round(roc_auc(labels, model.scores(levels, peaks)), 4),
               "global": round(roc_auc(labels, levels.mean(axis=1)), 4),
               "map_max": round(roc_auc(labels, maps.reshape(len(maps), -1).max(axis=1)), 4),
               "pixel": round(roc_auc(masks.ravel(), maps.ravel()), 4),
               "n": [len(fit), len(held), len(bad)], "s": round(time.perf_counter() - t0, 1)}
        rows.append(row)
    return rows


LIGHT = (0.7, 0.85, 1.0, 1.15, 1.3)


def lighting(data: Path, seed: int, fpr: float = 0.05) -> list[dict[str, Any]]:
    """What a change of the light does to good parts: the held-out goods of the synthetic split (no defects), every
    pixel multiplied by each factor of :data:`LIGHT` (clipped at 255, as a brighter or darker exposure), scored by
    the product's recommended preset with ``brightness`` keep and match fitted on the fit part; the share flagged at
    ``fpr`` (the decision's false-positive rate: ``fpr`` where the light is as in training) and the median score."""
    from gaussad import GaussianAD
    from gaussad.tools.datasets import load_category

    cat = load_category(data)
    fit_files, held_files, _, _ = synthetic_split(cat.train_files, seed)
    fit, held = load(fit_files), load(held_files)
    rows = []
    for brightness in ("keep", "match"):
        model = GaussianAD(verbose=False, random_state=seed, brightness=brightness).fit(fit)
        for factor in LIGHT:
            lit = [Image.fromarray(np.clip(np.asarray(im, np.float64) * factor + 0.5, 0, 255).astype(np.uint8))
                   for im in held]
            flags = model.predict(lit, fpr=fpr)
            rows.append({"data": data.name, "seed": seed, "brightness": brightness, "light": factor, "fpr": fpr,
                         "flagged": round(float(np.mean(flags)), 3), "n": len(held),
                         "median_score": round(float(np.median(model.score_samples(lit))), 3)})
    return rows


FIGURES = ("image_auroc", "fused_auroc", "max_map_auroc", "pixel_auroc", "hit_rate")


def full_protocol(cat: Any, ex: Any, train: Sequence[Any], tests: Sequence[Any]) -> dict[str, float]:
    """``gaussad evaluate``'s full-protocol figures (:func:`evaluate_category`) for category ``cat`` on the features
    extractor ``ex`` gives ``train`` and ``tests`` (files or images, in the category's order)."""
    from gaussad.detector.resolve import features
    from gaussad.tools.evaluate import evaluate_category, load_masks

    tr, tr_maps = features(ex, train, "train", True, False)
    te, te_maps = features(ex, tests, "test", True, False)
    r = evaluate_category(cat, (tr, te), {}, "full", feature_maps=(tr_maps, te_maps, load_masks(cat, ex.input_size)),
                          level_names=ex.level_names, map_size=ex.input_size)
    return {k: round(float(r[k]), 4) for k in FIGURES if r.get(k) is not None}


def recommended_extractor(cat: Any, **settings: Any) -> Any:
    """The recommended preset's extractor with ``settings``, its 'auto' settings decided from ``cat``'s training files."""
    from gaussad import GaussianAD
    from gaussad.detector import params as parameters
    from gaussad.intake.features import AUTO_SETTINGS, auto_settings

    em = GaussianAD(verbose=False, **settings)
    em.set_params(**{k: em.get_params()[k] for k in AUTO_SETTINGS})
    em.set_params(**auto_settings(cat.train_files, parameters.resolved(em.get_params())))
    return em.feature_extractor()


def test(data: Path, modes: Sequence[str]) -> list[dict[str, Any]]:
    """The full protocol on the real test set, features of transformed images (M, S from all of train/good)."""
    from gaussad.tools.datasets import load_category

    cat = load_category(data)
    train, tests = load(cat.train_files), load(cat.test_files)
    m, s = targets(train)
    rows = []
    for mode in modes:
        t0 = time.perf_counter()
        ex = recommended_extractor(cat, brightness="keep")  # the transform is the bench's, not the product's
        figures = full_protocol(cat, ex, [transform(im, mode, m, s) for im in train],
                                [transform(im, mode, m, s) for im in tests])
        rows.append({"data": data.name, "mode": mode, "test": True, "input_size": ex.input_size, **figures,
                     "s": round(time.perf_counter() - t0, 1)})
    return rows


def main(argv: Sequence[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", required=True, type=Path)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES[:3]))
    ap.add_argument("--test", action="store_true", help="the real test set, full protocol (after choosing)")
    ap.add_argument("--lighting", action="store_true",
                    help="held-out goods under brighter and darker light, product's keep against match")
    ap.add_argument("--json")
    args = ap.parse_args(argv)
    if args.test:
        rows = test(args.data, args.modes)
    elif args.lighting:
        rows = [r for seed in args.seeds for r in lighting(args.data, seed)]
    else:
        rows = [r for seed in args.seeds for r in synthetic(args.data, seed, args.modes)]
    for row in rows:
        emit(row, args.json)


if __name__ == "__main__":
    main()
