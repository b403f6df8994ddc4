"""What ``brightness='match'`` (the recommended preset's since issue 33) costs against ``'keep'``, in one process:

- the preprocessing alone (:func:`gaussad.intake.images.preprocess` of the decoded test images at the model's input
  size: resize, brightness, normalisation), and
- scoring (:func:`bench.common.variants_throughput`: ``score_samples`` of the whole test set by the recommended preset
  fitted on the first 40 training images, one model per setting),

each the best of ``--rounds`` runs, the two settings taking turns.

    python -m bench.speed.brightness_cost --data ../shared/data/mvtec_ad/bottle
"""

from __future__ import annotations

import argparse

from gaussad.intake.images import load_image, preprocess

from bench.common import best_times, cpu_model, variants_throughput

SETTINGS = ("keep", "match")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", required=True, help="a category folder in MVTec layout")
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    models, test, score = variants_throughput(args.data, {b: {"brightness": b} for b in SETTINGS}, args.rounds)
    ex = models["match"].feature_extractor()
    decoded = [load_image(p) for p in test]

    def prep(b: str):
        return lambda: [preprocess(img, ex.input_size, ex.normalization, ex.resize, b) for img in decoded]

    pre = best_times({b: prep(b) for b in SETTINGS}, args.rounds)
    n = len(test)
    print(f"{cpu_model()}; {n} images at {ex.input_size} px ({ex.resize} resize)")
    print("preprocess: " + ", ".join(f"{b} {1000 * t / n:.2f} ms/img" for b, t in pre.items())
          + f"; match - keep = {1000 * (pre['match'] - pre['keep']) / n:.2f} ms/img")
    print("score: " + ", ".join(f"{b} {v:.1f} img/s" for b, v in score.items())
          + f"; match / keep throughput = {score['match'] / score['keep']:.3f}")


if __name__ == "__main__":
    main()
