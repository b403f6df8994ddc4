"""Intake: from files to features. Image decoding and limits, the backbones (created by name from one registry),
the inference engines (torch, ONNX Runtime, OpenVINO) and the feature extractor with its tiles.

The choices it implements are declared here, where the code that implements them lives, and the parameter table
(:mod:`gaussad.detector.params`) offers them; this package imports no numpy, torch or submodule, so the table stays light to import.
"""

from typing import Any, Mapping

from ..errors import InvalidParameterError

NORMALIZATIONS = ("imagenet", "native")
RESIZES = ("square", "aspect")
POOLS = ("avg", "avg+std")
# keep: the pixels as decoded; match: each resized image scaled so that its mean grey level is MATCH_GREY, so that a
# photo's overall brightness (lighting that drifts between shots) does not move its features (issue 33, EXPERIMENTS.md
# "Issue 33: matching brightness before the network").
BRIGHTNESS = ("keep", "match")
# The grey level of ImageNet's mean colour (0.485, 0.456, 0.406) * 255 under ITU-R 601 luma: a target known without
# data (within 0.003 AUROC of the training images' median on both shared sets' synthetic defects).
MATCH_GREY = 117.0
# ITU-R 601 luma weights of R, G, B: the grey PIL's convert('L') computes.
LUMA = (0.299, 0.587, 0.114)
# When adaptation (adapt > 0 epochs, gaussad.intake.adapt) stops: at the epoch whose held-out goods and pasted defects
# rank best (the authors' validation against forgetting; the pretrained network where no epoch beats it), or after
# the last epoch.
ADAPT_STOPS = ("validation", "last")
MAX_ADAPT_EPOCHS = 50
ENGINES = ("auto", "onnxruntime", "openvino", "torch")
DECODERS = ("auto", "pil")
PRECISIONS = ("fp32", "int8")
# input_size='auto' takes about this many times the backbone's native size (a multiple of 32: 384 px for a native 224)
# where the median training image is at least that large: at 384 px the fused score gained 0.02-0.07 image AUROC on
# outside sets of 512-1131 px images and nothing on ~300 px ones (issue 30; EXPERIMENTS.md, "Input size by image size").
AUTO_LARGE_INPUT = 1.7
# The most tiles a side that map_tiles='auto' picks (tiles.auto_tiles): at 3 the recommended preset scored bottle at
# 0.17x the paper preset's throughput, at 2 at 0.36x (BENCHMARKS.md, "Tiled maps"); issue 14 asks for >= 0.25x.
AUTO_MAX_TILES = 2
# PIL's own hard limit (2 * Image.MAX_IMAGE_PIXELS): 178,956,970 pixels, about 537 MB as 8-bit RGB.
DEFAULT_MAX_PIXELS = 2 * (1024 * 1024 * 1024 // 4 // 3)


def check_precision(params: Mapping[str, Any]) -> None:
    """An int8 network is an ONNX graph quantized from the backbone: refuse the settings it cannot work with, naming
    both (engine 'auto' resolves to onnxruntime or openvino, or fails there when neither is installed)."""
    if params.get("precision", "fp32") != "int8":
        return
    if params.get("engine", "auto") == "torch":
        raise InvalidParameterError("precision='int8' runs a quantized ONNX graph, engine='torch' cannot run it: use "
                                    "engine='onnxruntime', 'openvino' (or 'auto') or precision='fp32'")
    if "backbone" in params and params["backbone"] is None:
        raise InvalidParameterError("precision='int8' quantizes the backbone, backbone=None has none: use "
                                    "precision='fp32'")
