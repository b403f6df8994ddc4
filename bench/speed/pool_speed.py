"""Scoring throughput of the recommended preset with ``pool='avg'`` against ``pool='avg+std'`` (the map levels'
spread pooled too), in one process: both fitted on the first 40 training images, ``score_samples`` of the whole
test set, alternating, best of 3 rounds.

    python -m bench.speed.pool_speed --data ../shared/data/mvtec_ad/bottle
"""

from __future__ import annotations

import argparse
import time

from gaussad import GaussianAD
from gaussad.tools.datasets import load_category

POOLS = ("avg", "avg+std")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", required=True, help="a category folder in MVTec layout")
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    cat = load_category(args.data)
    test = list(cat.test_files)
    models = {p: GaussianAD(pool=p).fit(list(cat.train_files)[:40]) for p in POOLS}
    for model in models.values():  # warm up: graph load, first batches
        model.score_samples(test[:8])
    best = dict.fromkeys(POOLS, 0.0)
    for _ in range(args.rounds):
        for pool, model in models.items():
            start = time.perf_counter()
            model.score_samples(test)
            best[pool] = max(best[pool], len(test) / (time.perf_counter() - start))
    print(f"{len(test)} images: " + ", ".join(f"pool={p} {v:.1f} img/s" for p, v in best.items())
          + f"; avg+std / avg = {best['avg+std'] / best['avg']:.3f}")


if __name__ == "__main__":
    main()
