"""Does the ranking of ``gaussad tune`` (held-out goods vs synthetic defects) agree with the real test set's?

Every setting of a tune grid is fitted on all of train/good (the full protocol: one fit, no folds) and scored on the
real test set: image AUROC of the global score and of the map maximum, pixel AUROC (maps and masks at 224 px, as
tune measures them). Features are extracted once per input size. With ``--tune`` (the JSON of ``gaussad tune
--json``) the synthetic figures are put beside the real ones with Spearman rank correlations over the grid.

    python -m bench.experiments.tune_agreement --data ../shared/data/mvtec_ad/bottle --tune bottle_tune.json [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
from scipy.stats import spearmanr

from gaussad import GaussianAD
from gaussad.detector import params
from gaussad.tools.datasets import load_category
from bench.common import extract
from gaussad.tools.evaluate import load_masks, roc_auc
from gaussad.intake.features import auto_settings
from gaussad.tools.tune import BASE, MAP_SIDE, _own_pooled, candidates, changed, describe

UNION = ["stage2", "stage3", "stage4", "stage5", "stage6", "stage7"]  # every map level of the small grid


def real_figures(data: str, grid: str) -> list[dict]:
    cat = load_category(data)
    masks = load_masks(cat, MAP_SIDE)
    out = []
    points = candidates(grid)
    for size in dict.fromkeys(p.get("input_size") for p in points):
        extractor = GaussianAD(**{**BASE, "input_size": size, "map_levels": UNION})
        # input_size and map_tiles 'auto' decided as a fit on these images decides them (as tune)
        extractor.set_params(**auto_settings(cat.train_files, params.resolved(extractor.get_params())))
        fx = extractor.feature_extractor()
        t0 = time.perf_counter()
        train, train_maps = extract(extractor, cat.train_files, f"train {size}", True)
        test, test_maps = extract(extractor, cat.test_files, f"test {size}", True)
        print(f"features at {size}: {time.perf_counter() - t0:.0f} s", flush=True)
        for point in (p for p in points if p.get("input_size") == size):
            setting = {**params.defaults(), **BASE, **point}
            own = [fx.map_levels[UNION.index(n)] for n in params.effective(setting, "map_levels")]
            mine = lambda pooled: _own_pooled(pooled, fx.levels, fx.spread_levels, own)  # noqa: E731 (as tune pools)
            model = GaussianAD(**setting).fit_features(mine(train), fx.level_names)
            pick = [UNION.index(n) for n in params.effective(setting, "map_levels")]
            model.fit_map_features([[m[i] for i in pick] for m in train_maps])
            amaps = model.anomaly_map_features([[m[i] for i in pick] for m in test_maps], MAP_SIDE)
            row = {"settings": describe(changed(setting, {**params.defaults(), **BASE})), "global_auroc": roc_auc(cat.test_labels, model.score_features(mine(test))),
                   "map_max_auroc": roc_auc(cat.test_labels, amaps.reshape(len(amaps), -1).max(axis=1)),
                   "pixel_auroc": roc_auc(masks.ravel(), amaps.ravel())}
            print(row, flush=True)
            out.append(row)
        del train_maps, test_maps
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", required=True)
    ap.add_argument("--grid", default="small")
    ap.add_argument("--tune", help="JSON written by gaussad tune --json on the same train/good")
    ap.add_argument("--json")
    args = ap.parse_args()
    real = real_figures(args.data, args.grid)
    report: dict = {"real": real}
    if args.tune:
        with open(args.tune) as f:
            synth = {describe(r["settings"]): r for r in json.load(f)["ranking"]}
        names = [r["settings"] for r in real]
        for key in ("global_auroc", "map_max_auroc", "pixel_auroc"):
            a = [synth[n][key] for n in names]
            b = [r[key] for r in real]
            rho = spearmanr(a, b).statistic
            report[f"spearman_{key}"] = None if np.isnan(rho) else float(rho)
        print("| setting | synthetic: global / map max / pixel | real test: global / map max / pixel |")
        for n, r in zip(names, real):
            s = synth[n]
            print(f"| {n} | {s['global_auroc']:.4f} / {s['map_max_auroc']:.4f} / {s['pixel_auroc']:.4f} | "
                  f"{r['global_auroc']:.4f} / {r['map_max_auroc']:.4f} / {r['pixel_auroc']:.4f} |")
        print({k: v for k, v in report.items() if k.startswith("spearman")})
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)


if __name__ == "__main__":
    main()
