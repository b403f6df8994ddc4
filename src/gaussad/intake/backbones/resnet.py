"""ResNet backbones (ResNet-18/34/50/101, WideResNet-50-2) from a local weights file in torchvision's layout.

This module only registers them (no torch); the networks are in :mod:`.resnet_net`. No ResNet weights are
bundled: the user passes torchvision's own ImageNet file (e.g. ``resnet18-f37072fd.pth``,
``wide_resnet50_2-95faca4d.pth``) or any state dict with the same keys, as ``.pth`` or ``.safetensors``.

Levels (5), as the paper's ResNet variant, each global-average-pooled for the Gaussians:

* ``stem``: after conv1 -> bn1 -> relu, *before* the max-pool (stride 2, 64 channels). The post-ReLU map is
  used, not the post-max-pool one, so that the stem is the full-resolution output of the first conv block,
  as the EfficientNet stem is (conv -> bn -> swish); the max-pool belongs to layer1's input.
* ``layer1`` .. ``layer4``: the output of each residual block group (strides 4, 8, 16, 32; channels
  64/128/256/512 for ResNet-18/34, 256/512/1024/2048 for the Bottleneck networks).

The recommended anomaly-map levels are layer2 and layer3, PatchCore's choice.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

from .registry import BackboneSpec, register

if TYPE_CHECKING:
    from .resnet_net import ResNet

LEVEL_NAMES = ("stem", "layer1", "layer2", "layer3", "layer4")
MAP_LEVELS = ("layer2", "layer3")
NAMES = ("resnet18", "resnet34", "resnet50", "resnet101", "wide_resnet50_2")

_TITLES = {"resnet18": "ResNet-18", "resnet34": "ResNet-34", "resnet50": "ResNet-50", "resnet101": "ResNet-101",
           "wide_resnet50_2": "WideResNet-50-2"}


def _make(name: str):
    def factory(input_size: int, weights: str | os.PathLike | None = None) -> "ResNet":
        from .resnet_net import build

        return build(name, weights)

    return factory


for _name in NAMES:
    register(BackboneSpec(_name, _make(_name), 224, LEVEL_NAMES, True,
                          f"{_TITLES[_name]} (torchvision layout), local weights file required",
                          map_levels=MAP_LEVELS))
