"""Quantization variants of the feature network, timed side by side (network only, random input): fp32, QDQ without
and with ONNX Runtime's ``quant_pre_process``, QOperator, and QDQ with int8 activations.

    python -m bench.speed.int8_variants --data ../shared/data/mvtec_ad/bottle [--calibration-images 16]

Speed only (the calibration images set the scales; AUROC is ``bench.speed.int8``'s job); prints one line per variant with
ms per image (best of 5 batches of 16), the speed-up over fp32 and the largest output difference relative to fp32's
range.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", required=True)
    ap.add_argument("--calibration-images", type=int, default=16)
    args = ap.parse_args()

    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    from gaussad.intake.engine import OnnxRuntimeEngine, export_onnx
    from gaussad.intake.features import FeatureExtractor
    from gaussad.intake.images import list_images

    extractor = FeatureExtractor(normalize="imagenet", engine="onnxruntime")
    size = extractor.input_size
    calibration = [extractor.prepare(f)[None] for f in
                   list_images(Path(args.data) / "train" / "good", recursive=True)[:args.calibration_images]]

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.batches = iter(calibration)

        def get_next(self):
            x = next(self.batches, None)
            return None if x is None else {"input": x}

    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        (d / "fp32.onnx").write_bytes(export_onnx(extractor.module, size))
        quant_pre_process(str(d / "fp32.onnx"), str(d / "pre.onnx"))
        paths = {"fp32": d / "fp32.onnx"}
        for name, source, fmt, act in (("qdq", "fp32", QuantFormat.QDQ, QuantType.QUInt8),
                                       ("qdq_pre_process", "pre", QuantFormat.QDQ, QuantType.QUInt8),
                                       ("qoperator_pre_process", "pre", QuantFormat.QOperator, QuantType.QUInt8),
                                       ("qdq_pre_process_s8s8", "pre", QuantFormat.QDQ, QuantType.QInt8)):
            paths[name] = d / f"{name}.onnx"
            quantize_static(str(d / f"{source}.onnx"), str(paths[name]), Reader(), quant_format=fmt, per_channel=True,
                            weight_type=QuantType.QInt8, activation_type=act)
        engines = {name: OnnxRuntimeEngine(path) for name, path in paths.items()}
        x = np.random.default_rng(0).standard_normal((16, 3, size, size)).astype(np.float32)
        reference = engines["fp32"].run(x)
        best = dict.fromkeys(engines, float("inf"))
        for engine in engines.values():
            engine.run(x)
        for _ in range(5):  # interleaved, so that a change in the machine's load touches every variant alike
            for name, engine in engines.items():
                t = time.perf_counter()
                engine.run(x)
                best[name] = min(best[name], time.perf_counter() - t)
        for name, engine in engines.items():
            err = max(float(np.abs(o - r).max() / (np.abs(r).max() + 1e-12)) for o, r in zip(engine.run(x), reference))
            print(f"{name:24s} {1000 * best[name] / len(x):6.2f} ms/img  speed-up {best['fp32'] / best[name]:.2f}  "
                  f"largest relative difference {err:.3f}")


if __name__ == "__main__":
    main()
