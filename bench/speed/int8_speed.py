"""int8 against fp32 through the product, in one run: fit time, scoring throughput end to end (decode, resize, network,
score) and the network alone, with the default preset.

    python -m bench.speed.int8_speed --data ../shared/data/mvtec_ad/bottle [--data ../shared/data/magnetic_tile] [--runs 3]

For each set: ``GaussianAD(precision=...).fit(train/good)`` timed once per precision (the int8 fit includes its
quantization), then ``score_samples(test)`` and the network on random input (batch 16) timed ``--runs`` times,
fp32 and int8 interleaved so that a change in the machine's load touches both alike; the best run counts. Prints
one line per set and precision and the int8/fp32 ratios; the CPU's instruction set (which decides ONNX Runtime's
int8 kernels) heads the output.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from bench.common import best_times, network_ms


def run(data: str, runs: int) -> dict:
    from gaussad import GaussianAD
    from gaussad.intake.images import list_images

    root = Path(data)
    train = list_images(root / "train" / "good", recursive=True)
    test = list_images(root / "test", recursive=True)
    models, out = {}, {"data": data, "train_images": len(train), "test_images": len(test)}
    for precision in ("fp32", "int8"):
        t = time.perf_counter()
        models[precision] = GaussianAD(precision=precision).fit(train)
        out[f"fit_s_{precision}"] = round(time.perf_counter() - t, 1)
    best = best_times({p: (lambda m=model: m.score_samples(test)) for p, model in models.items()}, runs)
    extractors = {p: m.feature_extractor() for p, m in models.items()}
    network = network_ms({p: e.runner for p, e in extractors.items()}, extractors["fp32"].input_size)
    for precision in models:
        out[f"score_img_s_{precision}"] = round(len(test) / best[precision], 1)
        out[f"network_ms_per_img_{precision}"] = network[precision]
    out["score_ratio"] = round(out["score_img_s_int8"] / out["score_img_s_fp32"], 2)
    out["network_ratio"] = round(network["fp32"] / network["int8"], 2)
    out["int8"] = models["int8"].summary()["int8"]
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", action="append", required=True)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--json")
    args = ap.parse_args(argv)

    from bench.common import cpu_model
    from gaussad.intake.engine import cpu_isa

    print(f"CPU: {cpu_model()} ({cpu_isa()})")
    results = []
    for data in args.data:
        r = run(data, args.runs)
        results.append(r)
        print(f"{Path(data).name}: fit {r['fit_s_fp32']} s fp32, {r['fit_s_int8']} s int8; score "
              f"{r['score_img_s_fp32']} -> {r['score_img_s_int8']} img/s ({r['score_ratio']}x); network "
              f"{r['network_ms_per_img_fp32']} -> {r['network_ms_per_img_int8']} ms/img ({r['network_ratio']}x)",
              flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps({"cpu": cpu_model(), "isa": cpu_isa(), "sets": results}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
