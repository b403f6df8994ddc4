"""The backbone registry itself (as timm's ``_registry``): :class:`BackboneSpec`, :func:`register` and the lookups.

Its own module so that the family modules, which register their networks here, and the package, which imports the
family modules, import nothing from each other in a circle. No torch is imported here.
"""


from __future__ import annotations

import numbers
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Sequence

from ...errors import GaussadError

if TYPE_CHECKING:
    from .base import Backbone


@dataclass
class BackboneSpec:
    """What the registry knows about a backbone before it is built."""

    name: str
    factory: Callable[..., "Backbone"]
    input_size: int
    level_names: tuple[str, ...]
    needs_weights_file: bool = False
    description: str = ""
    native_normalization: tuple = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    bundled_weights: Callable[[], Path] | None = None
    # The backbone's recommended levels for the nearest-neighbour anomaly maps (names from ``level_names``).
    map_levels: tuple[str, ...] = ()
    # The backbone's recommended pooling of the global features (``pool``): "avg+std" only where the map levels'
    # spread was measured to help (synthetic defects) without the chi2 rule flagging more held-out good images
    # (EXPERIMENTS.md, "Spread pooling"); the paper's "avg" elsewhere.
    pool: str = "avg"


_REGISTRY: dict[str, BackboneSpec] = {}


def register(spec: BackboneSpec) -> BackboneSpec:
    """Add a backbone to the registry under ``spec.name``."""
    _REGISTRY[spec.name] = spec
    return spec


def list_backbones() -> list[str]:
    """Names of every registered backbone."""
    return sorted(_REGISTRY)


def get_spec(name: str) -> BackboneSpec:
    """The registry entry for ``name``; a clear error lists the valid names."""
    try:
        return _REGISTRY[name]
    except KeyError:
        raise GaussadError(f"unknown backbone {name!r}; choose one of: {', '.join(list_backbones())}") from None


def create_backbone(name: str, input_size: int | None = None, weights: str | os.PathLike | None = None) -> "Backbone":
    """Build a backbone by name, in eval mode with gradients off."""
    spec = get_spec(name)
    if spec.needs_weights_file and weights is None:
        raise GaussadError(f"backbone {name!r} has no bundled weights: pass a local weights file (--weights PATH)")
    model = spec.factory(input_size=input_size or spec.input_size, weights=weights)
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def weights_file(name: str, weights: str | os.PathLike | None = None) -> Path | None:
    """The weights file a backbone is built from: the user's file, else the bundled one (None if neither)."""
    if weights is not None:
        return Path(weights)
    spec = get_spec(name)
    return spec.bundled_weights() if spec.bundled_weights is not None else None


def resolve_levels(spec_levels: Sequence[str], levels: Sequence[int | str] | None) -> list[int]:
    """Turn level names or indices into sorted unique indices; ``None`` means all levels."""
    if levels is None:
        return list(range(len(spec_levels)))
    if isinstance(levels, (str, numbers.Integral)):
        levels = [levels]  # one level
    out = set()
    for level in levels:
        if isinstance(level, str) and level.strip().lstrip("-").isdigit():
            level = int(level)
        if isinstance(level, numbers.Integral) and not isinstance(level, bool):
            level = int(level)
            if not 0 <= level < len(spec_levels):
                raise GaussadError(f"level {level} out of range 0..{len(spec_levels) - 1}")
            out.add(level)
        elif level in spec_levels:
            out.add(spec_levels.index(level))
        else:
            raise GaussadError(f"unknown level {level!r}; levels are {', '.join(spec_levels)} (or 0..{len(spec_levels) - 1})")
    if not out:
        raise GaussadError("at least one level must be selected")
    return sorted(out)
