"""Parity of the exported ONNX detector with the Python path on real images.

    python -m bench.speed.export_parity --data ../shared/data/mvtec_ad/bottle [--preset recommended] [--threshold conformal]
        [--limit 100] [--train-limit N] [--maps] [--adapt N [--adapt-stop last]]

``--preset recommended`` (the default's fused score: its graph always has the map) compares the fused score and
its full-conformal p-value.

Fits a model on train/good (or the first N images), exports it (:func:`gaussad.tools.export.export_detector`), scores the
test images (the first ``--limit`` in sorted order) both ways, and prints the largest relative differences of the
score, the per-level distances and the p-value, and the number of differing decisions.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", required=True, help="an MVTec-layout category")
    ap.add_argument("--preset", default="paper")
    ap.add_argument("--threshold", default=None, help="default: the preset's (paper: chi2; recommended: conformal)")
    ap.add_argument("--fpr", type=float, default=0.05)
    ap.add_argument("--limit", type=int, default=None, help="score the first N sorted test images")
    ap.add_argument("--train-limit", type=int, default=None)
    ap.add_argument("--maps", action="store_true", help="export and compare the anomaly maps too")
    ap.add_argument("--adapt", type=int, default=0, help="fit with the network adapted for up to N epochs")
    ap.add_argument("--adapt-stop", default="validation")
    args = ap.parse_args()

    import onnxruntime as ort

    import gaussad
    from gaussad.tools.export import export_detector
    from gaussad.intake.images import list_images

    root = Path(args.data)
    train = list_images(root / "train" / "good", recursive=True)[:args.train_limit]
    test = list_images(root / "test", recursive=True)[:args.limit]
    model = gaussad.GaussianAD(preset=args.preset, threshold=args.threshold, fpr=args.fpr, adapt=args.adapt,
                               adapt_stop=args.adapt_stop).fit(train)
    maps = args.maps or model.rule().fused  # a fused score's graph always has the map
    data, _ = export_detector(model, maps=args.maps)
    sess = ort.InferenceSession(data, providers=["CPUExecutionProvider"])
    levels, peaks, amaps = model.score_images(test, with_maps=maps)
    scores = model.scores(levels, peaks)
    decisions, pvalues = model.decide(levels, map_peaks=peaks)
    start = time.perf_counter()
    outs = []
    for path in test:
        with Image.open(path) as img:
            pixels = np.asarray(ImageOps.exif_transpose(img).convert("RGB"))
        outs.append(sess.run(None, {"image": pixels[None]}))
    graph_s = time.perf_counter() - start
    g_score = np.array([o[0][0] for o in outs])
    g_levels = np.stack([o[1][0] for o in outs])
    g_p = np.array([o[2][0] for o in outs])
    g_dec = np.array([o[3][0] for o in outs])
    extra = {}
    if maps:
        g_maps = np.stack([o[4][0] for o in outs])
        extra = {"max_abs_map": float(np.abs(g_maps - amaps).max()), "max_map": float(amaps.max()),
                 "max_rel_map": float((np.abs(g_maps - amaps) / np.maximum(np.abs(amaps), 1e-6)).max())}
    rel = lambda a, b: float(np.max(np.abs(a - b) / np.maximum(np.abs(b), 1e-300)))  # noqa: E731
    print(json.dumps({
        "data": str(root), "preset": args.preset, "threshold": model.setting("threshold"),
        "adapt": None if model.adaptation_ is None else {k: model.adaptation_[k] for k in ("epochs", "stop", "kept_epoch")},
        "image_score": model.setting("image_score"), "fpr": args.fpr, "input_size": model.input_size_,
        "n_train": len(train), "n_test": len(test), "graph_mib": round(len(data) / 2**20, 1),
        "max_rel_score": rel(g_score, scores), "max_rel_levels": rel(g_levels, levels),
        "max_rel_pvalue": rel(g_p, pvalues), "decisions_differ": int((g_dec != decisions).sum()),
        "min_pvalue": float(pvalues.min()), "graph_seconds_per_image": round(graph_s / len(test), 4), **extra,
    }))


if __name__ == "__main__":
    main()
