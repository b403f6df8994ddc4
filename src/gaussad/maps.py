"""Anomaly maps: location vectors of feature maps (optionally averaged over small neighbourhoods), scored per
level by a Gaussian shared by all positions (Mahalanobis distance) or by a memory bank (:mod:`gaussad.bank`);
levels are upsampled and averaged into one map per image."""

from __future__ import annotations

from typing import Sequence

import numpy as np
from PIL import Image

from .gaussian import LevelGaussian, MomentStats

# Five stops of a dark-blue -> red -> yellow ramp for heat-map overlays.
_STOPS = np.array([[0, 0, 64], [0, 96, 192], [64, 192, 96], [240, 160, 0], [255, 255, 160]], dtype=np.float64)


def patch_vectors(fmap: np.ndarray, dtype: type = np.float64) -> np.ndarray:
    """(B, C, H, W) feature maps -> (B*H*W, C) vectors, one per location (row-major over B, H, W)."""
    b, c, h, w = fmap.shape
    return np.ascontiguousarray(fmap.transpose(0, 2, 3, 1).reshape(-1, c), dtype=dtype)


def local_mean(fmap: np.ndarray, size: int) -> np.ndarray:
    """Mean of each location's ``size`` x ``size`` neighbourhood in (B, C, H, W) maps, over the positions inside
    the map (so border locations average fewer neighbours); ``size`` 1 returns the maps unchanged."""
    if size == 1:
        return fmap
    r = size // 2
    b, c, h, w = fmap.shape
    padded = np.zeros((b, c, h + 2 * r, w + 2 * r), dtype=np.float32)
    padded[:, :, r:r + h, r:r + w] = fmap
    ones = np.zeros((h + 2 * r, w + 2 * r), dtype=np.float32)
    ones[r:r + h, r:r + w] = 1.0
    total = np.zeros((b, c, h, w), dtype=np.float32)
    count = np.zeros((h, w), dtype=np.float32)
    for dy in range(size):
        for dx in range(size):
            total += padded[:, :, dy:dy + h, dx:dx + w]
            count += ones[dy:dy + h, dx:dx + w]
    return total / count


def accumulate(stats: list[MomentStats] | None, fmaps: Sequence[np.ndarray]) -> list[MomentStats]:
    """Fold the location vectors of a batch of feature maps into per-level moment statistics."""
    vectors = [patch_vectors(f) for f in fmaps]
    if stats is None:
        return [MomentStats.from_array(v) for v in vectors]
    return [s.update(v) for s, v in zip(stats, vectors)]


def level_maps(gaussians: Sequence[LevelGaussian], fmaps: Sequence[np.ndarray]) -> list[np.ndarray]:
    """Per level (B, H_l, W_l) distance maps divided by sqrt(dof), so every level is on a chi-like unit scale."""
    out = []
    for g, f in zip(gaussians, fmaps):
        b, _, h, w = f.shape
        out.append((g.distances(patch_vectors(f)) / np.sqrt(g.dof)).reshape(b, h, w).astype(np.float32))
    return out


def upsample(m: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Bilinear resize of one 2-D map to (width, height), sampled at pixel centres."""
    h, w = m.shape
    img = Image.fromarray(np.ascontiguousarray(m, dtype=np.float32), mode="F")
    out = img.transform(size, Image.AFFINE, (w / size[0], 0, 0, 0, h / size[1], 0), resample=Image.BILINEAR)
    return np.asarray(out, dtype=np.float32)


def combine(per_level: Sequence[np.ndarray], size: int) -> np.ndarray:
    """Mean over levels of the maps upsampled to size x size: (B, size, size) float32."""
    b = per_level[0].shape[0]
    return np.stack([
        np.mean([upsample(level[i], (size, size)) for level in per_level], axis=0) for i in range(b)
    ]).astype(np.float32)


def heat_colors(values: np.ndarray) -> np.ndarray:
    """Map values in [0, 1] to uint8 RGB along the heat ramp."""
    v = np.clip(values, 0.0, 1.0) * (len(_STOPS) - 1)
    lo = np.floor(v).astype(int).clip(0, len(_STOPS) - 2)
    t = (v - lo)[..., None]
    return ((1 - t) * _STOPS[lo] + t * _STOPS[lo + 1]).astype(np.uint8)


def overlay(image: Image.Image, amap: np.ndarray, vmin: float = 1.0, vmax: float = 4.0,
            alpha: float = 0.5) -> Image.Image:
    """Blend a heat map over the image at its own size; values <= vmin are transparent-ish, >= vmax hottest."""
    rgb = image.convert("RGB")
    m = upsample(amap, rgb.size)
    scaled = (m - vmin) / max(vmax - vmin, 1e-12)
    heat = heat_colors(scaled).astype(np.float64)
    weight = alpha * np.clip(scaled, 0.15, 1.0)[..., None]
    base = np.asarray(rgb, dtype=np.float64)
    return Image.fromarray((base * (1 - weight) + heat * weight).round().astype(np.uint8))
