"""EfficientNet networks (torch): the lukemelas layout wrapped to expose the paper's 9 levels."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import torch
from torch import nn

from ...errors import GaussadError
from .base import Backbone, load_strict, read_state_dict


class EfficientNetBackbone(Backbone):
    """Wraps an EfficientNet (lukemelas layout) and exposes its 9 paper levels."""

    def __init__(self, net: nn.Module, level_names: Sequence[str]):
        super().__init__()
        self.net = net
        self.level_names = tuple(level_names)
        blocks = list(net._blocks)
        starts = [i for i, b in enumerate(blocks) if b._block_args.input_filters != b._block_args.output_filters]
        if len(starts) != 7 or starts[0] != 0:
            raise GaussadError(f"unexpected EfficientNet layout: {len(starts)} stages")
        self.stage_ends = tuple(s - 1 for s in starts[1:]) + (len(blocks) - 1,)
        self.level_channels = (
            (net._conv_stem.out_channels,)
            + tuple(blocks[e]._block_args.output_filters for e in self.stage_ends)
            + (net._conv_head.out_channels,)
        )

    def _first_block(self, level: int) -> int:
        """Index of the first block of stage ``level`` (1-7)."""
        return 0 if level == 1 else self.stage_ends[level - 2] + 1

    def forward_levels(self, x: torch.Tensor, levels: Sequence[int], start: int = 0) -> list[torch.Tensor]:
        net = self.net
        wanted = set(levels)
        deepest = max(levels)
        out: list[torch.Tensor] = []
        if start == 0:
            x = net._swish(net._bn0(net._conv_stem(x)))
            if 0 in wanted:
                out.append(x)
            if deepest == 0:
                return out
        level = max(start, 1)
        for i in range(self._first_block(level) if level < 8 else len(net._blocks), len(net._blocks)):
            x = net._blocks[i](x)
            if i == self.stage_ends[level - 1]:
                if level in wanted:
                    out.append(x)
                if level == deepest:
                    return out
                level += 1
        x = net._swish(net._bn1(net._conv_head(x)))
        out.append(x)
        return out

    def tail_modules(self, start: int) -> list[nn.Module]:
        net = self.net
        head = [net._conv_head, net._bn1]
        return head if start >= 8 else list(net._blocks)[self._first_block(max(start, 1)):] + head


def _load_into(net: nn.Module, weights: str | os.PathLike) -> None:
    """Load backbone weights strictly, ignoring only the classifier; mismatches give one clear error."""
    load_strict(net, read_state_dict(weights), str(weights), "EfficientNet", ignore=("_fc.",))


def build_lite(name: str, input_size: int, weights: Path, level_names: Sequence[str]) -> EfficientNetBackbone:
    """EfficientNet-Lite ``name`` (efficientnet_lite_pytorch) loaded from ``weights``."""
    from efficientnet_lite_pytorch import EfficientNet

    net = EfficientNet.from_name(name, image_size=input_size)
    _load_into(net, weights)
    return EfficientNetBackbone(net, level_names)


def build_b(name: str, input_size: int, weights: str | os.PathLike, level_names: Sequence[str]) -> EfficientNetBackbone:
    """EfficientNet-B ``name`` (efficientnet_pytorch) loaded from ``weights``."""
    from efficientnet_pytorch import EfficientNet

    net = EfficientNet.from_name(name, image_size=input_size)
    net.set_swish(memory_efficient=False)
    _load_into(net, weights)
    return EfficientNetBackbone(net, level_names)
