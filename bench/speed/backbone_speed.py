"""Throughput of backbones relative to the first one, measured in one process with the backbones interleaved.

On a shared machine only ratios measured side by side mean anything: each round times every backbone in turn, and
each figure is the best over the rounds. Per backbone, with the given preset:

- network: the feature network alone in ONNX Runtime on random input (:func:`bench.common.time_backbone`);
- score: ``score_samples`` of a fitted model on the category's test images (decoding, network, Gaussians and, with
  the recommended preset, the anomaly maps), images read from the page cache.

    python -m bench.speed.backbone_speed --data ../shared/data/mvtec_ad/bottle [--preset recommended] [--rounds 3]
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

from bench.common import split_images, time_backbone
from gaussad import GaussianAD


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", required=True)
    ap.add_argument("--backbones", default="efficientnet-lite0,mobilenet_v2")
    ap.add_argument("--preset", default="paper")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--json")
    args = ap.parse_args()
    train, test = split_images(Path(args.data))
    for f in train + test:
        f.read_bytes()
    names = args.backbones.split(",")
    models = {n: GaussianAD(backbone=n, preset=args.preset).fit(train) for n in names}
    for m in models.values():
        m.score_samples(test[:4])  # warm-up
    best: dict[str, dict[str, float]] = {n: {"network_s": float("inf"), "score_s": float("inf")} for n in names}
    load = [os.getloadavg()[0]]
    for r in range(args.rounds):
        for n, m in models.items():
            fx = m.feature_extractor()
            best[n]["network_s"] = min(best[n]["network_s"], time_backbone(fx, len(test), 16))
            t0 = time.perf_counter()
            m.score_samples(test)
            best[n]["score_s"] = min(best[n]["score_s"], (time.perf_counter() - t0) / len(test))
        load.append(os.getloadavg()[0])
    first = names[0]
    report = {"data": str(args.data), "preset": args.preset, "n_score": len(test), "rounds": args.rounds,
              "loadavg": [round(x, 2) for x in load], "backbones": {}}
    for n in names:
        b = best[n]
        report["backbones"][n] = {
            "input_size": models[n].feature_extractor().input_size,
            "network_img_s": 1 / b["network_s"], "score_img_s": 1 / b["score_s"],
            "network_vs_first": best[first]["network_s"] / b["network_s"],
            "score_vs_first": best[first]["score_s"] / b["score_s"]}
        r = report["backbones"][n]
        print(f"{n:20s} {r['input_size']} px  network {r['network_img_s']:6.1f} img/s (x{r['network_vs_first']:.2f})  "
              f"score {r['score_img_s']:6.1f} img/s (x{r['score_vs_first']:.2f})", flush=True)
    print(f"load average over the rounds: {report['loadavg']}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)


if __name__ == "__main__":
    main()
