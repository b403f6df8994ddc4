"""What ``brightness='match'`` (the recommended preset's since issue 33) costs against ``'keep'``, in one process:

- the preprocessing alone (:func:`gaussad.intake.images.preprocess` of the decoded test images at the model's input
  size: resize, brightness, normalisation), and
- scoring (``score_samples`` of the whole test set by the recommended preset fitted on the first 40 training images,
  one model per setting),

each the best of ``--rounds`` runs, the two settings taking turns.

    python -m bench.speed.brightness_cost --data ../shared/data/mvtec_ad/bottle
"""

from __future__ import annotations

import argparse

from gaussad import GaussianAD
from gaussad.intake.images import load_image, preprocess
from gaussad.tools.datasets import load_category

from bench.common import best_times, cpu_model

SETTINGS = ("keep", "match")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", required=True, help="a category folder in MVTec layout")
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    cat = load_category(args.data)
    test = list(cat.test_files)
    models = {b: GaussianAD(brightness=b).fit(list(cat.train_files)[:40]) for b in SETTINGS}
    ex = models["match"].feature_extractor()
    decoded = [load_image(p) for p in test]

    def prep(b: str):
        return lambda: [preprocess(img, ex.input_size, ex.normalization, ex.resize, b) for img in decoded]

    for model in models.values():  # warm up: graph load, first batches
        model.score_samples(test[:8])
    pre = best_times({b: prep(b) for b in SETTINGS}, args.rounds)
    score = best_times({b: (lambda m=m: m.score_samples(test)) for b, m in models.items()}, args.rounds)
    n = len(test)
    print(f"{cpu_model()}; {n} images at {ex.input_size} px ({ex.resize} resize)")
    print("preprocess: " + ", ".join(f"{b} {1000 * t / n:.2f} ms/img" for b, t in pre.items())
          + f"; match - keep = {1000 * (pre['match'] - pre['keep']) / n:.2f} ms/img")
    print("score: " + ", ".join(f"{b} {n / t:.1f} img/s" for b, t in score.items())
          + f"; match / keep throughput = {score['keep'] / score['match']:.3f}")


if __name__ == "__main__":
    main()
