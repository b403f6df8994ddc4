"""Heat-map overlays (gaussad.detector.heatmap): the colour scale from the model's good images, nothing tinted below it, a
visible tint above it, the legend panel with the decision, and the same rendering written by ``score --maps``."""

import json

import numpy as np
import pytest
from PIL import Image

from gaussad import GaussianAD
from gaussad.cli import main
from gaussad.detector.heatmap import FALLBACK_LOW, HeatScale, heat_scale, render
from gaussad.intake.images import list_images, load_image

from .conftest import TINY

TINY_FUSED = {**TINY, "map_levels": ["stage2", "stage3"], "map_method": "nearest", "image_score": "fused",
              "threshold": "conformal", "fpr": 0.2}


def test_scale_starts_at_the_largest_good_peak_and_falls_back_without_peaks():
    assert heat_scale(np.array([1.0, 1.3, 1.2])) == HeatScale(1.3, 2.6, "max of 3 good images")
    fallback = heat_scale(None)
    assert (fallback.low, fallback.high) == (FALLBACK_LOW, 2 * FALLBACK_LOW) and "fixed" in fallback.source


def test_nothing_below_the_start_is_tinted_and_full_heat_is_the_last_colour():
    img = Image.fromarray(np.full((30, 40, 3), 128, np.uint8))
    amap = np.ones((10, 10), np.float32)  # below the start level 1.5: a good image's map
    amap[:, 5:] = 3.0  # at full colour (2 x 1.5)
    out = np.asarray(render(img, amap, heat_scale(np.array([1.0, 1.5])), 2.5, True)).astype(int)
    assert out.shape[1] == 240 and out.shape[0] > 30  # a 40 px image centred on a canvas as wide as the panel
    top = out[:30, 100:140]
    assert (top[:, :18] == 128).all()  # the cells at 1.0, away from the bilinear seam: untouched
    # full heat: the ramp's last stop (160, 0, 70) at blend 0.85 over grey 128
    np.testing.assert_array_equal(top[:, 22:], np.broadcast_to([155, 19, 79], top[:, 22:].shape))


def test_just_above_the_start_is_already_visible():
    img = Image.fromarray(np.full((20, 20, 3), 128, np.uint8))
    out = np.asarray(render(img, np.full((4, 4), 1.51, np.float32), HeatScale(1.5, 3.0, "test"))).astype(int)
    # the ramp's first stop (255, 240, 0) at blend >= 0.45: every pixel moves by more than 40 levels
    assert (np.abs(out[:20, 110:130] - 128).max(axis=2) > 40).all()


def test_the_panel_shows_the_decision():
    img = Image.fromarray(np.full((50, 300, 3), 128, np.uint8))
    amap = np.ones((5, 5), np.float32)
    scale = HeatScale(1.5, 3.0, "test")
    red, green = (214, 40, 40), (43, 147, 72)

    def has(colour, image):
        return bool((np.asarray(image)[50:] == colour).all(axis=2).any())

    flagged, ok, bare = render(img, amap, scale, 9.0, True), render(img, amap, scale, 0.1, False), render(img, amap, scale)
    assert has(red, flagged) and not has(green, flagged)
    assert has(green, ok) and not has(red, ok)
    assert not has(red, bare) and not has(green, bare)
    assert flagged.width == 300  # a wide image keeps its width


@pytest.fixture(scope="module")
def fused(tiny_category, tmp_path_factory):
    model = GaussianAD(**TINY_FUSED).fit(list_images(tiny_category / "train" / "good"))
    path = tmp_path_factory.mktemp("heat") / "fused.gaussad"
    model.save(path)
    return model, path


def test_score_maps_draws_the_models_scale_score_and_decision(fused, tiny_category, tmp_path, capsys):
    """The overlay of a training image has no heat at all (its map stays below the good images' largest peak); a
    defective image's has; each file is the rendering of its row."""
    model, path = fused
    good = list_images(tiny_category / "train" / "good")[0]
    bad = next(p for d in sorted((tiny_category / "test").iterdir()) if d.name != "good" for p in list_images(d))
    assert main(["score", str(path), str(good), str(bad), "--maps", str(tmp_path / "maps"), "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)["results"]
    scale = heat_scale(model.map_calibration_)
    tinted = []
    for image, row in zip((good, bad), rows):
        got = np.asarray(Image.open(row["map"]).convert("RGB")).astype(int)
        want = np.asarray(render(load_image(image), model.anomaly_map([image])[0], scale, row["score"], row["anomalous"]))
        assert got.shape == want.shape and np.abs(got - want).max() <= 2
        original = np.asarray(load_image(image)).astype(int)
        x = (got.shape[1] - original.shape[1]) // 2
        tinted.append(int((np.abs(got[:original.shape[0], x:x + original.shape[1]] - original) > 2).any(axis=2).sum()))
    assert tinted[0] == 0 and tinted[1] > 0
