"""ResNet networks (torch) in torchvision's exact layout, so that torchvision's weights files load strictly.

Module and attribute names follow ``torchvision.models.resnet`` (conv1, bn1, relu, maxpool, layer1..layer4 of
BasicBlock/Bottleneck blocks with conv1/bn1/conv2/bn2[/conv3/bn3] and downsample.0/.1, avgpool, fc), so the
state-dict keys are identical; the stride sits on the 3x3 conv of a Bottleneck (torchvision's "v1.5").
"""

from __future__ import annotations

import os
from typing import Sequence

import torch
from torch import nn

from ...errors import GaussadError
from .base import Backbone, load_with_head


def _conv3x3(cin: int, cout: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)


def _conv1x1(cin: int, cout: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, 1, stride=stride, bias=False)


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None,
                 base_width: int = 64):
        super().__init__()
        self.conv1 = _conv3x3(inplanes, planes, stride)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = _conv3x3(planes, planes)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None,
                 base_width: int = 64):
        super().__init__()
        width = int(planes * (base_width / 64.0))
        self.conv1 = _conv1x1(inplanes, width)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = _conv3x3(width, width, stride)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = _conv1x1(width, planes * self.expansion)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)


# name -> (block, blocks per group, width per group)
CONFIGS: dict[str, tuple[type, tuple[int, int, int, int], int]] = {
    "resnet18": (BasicBlock, (2, 2, 2, 2), 64),
    "resnet34": (BasicBlock, (3, 4, 6, 3), 64),
    "resnet50": (Bottleneck, (3, 4, 6, 3), 64),
    "resnet101": (Bottleneck, (3, 4, 23, 3), 64),
    "wide_resnet50_2": (Bottleneck, (3, 4, 6, 3), 128),
}


class ResNet(Backbone):
    """A torchvision-layout ResNet exposing 5 levels: the stem (post-ReLU, before the max-pool) and layer1..4."""

    level_names = ("stem", "layer1", "layer2", "layer3", "layer4")  # the registry entry lists the same (tested)

    def __init__(self, block: type, layers: Sequence[int], width_per_group: int = 64, num_classes: int = 1000):
        super().__init__()
        self.inplanes = 64
        self.base_width = width_per_group
        self.conv1 = nn.Conv2d(3, 64, 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        self.layer1 = self._make_layer(block, 64, layers[0])
        self.layer2 = self._make_layer(block, 128, layers[1], stride=2)
        self.layer3 = self._make_layer(block, 256, layers[2], stride=2)
        self.layer4 = self._make_layer(block, 512, layers[3], stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(512 * block.expansion, num_classes)
        self.level_channels = (64,) + tuple(p * block.expansion for p in (64, 128, 256, 512))
        for m in self.modules():  # torchvision's initialisation, so that random networks give sane features
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.constant_(m.weight, 1)
                nn.init.constant_(m.bias, 0)

    def _make_layer(self, block: type, planes: int, blocks: int, stride: int = 1) -> nn.Sequential:
        downsample = None
        if stride != 1 or self.inplanes != planes * block.expansion:
            downsample = nn.Sequential(_conv1x1(self.inplanes, planes * block.expansion, stride),
                                       nn.BatchNorm2d(planes * block.expansion))
        layers = [block(self.inplanes, planes, stride, downsample, self.base_width)]
        self.inplanes = planes * block.expansion
        layers += [block(self.inplanes, planes, base_width=self.base_width) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def forward_levels(self, x: torch.Tensor, levels: Sequence[int], start: int = 0) -> list[torch.Tensor]:
        wanted = set(levels)
        deepest = max(levels)
        out = []
        if start == 0:
            x = self.relu(self.bn1(self.conv1(x)))
            out = [x] if 0 in wanted else []
            if deepest == 0:
                return out
        if start <= 1:
            x = self.maxpool(x)
        for level, layer in enumerate(self._layers()[max(start, 1) - 1:], start=max(start, 1)):
            x = layer(x)
            if level in wanted:
                out.append(x)
            if level == deepest:
                break
        return out

    def _layers(self) -> tuple[nn.Module, ...]:
        return (self.layer1, self.layer2, self.layer3, self.layer4)

    def tail_modules(self, start: int) -> list[nn.Module]:
        return ([self.conv1, self.bn1] if start == 0 else []) + list(self._layers()[max(start, 1) - 1:])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """ImageNet logits, as torchvision's ``ResNet.forward``."""
        x = self.forward_levels(x, [4])[0]
        return self.fc(torch.flatten(self.avgpool(x), 1))


def create(name: str) -> ResNet:
    """A randomly initialised ``name`` network (torchvision's initialisation), keys as torchvision's."""
    try:
        block, layers, width = CONFIGS[name]
    except KeyError:
        raise GaussadError(f"unknown ResNet {name!r}; choose one of: {', '.join(CONFIGS)}") from None
    return ResNet(block, layers, width)


def build(name: str, weights: str | os.PathLike | None) -> ResNet:
    """``name`` loaded strictly from a local weights file, the classifier's ``fc.`` keys only where they fit."""
    net = create(name)
    if weights is not None:
        load_with_head(net, weights, name, "fc.")
    return net
