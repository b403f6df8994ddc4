"""Image intake: turn file paths, PIL images or uint8 arrays into normalised network input."""

from __future__ import annotations

import importlib
import io
import math
import os
import struct
from pathlib import Path
from typing import BinaryIO, Iterable, Union

import numpy as np
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

from ..errors import DataError, GaussadError, ImageError, ImageTooLargeError, UnknownImageFormatError
from .files import open_regular_file
from . import BRIGHTNESS, DEFAULT_MAX_PIXELS, LUMA, MATCH_GREY
from ..core.maps import resize_bilinear

ImageSource = Union[str, os.PathLike, Image.Image, np.ndarray, bytes]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
Normalization = tuple[tuple[float, float, float], tuple[float, float, float]]
IMAGENET: Normalization = (IMAGENET_MEAN, IMAGENET_STD)
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")
# PIL decoders tried, in this order; no other decoder ever sees the bytes (EPS would start Ghostscript).
FORMATS = ("PNG", "JPEG", "BMP", "TIFF", "WEBP")
FORMAT_NAMES = "PNG, JPEG, BMP, TIFF or WebP"


class NamedBytes(bytes):
    """The bytes of an image file with the name to use in messages (an upload's filename)."""

    name: str

    def __new__(cls, data: bytes, name: str) -> "NamedBytes":
        obj = super().__new__(cls, data)
        obj.name = name
        return obj


def describe(source: ImageSource, index: int | None = None) -> str:
    """A short name for an image source, used in error messages and reports."""
    if isinstance(source, (str, os.PathLike)):
        return os.fspath(source)
    if isinstance(source, NamedBytes):
        return source.name
    kind = ("PIL image" if isinstance(source, Image.Image) else "bytes" if isinstance(source, bytes)
            else "array" if isinstance(source, np.ndarray) else "image")
    return f"{kind} #{index}" if index is not None else kind


def check_max_pixels(max_pixels: int) -> int:
    """Validate a pixel limit: a positive integer."""
    if isinstance(max_pixels, bool) or not isinstance(max_pixels, (int, np.integer)) or max_pixels < 1:
        raise GaussadError(f"max_pixels must be a positive integer, got {max_pixels!r}")
    return int(max_pixels)


def _scale_to_8bit(img: Image.Image, name: str) -> Image.Image:
    """16-bit, 32-bit integer and float grayscale as 8-bit "L", rescaled by the range the values fit in.

    I;16 divides by 257 (65535 -> 255). I and F use 0..1 (floats only), 0..255 or 0..65535, whichever
    holds all values; negative, larger or non-finite values are refused rather than guessed at.
    """
    arr = np.asarray(img)
    if img.mode.startswith("I;16"):
        top = 65535
    else:
        if img.mode == "F" and not np.isfinite(arr).all():
            raise ImageError(f"{name}: floating-point image contains NaN or infinite values")
        lo, hi = (arr.min(), arr.max()) if arr.size else (0, 0)
        if lo < 0 or hi > 65535:
            raise ImageError(f"{name}: {img.mode} image values span {lo}..{hi}, outside 0..65535; "
                             "convert it to 8 or 16 bit")
        top = 1 if img.mode == "F" and hi <= 1 else 255 if hi <= 255 else 65535
    if top == 255:
        return Image.fromarray(np.rint(arr).astype(np.uint8))
    if img.mode == "F":
        return Image.fromarray(np.clip(np.rint(arr.astype(np.float64) * (255.0 / top)), 0, 255).astype(np.uint8))
    wide = arr.astype(np.uint32)
    return Image.fromarray(((wide * 255 + top // 2) // top).astype(np.uint8))


def _to_rgb(img: Image.Image, name: str = "image") -> Image.Image:
    """Convert any PIL mode to 8-bit RGB; 16-bit and float grayscale are rescaled, transparency is composited on black."""
    if img.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        img = _scale_to_8bit(img, name)
    if img.mode == "La":  # premultiplied; PIL converts it only to LA
        img = img.convert("LA")
    if img.mode in ("RGBA", "RGBa", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
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
    if arr.ndim not in (2, 3) or (arr.ndim == 3 and arr.shape[2] not in (3, 4)):
        raise ImageError(f"{name}: expected an HxW, HxWx3 or HxWx4 array, got shape {arr.shape}")
    if arr.shape[0] < 1 or arr.shape[1] < 1:
        raise ImageError(f"{name}: image has no pixels (shape {arr.shape})")
    return Image.fromarray(np.ascontiguousarray(arr))


def _identify(fh: BinaryIO, filename: str) -> ImageFile.ImageFile:
    """Parse the header with the first accepted decoder of FORMATS, as ``Image.open(fh, formats=FORMATS)``.

    Unlike ``Image.open`` this skips PIL's process-wide ``MAX_IMAGE_PIXELS`` check, so the caller's own
    limit applies whether it is lower or higher, and no other plugin (e.g. EPS via Ghostscript) is tried.
    """
    from PIL import BmpImagePlugin, JpegImagePlugin, PngImagePlugin, TiffImagePlugin, WebPImagePlugin  # noqa: F401

    prefix = fh.read(16)
    for fmt in FORMATS:
        factory, accept = Image.OPEN[fmt]
        verdict = accept(prefix) if accept else True
        if not verdict or isinstance(verdict, str):
            continue
        fh.seek(0)
        try:
            return factory(fh, filename)
        except (SyntaxError, IndexError, TypeError, struct.error):
            continue
    raise UnidentifiedImageError(filename)


def probe(data: bytes, name: str, max_pixels: int = DEFAULT_MAX_PIXELS) -> tuple[int, int]:
    """(width, height) of an image file's bytes from its header alone, checked like :func:`load_image` checks it
    (format, at least one pixel, at most ``max_pixels``) but without decoding the pixels."""
    if not data:
        raise UnknownImageFormatError(f"{name}: empty file, not an image")
    return _open(io.BytesIO(data), name, max_pixels).size


def _open(fh: BinaryIO, name: str, max_pixels: int) -> ImageFile.ImageFile:
    """Identify and size-check one image file (header only); failures become ImageErrors."""
    try:
        img = _identify(fh, name)
    except UnidentifiedImageError:
        raise UnknownImageFormatError(f"{name}: not a {FORMAT_NAMES} image (unknown format or damaged header)") from None
    except Exception as exc:  # a damaged header can make a decoder fail in many ways
        raise ImageError(f"{name}: damaged image header ({type(exc).__name__}: {exc})") from None
    width, height = img.size
    if width < 1 or height < 1:
        raise ImageError(f"{name}: image has no pixels ({width}x{height})")
    if width * height > max_pixels:
        raise ImageTooLargeError(f"{name}: refused, {width}x{height} = {width * height} pixels exceeds the limit of "
                         f"{max_pixels} (a decompression bomb? raise max_pixels / --max-pixels if it is genuine)")
    return img


def _fast_module(name: str):
    """An optional decoder module (pyspng, simplejpeg), or None when it is not installed or does not import."""
    if name not in _FAST_MODULES:
        try:
            _FAST_MODULES[name] = importlib.import_module(name)
        except Exception:  # not installed, or a broken build: Pillow decodes
            _FAST_MODULES[name] = None
    return _FAST_MODULES[name]


_FAST_MODULES: dict = {}


def fast_decoders() -> dict[str, str | None]:
    """Which faster decoder each format uses when ``decoder="auto"`` (None: Pillow)."""
    return {"PNG": "pyspng" if _fast_module("pyspng") else None,
            "JPEG": "simplejpeg" if _fast_module("simplejpeg") else None}


def _draft_scale(width: int, height: int, draft: int | None) -> int:
    """The reduction PIL's JPEG draft mode picks for a request of draft x draft: 8, 4, 2 or 1."""
    if not draft:
        return 1
    scale = min(width // draft, height // draft)
    return next(a for a in (8, 4, 2, 1) if scale >= a)


def _fast_decode(img: ImageFile.ImageFile, fh: BinaryIO, draft: int | None) -> Image.Image | None:
    """The file decoded by a faster decoder (pyspng for PNG, libjpeg-turbo through simplejpeg for JPEG, with the
    same DCT-domain reduction as PIL's draft mode) where one is installed and gives exactly Pillow's pixels: 8-bit
    grayscale or RGB, no transparency, one frame, no EXIF orientation to apply. None: let Pillow decode (also when
    the fast decoder fails, so that Pillow's message reports a damaged file)."""
    if img.format not in ("PNG", "JPEG") or img.mode not in ("RGB", "L") or "transparency" in img.info:
        return None
    module = _fast_module("pyspng" if img.format == "PNG" else "simplejpeg")
    if module is None or getattr(img, "n_frames", 1) != 1:
        return None
    fh.seek(0)
    data = fh.read()
    try:
        if img.format == "PNG":
            # IHDR's bit depth must be 8 (PIL keeps the high byte of 16-bit RGB); an eXIf chunk may orient the image.
            if data[24:25] != b"\x08" or b"eXIf" in data:
                return None
            arr = module.load(data)
        else:
            if img.getexif().get(0x0112, 1) != 1:
                return None
            a = _draft_scale(img.width, img.height, draft)
            arr = module.decode_jpeg(data, colorspace="RGB", min_width=-(-img.width // a),
                                     min_height=-(-img.height // a))
    except Exception:  # a damaged file: Pillow decodes it (or names the problem)
        return None
    if arr.dtype != np.uint8 or arr.ndim not in (2, 3) or (arr.ndim == 3 and arr.shape[2] != 3):
        return None
    return Image.fromarray(np.ascontiguousarray(arr))


def _decode(fh: BinaryIO, name: str, max_pixels: int, draft: int | None = None,
            decoder: str = "auto") -> Image.Image:
    """Identify, size-check, decode and orient one image file; every decoder failure becomes an ImageError."""
    img = _open(fh, name, max_pixels)
    if decoder == "auto":
        fast = _fast_decode(img, fh, draft)
        if fast is not None:
            return _convert(fast, name)
    try:
        if draft and img.format == "JPEG":
            img.draft(img.mode, (draft, draft))
        img.load()
    except Exception as exc:  # truncated or corrupt data surfaces as OSError, ValueError, SyntaxError, ...
        raise ImageError(f"{name}: cannot decode {img.format} image ({type(exc).__name__}: {exc})") from None
    try:
        oriented = ImageOps.exif_transpose(img)  # always a new image, detached from the file
    except Exception as exc:
        raise ImageError(f"{name}: damaged EXIF data ({type(exc).__name__}: {exc})") from None
    return _convert(oriented, name)


def _convert(img: Image.Image, name: str) -> Image.Image:
    """:func:`_to_rgb` with any unexpected conversion failure turned into an ImageError naming the source."""
    try:
        return _to_rgb(img, name)
    except ImageError:
        raise
    except Exception as exc:
        raise ImageError(f"{name}: cannot convert {img.mode} image to RGB ({type(exc).__name__}: {exc})") from None


def load_image(source: ImageSource, index: int | None = None, max_pixels: int = DEFAULT_MAX_PIXELS,
               draft: int | None = None, name: str | None = None, decoder: str = "auto") -> Image.Image:
    """Read one image (a file, the bytes of a file such as an upload, a PIL image or a uint8 array) as 8-bit RGB,
    applying EXIF orientation; errors name the file (or ``name``, e.g. an upload's filename).

    Files must be PNG, JPEG, BMP, TIFF or WebP of at most ``max_pixels`` pixels (checked from the header,
    before decoding). Multi-frame files give their first frame. With ``draft=S`` a JPEG file at least 2*S
    pixels on both sides is decoded at 1/2, 1/4 or 1/8 scale (PIL's draft mode, much faster), never below S
    on either side; other files decode in full. ``decoder="auto"`` decodes PNG and JPEG files with pyspng and
    simplejpeg where installed and where they give Pillow's exact pixels (:func:`_fast_decode`); ``"pil"``: Pillow only.
    """
    name = name or describe(source, index)
    if isinstance(source, bytes):
        if not source:
            raise UnknownImageFormatError(f"{name}: empty file, not an image")
        return _decode(io.BytesIO(source), name, max_pixels, draft, decoder)
    if isinstance(source, np.ndarray):
        return _to_rgb(_array_to_image(source, name), name)
    if isinstance(source, Image.Image):
        if source.width < 1 or source.height < 1:
            raise ImageError(f"{name}: image has no pixels")
        return _convert(source, name)
    if isinstance(source, (str, os.PathLike)):
        with open_regular_file(source, ImageError, "an image") as fh:
            return _decode(fh, name, max_pixels, draft, decoder)
    raise ImageError(f"{name}: unsupported image type {type(source).__name__}")


def image_side(source: ImageSource, index: int | None = None, max_pixels: int = DEFAULT_MAX_PIXELS) -> float:
    """The geometric-mean side sqrt(width x height) of one image, from a file's header alone (checked as
    :func:`load_image` checks it, without decoding the pixels); orientation does not change it."""
    name = describe(source, index)
    if isinstance(source, bytes):
        width, height = probe(source, name, max_pixels)
    elif isinstance(source, np.ndarray):
        width, height = _array_to_image(source, name).size
    elif isinstance(source, Image.Image):
        width, height = source.size
    elif isinstance(source, (str, os.PathLike)):
        with open_regular_file(source, ImageError, "an image") as fh:
            width, height = _open(fh, name, max_pixels).size
    else:
        raise ImageError(f"{name}: unsupported image type {type(source).__name__}")
    return math.sqrt(width * height)



def resize_square(img: Image.Image, size: int) -> Image.Image:
    """Plain square resize to size x size (:func:`resize_bilinear`), as the paper."""
    return resize_bilinear(img, size, size)


ASPECT_STEP = 32  # aspect-kept sides are multiples of the backbone's largest stride, so every level divides evenly


def aspect_size(width: int, height: int, size: int) -> tuple[int, int]:
    """(width, height) with the image's aspect ratio and about ``size``**2 pixels, each side a multiple of 32 in
    32..8*size."""
    k = size / math.sqrt(width * height)
    side = lambda v: int(min(max(round(v * k / ASPECT_STEP), 1), 8 * size // ASPECT_STEP)) * ASPECT_STEP
    return max(side(width), ASPECT_STEP), max(side(height), ASPECT_STEP)


def resize_to(img: Image.Image, size: int, resize: str = "square") -> Image.Image:
    """``square``: :func:`resize_square`; ``aspect``: the same interpolation to :func:`aspect_size`, keeping the
    image's proportions (elongated parts are not stretched unevenly)."""
    if resize == "square":
        return resize_square(img, size)
    return resize_bilinear(img, *aspect_size(*img.size, size))


def match_brightness(pixels: np.ndarray) -> np.ndarray:
    """(3, H, W) uint8 pixels as float32 scaled so that their mean grey (ITU-R 601 luma) is
    :data:`~gaussad.intake.MATCH_GREY`, clipped at 255: the input then depends on the pixels' proportions to their
    mean alone, not on how bright the photo is. A black image (mean grey under 1) is scaled as if it were 1.

    The channel sums are exact integers and the mean grey is float64, so the exported graph, which computes it the
    same way, finds the same factor and feeds the network the same float32 input (bit for bit on bottle's test
    images at 384 px)."""
    r, g, b = (int(v) for v in pixels.reshape(3, -1).sum(axis=1, dtype=np.int64))
    grey = (LUMA[0] * r + LUMA[1] * g + LUMA[2] * b) / (pixels.shape[1] * pixels.shape[2])
    px = pixels.astype(np.float32)
    np.multiply(px, np.float32(MATCH_GREY / max(grey, 1.0)), out=px)
    return np.minimum(px, np.float32(255.0), out=px)


def preprocess(img: Image.Image, size: int, normalization: Normalization = IMAGENET,
               resize: str = "square", brightness: str = "keep") -> np.ndarray:
    """Resize an RGB image (see :func:`resize_to`), match its brightness with ``brightness='match'``
    (:func:`match_brightness`) and normalise (ImageNet mean/std by default, as the paper): (3, H, W) float32,
    H = W = size for the square resize."""
    if brightness not in BRIGHTNESS:
        raise GaussadError(f"unknown brightness {brightness!r}; choose one of: {', '.join(BRIGHTNESS)}")
    mean, std = np.asarray(normalization[0], np.float32), np.asarray(normalization[1], np.float32)
    pixels = np.asarray(resize_to(img, size, resize)).transpose(2, 0, 1)
    if brightness == "match":
        pixels = match_brightness(pixels)
    # (x / 255 - mean) / std as one multiply-add written straight into the output: ten times faster than
    # the textbook form, equal to it within float32 rounding.
    out = np.empty(pixels.shape, np.float32)
    np.multiply(pixels, (1.0 / (255.0 * std))[:, None, None], out=out)
    out += (-mean / std)[:, None, None]
    return out


def _is_dir(path: Path) -> bool:
    """Whether ``path`` is a folder (following links); False when it cannot be looked at (a name too long, ...),
    so that reading it reports the problem."""
    try:
        return path.is_dir()
    except OSError:
        return False


def _identity(folder: Path) -> tuple[int, int] | None:
    """(device, inode) of a folder, following links; None when it cannot be read."""
    try:
        st = folder.stat()
    except OSError:
        return None
    return st.st_dev, st.st_ino


def list_images(folder: str | os.PathLike, recursive: bool = False) -> list[Path]:
    """Sorted image files (by extension) inside a folder; raises if there are none.

    With ``recursive`` the sub-folders are walked too, links to folders followed; a folder that is one of its own
    ancestors (a symbolic link loop) and hidden sub-folders (``.git``, ``.ipynb_checkpoints``, ...) are skipped.
    Files are sorted by their path, component by component, so each sub-folder's images stay together.
    """
    path = Path(folder)
    if not _is_dir(path):
        raise DataError(f"{path}: not a folder")
    files: list[Path] = []
    stack = [(path, frozenset([_identity(path)]))]
    while stack:
        here, ancestors = stack.pop()
        # Not is_file(): a broken link or a pipe named *.png is listed so that reading it reports the problem.
        try:
            entries = list(here.iterdir())
        except OSError as exc:
            raise DataError(f"{here}: cannot list folder ({exc.strerror or exc})") from None
        for p in entries:
            if not p.is_dir():
                if p.suffix.lower() in IMAGE_EXTENSIONS:
                    files.append(p)
            elif recursive and not p.name.startswith("."):
                ident = _identity(p)
                if ident is not None and ident not in ancestors:
                    stack.append((p, ancestors | {ident}))
    if not files:
        where = " in it or its sub-folders" if recursive else ""
        raise DataError(f"{path}: no images found{where} (looked for {', '.join(IMAGE_EXTENSIONS)})")
    return sorted(files)


def find_images(items: Iterable[str | os.PathLike], recursive: bool = False) -> tuple[list[Path], list[str]]:
    """Expand a mix of image files and folders into image files and the names results give them.

    A folder's images (see :func:`list_images`) are named by their path relative to the folder, so that
    ``good/000.png`` and ``crack/000.png`` stay apart; when several items are given, that path is prefixed with
    the folder as given. A file is named as given. An empty folder raises before anything is read.
    """
    items = [Path(item) for item in items]
    files: list[Path] = []
    names: list[str] = []
    for item in items:
        if not _is_dir(item):
            files.append(item)
            names.append(str(item))
            continue
        found = list_images(item, recursive)
        files += found
        names += [str(p.relative_to(item) if len(items) == 1 else p) for p in found]
    return files, names


def expand_sources(items: Iterable[str | os.PathLike], recursive: bool = False) -> list[Path]:
    """Expand a mix of image files and folders (their images, sorted; see :func:`list_images`) into a list of files."""
    return find_images(items, recursive)[0]


def image_list(images: Iterable[ImageSource] | str | os.PathLike) -> list[ImageSource]:
    """A list of image sources; a folder or file name given where a list is expected is refused (it would
    otherwise be read character by character)."""
    if isinstance(images, (str, bytes, os.PathLike)):
        raise DataError(f"{os.fsdecode(images)}: give a list of images; for a folder use "
                        "gaussad.intake.images.list_images(folder)")
    return list(images)
