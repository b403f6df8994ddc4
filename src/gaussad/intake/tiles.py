"""Tiled anomaly maps: where overlapping tiles at the network's input size lie on a larger "map image", and the
tiles' feature maps stitched into one feature map per level (plain numpy).

With ``map_tiles=k`` the map image is the image resized to about :func:`map_side` pixels a side (k tiles of side S
along each side of a square map image); every tile runs through the network at its own native scale, and the cells
of its feature maps go to their place in the stitched map, those covered by several tiles averaged. Tiles start on
multiples of :data:`TILE_ALIGN` pixels, the backbone's largest stride, so that every level's cells of every tile
fall on the stitched map's grid.
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np

from ..errors import InvalidParameterError
from . import AUTO_MAX_TILES

TILE_ALIGN = 32  # tile starts and sides are multiples of the backbone's largest stride (images.ASPECT_STEP)
Box = tuple[int, int, int, int]  # (top, left, height, width) of a tile in the map image, in pixels


def check_tiling(size: int, tiles: int) -> None:
    """Refuse an input size that tiles cannot align on: with ``tiles`` > 1 the side S must be a multiple of 32 and
    at least 64 (so that neighbouring tiles overlap and still advance)."""
    if tiles > 1 and (size % TILE_ALIGN or size < 2 * TILE_ALIGN):
        raise InvalidParameterError(f"map_tiles={tiles} needs an input_size that is a multiple of {TILE_ALIGN} and at "
                                    f"least {2 * TILE_ALIGN} (tiles must align with every level's grid), got "
                                    f"{size}: set input_size (e.g. {max(2, round(size / TILE_ALIGN)) * TILE_ALIGN})")


def tile_step(size: int) -> int:
    """Pixels from one tile's start to the next: the side less an overlap of about a quarter of it, the overlap
    rounded to a multiple of 32 (at least 32): 160 for S = 224, 32 for S = 64."""
    overlap = TILE_ALIGN * max(1, math.floor(size / (4 * TILE_ALIGN) + 0.5))
    return size - min(overlap, size - TILE_ALIGN)


def map_side(size: int, tiles: int) -> int:
    """The side of the square map image that ``tiles`` tiles of side ``size`` cover along each side (with the
    aspect-kept resize: the side of a square of the map image's area)."""
    return size + (tiles - 1) * tile_step(size)


def auto_tiles(side: float, size: int, most: int = AUTO_MAX_TILES) -> int:
    """The tiles a side that ``map_tiles='auto'`` takes for images of about ``side`` x ``side`` pixels (the median
    geometric-mean side of the training images): the most, up to ``most``, whose map image is no larger than the
    image, so that tiles only ever add detail the image has (an upscaled map image adds none; on the small magnetic
    tile images tiling hurt the maps, on bottle's 900 px images it helped: EXPERIMENTS.md, "Tiled maps"). 1 when
    ``size`` cannot be tiled (see :func:`check_tiling`)."""
    if size % TILE_ALIGN or size < 2 * TILE_ALIGN:
        return 1
    return max([1] + [k for k in range(2, most + 1) if map_side(size, k) <= side])


def starts(length: int, size: int) -> list[int]:
    """Starts of the tiles along one side of ``length`` pixels: one tile of the whole side when it is at most
    ``size``; else as few tiles as :func:`tile_step` allows, the first at 0, the last ending at ``length``, spread
    evenly on multiples of 32 (``length`` and ``size`` multiples of 32)."""
    if length <= size:
        return [0]
    n = -(-(length - size) // tile_step(size)) + 1
    return [TILE_ALIGN * round((length - size) * i / ((n - 1) * TILE_ALIGN)) for i in range(n)]


def tile_boxes(height: int, width: int, size: int) -> list[Box]:
    """Every tile of a map image of ``height`` x ``width`` pixels, row by row: all of one shape, at most
    ``size`` x ``size``, together covering the image."""
    h, w = min(height, size), min(width, size)
    return [(top, left, h, w) for top in starts(height, size) for left in starts(width, size)]


def cut(image: np.ndarray, box: Box) -> np.ndarray:
    """The (3, h, w) view of one tile of a (3, H, W) map image."""
    top, left, h, w = box
    return image[:, top:top + h, left:left + w]


class Mosaic:
    """The stitched feature maps of one map image of ``height`` x ``width`` pixels: per level, the sum of the tiles'
    cells at each position and how many tiles cover it; :meth:`result` is their mean."""

    def __init__(self, height: int, width: int):
        self.height, self.width = height, width
        self.sums: list[np.ndarray] = []
        self.counts: list[np.ndarray] = []

    def add(self, box: Box, fmaps: Sequence[np.ndarray]) -> None:
        """Add one tile's (C, h_l, w_l) feature maps, one per level, at ``box``."""
        top, left, h, w = box
        if not self.sums:
            for f in fmaps:
                sy, sx = self._stride(box, f)
                self.sums.append(np.zeros((f.shape[0], self.height // sy, self.width // sx), np.float32))
                self.counts.append(np.zeros((self.height // sy, self.width // sx), np.float32))
        for total, count, f in zip(self.sums, self.counts, fmaps):
            sy, sx = self._stride(box, f)
            rows, cols = slice(top // sy, top // sy + f.shape[1]), slice(left // sx, left // sx + f.shape[2])
            total[:, rows, cols] += f
            count[rows, cols] += 1.0

    def _stride(self, box: Box, f: np.ndarray) -> tuple[int, int]:
        """The stride of a (C, h_l, w_l) map of a tile, checked to divide the tile's start and the map image."""
        top, left, h, w = box
        sy, sx = h // max(f.shape[1], 1), w // max(f.shape[2], 1)
        if (sy * f.shape[1], sx * f.shape[2]) != (h, w) or top % sy or left % sx or self.height % sy or self.width % sx:
            raise InvalidParameterError(f"a {h} x {w} tile gives a {f.shape[1]} x {f.shape[2]} feature map, which does "
                                        "not align with the tile grid: map_tiles needs a backbone whose strides divide "
                                        f"{TILE_ALIGN}")
        return sy, sx

    def result(self) -> list[np.ndarray]:
        """Per level the (C, H_l, W_l) float32 mean of the tiles covering each cell."""
        return [total / count for total, count in zip(self.sums, self.counts)]
