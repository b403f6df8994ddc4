"""OpenVINO against ONNX Runtime through the product, in one run: `gaussad score`'s results with each engine and the
largest relative difference between them, scoring throughput end to end and the network alone, fp32 and int8, with
the default preset (issue 34).

    python -m bench.speed.engines --data ../shared/data/mvtec_ad/bottle --data ../shared/data/magnetic_tile [--runs 3]

For each set (an MVTec-layout category): a default-preset model fitted on train/good for each precision (fp32, and
int8: the network quantized at fit), engine onnxruntime, saved. Then

- **parity**: ``gaussad score MODEL test/ --json --engine E`` in a child process for E = onnxruntime, openvino, and
  torch (fp32 only: the yardstick, two engines the product already calls equal); per image the score (the fused score
  of the default preset), each level's Mahalanobis distance, the p-value; the largest and the median relative
  difference |e - ort| / |ort| over the images (and levels) of each, and the decisions that differ; the child's wall
  time too (start-up, model load and engine build included);
- **throughput**: the fitted model's ``score_images(test)`` (what ``score`` runs for a fused score: decode, resize,
  network, distances, map peaks) in this process with each engine, after one warm-up, ``--runs`` times with the
  engines taking turns, the best run counting; the network alone on random input (batch 16, best of 5, turns);
- **auto**: what engine 'auto' chose for each graph (:func:`gaussad.intake.engine.fastest_engine`), with its timing.

The share of the CPU taken by other processes during the timings and the load averages are printed and kept.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from bench.common import LoadMeter, best_times, cpu_model, network_ms

ENGINES = ("onnxruntime", "openvino")


def score_cli(model: Path, test: Path, engine: str) -> tuple[float, list[dict]]:
    """``gaussad score --json`` in a child process: its wall time and its result rows."""
    t = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "gaussad", "score", str(model), str(test), "--json", "--quiet",
                           "--engine", engine], capture_output=True, text=True, check=True)
    return time.perf_counter() - t, json.loads(proc.stdout)["results"]


def differences(rows: list[dict], reference: list[dict]) -> dict:
    """How far one engine's result rows are from onnxruntime's: the largest and the median relative difference of
    the score, the level distances and the p-value over the images (and levels), and how many decisions differ."""
    if [r["path"] for r in rows] != [r["path"] for r in reference]:
        raise RuntimeError("the two engines scored different images")
    levels = list(reference[0]["levels"])
    fields = {"score": lambda r: [r["score"]], "levels": lambda r: [r["levels"][n] for n in levels],
              "pvalue": lambda r: [r["pvalue"]]}
    out: dict = {}
    for name, get in fields.items():
        a = np.array([get(r) for r in rows], float)
        b = np.array([get(r) for r in reference], float)
        rel = np.abs(a - b) / np.abs(b)
        out[name] = {"max": float(rel.max()), "median": float(np.median(rel))}
    if len(levels) > 1:  # the level where the distances differ most
        a = np.array([fields["levels"](r) for r in rows], float)
        b = np.array([fields["levels"](r) for r in reference], float)
        out["levels"]["worst_level"] = levels[int((np.abs(a - b) / np.abs(b)).max(axis=0).argmax())]
    out["decisions_differing"] = sum(x["anomalous"] != y["anomalous"] for x, y in zip(rows, reference))
    out["images"] = len(rows)
    return out


def run(data: str, runs: int, folder: Path) -> dict:
    from gaussad import GaussianAD, load
    from gaussad.intake.engine import fastest_engine
    from gaussad.intake.images import list_images

    root = Path(data)
    train = list_images(root / "train" / "good", recursive=True)
    test = list_images(root / "test", recursive=True)
    out: dict = {"data": data, "train_images": len(train), "test_images": len(test)}
    for precision in ("fp32", "int8"):
        path = folder / f"{root.name}-{precision}.gaussad"
        GaussianAD(precision=precision, engine="onnxruntime").fit(train).save(path)
        r: dict = {}
        cli = {e: score_cli(path, root / "test", e) for e in ENGINES + (("torch",) if precision == "fp32" else ())}
        r["cli_wall_s"] = {e: round(w, 2) for e, (w, _) in cli.items()}
        r["relative_difference"] = {e: differences(rows, cli["onnxruntime"][1]) for e, (_, rows) in cli.items()
                                    if e != "onnxruntime"}
        models = {e: load(path).set_params(engine=e) for e in ENGINES}
        for model in models.values():
            model.score_images(test[:8])  # builds the engine (OpenVINO compiles here) and warms it
        with LoadMeter() as load_meter:
            best = best_times({e: (lambda m=model: m.score_images(test)) for e, model in models.items()}, runs)
            extractors = {e: m.feature_extractor() for e, m in models.items()}
            network = network_ms({e: x.runner for e, x in extractors.items()}, extractors["onnxruntime"].input_size)
        r["score_img_s"] = {e: round(len(test) / best[e], 1) for e in ENGINES}
        r["score_ratio_ov_over_ort"] = round(best["onnxruntime"] / best["openvino"], 3)
        r["network_ms_per_img"] = network
        r["network_ratio_ov_over_ort"] = round(network["onnxruntime"] / network["openvino"], 3)
        r["others_cpu_share"] = None if load_meter.others is None else round(load_meter.others, 3)
        r["loadavg"] = [round(x, 2) for x in load_meter.loadavg_before + load_meter.loadavg_after]
        x = extractors["onnxruntime"]
        graph = x.network if precision == "int8" else _fp32_graph(x)
        r["auto_chose"] = fastest_engine(graph, x.input_size).name
        r["input_size"] = x.input_size
        out[precision] = r
    return out


def _fp32_graph(extractor) -> bytes:
    """The cached fp32 ONNX graph an extractor runs."""
    from gaussad.intake.engine import cached_onnx_graph

    return cached_onnx_graph(lambda: extractor.module, extractor.input_size, extractor._graph_key(),
                             any_size=extractor.resize == "aspect")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", action="append", required=True)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--json")
    args = ap.parse_args(argv)

    from importlib import metadata

    from gaussad.intake.engine import cpu_isa

    os.environ.pop("GAUSSAD_AUTO_ENGINE", None)  # 'auto' as users get it
    versions = {p: metadata.version(p) for p in ("onnxruntime", "openvino", "torch")}
    print(f"CPU: {cpu_model()} ({cpu_isa()}), {os.cpu_count()} cores; {versions}", flush=True)
    results = []
    with tempfile.TemporaryDirectory(prefix="gaussad-engines-") as tmp:
        for data in args.data:
            r = run(data, args.runs, Path(tmp))
            results.append(r)
            for precision in ("fp32", "int8"):
                p = r[precision]
                diffs = "; ".join(f"{e}: score {d['score']['max']:.1e} (median {d['score']['median']:.1e}), levels "
                                  f"{d['levels']['max']:.1e} (median {d['levels']['median']:.1e}, worst "
                                  f"{d['levels'].get('worst_level')}), p-value {d['pvalue']['max']:.1e}, decisions "
                                  f"differing {d['decisions_differing']}/{d['images']}"
                                  for e, d in p["relative_difference"].items())
                print(f"{Path(data).name} {precision} ({p['input_size']} px): score img/s "
                      f"{p['score_img_s']} ({p['score_ratio_ov_over_ort']}x); network ms/img {p['network_ms_per_img']} "
                      f"({p['network_ratio_ov_over_ort']}x); against onnxruntime: {diffs}; cli wall s "
                      f"{p['cli_wall_s']}; auto chose {p['auto_chose']}; others' CPU share {p['others_cpu_share']}, "
                      f"loadavg {p['loadavg']}", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps({"cpu": cpu_model(), "isa": cpu_isa(), "versions": versions,
                                               "sets": results}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
