"""Is the fused decision valid with tiled maps? Realised false-positive rates on held-out training goods only.

K-fold cross-fitting over train/good (``KFold``-style seeded folds, :func:`gaussad.tools.datasets.kfold_indices`): each
fold fits the recommended preset with ``image_score='fused'`` (conformal, cross-conformal calibration: out-of-fold
global scores and leave-one-image-out map peaks, as ``fit`` calibrates it) and ``map_tiles=K`` (at each ``--input-size``) on the other folds'
images, through ``fit`` itself, and scores its own images, which every fold's model has never seen. Per K: the share of
held-out goods flagged at each alpha by the fused decision, by the global score's conformal p-value and by the map
peak's alone (each should be at most about alpha), and the median of the calibration (leave-one-image-out) and of the
held-out peaks. No test image is read: this checks the calibration under exchangeability, where the guarantee holds.

    python -m bench.experiments.fused_validity --data ../shared/data/mvtec_ad/bottle [--tiles 1 2] [--input-size 0 384] [--json OUT]
"""

from __future__ import annotations

import argparse
import json

import numpy as np

from gaussad import GaussianAD
from gaussad.tools.datasets import kfold_indices, load_category
from gaussad.core.threshold import conformal_pvalue

ALPHAS = (0.01, 0.05, 0.1)


def measure(files: list, tiles: int, folds: int, seed: int, size: int | None = None) -> dict:
    """The held-out goods' p-values of every fold, for one ``map_tiles`` value and input size (None: the
    backbone's native one), as flagged shares per alpha."""
    pvalues: dict[str, list] = {"fused": [], "global": [], "map peak": []}
    medians: dict[str, list] = {"calibration peaks": [], "held-out peaks": []}
    for keep, held in kfold_indices(len(files), folds, seed):
        model = GaussianAD(preset="recommended", map_tiles=tiles, input_size=size, image_score="fused", threshold="conformal",
                           calibration="cv", verbose=False).fit([files[i] for i in keep])
        levels, peaks, _ = model.score_images([files[i] for i in held])
        pvalues["fused"].append(model.decide(levels, ALPHAS[0], map_peaks=peaks)[1])
        pvalues["global"].append(conformal_pvalue(levels.mean(axis=1), model.calibration_scores_))
        pvalues["map peak"].append(conformal_pvalue(peaks, model.map_calibration_))
        medians["calibration peaks"].append(float(np.median(model.map_calibration_)))
        medians["held-out peaks"].append(float(np.median(peaks)))
    out = {"n_held_out": len(files), "flagged": {}, "medians": {k: float(np.mean(v)) for k, v in medians.items()}}
    for name, chunks in pvalues.items():
        p = np.concatenate(chunks)
        out["flagged"][name] = {str(a): float((p <= a).mean()) for a in ALPHAS}
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", required=True)
    ap.add_argument("--tiles", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--input-size", type=int, nargs="+", default=[0], help="input sizes (0: native)")
    ap.add_argument("--folds", type=int, default=5)
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--json")
    args = ap.parse_args()
    cat = load_category(args.data)
    report = {}
    for size, k in [(size, k) for size in args.input_size for k in args.tiles]:
        report[f"{size or 'native'} px, {k} tiles"] = r = measure(cat.train_files, k, args.folds, args.seed,
                                                                 size or None)
        print(f"{cat.name} input {size or 'native'} px, map_tiles={k}: {r['n_held_out']} held-out goods; flagged at alpha "
              + "; ".join(f"{name} " + " / ".join(f"{v:.3f}" for v in by_alpha.values())
                          for name, by_alpha in r["flagged"].items())
              + f" ({' / '.join(map(str, ALPHAS))}); median peak, calibration {r['medians']['calibration peaks']:.3f}"
              f", held out {r['medians']['held-out peaks']:.3f}", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)


if __name__ == "__main__":
    main()
