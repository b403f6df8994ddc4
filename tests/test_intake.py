"""Image intake: every common format and mode is read as the RGB an independent formula predicts; every bad
file is refused with one ImageError naming it. See RELIABILITY.md for the table these tests back."""

import errno
import io
import os
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

import gaussad.intake.files
from gaussad.errors import DataError, GaussadError, ImageError
from gaussad.intake.images import DEFAULT_MAX_PIXELS, list_images, load_image

from .conftest import in_child


def _ref(h=24, w=32, seed=0):
    """Blocky RGB test pattern (8x8 blocks, so lossy codecs keep it close)."""
    small = np.random.default_rng(seed).integers(0, 256, (h // 8, w // 8, 3), dtype=np.uint8)
    return np.kron(small, np.ones((8, 8, 1), np.uint8))


REF = _ref()
GRAY = REF[:, :, 0]
# Smooth colour gradients for the lossy codecs (JPEG/WebP smear the sharp edges of REF across chroma blocks).
_yy, _xx = np.mgrid[0:48, 0:64]
SMOOTH = np.dstack([_xx * 4, _yy * 5, 255 - _xx * 2 - _yy]).astype(np.uint8)
ALPHA = np.tile(np.linspace(0, 255, REF.shape[1]).round().astype(np.uint8), (REF.shape[0], 1))


def _composite_on_black(rgb, alpha):
    return np.rint(rgb.astype(float) * alpha[..., None] / 255.0)


def _save(tmp_path, name, img, **kw):
    path = tmp_path / name
    img.save(path, **kw)
    return path


def _loaded(path, **kw):
    img = load_image(path, **kw)
    assert img.mode == "RGB"
    return np.asarray(img).astype(float)


# ----- accepted formats and modes, each against an expectation computed independently -----------------------

def _palette_image(transparent: bool):
    palette = np.array([[255, 0, 0], [0, 255, 0], [0, 0, 255], [200, 200, 50]], np.uint8)
    idx = (GRAY // 64).astype(np.uint8)
    img = Image.fromarray(idx, mode="P")
    img.putpalette(palette.ravel().tolist())
    expected = palette[idx].astype(float)
    if transparent:
        img.info["transparency"] = 2
        expected[idx == 2] = 0
    return img, expected


LOSSLESS = {
    "png-rgb": (lambda: Image.fromarray(REF), "png", {}, REF),
    "png-gray8": (lambda: Image.fromarray(GRAY), "png", {}, np.dstack([GRAY] * 3)),
    "png-gray16": (
        lambda: Image.fromarray(GRAY.astype(np.uint16) * 257 + 128),
        "png", {}, np.dstack([np.rint((GRAY * 257.0 + 128) / 257)] * 3),
    ),
    "png-rgba": (lambda: Image.fromarray(np.dstack([REF, ALPHA])), "png", {}, _composite_on_black(REF, ALPHA)),
    "png-la": (
        lambda: Image.fromarray(np.dstack([GRAY, ALPHA])), "png", {}, np.dstack([_composite_on_black(GRAY[..., None], ALPHA)[..., 0]] * 3),
    ),
    "png-palette": (lambda: _palette_image(False)[0], "png", {}, _palette_image(False)[1]),
    "png-palette-transparent": (
        lambda: _palette_image(True)[0], "png", {"transparency": 2}, _palette_image(True)[1],
    ),
    "png-1bit": (lambda: Image.fromarray(GRAY > 127), "png", {}, np.dstack([np.where(GRAY > 127, 255.0, 0.0)] * 3)),
    "bmp-rgb": (lambda: Image.fromarray(REF), "bmp", {}, REF),
    "bmp-gray8": (lambda: Image.fromarray(GRAY), "bmp", {}, np.dstack([GRAY] * 3)),
    "bmp-1bit": (lambda: Image.fromarray(GRAY > 127), "bmp", {}, np.dstack([np.where(GRAY > 127, 255.0, 0.0)] * 3)),
    "tiff-rgb": (lambda: Image.fromarray(REF), "tif", {}, REF),
    "tiff-rgb-lzw": (lambda: Image.fromarray(REF), "tif", {"compression": "tiff_lzw"}, REF),
    "tiff-rgb-deflate": (lambda: Image.fromarray(REF), "tif", {"compression": "tiff_adobe_deflate"}, REF),
    "tiff-gray16": (
        lambda: Image.fromarray(GRAY.astype(np.uint16) * 257), "tif", {}, np.dstack([GRAY] * 3),
    ),
    "tiff-rgba": (lambda: Image.fromarray(np.dstack([REF, ALPHA])), "tif", {}, _composite_on_black(REF, ALPHA)),
    "webp-lossless-rgb": (lambda: Image.fromarray(REF), "webp", {"lossless": True}, REF),
    "webp-lossless-rgba": (
        lambda: Image.fromarray(np.dstack([REF, ALPHA])), "webp", {"lossless": True, "exact": True}, _composite_on_black(REF, ALPHA),
    ),
}


@pytest.mark.parametrize("case", list(LOSSLESS))
def test_lossless_formats_and_modes_decode_exactly(tmp_path, case):
    make, ext, kw, expected = LOSSLESS[case]
    out = _loaded(_save(tmp_path, f"img.{ext}", make(), **kw))
    assert out.shape == REF.shape
    assert np.abs(out - expected).max() <= 1, case


def _cmyk_array():
    rng = np.random.default_rng(5)
    return np.kron(rng.integers(0, 256, (3, 4, 4), dtype=np.uint8), np.ones((8, 8, 1), np.uint8))


def _cmyk_to_rgb(cmyk):
    """Naive (profile-free) CMYK -> RGB: R = (255 - C)(255 - K) / 255, likewise G and B."""
    c = cmyk.astype(float)
    return (255 - c[..., :3]) * (255 - c[..., 3:]) / 255.0


def test_cmyk_tiff_uses_the_standard_formula(tmp_path):
    cmyk = _cmyk_array()
    out = _loaded(_save(tmp_path, "cmyk.tif", Image.fromarray(cmyk, mode="CMYK")))
    assert np.abs(out - _cmyk_to_rgb(cmyk)).max() <= 1


def test_cmyk_jpeg_is_read_like_the_same_cmyk_tiff(tmp_path):
    """PIL writes CMYK JPEGs with an Adobe marker (inverted storage); reading must undo it."""
    cmyk = _cmyk_array()
    path = _save(tmp_path, "cmyk.jpg", Image.fromarray(cmyk, mode="CMYK"), quality=98)
    with Image.open(path) as raw:
        assert raw.mode == "CMYK" and "adobe" in raw.info
    assert np.abs(_loaded(path) - _cmyk_to_rgb(cmyk)).mean() < 3


@pytest.mark.parametrize("mode", ["RGB", "L"])
def test_jpeg_is_close_to_the_source(tmp_path, mode):
    src = Image.fromarray(SMOOTH).convert(mode)
    expected = np.asarray(src.convert("RGB")).astype(float)
    assert np.abs(_loaded(_save(tmp_path, "img.jpg", src, quality=95)) - expected).mean() < 2


def test_lossy_webp_is_close_to_the_source(tmp_path):
    assert np.abs(_loaded(_save(tmp_path, "img.webp", Image.fromarray(SMOOTH), quality=95)) - SMOOTH).mean() < 2


def test_16bit_rgb_and_float_tiffs(tmp_path):
    tifffile = pytest.importorskip("tifffile")
    rgb16 = REF.astype(np.uint16) * 257 + 100
    tifffile.imwrite(tmp_path / "rgb16.tif", rgb16, photometric="rgb")
    with Image.open(tmp_path / "rgb16.tif") as raw:
        assert raw.format == "TIFF"
    assert np.abs(_loaded(tmp_path / "rgb16.tif") - rgb16 / 257.0).max() <= 1
    unit = GRAY.astype(np.float32) / 255.0
    tifffile.imwrite(tmp_path / "float.tif", unit)
    with Image.open(tmp_path / "float.tif") as raw:
        assert raw.mode == "F"
    assert np.abs(_loaded(tmp_path / "float.tif") - np.dstack([GRAY] * 3)).max() <= 1


# EXIF orientation tag -> the transform that displays the stored pixels upright (EXIF 2.3, tag 0x0112).
ORIENTATIONS = {
    1: lambda a: a,
    2: lambda a: a[:, ::-1],
    3: lambda a: a[::-1, ::-1],
    4: lambda a: a[::-1],
    5: lambda a: a.transpose(1, 0, 2),
    6: lambda a: np.rot90(a, -1),
    7: lambda a: a.transpose(1, 0, 2)[::-1, ::-1],
    8: lambda a: np.rot90(a, 1),
}


@pytest.mark.parametrize("orientation", sorted(ORIENTATIONS))
def test_exif_orientation_is_applied(tmp_path, orientation):
    exif = Image.Exif()
    exif[0x0112] = orientation
    path = _save(tmp_path, "o.png", Image.fromarray(REF), exif=exif)
    assert np.array_equal(_loaded(path), ORIENTATIONS[orientation](REF))


def test_exif_orientation_in_a_jpeg(tmp_path):
    exif = Image.Exif()
    exif[0x0112] = 6
    path = _save(tmp_path, "o.jpg", Image.fromarray(SMOOTH), exif=exif, quality=95)
    out = _loaded(path)
    assert out.shape == (SMOOTH.shape[1], SMOOTH.shape[0], 3)
    assert np.abs(out - np.rot90(SMOOTH, -1)).mean() < 2


def test_multi_frame_files_give_their_first_frame(tmp_path):
    second = Image.fromarray(255 - REF)
    tif = _save(tmp_path, "pages.tif", Image.fromarray(REF), save_all=True, append_images=[second])
    webp = _save(tmp_path, "anim.webp", Image.fromarray(REF), save_all=True, append_images=[second], lossless=True)
    with Image.open(tif) as raw:
        assert raw.n_frames == 2
    assert np.array_equal(_loaded(tif), REF)
    assert np.array_equal(_loaded(webp), REF)


def test_extreme_shapes_are_accepted(tmp_path):
    assert _loaded(_save(tmp_path, "dot.png", Image.new("RGB", (1, 1), (9, 8, 7)))).tolist() == [[[9, 8, 7]]]
    line = _loaded(_save(tmp_path, "line.png", Image.new("L", (1, 200_000), 77)))
    assert line.shape == (200_000, 1, 3) and (line == 77).all()


@pytest.mark.parametrize(
    "mode, values, expected",
    [
        ("I;16", np.array([[0, 257, 65535]], np.uint16), [0, 1, 255]),
        ("I", np.array([[0, 128, 255]], np.int32), [0, 128, 255]),
        ("I", np.array([[0, 514, 65535]], np.int32), [0, 2, 255]),
        ("F", np.array([[0.0, 0.5, 1.0]], np.float32), [0, 128, 255]),
        ("F", np.array([[0.0, 100.0, 255.0]], np.float32), [0, 100, 255]),
    ],
)
def test_wide_grayscale_scaling_rule(mode, values, expected):
    """16-bit divides by 257; 32-bit int and float use the range (0..1 floats, 0..255, 0..65535) holding all values."""
    img = Image.fromarray(values) if mode != "I;16" else Image.fromarray(values).convert("I;16")
    assert img.mode == mode
    assert np.asarray(load_image(img))[0, :, 0].tolist() == expected


@pytest.mark.parametrize("mode", ["1", "L", "P", "PA", "LA", "La", "RGBA", "RGBa", "RGBX", "CMYK", "YCbCr", "LAB", "HSV"])
def test_every_pil_mode_converts_to_rgb(mode):
    assert load_image(Image.new(mode, (3, 2))).mode == "RGB"


# ----- refused files: one ImageError naming the file and saying what is wrong ----------------------------

def _refused(path, needle, **kw):
    with pytest.raises(ImageError) as info:
        load_image(path, **kw)
    message = str(info.value)
    assert str(path) in message and needle in message, message
    return message


def test_zero_byte_file(tmp_path):
    (tmp_path / "empty.png").write_bytes(b"")
    _refused(tmp_path / "empty.png", "empty file (0 bytes)")


@pytest.mark.parametrize("fmt, ext", [("PNG", "png"), ("JPEG", "jpg"), ("BMP", "bmp"), ("TIFF", "tif"), ("WEBP", "webp")])
def test_truncated_files(tmp_path, fmt, ext):
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(1).integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(buf, fmt)
    path = tmp_path / f"cut.{ext}"
    path.write_bytes(buf.getvalue()[: len(buf.getvalue()) * 2 // 3])
    _refused(path, "")


def test_not_an_image(tmp_path):
    path = tmp_path / "page.jpg"
    path.write_bytes(b"<html><body>404 Not Found</body></html>")
    _refused(path, "not a PNG, JPEG, BMP, TIFF or WebP image")


def test_other_formats_are_refused_even_when_pil_reads_them(tmp_path):
    gif = _save(tmp_path, "anim.gif", Image.fromarray(REF))
    with Image.open(gif) as raw:
        assert raw.format == "GIF"
    _refused(gif, "not a PNG, JPEG, BMP, TIFF or WebP image")


def test_postscript_disguised_as_png_never_reaches_ghostscript(tmp_path, monkeypatch):
    """PIL would identify this as EPS and run Ghostscript on load; the allow-list never offers it to that plugin."""
    from PIL import EpsImagePlugin

    path = tmp_path / "innocent.png"
    path.write_bytes(b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 8 8\nnewpath 0 0 moveto showpage\n%%EOF\n")
    with Image.open(path) as raw:
        assert raw.format == "EPS"
    called = []
    monkeypatch.setattr(EpsImagePlugin, "Ghostscript", lambda *a, **k: called.append(a))
    _refused(path, "not a PNG, JPEG, BMP, TIFF or WebP image")
    assert called == []


def _png_bomb(side: int) -> bytes:
    """A genuine, valid PNG of side x side black pixels; zlib squeezes it about 1000:1."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    comp = zlib.compressobj(9)
    row = b"\0" * (side + 1)
    idat = b"".join(comp.compress(row) for _ in range(side)) + comp.flush()
    header = struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def test_decompression_bomb_is_refused_before_decoding(tmp_path, monkeypatch):
    from PIL import ImageFile

    path = tmp_path / "bomb.png"
    path.write_bytes(_png_bomb(14_000))  # 196 Mpx, 588 MB as RGB, about 190 kB on disk
    assert path.stat().st_size < 300_000 and 14_000**2 > DEFAULT_MAX_PIXELS
    monkeypatch.setattr(ImageFile.ImageFile, "load", lambda self: pytest.fail("decoding started"))
    _refused(path, f"14000x14000 = 196000000 pixels exceeds the limit of {DEFAULT_MAX_PIXELS}")


def test_pixel_limit_is_per_call_and_independent_of_pils_global(tmp_path, monkeypatch):
    path = _save(tmp_path, "img.png", Image.fromarray(REF))  # 768 pixels
    before = Image.MAX_IMAGE_PIXELS
    _refused(path, "768 pixels exceeds the limit of 767", max_pixels=767)
    assert load_image(path, max_pixels=768).size == (32, 24)
    assert Image.MAX_IMAGE_PIXELS == before  # nothing leaks into PIL's process-wide setting
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 10)  # another library's strict global setting
    assert load_image(path).size == (32, 24)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", None)  # ... or a disabled one
    _refused(path, "exceeds the limit of 100", max_pixels=100)
    for bad in (0, -5, 1.5, True, "many"):
        with pytest.raises(GaussadError, match="max_pixels must be a positive integer"):
            from gaussad.intake.images import check_max_pixels

            check_max_pixels(bad)


def test_pixel_limit_reaches_the_pipeline(tmp_path):
    from gaussad.intake.features import FeatureExtractor

    small = _save(tmp_path, "small.png", Image.fromarray(REF[:8, :8]))
    big = _save(tmp_path, "big.png", Image.fromarray(REF))
    skipped = []
    extractor = FeatureExtractor(input_size=32, levels=["stem"], max_pixels=100)
    feats = extractor.extract([small, big], on_error="skip", skipped=skipped)
    assert feats[0].shape[0] == 1 and skipped[0][0] == 1 and "exceeds the limit of 100" in skipped[0][1]


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_unreadable_file_real_permissions():
    """A chmod 000 file, read by an unprivileged user: as root (CI), a forked child drops to uid/gid 65534 first."""
    import tempfile
    from pathlib import Path

    folder = Path(tempfile.mkdtemp(prefix="gaussad-perm-"))  # pytest's tmp_path is 0700 root: not traversable
    try:
        folder.chmod(0o755)
        path = _save(folder, "locked.png", Image.fromarray(REF))
        path.chmod(0)
        if os.geteuid() != 0:
            _refused(path, "cannot open (permission denied)")
            return

        def work() -> tuple[int, str]:  # in the child: drop privileges for good, try the read, report
            os.setgroups([])
            os.setgid(65534)
            os.setuid(65534)
            try:
                load_image(path)
                return 0, "loaded"
            except ImageError as exc:
                return 0, f"ImageError: {exc}"
            except BaseException as exc:  # noqa: BLE001 - reported to the parent
                return 0, f"{type(exc).__name__}: {exc}"

        code, text = in_child(work)
        assert code == 0, text
        assert text == f"ImageError: {path}: cannot open (permission denied)", text
    finally:
        for p in folder.iterdir():
            p.chmod(0o644)
        import shutil

        shutil.rmtree(folder, ignore_errors=True)


def test_unreadable_file_simulated_eacces(tmp_path, monkeypatch):
    """os.open failing with EACCES, as it does for a non-root user on a chmod 000 file."""
    path = _save(tmp_path, "locked.png", Image.fromarray(REF))
    real_open = os.open

    def guarded(p, flags, *args):
        if os.fspath(p) == str(path):
            raise PermissionError(errno.EACCES, "Permission denied", str(p))
        return real_open(p, flags, *args)

    monkeypatch.setattr(gaussad.intake.files.os, "open", guarded)
    _refused(path, "cannot open (permission denied)")


def test_folder_instead_of_file(tmp_path):
    (tmp_path / "shots.png").mkdir()
    _refused(tmp_path / "shots.png", "is a folder, not an image")


def test_missing_file(tmp_path):
    _refused(tmp_path / "nope.png", "cannot open (no such file)")


def test_broken_symlink(tmp_path):
    (tmp_path / "link.png").symlink_to(tmp_path / "gone.png")
    _refused(tmp_path / "link.png", "broken symbolic link")


def test_symlink_loop(tmp_path):
    (tmp_path / "a.png").symlink_to(tmp_path / "b.png")
    (tmp_path / "b.png").symlink_to(tmp_path / "a.png")
    _refused(tmp_path / "a.png", "symbolic link loop")


def test_named_pipe_is_refused_without_blocking(tmp_path):
    os.mkfifo(tmp_path / "pipe.png")
    _refused(tmp_path / "pipe.png", "not a regular file")


def test_device_file_is_refused():
    if not os.path.exists("/dev/zero"):
        pytest.skip("no /dev/zero on this system")
    _refused("/dev/zero", "not a regular file")


def test_float_image_with_nan_and_out_of_range_integers():
    with pytest.raises(ImageError, match="NaN or infinite"):
        load_image(Image.fromarray(np.array([[0.5, np.nan]], np.float32)))
    with pytest.raises(ImageError, match="outside 0..65535"):
        load_image(Image.fromarray(np.array([[0, 70_000]], np.int32)))
    with pytest.raises(ImageError, match="outside 0..65535"):
        load_image(Image.fromarray(np.array([[-3.0, 1.0]], np.float32)))


@pytest.mark.parametrize(
    "array, needle",
    [
        (np.zeros((4, 4, 3), np.float32), "must be uint8"),
        (np.zeros((4, 4, 3), np.uint16), "must be uint8"),
        (np.zeros((4, 4, 2), np.uint8), "got shape (4, 4, 2)"),
        (np.zeros((2, 4, 4, 3), np.uint8), "got shape (2, 4, 4, 3)"),
        (np.zeros((0, 4, 3), np.uint8), "no pixels"),
    ],
    ids=["float32", "uint16", "two-channel", "4d", "empty"],
)
def test_bad_arrays(array, needle):
    with pytest.raises(ImageError, match=r"array #3.*" + needle.replace("(", r"\(").replace(")", r"\)")):
        load_image(array, 3)


def test_unsupported_source_type():
    with pytest.raises(ImageError, match="unsupported image type list"):
        load_image([[1, 2], [3, 4]])


def test_folder_listing_reports_broken_links_and_unlistable_folders(tmp_path, monkeypatch):
    Image.fromarray(REF).save(tmp_path / "a.png")
    (tmp_path / "b.png").symlink_to(tmp_path / "gone.png")
    (tmp_path / "sub.png").mkdir()
    assert [p.name for p in list_images(tmp_path)] == ["a.png", "b.png"]
    from pathlib import Path

    def denied(self):
        raise PermissionError(errno.EACCES, "Permission denied")

    monkeypatch.setattr(Path, "iterdir", denied)
    with pytest.raises(DataError, match="cannot list folder"):
        list_images(tmp_path)
