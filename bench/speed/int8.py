"""Static int8 quantization of the feature network: image AUROC change and network speed-up (the recipe of the model
parameter ``precision="int8"``, :func:`gaussad.intake.engine.quantize_int8`, measured here on its own).

    python -m bench.speed.int8 --data ../shared/data/mvtec_ad/bottle [--calibration-images 64] [--preset paper]

Exports the pooled-feature network (all 9 levels, the preset's normalisation, square resize), runs ONNX Runtime's
``quant_pre_process`` on it (shape inference and graph optimisation; without it ONNX Runtime cannot fuse the
quantized operators and int8 is no faster, EXPERIMENTS.md), quantizes it with ``quantize_static`` in the product's
format (:data:`gaussad.intake.engine.INT8_FORMAT`; uint8 activations, MinMax calibration on ``--calibration-images`` training
images spread over the sorted list, as fit takes them), then, in one run: the full protocol (fit on all of train/good, score test/*) with the fp32 and the int8 network, image AUROC
of each, and the network alone on random input (batch 16), also the first recipe without the pre-processing
(per-channel 8-bit weights everywhere, the u8s8 format of gaussad 0.1.0). The formats side by side: ``bench.speed.int8_formats``.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np


def _features(engine, extractor, files, batch: int = 16) -> list[np.ndarray]:
    chunks = []
    for start in range(0, len(files), batch):
        x = np.stack([extractor.prepare(f) for f in files[start:start + batch]])
        chunks.append([o.astype(np.float64) for o in engine.run(x)])
    return [np.concatenate(level) for level in zip(*chunks)]


def _network_seconds(engine, size: int, batch: int = 16, repeats: int = 5) -> float:
    x = np.random.default_rng(0).standard_normal((batch, 3, size, size)).astype(np.float32)
    engine.run(x)
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        engine.run(x)
        best = min(best, time.perf_counter() - t)
    return best / batch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", required=True)
    ap.add_argument("--calibration-images", type=int, default=64)
    ap.add_argument("--preset", default="paper", choices=("paper", "recommended"))
    args = ap.parse_args()

    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
    from sklearn.metrics import roc_auc_score

    from gaussad import GaussianAD
    from gaussad.intake.engine import OnnxRuntimeEngine, calibration_order, export_onnx, quantize_int8
    from gaussad.intake.features import FeatureExtractor
    from gaussad.intake.images import list_images

    root = Path(args.data)
    train = list_images(root / "train" / "good", recursive=True)
    test = list_images(root / "test", recursive=True)
    labels = np.array([0 if p.parent.name == "good" else 1 for p in test])
    extractor = FeatureExtractor(normalize="imagenet" if args.preset == "paper" else "native", engine="onnxruntime")
    size = extractor.input_size

    class Reader(CalibrationDataReader):
        def __init__(self, files):
            self.files = iter(files)

        def get_next(self):
            f = next(self.files, None)
            return None if f is None else {"input": extractor.prepare(f)[None]}

    with tempfile.TemporaryDirectory() as tmp:
        fp32_path, plain_path = Path(tmp) / "fp32.onnx", Path(tmp) / "int8_plain.onnx"
        fp32_path.write_bytes(export_onnx(extractor.module, size))
        calibration = [train[i] for i in calibration_order(len(train), args.calibration_images)[:args.calibration_images]]
        t = time.perf_counter()
        int8_graph = quantize_int8(fp32_path.read_bytes(), [extractor.prepare(f) for f in calibration])  # fit's
        quant_s = time.perf_counter() - t
        quantize_static(str(fp32_path), str(plain_path), Reader(calibration), quant_format=QuantFormat.QDQ,
                        per_channel=True, weight_type=QuantType.QInt8, activation_type=QuantType.QUInt8)
        engines = {"fp32": OnnxRuntimeEngine(fp32_path), "int8": OnnxRuntimeEngine(int8_graph)}
        res = {"data": str(root), "preset": args.preset, "calibration_images": args.calibration_images,
               "quantize_seconds": round(quant_s, 1)}
        scores = {}
        for name, engine in engines.items():
            model = GaussianAD(backbone=None).fit_features(_features(engine, extractor, train))
            scores[name] = model.score_features(_features(engine, extractor, test))
            res[f"auroc_{name}"] = float(roc_auc_score(labels, scores[name]))
        engines["int8_without_pre_process"] = OnnxRuntimeEngine(plain_path)
        for name, engine in engines.items():  # the network alone, all in the same run
            res[f"network_ms_per_img_{name}"] = round(1000 * _network_seconds(engine, size), 2)
        res["auroc_change"] = res["auroc_int8"] - res["auroc_fp32"]
        res["network_speedup"] = res["network_ms_per_img_fp32"] / res["network_ms_per_img_int8"]
        res["network_speedup_without_pre_process"] = (res["network_ms_per_img_fp32"]
                                                      / res["network_ms_per_img_int8_without_pre_process"])
        res["score_spearman"] = float(np.corrcoef(np.argsort(np.argsort(scores["fp32"])),
                                                  np.argsort(np.argsort(scores["int8"])))[0, 1])
    print(json.dumps(res))


if __name__ == "__main__":
    main()
