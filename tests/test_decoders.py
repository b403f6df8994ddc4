"""Faster decoders (pyspng, simplejpeg): exactly Pillow's pixels, Pillow's messages for bad files, Pillow for the rest."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

import gaussad
from gaussad.errors import ImageError
from gaussad.intake.images import _fast_decode, _open, fast_decoders, list_images, load_image

from .conftest import SHARED_DATA

pytest.importorskip("pyspng")
pytest.importorskip("simplejpeg")


def _bytes(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def _texture(w: int = 150, h: int = 110, mode: str = "RGB") -> Image.Image:
    rng = np.random.default_rng(0)
    img = Image.fromarray(rng.integers(0, 256, (h // 10 + 2, w // 10 + 2, 3), dtype=np.uint8)).resize((w, h), Image.BICUBIC)
    return img.convert(mode)


def _fast(data: bytes, draft=None) -> bool:
    """Whether the fast path takes this file."""
    fh = io.BytesIO(data)
    return _fast_decode(_open(fh, "x", 10**9), fh, draft) is not None


CASES = {
    "png rgb": (_bytes(_texture(), "PNG"), True),
    "png gray": (_bytes(_texture(mode="L"), "PNG"), True),
    "png 16-bit gray": (_bytes(Image.fromarray((np.arange(64 * 48, dtype=np.uint16) * 20).reshape(48, 64)), "PNG"), False),
    "png palette": (_bytes(_texture().convert("P"), "PNG"), False),
    "png rgba": (_bytes(_texture(mode="RGBA"), "PNG"), False),
    "jpeg rgb": (_bytes(_texture(), "JPEG", quality=90), True),
    "jpeg gray": (_bytes(_texture(mode="L"), "JPEG"), True),
    "jpeg cmyk": (_bytes(_texture(mode="CMYK"), "JPEG"), False),
    "bmp": (_bytes(_texture(), "BMP"), False),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_same_pixels_as_pillow(case):
    data, fast = CASES[case]
    assert _fast(data) == fast
    a = np.asarray(load_image(data, decoder="auto"))
    b = np.asarray(load_image(data, decoder="pil"))
    assert a.shape == b.shape and (a == b).all()


def test_exif_orientation_and_draft_jpeg():
    img = _texture(1000, 700)
    exif = Image.Exif()
    exif[0x0112] = 6
    rotated = _bytes(img, "JPEG", exif=exif.tobytes())
    assert not _fast(rotated)  # Pillow orients it
    assert np.asarray(load_image(rotated)).shape == (1000, 700, 3)
    plain = _bytes(img, "JPEG", quality=92)
    for draft in (None, 64, 224, 300):
        assert _fast(plain, draft)
        a, b = (np.asarray(load_image(plain, draft=draft, decoder=d)) for d in ("auto", "pil"))
        assert a.shape == b.shape and (a == b).all(), draft
    assert np.asarray(load_image(plain, draft=224)).shape == (350, 500, 3)  # 1/2 scale, never below 224


def test_damaged_files_keep_pillows_messages():
    png = CASES["png rgb"][0]
    for data in (png[: len(png) // 2], png[:60] + bytes(len(png) - 60), CASES["jpeg rgb"][0][:300]):
        with pytest.raises(ImageError) as auto:
            load_image(gaussad.intake.images.NamedBytes(data, "bad.png"), decoder="auto")
        with pytest.raises(ImageError) as pil:
            load_image(gaussad.intake.images.NamedBytes(data, "bad.png"), decoder="pil")
        assert str(auto.value) == str(pil.value) and "bad.png" in str(auto.value)


def test_decoders_reported():
    assert fast_decoders() == {"PNG": "pyspng", "JPEG": "simplejpeg"}


def test_every_shared_image_decodes_identically():
    """Every image of the shared sets (bottle PNGs with masks, magnetic tile JPEGs and PNG masks)."""
    if not SHARED_DATA.exists():
        pytest.skip("shared data not present")
    files = list_images(SHARED_DATA, recursive=True)
    for path in files:
        a = np.asarray(load_image(path, decoder="auto"))
        b = np.asarray(load_image(path, decoder="pil"))
        assert a.shape == b.shape and (a == b).all(), path
    assert len(files) > 2000
