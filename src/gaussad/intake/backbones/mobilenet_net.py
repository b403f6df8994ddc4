"""MobileNetV2 (torch) in torchvision's exact layout, so that torchvision's ImageNet file loads strictly.

Module names follow ``torchvision.models.mobilenetv2``: ``features.0`` the stem (conv, BN, ReLU6),
``features.1``..``features.17`` the inverted-residual blocks (``conv.0`` expansion, ``conv.1`` depthwise,
``conv.2`` projection and ``conv.3`` its BN; the first block has no expansion), ``features.18`` the 1x1 head conv to
1280 channels, ``classifier.1`` the linear layer (``classifier.0`` is dropout), so the state-dict keys are identical.
"""

from __future__ import annotations

import os
from typing import Sequence

import torch
from torch import nn

from .base import Backbone, load_with_head

# torchvision's inverted-residual setting: (expansion t, output channels c, blocks n, first stride s) per stage.
STAGES = ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1))
STEM_CHANNELS = 32
HEAD_CHANNELS = 1280


class ConvBNReLU(nn.Sequential):
    """conv (no bias), BN, ReLU6: torchvision's ``Conv2dNormActivation`` with its children numbered 0, 1, 2."""

    def __init__(self, cin: int, cout: int, kernel_size: int = 3, stride: int = 1, groups: int = 1):
        super().__init__(nn.Conv2d(cin, cout, kernel_size, stride, (kernel_size - 1) // 2, groups=groups, bias=False),
                         nn.BatchNorm2d(cout), nn.ReLU6(inplace=True))


class InvertedResidual(nn.Module):
    """Expand (1x1), depthwise 3x3, project (1x1, linear); a skip connection where shape allows."""

    def __init__(self, cin: int, cout: int, stride: int, expand_ratio: int):
        super().__init__()
        hidden = int(round(cin * expand_ratio))
        self.use_res_connect = stride == 1 and cin == cout
        layers: list[nn.Module] = [ConvBNReLU(cin, hidden, kernel_size=1)] if expand_ratio != 1 else []
        layers += [ConvBNReLU(hidden, hidden, stride=stride, groups=hidden),
                   nn.Conv2d(hidden, cout, 1, 1, 0, bias=False), nn.BatchNorm2d(cout)]
        self.conv = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv(x) if self.use_res_connect else self.conv(x)


class MobileNetV2(Backbone):
    """torchvision's MobileNetV2 (width 1.0) exposing 9 levels: the stem, the end of each of the 7 stages, the head."""

    level_names = ("stem", "stage1", "stage2", "stage3", "stage4", "stage5", "stage6", "stage7", "head")

    def __init__(self, num_classes: int = 1000):
        super().__init__()
        features: list[nn.Module] = [ConvBNReLU(3, STEM_CHANNELS, stride=2)]
        cin = STEM_CHANNELS
        ends = [0]  # index in ``features`` of each level's module
        for t, c, n, s in STAGES:
            for i in range(n):
                features.append(InvertedResidual(cin, c, s if i == 0 else 1, t))
                cin = c
            ends.append(len(features) - 1)
        features.append(ConvBNReLU(cin, HEAD_CHANNELS, kernel_size=1))
        ends.append(len(features) - 1)
        self.features = nn.Sequential(*features)
        self.classifier = nn.Sequential(nn.Dropout(0.2), nn.Linear(HEAD_CHANNELS, num_classes))
        self.level_ends = tuple(ends)
        self.level_channels = (STEM_CHANNELS,) + tuple(c for _, c, _, _ in STAGES) + (HEAD_CHANNELS,)
        for m in self.modules():  # torchvision's initialisation, so that a random network gives sane features
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0, 0.01)
                nn.init.zeros_(m.bias)

    def forward_levels(self, x: torch.Tensor, levels: Sequence[int], start: int = 0) -> list[torch.Tensor]:
        wanted = {self.level_ends[i] for i in levels}
        deepest = self.level_ends[max(levels)]
        first = self.level_ends[start - 1] + 1 if start else 0
        out = []
        for i in range(first, deepest + 1):
            x = self.features[i](x)
            if i in wanted:
                out.append(x)
        return out

    def tail_modules(self, start: int) -> list[nn.Module]:
        return list(self.features)[self.level_ends[start - 1] + 1 if start else 0:]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """ImageNet logits, as torchvision's ``MobileNetV2.forward``."""
        x = self.forward_levels(x, [len(self.level_ends) - 1])[0]
        return self.classifier(torch.flatten(x.mean(dim=(2, 3)), 1))


def build(weights: str | os.PathLike | None) -> MobileNetV2:
    """MobileNetV2 loaded strictly from a weights file in torchvision's layout (random without one); the classifier's
    ``classifier.1.`` keys only where they fit, as for the ResNets (torchvision's own file has them)."""
    net = MobileNetV2()
    if weights is not None:
        load_with_head(net, weights, "mobilenet_v2", "classifier.")
    return net
