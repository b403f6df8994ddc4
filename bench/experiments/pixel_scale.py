"""Research for issue 33, session 14: one pixel scale for every image instead of one pixel count.

The aspect-kept resize (``--resize aspect``, the recommended preset's) brings every image to about S x S pixels. Where
the photos are crops of one surface at one camera scale but of different sizes (magnetic tile's train/good: 125-600 px
wide, 252-377 px high), that rescales each crop by its own factor: a wide crop shrinks, a narrow one grows, and the
texture's grain changes size from image to image (up to about 2x on tile). Variant ``scale``: every image resized by
one factor ``k = S / sqrt(median(w * h))`` (the median over the fit images), sides rounded to multiples of 32 as the
aspect resize does, so that the grain keeps one size; ``area``: the product's resize. Everything else is the
recommended preset (brightness matched or not: ``--brightness``).

Figures as :mod:`bench.experiments.photometric` (the shared synthetic split over seeds; ``--test``: the real test
set, full protocol, after the choice).

    PYTHONPATH=src:. python -m bench.experiments.pixel_scale --data ../shared/data/magnetic_tile --seeds 0 1 2 \
        [--modes area scale] [--brightness match] [--test] [--json F]
"""

from __future__ import annotations

import argparse
import contextlib
import math
import time
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
from PIL import Image

from bench.common import split_masks, synthetic_split
from bench.experiments.adapt import emit
from bench.experiments.photometric import full_protocol, load, recommended_extractor

MODES = ("area", "scale")


def median_side(images: Sequence[Image.Image]) -> float:
    return float(math.sqrt(np.median([im.size[0] * im.size[1] for im in images])))


@contextlib.contextmanager
def one_scale(mode: str, side: float) -> Iterator[None]:
    """With ``mode='scale'``, the intake's aspect resize to about S x S pixels takes every image by the one factor
    ``S / side`` instead (the map image of tiles, at another S, likewise)."""
    from gaussad.core.maps import resize_bilinear
    from gaussad.intake import images

    if mode == "area":
        yield
        return
    step = images.ASPECT_STEP
    original = images.resize_to

    def resize_to(img: Image.Image, s: int, resize: str = "square") -> Image.Image:
        if resize != "aspect":
            return original(img, s, resize)
        f = s / side
        dims = [max(int(min(max(round(v * f / step), 1), 8 * s // step)) * step, step) for v in img.size]
        return resize_bilinear(img, *dims)

    images.resize_to = resize_to
    try:
        yield
    finally:
        images.resize_to = original


def synthetic(data: Path, seed: int, modes: Sequence[str], brightness: str) -> list[dict[str, Any]]:
    from gaussad import GaussianAD
    from gaussad.tools.datasets import load_category
    from gaussad.tools.evaluate import roc_auc

    cat = load_category(data)
    fit_files, held_files, bad, bad_masks = synthetic_split(cat.train_files, seed)
    fit, held = load(fit_files), load(held_files)
    labels = np.r_[np.zeros(len(held)), np.ones(len(bad))]
    rows = []
    for mode in modes:
        t0 = time.perf_counter()
        model = GaussianAD(verbose=False, random_state=seed, brightness=brightness)
        with one_scale(mode, median_side(fit)):
            model.fit(fit)
            size = model.input_size_
            levels, peaks, maps = model.score_images(held + bad, with_maps=True)
        masks = split_masks(len(held), bad_masks, maps.shape[-1])
        rows.append({"data": data.name, "seed": seed, "mode": mode, "brightness": brightness, "input_size": size,
                     "model_score": round(roc_auc(labels, model.scores(levels, peaks)), 4),
                     "global": round(roc_auc(labels, levels.mean(axis=1)), 4),
                     "map_max": round(roc_auc(labels, maps.reshape(len(maps), -1).max(axis=1)), 4),
                     "pixel": round(roc_auc(masks.ravel(), maps.ravel()), 4), "s": round(time.perf_counter() - t0, 1)})
    return rows


def test(data: Path, modes: Sequence[str], brightness: str) -> list[dict[str, Any]]:
    from gaussad.tools.datasets import load_category

    cat = load_category(data)
    side = median_side(load(cat.train_files))
    rows = []
    for mode in modes:
        t0 = time.perf_counter()
        ex = recommended_extractor(cat, brightness=brightness)
        with one_scale(mode, side):
            figures = full_protocol(cat, ex, cat.train_files, cat.test_files)
        rows.append({"data": data.name, "mode": mode, "brightness": brightness, "test": True,
                     "input_size": ex.input_size, **figures, "s": round(time.perf_counter() - t0, 1)})
    return rows


def main(argv: Sequence[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", required=True, type=Path)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    ap.add_argument("--brightness", choices=("keep", "match"), default="match")
    ap.add_argument("--test", action="store_true", help="the real test set, full protocol (after choosing)")
    ap.add_argument("--json")
    args = ap.parse_args(argv)
    if args.test:
        rows = test(args.data, args.modes, args.brightness)
    else:
        rows = [r for seed in args.seeds for r in synthetic(args.data, seed, args.modes, args.brightness)]
    for row in rows:
        emit(row, args.json)


if __name__ == "__main__":
    main()
