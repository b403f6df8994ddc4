"""Small synthetic defects pasted into a user's own good images: what ``gaussad tune`` ranks settings on and what the
adaptation of the network (:mod:`gaussad.intake.adapt`) stops its training on, where no defective image is at hand."""

from __future__ import annotations

import numpy as np
from PIL import Image
from scipy import ndimage

__all__ = ["PASTED_DEFECTS", "add_defect"]

# Defects that :func:`add_defect` pastes into good images.
PASTED_DEFECTS: tuple[str, ...] = ("patch", "scratch", "noise", "spot")


def _smooth_noise(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """Perlin-like noise in [0, 1] of shape (h, w): two octaves of cubic-interpolated random lattices."""
    out = np.zeros((h, w))
    for cells, weight in ((3, 1.0), (6, 0.5)):
        lattice = rng.standard_normal((cells + 1, cells + 1))
        out += weight * ndimage.zoom(lattice, (h / (cells + 1), w / (cells + 1)), order=3, mode="nearest")[:h, :w]
    out -= out.min()
    return out / max(float(out.max()), 1e-12)


def add_defect(image: np.ndarray, donor: np.ndarray, rng: np.random.Generator, kind: str
               ) -> tuple[np.ndarray, np.ndarray]:
    """A copy of ``image`` (uint8, H x W x 3) with one small synthetic defect of ``kind``, and its bool mask (H, W).

    The defect spans 4-12 % of the shorter side and lies in the central three quarters of the image; pixels outside
    the mask are untouched. Kinds (:data:`PASTED_DEFECTS`): ``patch``, a square cut from another place of ``donor``
    (another good image, so the defect looks like the product, only misplaced); ``scratch``, a thin dark or light
    stroke; ``noise``, a Perlin-noise blob blending in ``donor``'s texture, rotated and re-lit; ``spot``, a
    disc tinted with a random colour. The same ``rng`` state gives the same defect.
    """
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"add_defect needs a uint8 H x W x 3 image, got {image.dtype} {image.shape}")
    h, w = image.shape[:2]
    side = max(3, int(round(min(h, w) * rng.uniform(0.04, 0.12))))
    y0 = int(rng.integers(h // 8, max(h // 8 + 1, h - h // 8 - side)))
    x0 = int(rng.integers(w // 8, max(w // 8 + 1, w - w // 8 - side)))
    side_y, side_x = min(side, h - y0), min(side, w - x0)
    box = (slice(y0, y0 + side_y), slice(x0, x0 + side_x))
    out = image.copy()
    mask = np.zeros((h, w), dtype=bool)
    if donor.shape != image.shape:
        donor = np.asarray(Image.fromarray(donor).resize((w, h), Image.Resampling.BILINEAR))
    if kind == "patch":
        dy, dx = int(rng.integers(0, h - side_y + 1)), int(rng.integers(0, w - side_x + 1))
        patch = donor[dy : dy + side_y, dx : dx + side_x]
        mask[box] = np.any(patch != out[box], axis=2)
        out[box] = patch
    elif kind == "scratch":
        length = side * rng.uniform(2.0, 4.0)
        angle = rng.uniform(0.0, np.pi)
        t = np.linspace(0.0, 1.0, int(2 * length) + 2)
        ys = np.clip(np.rint(y0 + t * length * np.sin(angle)), 0, h - 1).astype(int)
        xs = np.clip(np.rint(x0 + t * length * np.cos(angle)), 0, w - 1).astype(int)
        seeds = np.zeros((h, w), dtype=bool)
        seeds[ys, xs] = True
        mask = ndimage.distance_transform_edt(~seeds) <= max(1.0, min(h, w) / 200)
        value = rng.uniform(0, 40) if rng.random() < 0.5 else rng.uniform(215, 255)
        out[mask] = np.rint(0.2 * out[mask] + 0.8 * value).astype(np.uint8)
    elif kind == "noise":
        blob = _smooth_noise(rng, side_y, side_x)
        yy, xx = np.mgrid[0:side_y, 0:side_x]
        ry, rx = (yy - (side_y - 1) / 2) / (side_y / 2), (xx - (side_x - 1) / 2) / (side_x / 2)
        inside = (blob + (1 - np.hypot(ry, rx))) > 1.0  # noise thresholded, fading towards the box's edge
        texture = np.rot90(donor, int(rng.integers(1, 4)))
        th, tw = texture.shape[:2]
        dy, dx = int(rng.integers(0, th - side_y + 1)), int(rng.integers(0, tw - side_x + 1))
        src = texture[dy : dy + side_y, dx : dx + side_x].astype(np.float64) * rng.uniform(0.5, 1.5)
        beta = rng.uniform(0.6, 1.0)
        region = out[box].astype(np.float64)
        region[inside] = (1 - beta) * region[inside] + beta * src[inside]
        out[box] = np.clip(np.rint(region), 0, 255).astype(np.uint8)
        mask[box] = inside
    elif kind == "spot":
        yy, xx = np.mgrid[0:h, 0:w]
        cy, cx, r = y0 + side_y / 2, x0 + side_x / 2, min(side_y, side_x) / 2
        mask = (yy + 0.5 - cy) ** 2 + (xx + 0.5 - cx) ** 2 <= r**2
        alpha = rng.uniform(0.5, 0.9)
        colour = rng.integers(0, 256, 3)
        out[mask] = np.rint((1 - alpha) * out[mask] + alpha * colour).astype(np.uint8)
    else:
        raise ValueError(f"unknown defect kind {kind!r}; expected one of {PASTED_DEFECTS}")
    return out, mask
