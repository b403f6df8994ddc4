"""Image intake: turn file paths, PIL images or uint8 arrays into normalised network input."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Iterable, Sequence, Union

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from .errors import DataError, ImageError

ImageSource = Union[str, os.PathLike, Image.Image, np.ndarray]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
Normalization = tuple[tuple[float, float, float], tuple[float, float, float]]
IMAGENET: Normalization = (IMAGENET_MEAN, IMAGENET_STD)
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")


def describe(source: ImageSource, index: int | None = None) -> str:
    """A short name for an image source, used in error messages and reports."""
    if isinstance(source, (str, os.PathLike)):
        return os.fspath(source)
    kind = "PIL image" if isinstance(source, Image.Image) else "array"
    return f"{kind} #{index}" if index is not None else kind


def _to_rgb(img: Image.Image) -> Image.Image:
    """Convert any PIL mode to 8-bit RGB; 16-bit and float grayscale are rescaled, not clipped."""
    if img.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        arr = np.asarray(img, dtype=np.float64)
        top = 65535.0 if img.mode.startswith("I;16") or arr.max(initial=0) > 255 else 255.0
        arr = np.clip(arr / top * 255.0 + 0.5, 0, 255).astype(np.uint8)
        img = Image.fromarray(arr)
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (0, 0, 0, 255))
        img = Image.alpha_composite(background, rgba)
    return img.convert("RGB") if img.mode != "RGB" else img


def _array_to_image(arr: np.ndarray, name: str) -> Image.Image:
    """Wrap a uint8 HxW, HxWx1, HxWx3 or HxWx4 array as a PIL image."""
    if arr.dtype != np.uint8:
        raise ImageError(f"{name}: arrays must be uint8 (got {arr.dtype})")
    if arr.ndim == 3 and arr.shape[2] == 1:
        arr = arr[:, :, 0]
    if arr.ndim == 2:
        return Image.fromarray(arr)
    if arr.ndim == 3 and arr.shape[2] in (3, 4):
        return Image.fromarray(np.ascontiguousarray(arr))
    raise ImageError(f"{name}: expected an HxW, HxWx3 or HxWx4 array, got shape {arr.shape}")


def load_image(source: ImageSource, index: int | None = None) -> Image.Image:
    """Read one image as 8-bit RGB, applying EXIF orientation; errors name the file."""
    name = describe(source, index)
    if isinstance(source, np.ndarray):
        img = _array_to_image(source, name)
    elif isinstance(source, Image.Image):
        img = source
    elif isinstance(source, (str, os.PathLike)):
        path = Path(source)
        if not path.exists():
            raise ImageError(f"{name}: no such file")
        if path.is_dir():
            raise ImageError(f"{name}: is a folder, not an image")
        try:
            with Image.open(path) as opened:
                opened.load()
                img = ImageOps.exif_transpose(opened)
                if img is opened:
                    img = opened.copy()
        except UnidentifiedImageError:
            raise ImageError(f"{name}: not an image file (unknown or corrupt format)") from None
        except Image.DecompressionBombError as exc:
            raise ImageError(f"{name}: refused, too many pixels ({exc})") from None
        except (OSError, SyntaxError, ValueError) as exc:
            raise ImageError(f"{name}: cannot read image ({exc})") from None
    else:
        raise ImageError(f"{name}: unsupported image type {type(source).__name__}")
    if img.width < 1 or img.height < 1:
        raise ImageError(f"{name}: image has no pixels")
    try:
        return _to_rgb(img)
    except (OSError, ValueError) as exc:
        raise ImageError(f"{name}: cannot convert image to RGB ({exc})") from None


def resize_square(img: Image.Image, size: int) -> Image.Image:
    """Plain square resize, bilinear at pixel centres without antialiasing.

    This is cv2.INTER_LINEAR (within one grey level), the interpolation of the paper's own code
    (albumentations ``Resize``).
    """
    w, h = img.size
    if (w, h) == (size, size):
        return img
    return img.transform((size, size), Image.AFFINE, (w / size, 0, 0, 0, h / size, 0), resample=Image.BILINEAR)


def preprocess(img: Image.Image, size: int, normalization: Normalization = IMAGENET) -> np.ndarray:
    """Square-resize an RGB image and normalise (ImageNet mean/std by default, as the paper): (3, size, size) float32."""
    mean, std = normalization
    resized = resize_square(img, size)
    arr = np.asarray(resized, dtype=np.float32) / 255.0
    arr = (arr - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)
    return np.ascontiguousarray(arr.transpose(2, 0, 1))


def list_images(folder: str | os.PathLike) -> list[Path]:
    """Sorted image files directly inside a folder (by extension); raises if there are none."""
    path = Path(folder)
    if not path.is_dir():
        raise DataError(f"{path}: not a folder")
    files = sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
    if not files:
        raise DataError(f"{path}: no images found (looked for {', '.join(IMAGE_EXTENSIONS)})")
    return files


def expand_sources(items: Iterable[str | os.PathLike]) -> list[Path]:
    """Expand a mix of image files and folders (their images, sorted) into a list of files."""
    out: list[Path] = []
    for item in items:
        path = Path(item)
        out.extend(list_images(path) if path.is_dir() else [path])
    return out
