"""The default preset's decision and its cost (issue 30): the recommended preset as it was before issue 30 (global
score, chi2 at FPR 0.01, native input size, tiles auto) against today's (the fused score decided by its conformal law,
input_size auto, untiled maps) and the fast preset (today's at the native size), on one category in MVTec layout.

Per preset: the input size fit chose, the realised false-positive rate on test/good and the true-positive rate on the
defective test images at the target FPR the model states (and at 0.05), the image AUROC of its image score, and the
scoring throughput of ``predict`` (what ``gaussad score`` runs: network, banks, decision) on the test images, best of
``--repeats``, the presets interleaved in one run so that their ratio is measured under the same load. Test figures are
read here after the settings were chosen (EXPERIMENTS.md, "Issue 30").

    python -m bench.speed.default_decision --data ../shared/data/magnetic_tile [--repeats 3] [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np

from gaussad import GaussianAD
from gaussad.tools.datasets import load_category
from gaussad.tools.evaluate import roc_auc

# The recommended preset before issue 30, spelled out (its preset name now means today's).
PRESETS = {
    "recommended before issue 30": {"preset": "recommended", "image_score": "global", "threshold": "chi2",
                                    "input_size": "native", "map_tiles": "auto"},
    "recommended (default)": {},
    "fast": {"preset": "fast"},
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.speed.default_decision", description=__doc__)
    parser.add_argument("--data", required=True, help="one category in MVTec layout")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", help="write the figures as JSON here")
    args = parser.parse_args(argv)
    cat = load_category(args.data)
    labels = np.asarray(cat.test_labels)
    models, out = {}, {}
    for name, settings in PRESETS.items():
        start = time.perf_counter()
        models[name] = model = GaussianAD(**settings).fit(cat.train_files)
        fit_s = time.perf_counter() - start
        levels, peaks, _ = model.score_images(cat.test_files)
        stated = model.summary()["threshold"]["fpr"]
        row = {"input_size": model.input_size_, "map_tiles": model.map_tiles_, "fit_s": round(fit_s, 1),
               "stated_fpr": stated, "auroc": roc_auc(labels, model.scores(levels, peaks))}
        for label, fpr in (("stated", None), ("0.05", 0.05)):
            flagged = model.decide(levels, fpr, map_peaks=peaks)[0].astype(bool)
            row[f"fpr_at_{label}"] = float(flagged[labels == 0].mean())
            row[f"tpr_at_{label}"] = float(flagged[labels == 1].mean())
        row["seconds"] = []
        out[name] = row
    for _ in range(args.repeats):  # interleaved: each round times every preset once
        for name, model in models.items():
            start = time.perf_counter()
            model.predict(cat.test_files)
            out[name]["seconds"].append(time.perf_counter() - start)
    base = len(cat.test_files) / min(out["recommended before issue 30"]["seconds"])
    print(f"{cat.name}: {len(cat.train_files)} training, {len(cat.test_files)} test images "
          f"({int((labels == 0).sum())} good); predict throughput best of {args.repeats}")
    for name, row in out.items():
        row["img_per_s"] = len(cat.test_files) / min(row["seconds"])
        row["throughput_ratio"] = row["img_per_s"] / base
        print(f"  {name:28s} {row['input_size']} px, {row['map_tiles']} tile(s): target FPR {row['stated_fpr']:.3g} "
              f"-> realised {row['fpr_at_stated']:.3f} (TPR {row['tpr_at_stated']:.3f}); at 0.05: "
              f"{row['fpr_at_0.05']:.3f} / {row['tpr_at_0.05']:.3f}; AUROC {row['auroc']:.4f}; "
              f"{row['img_per_s']:.1f} img/s = {row['throughput_ratio']:.2f}x", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
