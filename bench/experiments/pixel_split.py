"""Diagnostic for issue 33 (test figures, read to see where the pixel AUROC is lost, never to choose): the product's
anomaly maps on the real test set (recommended preset fitted on all of train/good), pixel AUROC over all test pixels,
split by where the normal pixels are (defect pixels against the good images' pixels, and against the normal pixels
of the defective images themselves), and both halves per defect class (the test folder's name).

    PYTHONPATH=src:. python -m bench.experiments.pixel_split --data ../shared/data/magnetic_tile [--brightness keep]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Sequence

import numpy as np

from bench.experiments.adapt import emit


def auc(pos: np.ndarray, neg: np.ndarray) -> float:
    from gaussad.tools.evaluate import roc_auc

    return round(roc_auc(np.r_[np.ones(pos.size), np.zeros(neg.size)], np.r_[pos, neg]), 4)


def main(argv: Sequence[str] | None = None) -> None:
    from gaussad import GaussianAD
    from gaussad.tools.datasets import load_category
    from gaussad.tools.evaluate import load_masks

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", required=True, type=Path)
    ap.add_argument("--brightness", choices=("keep", "match"), default="match")
    ap.add_argument("--json")
    args = ap.parse_args(argv)
    t0 = time.perf_counter()
    cat = load_category(args.data)
    model = GaussianAD(brightness=args.brightness).fit(list(cat.train_files))
    maps = model.anomaly_map(list(cat.test_files))
    masks = load_masks(cat, maps.shape[-1])
    kinds = np.array([Path(p).parent.name for p in cat.test_files])
    good = maps[kinds == "good"].ravel()
    row = {"data": args.data.name, "brightness": args.brightness, "size": int(maps.shape[-1]),
           "pixel": auc(maps[masks], maps[~masks]), "vs_goods": auc(maps[masks], good)}
    bad = kinds != "good"
    row["within_defective"] = auc(maps[bad][masks[bad]], maps[bad][~masks[bad]])
    for kind in sorted(set(kinds[bad])):
        k = kinds == kind
        m, mk = maps[k], masks[k]
        row[kind] = {"n": int(k.sum()), "defect_share": round(float(mk.mean()), 4), "vs_goods": auc(m[mk], good),
                     "within": auc(m[mk], m[~mk]),
                     "normal_vs_goods": auc(m[~mk], good)}  # > 0.5: this class's normal pixels outrank good ones
    row["s"] = round(time.perf_counter() - t0, 1)
    emit(row, args.json)


if __name__ == "__main__":
    main()
