"""int8 weight formats on CPUs with and without VNNI: feature error against fp32 per level, image AUROC and network
speed, for each format, in one run.

    python -m bench.speed.int8_formats --data ../shared/data/mvtec_ad/bottle [--emulate EPYC-Rome] [--json out.json]

On x86-64 without VNNI, ONNX Runtime multiplies uint8 activations by int8 weights with ``VPMADDUBSW``, whose 16-bit
sums saturate (:class:`gaussad.intake.engine.Int8Format`). Each format quantizes the default preset's network (its
normalisation, aspect resize, spread pooling; untiled: tiles shape the maps, not the pooled features) on the 64
training images fit calibrates on; then on this CPU and, with ``--emulate CPU``, on a CPU without VNNI emulated by
``qemu-x86_64 -cpu CPU`` (Debian's qemu-user; EPYC-Rome and Haswell have AVX2 and no AVX-512):

- per level, mean |int8 - fp32| / mean |fp32| of the pooled features on the held-out training images (those not
  used to calibrate: how the format was chosen) and on the test images (the issue's acceptance figure);
- image AUROC, full protocol, global score: the Gaussians fitted on this CPU's int8 features of every training
  image, the test images scored on this CPU and on the emulated one (a model fitted on one CPU, scored on another);
- per level, the same measure between the int8 features on the two CPUs (0 where the format does not depend on VNNI);
- network speed on this CPU (batch 16, best of 5, interleaved); emulated speed means nothing and is not timed.
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

from bench.common import network_ms

# name: (weight type, per channel, 7-bit weights, 8-bit depthwise weights, convolutions left in fp32 at the start,
# at the end)
VARIANTS = {
    "u8s8": ("int8", True, False, False, 0, 0),
    "u8s8-per-tensor": ("int8", False, False, False, 0, 0),
    "u8s7": ("int8", True, True, False, 0, 0),
    "u8s7-per-tensor": ("int8", False, True, False, 0, 0),
    "u8u8": ("uint8", True, False, False, 0, 0),
    "u8u8-per-tensor": ("uint8", False, False, False, 0, 0),
    "u8s8-ends": ("int8", True, False, False, 3, 1),
    "u8s7-ends": ("int8", True, True, False, 3, 1),
    "u8s7-dw8": ("int8", True, True, True, 0, 0),
    "u8s7-dw8-ends": ("int8", True, True, True, 3, 1),
    "u8s7-dw8-ends4": ("int8", True, True, True, 3, 4),
}


def _extractor(precision: str, network: bytes | None = None):
    """The default preset's pooled-feature extractor (int8: running ``network``, or to be calibrated)."""
    from gaussad import GaussianAD
    from gaussad.intake.features import ExtractorCache
    from gaussad.detector.params import resolved

    settings = resolved(GaussianAD(map_tiles=1, precision=precision, engine="onnxruntime").get_params())
    return ExtractorCache().get(settings, network=network)


def _features(network: bytes | None, files: list) -> list[np.ndarray]:
    return _extractor("fp32" if network is None else "int8", network).extract(files)


def _relative_errors(a: list[np.ndarray], b: list[np.ndarray]) -> list[float]:
    return [float(np.abs(x - y).mean() / np.abs(x).mean()) for x, y in zip(a, b)]


def worker(spec_path: str) -> None:
    """Inside the emulator: the features of the spec's images for each of its networks, into one .npz."""
    spec = json.loads(Path(spec_path).read_text())
    files = spec["files"]
    out = {}
    for name, path in spec["networks"].items():
        for i, level in enumerate(_features(Path(path).read_bytes(), files)):
            out[f"{name}/{i}"] = level
    from gaussad.intake.engine import cpu_isa

    out["isa"] = np.array(cpu_isa())
    np.savez(spec["out"], **out)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", required=True)
    ap.add_argument("--emulate", metavar="CPU", help="qemu-x86_64 CPU model without VNNI (e.g. EPYC-Rome)")
    ap.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated subset of: " + ", ".join(VARIANTS))
    ap.add_argument("--emulate-variants", help="the variants run under emulation (default: all of --variants)")
    ap.add_argument("--emulate-held", type=int, metavar="N",
                    help="under emulation, only the first N held-out training images (emulation is ~50x slower)")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--json")
    args = ap.parse_args(argv)
    if args.worker:
        worker(args.worker)
        return 0

    from sklearn.metrics import roc_auc_score

    from gaussad import GaussianAD
    from gaussad.intake import engine
    from gaussad.intake.engine import INT8_CALIBRATION_IMAGES, Int8Format, OnnxRuntimeEngine, calibration_order, cpu_isa
    from gaussad.intake.images import list_images

    root = Path(args.data)
    train = list_images(root / "train" / "good", recursive=True)
    test = list_images(root / "test", recursive=True)
    labels = np.array([0 if p.parent.name == "good" else 1 for p in test])
    calibrated = set(calibration_order(len(train))[:INT8_CALIBRATION_IMAGES])
    held = [f for i, f in enumerate(train) if i not in calibrated]
    names = args.variants.split(",")
    emulated_names = (args.emulate_variants or args.variants).split(",") if args.emulate else []

    fp32 = _extractor("fp32")
    networks = {}
    for name in names:
        fmt = Int8Format(name, *VARIANTS[name])
        extractor = _extractor("int8")
        original = engine.INT8_FORMATS.get(engine.INT8_FORMAT)
        engine.INT8_FORMATS[engine.INT8_FORMAT] = fmt  # calibrate exactly as fit does, in this format
        try:
            extractor.calibrate(train)
        finally:
            engine.INT8_FORMATS[engine.INT8_FORMAT] = original
        networks[name] = extractor.network

    res: dict = {"data": str(root), "cpu": cpu_isa(), "held_out_train_images": len(held), "test_images": len(test),
                 "variants": {}}
    ref_train, ref_held, ref_test = (_features(None, files) for files in (train, held, test))
    fp32_model = GaussianAD(backbone=None).fit_features(ref_train)
    res["auroc_fp32"] = float(roc_auc_score(labels, fp32_model.score_features(ref_test)))
    engines = {"fp32": fp32.runner, **{name: OnnxRuntimeEngine(net) for name, net in networks.items()}}
    speed = network_ms(engines, fp32.input_size)
    res["network_ms_per_img_fp32"] = speed["fp32"]

    emulated: dict = {}
    if emulated_names:
        with tempfile.TemporaryDirectory(prefix="gaussad-int8-formats-") as tmp:
            some_held = held[:args.emulate_held] if args.emulate_held is not None else held
            spec = {"files": [os.fspath(f) for f in some_held + test], "out": os.path.join(tmp, "features.npz"),
                    "networks": {}}
            for name in emulated_names:
                path = Path(tmp) / f"{name}.onnx"
                path.write_bytes(networks[name])
                spec["networks"][name] = os.fspath(path)
            spec_path = Path(tmp) / "spec.json"
            spec_path.write_text(json.dumps(spec))
            t = time.perf_counter()
            subprocess.run(["qemu-x86_64", "-cpu", args.emulate, sys.executable, "-m", "bench.speed.int8_formats",
                            "--data", args.data, "--worker", os.fspath(spec_path)], check=True,
                           stderr=subprocess.DEVNULL, env={**os.environ, "GAUSSAD_CACHE": tmp})
            res["emulation_seconds"] = round(time.perf_counter() - t, 1)
            with np.load(spec["out"]) as z:
                res["emulated_cpu"] = f"qemu -cpu {args.emulate}: {z['isa']}"
                for name in emulated_names:
                    levels = sorted((k for k in z.files if k.startswith(name + "/")), key=lambda k: int(k.split("/")[1]))
                    both = [z[k] for k in levels]
                    emulated[name] = ([x[:len(some_held)] for x in both], [x[len(some_held):] for x in both])
            res["emulated_held_train_images"] = len(some_held)

    for name in names:
        held_f, test_f = _features(networks[name], held), _features(networks[name], test)
        model = GaussianAD(backbone=None).fit_features(_features(networks[name], train))
        row = {"network_ms_per_img": speed[name], "network_speedup": round(speed["fp32"] / speed[name], 2),
               "held_error_per_level": [round(e, 4) for e in _relative_errors(ref_held, held_f)],
               "test_error_per_level": [round(e, 4) for e in _relative_errors(ref_test, test_f)],
               "auroc": float(roc_auc_score(labels, model.score_features(test_f)))}
        if name in emulated:
            e_held, e_test = emulated[name]
            n = len(e_held[0])
            row["emulated_held_error_per_level"] = [round(e, 4) for e in
                                                    _relative_errors([x[:n] for x in ref_held], e_held)]
            row["emulated_test_error_per_level"] = [round(e, 4) for e in _relative_errors(ref_test, e_test)]
            # the same network on the two CPUs: 0 where its arithmetic does not depend on VNNI
            row["cross_cpu_test_difference_per_level"] = [round(e, 4) for e in _relative_errors(test_f, e_test)]
            row["emulated_auroc"] = float(roc_auc_score(labels, model.score_features(e_test)))
        res["variants"][name] = row
        print(f"{name:16s} {speed[name]:6.2f} ms/img ({row['network_speedup']:.2f}x)  auroc {row['auroc']:.4f}"
              + (f" emulated {row['emulated_auroc']:.4f}" if name in emulated else "")
              + f"  worst level error held {max(row['held_error_per_level']):.3f}"
              + (f" emulated {max(row['emulated_held_error_per_level']):.3f}" if name in emulated else ""),
              flush=True)
    print(f"fp32             {speed['fp32']:6.2f} ms/img  auroc {res['auroc_fp32']:.4f}  ({res['cpu']})")
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
