"""Anomaly maps: location vectors of feature maps (optionally averaged over small neighbourhoods), scored per
level by a Gaussian shared by all positions (Mahalanobis distance) or by a memory bank (:mod:`gaussad.core.bank`);
levels are upsampled and averaged into one map per image (drawn over the image by :mod:`gaussad.detector.heatmap`)."""

from __future__ import annotations

from functools import lru_cache
from typing import Iterator, Sequence

import numpy as np
from PIL import Image

from .gaussian import LevelGaussian, MomentStats

def patch_vectors(fmap: np.ndarray, dtype: type = np.float64) -> np.ndarray:
    """(B, C, H, W) feature maps -> (B*H*W, C) vectors, one per location (row-major over B, H, W)."""
    b, c, h, w = fmap.shape
    return np.ascontiguousarray(fmap.transpose(0, 2, 3, 1).reshape(-1, c), dtype=dtype)


@lru_cache(maxsize=256)
def _box(n: int, size: int) -> np.ndarray:
    """(n, n) matrix averaging each position's ``size`` neighbours along one axis, over those inside 0..n-1
    (cached, read-only: every batch of one shape uses the same)."""
    r = size // 2
    idx = np.arange(n)
    m = (np.abs(idx[:, None] - idx[None]) <= r).astype(np.float32)
    m /= m.sum(axis=1, keepdims=True)
    m.flags.writeable = False
    return m


def _separable(fmap: np.ndarray, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
    """``rows @ f @ cols.T`` for every (B, C) slice of (B, C, H, W) maps: one separable linear resampling."""
    return np.einsum("oh,bchw,pw->bcop", rows, np.asarray(fmap, dtype=np.float32), cols, optimize=True)


def local_mean(fmap: np.ndarray, size: int) -> np.ndarray:
    """Mean of each location's ``size`` x ``size`` neighbourhood in (B, C, H, W) maps, over the positions inside
    the map (so border locations average fewer neighbours); ``size`` 1 returns the maps unchanged."""
    if size == 1:
        return fmap
    return _separable(fmap, _box(fmap.shape[2], size), _box(fmap.shape[3], size))


# Images per run of :func:`shape_groups`: every run is stacked and then resampled, scored and copied a few times, so
# the memory of scoring maps given per image grows with the run, not with the images (evaluate, tune).
GROUP = 32


def shape_groups(per_image: Sequence[Sequence[np.ndarray]], most: int | None = None
                 ) -> Iterator[tuple[np.ndarray, list[np.ndarray]]]:
    """Runs of at most ``most`` (default :data:`GROUP`) consecutive images whose per-level (C, H, W) maps have equal
    shapes, as (image indices, per-level (b, C, H, W) stacks)."""
    most = most or GROUP
    start = 0
    for end in range(1, len(per_image) + 1):
        if (end == len(per_image) or end - start == most
                or [f.shape for f in per_image[end]] != [f.shape for f in per_image[start]]):
            yield np.arange(start, end), [np.stack(level) for level in zip(*per_image[start:end])]
            start = end


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

def resize_bilinear(img: Image.Image, width: int, height: int) -> Image.Image:
    """Resize bilinearly at pixel centres without antialiasing (any PIL mode, float maps included).

    This is cv2.INTER_LINEAR (within one grey level), the interpolation of the paper's own code
    (albumentations ``Resize``).
    """
    w, h = img.size
    if (w, h) == (width, height):
        return img
    return img.transform((width, height), Image.AFFINE, (w / width, 0, 0, 0, h / height, 0), resample=Image.BILINEAR)


def upsample(m: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Bilinear resize of one 2-D map to (width, height), sampled at pixel centres."""
    img = Image.fromarray(np.ascontiguousarray(m, dtype=np.float32), mode="F")
    return np.asarray(resize_bilinear(img, *size), dtype=np.float32)


def combine(per_level: Sequence[np.ndarray], size: int) -> np.ndarray:
    """Mean over levels of the maps upsampled to size x size: (B, size, size) float32. Levels on one grid are
    averaged before upsampling, which gives the same result (bilinear interpolation is linear) at less cost."""
    if len({m.shape for m in per_level}) == 1:
        per_level = [np.mean(per_level, axis=0)]
    b = per_level[0].shape[0]
    return np.stack([
        np.mean([upsample(level[i], (size, size)) for level in per_level], axis=0) for i in range(b)
    ]).astype(np.float32)


@lru_cache(maxsize=256)
def _bins(n_in: int, n_out: int) -> np.ndarray:
    """(n_out, n_in) averaging matrix of adaptive average pooling: output i averages inputs
    floor(i * n_in / n_out) .. ceil((i + 1) * n_in / n_out) - 1 (cached, read-only)."""
    m = np.zeros((n_out, n_in), dtype=np.float32)
    for i in range(n_out):
        lo, hi = (i * n_in) // n_out, -((-(i + 1) * n_in) // n_out)
        m[i, lo:hi] = 1.0 / (hi - lo)
    m.flags.writeable = False
    return m


def to_grid(fmaps: Sequence[np.ndarray], size: int = 1) -> list[np.ndarray]:
    """Average (B, C, H, W) maps over ``size`` x ``size`` neighbourhoods (as :func:`local_mean`), then down to the
    grid of the coarsest one (adaptive average pooling; 2 x 2 blocks for a stride-16 level under a stride-32 one),
    so every level has one vector per cell of that grid; both steps are applied as one separable product."""
    h = min(f.shape[2] for f in fmaps)
    w = min(f.shape[3] for f in fmaps)
    out = []
    for f in fmaps:
        if f.shape[2:] == (h, w):
            out.append(local_mean(f, size))
            continue
        rows, cols = _bins(f.shape[2], h), _bins(f.shape[3], w)
        if size > 1:
            rows, cols = rows @ _box(f.shape[2], size), cols @ _box(f.shape[3], size)
        out.append(_separable(f, rows, cols))
    return out


@lru_cache(maxsize=256)
def _linear(n_in: int, n_out: int) -> np.ndarray:
    """(n_out, n_in) matrix of bilinear upsampling along one axis, sampled at pixel centres with the edges clamped
    (as :func:`upsample`; cached, read-only)."""
    x = np.clip((np.arange(n_out) + 0.5) * n_in / n_out - 0.5, 0.0, n_in - 1.0)
    lo = np.floor(x).astype(int)
    hi = np.minimum(lo + 1, n_in - 1)
    t = (x - lo).astype(np.float32)
    m = np.zeros((n_out, n_in), dtype=np.float32)
    np.add.at(m, (np.arange(n_out), lo), 1.0 - t)
    np.add.at(m, (np.arange(n_out), hi), t)
    m.flags.writeable = False
    return m


def to_finest(fmaps: Sequence[np.ndarray], size: int = 1) -> list[np.ndarray]:
    """PatchCore's recipe: average (B, C, H, W) maps over ``size`` x ``size`` neighbourhoods at their own
    resolution, upsample them bilinearly to the grid of the finest one and concatenate the channels: one
    (B, sum C, H, W) map, one vector per cell of the finest grid."""
    h = max(f.shape[2] for f in fmaps)
    w = max(f.shape[3] for f in fmaps)
    out = []
    for f in fmaps:
        rows, cols = _box(f.shape[2], size), _box(f.shape[3], size)
        if f.shape[2:] != (h, w):
            rows, cols = _linear(f.shape[2], h) @ rows, _linear(f.shape[3], w) @ cols
        out.append(_separable(f, rows, cols) if size > 1 or f.shape[2:] != (h, w) else np.asarray(f, np.float32))
    return [np.concatenate(out, axis=1)]
