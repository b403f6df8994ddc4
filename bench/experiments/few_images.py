"""Decisions from a few dozen good images (issue 13), through the command line as a user runs it.

Fits ``gaussad fit DIR --threshold conformal --fpr 0.05`` (default calibration: cross-conformal below 500 images)
on a subset of a category's train/good (linked into a scratch folder), scores the whole test set with ``gaussad
score --json``, and prints one JSON line per run: realised FPR on test/good, TPR on the defective images, the
threshold and its calibration. Subsets: bottle's first 40 sorted images; magnetic tile's first 60 sorted (all
one acquisition series) and 60 random ones (``random.Random(seed).sample``), with the FPR per series.

    python -m bench.experiments.few_images --shared ../shared/data [--preset paper] [--seed 0]
"""

from __future__ import annotations

import argparse
import collections
import json
import random
import subprocess
import sys
import tempfile
from pathlib import Path


def run(name: str, files: list[Path], test: Path, work: Path, preset: str | None) -> dict:
    folder = work / name
    folder.mkdir()
    for f in files:
        (folder / f.name).symlink_to(f.resolve())
    model = work / f"{name}.gaussad"
    gaussad = [sys.executable, "-m", "gaussad"]
    fit = subprocess.run([*gaussad, "fit", str(folder), "-o", str(model), "--threshold", "conformal", "--fpr", "0.05",
                          "--json", "--quiet", *(["--preset", preset] if preset else [])],
                         capture_output=True, text=True, check=True)
    summary = json.loads(fit.stdout)
    score = subprocess.run([*gaussad, "score", str(model), str(test), "--json", "--quiet"], capture_output=True,
                           text=True, check=True)
    rows = json.loads(score.stdout)["results"]
    good = [r for r in rows if Path(r["path"]).parts[0] == "good"]
    bad = [r for r in rows if Path(r["path"]).parts[0] != "good"]
    series: dict[str, list[int]] = collections.defaultdict(list)  # magnetic tile names: exp<k>_num_<id>.jpg
    for r in good:
        if "_" in Path(r["path"]).name:
            series[Path(r["path"]).name.split("_")[0]].append(int(r["anomalous"]))
    return {"run": name, "preset": preset or "default", "n_train": len(files),
            "score_threshold": summary["score_threshold"], "min_fpr": summary["calibration"]["min_fpr"],
            "fpr": round(sum(r["anomalous"] for r in good) / len(good), 3),
            "tpr": round(sum(r["anomalous"] for r in bad) / len(bad), 3), "n_good": len(good), "n_defective": len(bad),
            "fpr_by_series": {k: round(sum(v) / len(v), 3) for k, v in sorted(series.items())} if len(series) > 1
            else None}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shared", default="../shared/data", help="folder holding mvtec_ad/bottle and magnetic_tile")
    p.add_argument("--preset", help="fit with this preset (default: the tool's default)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random magnetic tile subset")
    args = p.parse_args(argv)
    shared = Path(args.shared)
    bottle, tile = shared / "mvtec_ad" / "bottle", shared / "magnetic_tile"
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        b = sorted((bottle / "train" / "good").iterdir())
        print(json.dumps(run("bottle_first40", b[:40], bottle / "test", work, args.preset)), flush=True)
        t = sorted((tile / "train" / "good").iterdir())
        print(json.dumps(run("tile_first60", t[:60], tile / "test", work, args.preset)), flush=True)
        subset = sorted(random.Random(args.seed).sample(t, 60))
        print(json.dumps(run("tile_random60", subset, tile / "test", work, args.preset)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
