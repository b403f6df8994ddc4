"""End-to-end throughput of fit and score against the paper's pipeline and against this machine's limits.

    python -m bench.speed.throughput --data DIR [--json OUT] [--runs N] [--rss-images N] [--preset paper]

DIR is an MVTec-layout category (fit on train/good, score test/*) or a plain folder of images (fit and score
on all of them). In one run, on the same images, it times:

- reference: the paper's pipeline, images decoded one after another with PIL and the network in torch eager;
- ours: GaussianAD.fit from a fresh object (building the network and the engine included) and score_samples;
- the decode limit: decoding, resizing and normalising alone, in a thread pool over all cores;
- the compute limit: the feature network alone in ONNX Runtime on random input.

The combined limit is 1 / (decode time + network time) per image, each at full use of the cores: the best a
pipeline can do when decoding and the network share the same cores. Peak RSS is that of `gaussad score` run
as a child process on ``--rss-images`` images (the score set cycled), with the model fitted here.
Each timing is the best of ``--runs`` repetitions (every run is kept in the JSON too); the share of the
CPU taken by other processes is recorded with the results.
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from bench.common import LoadMeter, cpu_model, split_images, time_backbone


def reference_features(module, files: list[Path], size: int, batch_size: int) -> list[np.ndarray]:
    """The paper's pipeline: each image decoded and resized in turn, then batches through torch eager."""
    import torch

    from gaussad.intake.images import load_image, preprocess

    chunks = []
    with torch.inference_mode():
        for start in range(0, len(files), batch_size):
            batch = np.stack([preprocess(load_image(f, decoder="pil"), size) for f in files[start:start + batch_size]])
            chunks.append([o.numpy().astype(np.float64) for o in module(torch.from_numpy(batch))])
    return [np.concatenate(level) for level in zip(*chunks)]


def time_reference(args, train: list[Path], test: list[Path]) -> dict:
    """Fit and score with the reference pipeline; the network is built inside the fit timing."""
    from gaussad import GaussianAD
    from gaussad.intake.features import FeatureExtractor

    t0 = time.perf_counter()
    fe = FeatureExtractor(args.backbone, input_size=args.input_size, engine="torch")
    module, size = fe.module, fe.input_size
    model = GaussianAD(backbone=None).fit_features(reference_features(module, train, size, args.batch_size))
    t1 = time.perf_counter()
    scores = model.score_features(reference_features(module, test, size, args.batch_size))
    t2 = time.perf_counter()
    return {"fit_s": t1 - t0, "score_s": t2 - t1, "scores": scores}


def time_ours(args, train: list[Path], test: list[Path]) -> dict:
    """Fit from a fresh GaussianAD (network, engine and all) and score the test images."""
    from gaussad import GaussianAD

    t0 = time.perf_counter()
    model = GaussianAD(args.backbone, input_size=args.input_size, batch_size=args.batch_size, engine=args.engine,
                       decoder=args.decoder, precision=args.precision, preset=args.preset)
    model.fit(train)
    t1 = time.perf_counter()
    scores = model.score_samples(test)
    t2 = time.perf_counter()
    model.set_params(decoder="pil")  # the same model scoring with Pillow alone, for the decoders' speed-up
    pil_scores = model.score_samples(test)
    t3 = time.perf_counter()
    model.set_params(decoder=args.decoder)
    if not np.array_equal(pil_scores, scores):
        raise RuntimeError("scores with --decoder pil differ from those with the faster decoders")
    return {"fit_s": t1 - t0, "score_s": t2 - t1, "score_pil_s": t3 - t2, "scores": scores, "model": model}


def time_decode(extractor, files: list[Path]) -> float:
    """Seconds to decode, resize and normalise every file, one thread per core."""
    from gaussad.intake.engine import cpu_count

    t0 = time.perf_counter()
    with ThreadPoolExecutor(cpu_count()) as pool:
        for _ in pool.map(extractor.prepare, files):
            pass
    return time.perf_counter() - t0


# Run in the child: `gaussad score` in-process, then its own peak RSS. VmHWM belongs to the child's address
# space alone; ru_maxrss would also count the (large) parent's pages held at the fork.
_CHILD = """
import resource, sys
from gaussad.cli import main
listing, model, engine, batch, peak = sys.argv[1:]
code = main(["score", model, *open(listing).read().split("\\n"), "--json", "--quiet", "--engine", engine,
             "--batch-size", batch])
try:
    hwm = [l for l in open("/proc/self/status") if l.startswith("VmHWM:")][0].split()[1]
except OSError:
    hwm = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
open(peak, "w").write(str(hwm))
sys.exit(code)
"""


def score_child(model_path: Path, files: list[Path], engine: str, batch_size: int) -> dict:
    """Run `gaussad score --json` on ``files`` in a child process: its wall time and peak RSS."""
    with tempfile.TemporaryDirectory() as tmp:
        listing, out, peak = Path(tmp) / "files.txt", Path(tmp) / "out.json", Path(tmp) / "peak"
        listing.write_text("\n".join(map(str, files)))
        t0 = time.perf_counter()
        with open(out, "w") as fh:
            subprocess.run([sys.executable, "-c", _CHILD, str(listing), str(model_path), engine, str(batch_size),
                            str(peak)], stdout=fh, check=True)
        wall = time.perf_counter() - t0
        n = len(json.loads(out.read_text())["results"])
        peak_kb = int(peak.read_text())
    if n != len(files):
        raise RuntimeError(f"gaussad score returned {n} results for {len(files)} images")
    return {"images": n, "wall_s": wall, "img_s": n / wall, "peak_rss_mb": peak_kb / 1024}


def run(args) -> dict:
    import onnxruntime
    import torch

    import gaussad
    from gaussad.intake.engine import cpu_count
    from gaussad.intake.features import FeatureExtractor
    from gaussad.intake.images import fast_decoders

    train, test = split_images(Path(args.data))
    files = train + test
    for f in files:  # every pipeline reads from the page cache
        f.read_bytes()
    extractor = FeatureExtractor(args.backbone, input_size=args.input_size, engine="onnxruntime", decoder=args.decoder)
    extractor.prepare(files[0])

    extractor.runner  # export the graph now if the cache lacks it, outside every timing
    runs = []
    with LoadMeter() as load:
        for r in range(args.runs):
            with LoadMeter() as run_load:
                extractor.decoder = "pil"
                decode_pil = time_decode(extractor, files) / len(files)
                extractor.decoder = args.decoder
                t = {"decode_s_per_img": time_decode(extractor, files) / len(files), "decode_pil_s_per_img": decode_pil,
                     "backbone_s_per_img": time_backbone(extractor, len(test), args.batch_size)}
                ref = time_reference(args, train, test)
                ours = time_ours(args, train, test)
                if args.precision == "int8":  # the network limit of the quantized network the model runs
                    t["backbone_s_per_img"] = time_backbone(ours["model"].feature_extractor(), len(test),
                                                            args.batch_size)
            t.update(ref_fit_s=ref["fit_s"], ref_score_s=ref["score_s"], fit_s=ours["fit_s"], score_s=ours["score_s"],
                     score_pil_s=ours["score_pil_s"])
            limit = 1 / (t["decode_s_per_img"] + t["backbone_s_per_img"])
            t.update(fraction_of_limit=len(test) / t["score_s"] / limit,
                     ratio_vs_reference=t["ref_score_s"] / t["score_s"], others_cpu_share=run_load.others)
            runs.append(t)
            if not args.quiet:
                print(f"run {r + 1}/{args.runs}: reference fit {ref['fit_s']:.2f} s, score {ref['score_s']:.2f} s; "
                      f"ours fit {ours['fit_s']:.2f} s, score {ours['score_s']:.2f} s; score fraction of limit "
                      f"{t['fraction_of_limit']:.2f}, ratio {t['ratio_vs_reference']:.2f}", file=sys.stderr,
                      flush=True)
    best = {k: min(run[k] for run in runs) for k in ("decode_s_per_img", "backbone_s_per_img", "ref_fit_s",
                                                      "ref_score_s", "fit_s", "score_s", "score_pil_s",
                                                      "decode_pil_s_per_img")}
    rel = np.abs(ours["scores"] - ref["scores"]) / np.abs(ref["scores"])

    rss_files = [test[i % len(test)] for i in range(args.rss_images or len(test))]
    with tempfile.TemporaryDirectory() as tmp:
        model_path = Path(tmp) / "model.gad"
        ours["model"].save(model_path)
        child = score_child(model_path, rss_files, args.engine, args.batch_size)

    decode_img_s = 1 / best["decode_s_per_img"]
    backbone_img_s = 1 / best["backbone_s_per_img"]
    limit = 1 / (best["decode_s_per_img"] + best["backbone_s_per_img"])
    score_img_s = len(test) / best["score_s"]
    reference_img_s = len(test) / best["ref_score_s"]
    fit_img_s = len(train) / best["fit_s"]
    reference_fit_img_s = len(train) / best["ref_fit_s"]
    return {
        "data": str(args.data),
        "n_fit": len(train),
        "n_score": len(test),
        "reference_img_s": reference_img_s,
        "score_img_s": score_img_s,
        "fit_img_s": fit_img_s,
        "limit_img_s": limit,
        "ratio_vs_reference": score_img_s / reference_img_s,
        "decoder": args.decoder,
        "precision": args.precision,
        "decoders": fast_decoders() if args.decoder == "auto" else {},
        "score_pil_img_s": len(test) / best["score_pil_s"],
        "decoder_speedup": best["score_pil_s"] / best["score_s"],
        "decode_pil_img_s": 1 / best["decode_pil_s_per_img"],
        "fraction_of_limit": score_img_s / limit,
        "peak_rss_mb": child["peak_rss_mb"],
        "reference_fit_img_s": reference_fit_img_s,
        "fit_ratio_vs_reference": fit_img_s / reference_fit_img_s,
        "fit_wall_s": best["fit_s"],
        "fit_fraction_of_limit": fit_img_s / limit,
        "decode_img_s": decode_img_s,
        "backbone_img_s": backbone_img_s,
        "max_rel_score_diff_vs_reference": float(rel.max()),
        "cli_score_images": child["images"],
        "cli_score_img_s": child["img_s"],
        "runs": args.runs,
        "per_run": runs,
        "backbone": args.backbone,
        "input_size": extractor.input_size,
        "batch_size": args.batch_size,
        "engine": args.engine,
        "machine": {
            "cpu_model": cpu_model(),
            "cores": cpu_count(),
            "loadavg_before": [round(x, 2) for x in load.loadavg_before],
            "loadavg_after": [round(x, 2) for x in load.loadavg_after],
            "cpu_share_taken_by_other_processes": None if load.others is None else round(load.others, 3),
        },
        "versions": {"gaussad": gaussad.__version__, "torch": torch.__version__,
                     "onnxruntime": onnxruntime.__version__, "python": platform.python_version()},
    }


def format_table(res: dict) -> str:
    """The human-readable summary printed after a run."""
    m = res["machine"]
    rows = [
        ("reference score (serial PIL + torch eager)", f"{res['reference_img_s']:.1f} img/s"),
        ("ours score", f"{res['score_img_s']:.1f} img/s"),
        ("reference fit", f"{res['reference_fit_img_s']:.1f} img/s"),
        ("ours fit", f"{res['fit_img_s']:.1f} img/s ({res['fit_wall_s']:.2f} s for {res['n_fit']} images)"),
        ("decode limit (all cores)", f"{res['decode_img_s']:.1f} img/s"),
        ("network limit (ONNX Runtime, random input)", f"{res['backbone_img_s']:.1f} img/s"),
        ("combined limit", f"{res['limit_img_s']:.1f} img/s"),
        ("score ratio vs reference", f"{res['ratio_vs_reference']:.2f}"),
        (f"ours score, decoder pil (vs {res['decoder']})", f"{res['score_pil_img_s']:.1f} img/s "
                                                          f"(speed-up {res['decoder_speedup']:.2f})"),
        ("decode limit, decoder pil", f"{res['decode_pil_img_s']:.1f} img/s"),
        ("score fraction of limit", f"{res['fraction_of_limit']:.2f}"),
        ("fit ratio vs reference", f"{res['fit_ratio_vs_reference']:.2f}"),
        (f"peak RSS, gaussad score of {res['cli_score_images']} images",
         f"{res['peak_rss_mb']:.0f} MB ({res['cli_score_img_s']:.1f} img/s with start-up)"),
        ("max relative score difference vs reference", f"{res['max_rel_score_diff_vs_reference']:.1e}"),
    ]
    width = max(len(k) for k, _ in rows)
    others = m["cpu_share_taken_by_other_processes"]
    if others is not None and others > 0.1:
        rows.append(("WARNING", f"other processes took {others:.0%} of the CPU during the timings: "
                                "the figures are not this machine's; rerun on a quiet machine"))
    head = (f"{res['data']}: fit {res['n_fit']} / score {res['n_score']} images, {res['backbone']} at "
            f"{res['input_size']} px, batch {res['batch_size']}, engine {res['engine']}, best of {res['runs']}\n"
            f"{m['cpu_model']}, {m['cores']} cores; load average {m['loadavg_before'][0]} -> "
            f"{m['loadavg_after'][0]}; CPU share taken by other processes {m['cpu_share_taken_by_other_processes']}")
    return "\n".join([head] + [f"  {k.ljust(width)}  {v}" for k, v in rows])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.speed.throughput", description=__doc__.split("\n\n")[0])
    p.add_argument("--data", required=True, help="an MVTec-layout category or a folder of images")
    p.add_argument("--json", metavar="OUT", help="also write the results as JSON to OUT")
    p.add_argument("--backbone", default="efficientnet-lite0")
    p.add_argument("--input-size", type=int, help="default: the backbone's native size")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--preset", default="paper", choices=("paper", "recommended", "fast"),
                   help="preset of 'ours' (default paper: the reference's recipe, so that the scores can be compared "
                        "and the decode limit, measured with its resize, applies)")
    p.add_argument("--engine", default="onnxruntime", choices=("onnxruntime", "torch"), help="engine of 'ours'")
    p.add_argument("--precision", default="fp32", choices=("fp32", "int8"),
                   help="network precision of 'ours' (int8: quantized at fit; the reference stays fp32 torch)")
    p.add_argument("--decoder", default="auto", choices=("auto", "pil"),
                   help="decoders of 'ours' (auto: pyspng/simplejpeg where exact); the same model also scores with "
                        "pil in each run, for the decoders' speed-up")
    p.add_argument("--runs", type=int, default=1, help="repetitions; each timing is the best of them (default 1)")
    p.add_argument("--rss-images", type=int, default=0,
                   help="images scored by the child `gaussad score` whose peak RSS is reported (the score set "
                        "cycled; default: the score set once)")
    p.add_argument("--quiet", action="store_true", help="print only the final table")
    args = p.parse_args(argv)
    res = run(args)
    print(format_table(res))
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
