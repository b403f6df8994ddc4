"""Small synthetic anomaly-detection data sets in MVTec AD layout, built offline.

The normal images are crops of texture photos bundled inside scikit-image
(``skimage.data``), so ``make demo`` works without the real MVTec AD data.
"""

from __future__ import annotations

import json
import operator
import os
import shutil
import time
import uuid
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from types import ModuleType

import numpy as np
from PIL import Image
from scipy import ndimage

from ..errors import DataError
from ..intake.defects import PASTED_DEFECTS, add_defect

__all__ = ["DEFECTS", "PASTED_DEFECTS", "TEXTURES", "add_defect", "available_textures", "build_texture_dataset"]

TEXTURES: tuple[str, ...] = ("brick", "grass", "gravel")
DEFECTS: tuple[str, ...] = ("patch", "scratch")

_VERSION = 1
_MARKER = ".gaussad_synthetic.json"
_MIN_SIZE = 16
_STAGING = ".gaussad-synthetic-tmp"
_STALE_S = 3600.0


@dataclass(frozen=True)
class _Sample:
    """One generated image: where it goes, its pixels, and for defects its mask and clean source."""

    folder: str
    stem: str
    image: np.ndarray
    mask: np.ndarray | None = None
    clean: np.ndarray | None = None


def _skimage_data() -> ModuleType:
    """Import ``skimage.data`` or explain which extra provides it."""
    try:
        import skimage.data
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError(
            "gaussad.tools.synthetic needs scikit-image: pip install 'gaussad[demo]'"
        ) from exc
    return skimage.data


def available_textures() -> tuple[str, ...]:
    """Return the names in ``TEXTURES`` whose photo ships inside the installed scikit-image."""
    data_dir = Path(_skimage_data().__file__).parent
    return tuple(name for name in TEXTURES if (data_dir / f"{name}.png").is_file())


@lru_cache(maxsize=None)
def _texture(name: str, min_side: int) -> np.ndarray:
    """Load a bundled texture as read-only float32 RGB, upscaled so both sides are >= ``min_side``."""
    if name not in available_textures():
        raise ValueError(f"texture {name!r} is not bundled with scikit-image")
    raw = np.asarray(getattr(_skimage_data(), name)())
    if raw.ndim == 2:
        raw = np.repeat(raw[:, :, None], 3, axis=2)
    raw = np.ascontiguousarray(raw[:, :, :3]).astype(np.uint8)
    h, w = raw.shape[:2]
    if min(h, w) < min_side:
        scale = min_side / min(h, w)
        new_size = (max(min_side, round(w * scale)), max(min_side, round(h * scale)))
        raw = np.asarray(Image.fromarray(raw).resize(new_size, Image.Resampling.BICUBIC))
    out = raw.astype(np.float32)
    out.setflags(write=False)
    return out


def _crop(texture: np.ndarray, rng: np.random.Generator, size: int, rows: tuple[int, int]) -> np.ndarray:
    """Random ``size`` x ``size`` crop within ``rows``, randomly flipped and slightly brightened or darkened."""
    h, w = texture.shape[:2]
    r0, r1 = rows
    if r1 - r0 < size:
        r0, r1 = 0, h
    y0 = int(rng.integers(r0, r1 - size + 1))
    x0 = int(rng.integers(0, w - size + 1))
    crop = texture[y0 : y0 + size, x0 : x0 + size]
    if rng.random() < 0.5:
        crop = crop[:, ::-1]
    if rng.random() < 0.5:
        crop = crop[::-1, :]
    gain = rng.uniform(0.9, 1.1)
    return np.clip(np.rint(crop * gain), 0, 255).astype(np.uint8)


def _blob_mask(rng: np.random.Generator, size: int) -> np.ndarray:
    """Irregular, rotated ellipse covering about 5-15% of a ``size`` x ``size`` image."""
    frac = rng.uniform(0.05, 0.15)
    harmonics = np.arange(2, 6)
    amps = rng.uniform(0.0, 0.25, size=harmonics.size) / (harmonics - 1)
    phases = rng.uniform(0.0, 2 * np.pi, size=harmonics.size)
    aspect = np.sqrt(rng.uniform(1.0, 1.8))
    angle = rng.uniform(0.0, np.pi)

    def radial(theta: np.ndarray) -> np.ndarray:
        """Relative radius of the wobbly outline at angle ``theta``."""
        return 1.0 + np.sum(amps[:, None] * np.cos(harmonics[:, None] * theta[None] + phases[:, None]), axis=0)

    theta = np.linspace(0.0, 2 * np.pi, 1440, endpoint=False)
    r_unit = radial(theta)
    base = np.sqrt(frac * size**2 / (np.pi * np.mean(r_unit**2)))
    reach = base * r_unit.max() * aspect
    lo, hi = reach, size - reach
    cy, cx = (rng.uniform(lo, hi, size=2) if hi > lo else np.full(2, size / 2))

    yy, xx = np.mgrid[0:size, 0:size] + 0.5
    dy, dx = yy - cy, xx - cx
    u = (dx * np.cos(angle) + dy * np.sin(angle)) / aspect
    v = (-dx * np.sin(angle) + dy * np.cos(angle)) * aspect
    rho = np.hypot(u, v)
    limit = base * radial(np.arctan2(v, u).ravel()).reshape(rho.shape)
    return rho <= limit


def _scratch_mask(rng: np.random.Generator, size: int) -> np.ndarray:
    """Thin curved line (quadratic Bezier) a few pixels wide crossing the middle of the image."""
    length = rng.uniform(0.35, 0.7) * size
    direction = rng.uniform(0.0, 2 * np.pi)
    d = np.array([np.cos(direction), np.sin(direction)])
    perp = np.array([-d[1], d[0]])
    mid = rng.uniform(0.25 * size, 0.75 * size, size=2)
    p0, p2 = mid - 0.5 * length * d, mid + 0.5 * length * d
    p1 = mid + rng.uniform(-0.3, 0.3) * length * perp
    t = np.linspace(0.0, 1.0, int(4 * length) + 2)[:, None]
    pts = (1 - t) ** 2 * p0 + 2 * (1 - t) * t * p1 + t**2 * p2
    pts = np.rint(pts).astype(int)
    pts = pts[np.all((pts >= 0) & (pts < size), axis=1)]
    seeds = np.zeros((size, size), dtype=bool)
    seeds[pts[:, 0], pts[:, 1]] = True
    half_width = rng.uniform(0.8, 1.8) * max(1.0, size / 128)
    return ndimage.distance_transform_edt(~seeds) <= half_width


def _make_defect(
    clean: np.ndarray, rng: np.random.Generator, kind: str, other: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Return ``(image, mask)``: ``clean`` with a ``kind`` defect; pixels outside the bool mask are untouched.

    ``other`` is a crop of a different texture, the same shape as ``clean``, used by ``patch``.
    """
    size = clean.shape[0]
    src = clean.astype(np.float32)
    if kind == "patch":
        mask = _blob_mask(rng, size)
        oth = other.astype(np.float32)
        new = (oth - oth.mean()) / max(float(oth.std()), 1e-6) * src.std() + src.mean()
    elif kind == "scratch":
        mask = _scratch_mask(rng, size)
        strength = rng.uniform(0.55, 0.8)
        new = src * (1 - strength) if rng.random() < 0.5 else src + (255 - src) * strength
    else:
        raise ValueError(f"unknown defect kind {kind!r}; expected one of {DEFECTS}")
    image = clean.copy()
    image[mask] = np.clip(np.rint(new[mask]), 0, 255).astype(np.uint8)
    return image, mask


def _stem(index: int, count: int) -> str:
    """Zero-padded file stem, at least three digits wide."""
    return f"{index:0{max(3, len(str(count - 1)))}d}"


def _generate(
    name: str, pool: Sequence[str], size: int, n_train: int, n_test_good: int, n_test_bad: int, seed: int
) -> Iterator[_Sample]:
    """Yield every image of one category; the same arguments always yield the same pixels."""
    rng = np.random.default_rng([seed, zlib.crc32(name.encode("utf-8"))])
    texture = _texture(name, size)
    h = texture.shape[0]
    train_rows = (0, h // 2 + size // 4)
    test_rows = (h // 2 - size // 4, h)

    for i in range(n_train):
        yield _Sample("train/good", _stem(i, n_train), _crop(texture, rng, size, train_rows))
    for i in range(n_test_good):
        yield _Sample("test/good", _stem(i, n_test_good), _crop(texture, rng, size, test_rows))

    others = [o for o in pool if o != name]
    kinds = [DEFECTS[i % len(DEFECTS)] for i in range(n_test_bad)]
    for kind in DEFECTS:
        count = kinds.count(kind)
        for i in range(count):
            clean = _crop(texture, rng, size, test_rows)
            other_tex = _texture(others[int(rng.integers(len(others)))], size)
            other = _crop(other_tex, rng, size, (0, other_tex.shape[0]))
            image, mask = _make_defect(clean, rng, kind, other)
            yield _Sample(f"test/{kind}", _stem(i, count), image, mask, clean)


def _marker(name: str, size: int, n_train: int, n_test_good: int, n_test_bad: int, seed: int) -> str:
    """Text of the marker file that records a finished category and how it was made."""
    info = {
        "generator": "gaussad.synthetic",
        "version": _VERSION,
        "texture": name,
        "defects": list(DEFECTS),
        "size": size,
        "n_train": n_train,
        "n_test_good": n_test_good,
        "n_test_bad": n_test_bad,
        "seed": seed,
    }
    return json.dumps(info, sort_keys=True, indent=2) + "\n"


def _read_marker(cat_dir: Path) -> str | None:
    """Marker text of an existing category folder, or None when it has none."""
    try:
        return (cat_dir / _MARKER).read_text(encoding="utf-8")
    except (FileNotFoundError, NotADirectoryError):
        return None


def _write_category(tmp: Path, samples: Iterator[_Sample], marker: str) -> None:
    """Write all samples and, last, the marker under ``tmp``."""
    for s in samples:
        folder = tmp / s.folder
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(s.image).save(folder / f"{s.stem}.png")
        if s.mask is not None:
            mask_dir = tmp / "ground_truth" / Path(s.folder).name
            mask_dir.mkdir(parents=True, exist_ok=True)
            Image.fromarray(s.mask.astype(np.uint8) * 255).save(mask_dir / f"{s.stem}_mask.png")
    (tmp / _MARKER).write_text(marker, encoding="utf-8")


def _scratch_dir(root: Path, name: str, tag: str) -> Path:
    """Fresh folder in the hidden staging area of ``root`` (created with the normal umask)."""
    path = root / _STAGING / f"{name}.{tag}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    path.mkdir(parents=True)
    return path


def _tidy_staging(root: Path) -> None:
    """Remove leftovers of killed builds from the staging area, and the area itself once empty."""
    staging = root / _STAGING
    if not staging.is_dir():
        return
    now = time.time()
    for entry in staging.iterdir():
        try:
            if now - entry.stat().st_mtime > _STALE_S:
                shutil.rmtree(entry, ignore_errors=True)
        except OSError:
            continue
    try:
        staging.rmdir()
    except OSError:
        pass


def _install(tmp: Path, target: Path, marker: str) -> None:
    """Move the finished ``tmp`` folder to ``target``, replacing an outdated generated one."""
    old: Path | None = None
    if target.exists():
        old = _scratch_dir(target.parent, target.name, "old")
        os.replace(target, old / target.name)
    try:
        os.replace(tmp, target)
    except OSError:
        if old is not None and not target.exists():
            os.replace(old / target.name, target)
        if _read_marker(target) != marker:
            raise
    finally:
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)


def _build_category(
    root: Path, name: str, pool: Sequence[str], size: int, n_train: int, n_test_good: int, n_test_bad: int, seed: int
) -> None:
    """Write ``root/name`` unless an identical generated copy is already there."""
    target = root / name
    marker = _marker(name, size, n_train, n_test_good, n_test_bad, seed)
    existing = _read_marker(target)
    if existing == marker:
        return
    if existing is None and target.exists():
        raise DataError(f"{target} exists and was not made by gaussad.tools.synthetic; not replacing it")
    tmp = _scratch_dir(root, name, "tmp")
    try:
        _write_category(tmp, _generate(name, pool, size, n_train, n_test_good, n_test_bad, seed), marker)
        _install(tmp, target, marker)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def _check_int(name: str, value: object, minimum: int) -> int:
    """``value`` as a plain int, or ValueError when it is not an integer >= ``minimum``."""
    try:
        number = operator.index(value) if not isinstance(value, bool) else None
    except TypeError:
        number = None
    if number is None or number < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return number


def build_texture_dataset(
    root: str | os.PathLike[str],
    *,
    size: int = 128,
    n_train: int = 40,
    n_test_good: int = 12,
    n_test_bad: int = 12,
    seed: int = 0,
    categories: Sequence[str] | None = None,
) -> Path:
    """Build ``root/<texture>/{train,test,ground_truth}`` in MVTec AD layout and return ``Path(root)``.

    ``n_test_bad`` is the total number of defective test images, split evenly over ``DEFECTS``.
    """
    size = _check_int("size", size, _MIN_SIZE)
    n_train = _check_int("n_train", n_train, 1)
    n_test_good = _check_int("n_test_good", n_test_good, 0)
    n_test_bad = _check_int("n_test_bad", n_test_bad, 0)
    seed = _check_int("seed", seed, 0)

    pool = available_textures()
    if len(pool) < 2:
        raise RuntimeError(f"need at least two bundled scikit-image textures, found {pool}")
    if categories is None:
        names = list(pool)
    else:
        names = list(dict.fromkeys([categories] if isinstance(categories, str) else categories))
        unknown = [n for n in names if n not in pool]
        if unknown:
            raise ValueError(f"unknown or unavailable categories {unknown}; choose from {pool}")

    root_path = Path(root)
    root_path.mkdir(parents=True, exist_ok=True)
    try:
        for name in names:
            _build_category(root_path, name, pool, size, n_train, n_test_good, n_test_bad, seed)
    finally:
        _tidy_staging(root_path)
    return root_path
