"""Scoring throughput of the recommended preset with ``pool='avg'`` against ``pool='avg+std'`` (the map levels'
spread pooled too), in one process: both fitted on the first 40 training images, ``score_samples`` of the whole
test set, alternating, best of 3 rounds (:func:`bench.common.variants_throughput`).

    python -m bench.speed.pool_speed --data ../shared/data/mvtec_ad/bottle
"""

from __future__ import annotations

import argparse

from bench.common import variants_throughput

POOLS = ("avg", "avg+std")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", required=True, help="a category folder in MVTec layout")
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    _, test, best = variants_throughput(args.data, {p: {"pool": p} for p in POOLS}, args.rounds)
    print(f"{len(test)} images: " + ", ".join(f"pool={p} {v:.1f} img/s" for p, v in best.items())
          + f"; avg+std / avg = {best['avg+std'] / best['avg']:.3f}")


if __name__ == "__main__":
    main()
