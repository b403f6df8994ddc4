"""Start-up of the command line: seconds until `gaussad --help`, an argument error and `gaussad score` (one image, the
ONNX engine already cached) are done, for this checkout and for an earlier revision, in the same run.

    python -m bench.speed.startup [--before bdd3802] [--runs 7] [--image FILE] [--json OUT]

The earlier revision's ``src/`` is exported with ``git archive`` into a temporary folder and run from there with
PYTHONPATH, as this checkout's ``src/`` is; both use this interpreter and share one temporary engine cache, warmed
before the timings. Each command runs as a fresh process ``--runs`` times; the table gives the best and the median
wall time, and whether the process imported numpy, scipy or torch. The model is fitted on a few noise images (or on
``--image``'s folder) with this checkout's default settings, so ``score`` runs the real EfficientNet-Lite0 graph.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
# Runs gaussad's command line as the console script does, and reports on stderr which heavy modules it imported.
WRAPPER = ("import atexit, sys\n"
           "atexit.register(lambda: sys.stderr.write('\\nIMPORTED ' + ','.join(m for m in ('numpy', 'scipy', 'torch', "
           "'onnxruntime') if m in sys.modules) + '\\n'))\n"
           "from gaussad.cli import main\n"
           "sys.exit(main(sys.argv[1:]))\n")


def export_revision(rev: str, dest: Path) -> Path:
    """The ``src/`` folder of revision ``rev``, extracted under ``dest``."""
    dest.mkdir(parents=True, exist_ok=True)
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", rev, "src"], check=True, capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(dest)], input=archive, check=True)
    return dest / "src"


def time_command(src: Path, argv: list[str], runs: int, env: dict[str, str]) -> dict:
    """Best and median wall seconds of ``argv`` as a fresh process, its exit code and the heavy modules it imported."""
    env = {**env, "PYTHONPATH": str(src)}
    times, code, imported = [], None, ""
    for _ in range(runs):
        start = time.perf_counter()
        proc = subprocess.run([sys.executable, "-c", WRAPPER, *argv], env=env, capture_output=True, text=True)
        times.append(time.perf_counter() - start)
        code = proc.returncode
        imported = next((line.split(" ", 1)[1] if " " in line else "" for line in proc.stderr.splitlines()[::-1]
                         if line.startswith("IMPORTED")), "?")
    return {"best_s": round(min(times), 3), "median_s": round(statistics.median(times), 3), "exit": code,
            "imported": imported or "-", "runs": [round(t, 3) for t in times]}


def noise_images(folder: Path, n: int = 8, size: int = 256) -> Path:
    """``n`` random RGB images: enough to fit a model whose only use is to be loaded and run."""
    import numpy as np
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(n):
        Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(folder / f"{i:03d}.png")
    return folder


def main(argv: list[str] | None = None) -> int:
    from bench.common import LoadMeter, cpu_model

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--before", default="bdd3802", help="revision to compare with (default %(default)s)")
    ap.add_argument("--runs", type=int, default=7, help="runs of each command (default %(default)s)")
    ap.add_argument("--image", type=Path, help="image to score (default: a noise image); its folder fits the model")
    ap.add_argument("--json", type=Path, help="write the results as JSON")
    args = ap.parse_args(argv)

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        env = {**os.environ, "GAUSSAD_CACHE": str(tmp / "cache")}
        versions = {"before": export_revision(args.before, tmp / "before"), "after": ROOT / "src"}
        train = args.image.parent if args.image else noise_images(tmp / "images")
        image = args.image or sorted(train.glob("*.png"))[0]
        model = tmp / "m.gaussad"
        fit = subprocess.run([sys.executable, "-m", "gaussad", "fit", str(train), "-o", str(model), "--quiet"],
                             env={**env, "PYTHONPATH": str(versions["after"])}, capture_output=True, text=True)
        if fit.returncode != 0:
            sys.exit(f"fitting the bench model failed: {fit.stderr.strip()}")
        commands = {
            "gaussad --help": ["--help"],
            "gaussad score --fpr 2 (argument error)": ["score", str(model), str(image), "--fpr", "2"],
            "gaussad score MODEL IMAGE (cached engine)": ["score", str(model), str(image), "--quiet"],
        }
        for src in versions.values():  # warm the engine cache and the file system for both versions
            time_command(src, commands["gaussad score MODEL IMAGE (cached engine)"], 1, env)
        results: dict = {}
        with LoadMeter() as load:
            for name, cmd in commands.items():
                results[name] = {v: time_command(src, cmd, args.runs, env) for v, src in versions.items()}

    print(f"start-up, best (median) of {args.runs} runs; before = {args.before}, after = this checkout")
    print(f"{'command':44s} {'before s':>15s} {'after s':>15s}   imported (before -> after)")
    for name, r in results.items():
        b, a = r["before"], r["after"]
        print(f"{name:44s} {b['best_s']:6.3f} ({b['median_s']:6.3f}) {a['best_s']:6.3f} ({a['median_s']:6.3f})   "
              f"{b['imported']} -> {a['imported']}")
    others = load.others
    print(f"machine: {cpu_model()}, {os.cpu_count()} cores; load average {load.loadavg_before[0]:.2f} -> "
          f"{load.loadavg_after[0]:.2f}; CPU share taken by other processes "
          f"{'unknown' if others is None else f'{others:.0%}'}")
    if args.json:
        args.json.write_text(json.dumps({"before": args.before, "runs": args.runs, "results": results,
                                         "cpu_share_taken_by_other_processes": others,
                                         "loadavg": [load.loadavg_before, load.loadavg_after]}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
