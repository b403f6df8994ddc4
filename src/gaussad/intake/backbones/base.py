"""What every backbone network shares (torch): the level-returning module base and code-free weight loading."""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Sequence

import torch
from torch import nn

from ...errors import GaussadError


class Backbone(nn.Module):
    """A frozen network that returns the feature maps of the requested levels, shallowest first."""

    level_names: tuple[str, ...] = ()
    level_channels: tuple[int, ...] = ()

    def forward_levels(self, x: torch.Tensor, levels: Sequence[int], start: int = 0) -> list[torch.Tensor]:
        """Feature maps (B, C, H, W) for the given sorted level indices; stops after the deepest one. With ``start``
        > 0, ``x`` is the feature map of level ``start - 1`` and only the levels from ``start`` on are computed (the
        part that adaptation trains, :mod:`gaussad.intake.adapt`, run from its cached input)."""
        raise NotImplementedError

    def tail_modules(self, start: int) -> list[nn.Module]:
        """The modules that compute level ``start`` and the deeper ones from level ``start - 1``'s map: the part of the
        network that adaptation trains."""
        raise NotImplementedError


class PooledLevels(nn.Module):
    """Backbone plus global average pooling of each chosen level: (B,3,S,S) -> tuple of (B, C_l).

    Levels in ``spread_levels`` also pool the spread of each channel over the map, after its average: (B, 2 C_l);
    the spread is the square root of the standard deviation, which a Gaussian fits better (the standard deviation
    itself has heavy tails: the chi2 threshold flagged 3-4 times the held-out good images, EXPERIMENTS.md). With
    ``map_levels`` the spatial feature maps (B, C, H, W) of those levels follow the pooled vectors in the output
    tuple, from the same forward pass.
    """

    def __init__(self, backbone: Backbone, levels: Sequence[int], map_levels: Sequence[int] = (),
                 spread_levels: Sequence[int] = ()):
        super().__init__()
        self.backbone = backbone
        self.levels = list(levels)
        self.map_levels = list(map_levels)
        self.spread_levels = set(spread_levels)
        self._all = sorted(set(self.levels) | set(self.map_levels))

    def _pool(self, fmap: torch.Tensor, spread: bool) -> torch.Tensor:
        # Means over the map as means of row means: each float32 sum then has at most max(H, W) terms. ONNX Runtime's
        # one-step mean of a 192 x 192 stem map (384 px input) was 1.8e-5 of its scale off the exact mean, which the
        # stem's Gaussian amplified to 5e-3 relative in its distances; two steps, 6e-7 (BENCHMARKS.md, "OpenVINO
        # against ONNX Runtime"). torch and OpenVINO were within 1.4e-6 either way.
        mean = fmap.mean(dim=3).mean(dim=2)
        if not spread:
            return mean
        std = (fmap - mean[:, :, None, None]).square().mean(dim=3).mean(dim=2).sqrt()
        return torch.cat([mean, std.sqrt()], dim=1)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        by_level = dict(zip(self._all, self.backbone.forward_levels(x, self._all)))
        pooled = tuple(self._pool(by_level[i], i in self.spread_levels) for i in self.levels)
        return pooled + tuple(by_level[i] for i in self.map_levels)

    def pooled_dims(self) -> list[int]:
        """Length of each level's pooled vector."""
        return [self.backbone.level_channels[i] * (2 if i in self.spread_levels else 1) for i in self.levels]


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
        raise GaussadError(f"{path}: cannot read weights ({_one_line(exc)})") from None
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise GaussadError(f"{path}: not a state dict of tensors")
    return state


def _one_line(exc: Exception) -> str:
    """A loader's exception as one short line: torch's multi-line weights-only refusal is cut to its cause."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(exc))
    cause = re.search(r"WeightsUnpickler error:\s*([^\n]+)", text)
    if cause:
        found = cause.group(1).strip()
        if found.startswith("Unsupported global"):  # a pickled object (class, function) other than tensors
            found = found.split(" was not an allowed global")[0]
            return (f"refused: it holds pickled objects, not only tensors ({found}); only plain state dicts load, "
                    f"with weights_only=True")
        return f"not a torch weights file ({found})"
    return f"{type(exc).__name__}: {' '.join(text.split())}"[:300]


def load_strict(net: nn.Module, state: dict[str, torch.Tensor], source: str, what: str,
                ignore: tuple[str, ...] = ()) -> None:
    """Load ``state`` into ``net`` strictly (keys starting with a prefix in ``ignore`` left out on both sides, a
    ``module.`` prefix of data-parallel checkpoints dropped); mismatches give one error naming the keys."""
    state = {k.removeprefix("module."): v for k, v in state.items()
             if not k.removeprefix("module.").startswith(ignore or ("\0",))}
    own = {k: v for k, v in net.state_dict().items() if not k.startswith(ignore or ("\0",))}
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    bad_shape = sorted(k for k in set(own) & set(state) if own[k].shape != state[k].shape)
    if missing or unexpected or bad_shape:
        detail = "; ".join(
            f"{label}: {', '.join(keys[:3])}{' ...' if len(keys) > 3 else ''}"
            for label, keys in (("missing", missing), ("unexpected", unexpected), ("wrong shape", bad_shape))
            if keys
        )
        raise GaussadError(f"{source}: weights do not fit this {what} ({detail})")
    net.load_state_dict(state, strict=False)


def load_with_head(net: nn.Module, weights: str | os.PathLike, what: str, head: str) -> None:
    """Load a torchvision-layout file into ``net`` strictly except the classifier (keys under ``head``, e.g. ``fc.``):
    features do not need it, so a file may lack it or hold another classifier; when it fits it is loaded too (for
    the ImageNet logits of ``net.forward``)."""
    state = read_state_dict(weights)
    load_strict(net, state, str(weights), what, ignore=(head,))
    module = net.get_submodule(head.rstrip("."))
    own = module.state_dict()
    found = {k: state.get(f"{head}{k}", state.get(f"module.{head}{k}")) for k in own}
    if all(v is not None and v.shape == own[k].shape for k, v in found.items()):
        module.load_state_dict(found)
