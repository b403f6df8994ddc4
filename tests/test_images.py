import numpy as np
import pytest
from PIL import Image

from gaussad.errors import DataError, GaussadError, ImageError
from gaussad.intake.images import IMAGENET_MEAN, IMAGENET_STD, expand_sources, list_images, load_image, preprocess


def test_modes_are_converted_to_rgb(tmp_path):
    rgb = np.random.default_rng(0).integers(0, 256, (20, 30, 3), dtype=np.uint8)
    gray = rgb[:, :, 0]
    assert load_image(rgb).size == (30, 20)
    assert np.array_equal(np.asarray(load_image(gray)), np.repeat(gray[:, :, None], 3, axis=2))
    rgba = np.dstack([rgb, np.full((20, 30), 255, np.uint8)])
    assert np.array_equal(np.asarray(load_image(rgba)), rgb)
    img16 = Image.fromarray(gray.astype(np.uint16) * 257)
    assert img16.mode.startswith("I;16")
    path = tmp_path / "g16.png"
    img16.save(path)
    assert np.abs(np.asarray(load_image(path))[:, :, 0].astype(int) - gray).max() <= 1


def test_preprocess_is_square_resize_and_imagenet_normalisation():
    arr = np.full((10, 40, 3), 255, np.uint8)
    x = preprocess(load_image(arr), 16)
    assert x.shape == (3, 16, 16) and x.dtype == np.float32
    expected = (1.0 - np.asarray(IMAGENET_MEAN)) / np.asarray(IMAGENET_STD)
    np.testing.assert_allclose(x[:, 5, 5], expected, rtol=1e-6)


def _pixels(x: np.ndarray) -> np.ndarray:
    """Undo the ImageNet normalisation: the 0..255 pixel values the network input was made of."""
    return (x * np.asarray(IMAGENET_STD)[:, None, None] + np.asarray(IMAGENET_MEAN)[:, None, None]) * 255


def test_brightness_match_scales_to_one_grey_level():
    """``brightness='match'``: the resized image's mean grey (PIL's own 'L' conversion, computed independently here)
    becomes 117 by one factor on every channel, clipped at 255; a black image stays black; a photo taken at half the
    light gives the same input as the full-light one (up to its 8-bit rounding); 'keep' leaves the pixels alone."""
    rng = np.random.default_rng(0)
    arr = rng.integers(20, 120, (16, 16, 3), dtype=np.uint8)  # at the input size: the resize leaves it as it is
    img = load_image(arr)
    kept, matched = preprocess(img, 16), preprocess(img, 16, brightness="match")
    grey = np.asarray(img.convert("L"), float).mean()
    np.testing.assert_allclose(_pixels(kept), arr.transpose(2, 0, 1), atol=1e-3)
    np.testing.assert_allclose(_pixels(matched), arr.transpose(2, 0, 1) * 117.0 / grey, rtol=0.01)
    assert abs(np.asarray(Image.fromarray(_pixels(matched).round().astype(np.uint8).transpose(1, 2, 0)).convert("L"),
                          float).mean() - 117.0) < 1.0
    half = load_image((arr // 2).astype(np.uint8))
    assert np.abs(_pixels(preprocess(half, 16, brightness="match")) - _pixels(matched)).max() < 6.0
    assert np.abs(_pixels(preprocess(half, 16)) - _pixels(kept)).max() > 20.0
    black = preprocess(load_image(np.zeros((8, 8, 3), np.uint8)), 8, brightness="match")
    np.testing.assert_allclose(_pixels(black), 0.0, atol=1e-3)
    spot = np.zeros((32, 32, 3), np.uint8)
    spot[:4, :4] = 200  # mean grey about 3: a gain of about 37 that only the clipping keeps in range
    assert _pixels(preprocess(load_image(spot), 32, brightness="match")).max() == pytest.approx(255.0, abs=1e-3)
    with pytest.raises(GaussadError, match="unknown brightness 'auto'; choose one of: keep, match"):
        preprocess(img, 16, brightness="auto")


def test_bad_images_name_the_file(tmp_path):
    empty = tmp_path / "empty.png"
    empty.write_bytes(b"")
    junk = tmp_path / "junk.jpg"
    junk.write_bytes(b"this is not a jpeg at all")
    good = tmp_path / "ok.png"
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(good)
    truncated = tmp_path / "cut.png"
    truncated.write_bytes(good.read_bytes()[:40])
    for bad in (empty, junk, truncated, tmp_path / "missing.png"):
        with pytest.raises(ImageError, match=bad.name):
            load_image(bad)
    with pytest.raises(ImageError, match="uint8"):
        load_image(np.zeros((4, 4, 3), np.float32))


def test_folders_list_images_sorted_and_empty_folder_errors(tmp_path):
    for name in ("b.png", "a.jpg", "notes.txt"):
        (tmp_path / name).write_bytes(b"x")
    assert [p.name for p in list_images(tmp_path)] == ["a.jpg", "b.png"]
    assert [p.name for p in expand_sources([tmp_path / "b.png", tmp_path])] == ["b.png", "a.jpg", "b.png"]
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DataError, match="no images"):
        list_images(empty)


def test_native_lite_normalisation_is_tf_scaling():
    """EfficientNet-Lite's own normalisation is (x - 127) / 128, the TF training recipe."""
    from gaussad.intake.backbones import get_spec

    arr = np.random.default_rng(3).integers(0, 256, (16, 16, 3), dtype=np.uint8)
    x = preprocess(load_image(arr), 16, get_spec("efficientnet-lite0").native_normalization)
    np.testing.assert_allclose(x, (arr.transpose(2, 0, 1).astype(np.float32) - 127) / 128, atol=1e-5)


def test_resize_matches_cv2_inter_linear_within_one_level():
    """The square resize samples bilinearly at pixel centres like cv2.INTER_LINEAR (the paper's albumentations)."""
    import torch

    from gaussad.intake.images import resize_square

    arr = np.random.default_rng(4).integers(0, 256, (37, 53, 3), dtype=np.uint8)
    ours = np.asarray(resize_square(Image.fromarray(arr), 24)).astype(float)
    t = torch.from_numpy(arr.astype(np.float32).transpose(2, 0, 1))[None]
    ref = torch.nn.functional.interpolate(t, size=(24, 24), mode="bilinear", align_corners=False, antialias=False)
    diff = np.abs(ours - ref[0].numpy().transpose(1, 2, 0))
    assert diff.max() <= 1.01 and diff.mean() < 0.6
    antialiased = np.asarray(Image.fromarray(arr).resize((24, 24), Image.BILINEAR)).astype(float)
    assert np.abs(antialiased - ref[0].numpy().transpose(1, 2, 0)).mean() > 5


@pytest.mark.parametrize("width, height", [(224, 224), (103, 400), (632, 222), (900, 900), (5000, 10), (1, 1)])
def test_aspect_size_keeps_proportions_at_about_the_same_area(width, height):
    from gaussad.intake.images import aspect_size

    tw, th = aspect_size(width, height, 224)
    assert tw % 32 == 0 and th % 32 == 0 and 32 <= tw <= 8 * 224 and 32 <= th <= 8 * 224
    if max(width / height, height / width) < 8:
        assert abs(np.log((tw / th) / (width / height))) < 0.35
        assert 0.6 < tw * th / 224**2 < 1.6


def test_aspect_resize_is_the_square_interpolation_at_another_size():
    """resize='aspect' samples like the square resize, only to the aspect-kept size (checked against torch)."""
    import torch

    from gaussad.intake.images import aspect_size, resize_to

    arr = np.random.default_rng(5).integers(0, 256, (150, 60, 3), dtype=np.uint8)
    tw, th = aspect_size(60, 150, 64)
    ours = np.asarray(resize_to(Image.fromarray(arr), 64, "aspect")).astype(float)
    assert ours.shape == (th, tw, 3) and th > tw
    t = torch.from_numpy(arr.astype(np.float32).transpose(2, 0, 1))[None]
    ref = torch.nn.functional.interpolate(t, size=(th, tw), mode="bilinear", align_corners=False, antialias=False)
    assert np.abs(ours - ref[0].numpy().transpose(1, 2, 0)).max() <= 1.01
