"""What ``adapt`` costs (issue 33): the whole ``fit`` of the default preset on a category's train/good with the network
pretrained, adapted for up to ``--epochs`` epochs with the validation choosing (``adapt_stop='validation'``), and
with every epoch run (``'last'``), in one process, each fitted once (a fit's time is minutes; the graph of each
adapted network is exported anew, as a user's fit does), then the scoring throughput of the test set by each model
(best of ``--rounds``), the adaptation's own record (seconds, per-epoch seconds) and the model file's size.

    python -m bench.speed.adapt_cost --data ../shared/data/mvtec_ad/bottle [--epochs 5]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from bench.common import best_times, cpu_model


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", required=True, help="a category folder in MVTec layout")
    ap.add_argument("--epochs", type=int, default=5)
    ap.add_argument("--rounds", type=int, default=2)
    args = ap.parse_args()
    from gaussad import GaussianAD
    from gaussad.tools.datasets import load_category

    cat = load_category(args.data)
    train, test = list(cat.train_files), list(cat.test_files)
    variants = {"pretrained": {}, "adapt validation": {"adapt": args.epochs},
                "adapt last": {"adapt": args.epochs, "adapt_stop": "last"}}
    models, fit_s = {}, {}
    for name, settings in variants.items():
        t0 = time.perf_counter()
        models[name] = GaussianAD(**settings).fit(train)
        fit_s[name] = time.perf_counter() - t0
    for model in models.values():
        model.score_samples(test[:8])
    score = best_times({name: (lambda m=m: m.score_samples(test)) for name, m in models.items()}, args.rounds)
    print(f"{cpu_model()}; {cat.name}: {len(train)} training images at {models['pretrained'].input_size_} px, "
          f"{len(test)} test images")
    with tempfile.TemporaryDirectory() as tmp:
        for name, model in models.items():
            path = Path(tmp) / "m.gaussad"
            model.save(path)
            record = model.adaptation_ or {}
            epochs = [h["seconds"] for h in record.get("history", [])[1:]]
            print(f"{name}: fit {fit_s[name]:.1f} s ({fit_s[name] / fit_s['pretrained']:.2f}x pretrained)"
                  + (f", of which adaptation {record['seconds']:.1f} s (kept epoch {record['kept_epoch']} of "
                     f"{len(epochs)} run, {sum(epochs) / max(len(epochs), 1):.1f} s an epoch, its validation included where it ran)"
                     if record else "")
                  + f"; scoring {len(test) / score[name]:.1f} img/s ({score['pretrained'] / score[name]:.2f}x); "
                  f"model file {path.stat().st_size / 2**20:.1f} MiB")


if __name__ == "__main__":
    main()
