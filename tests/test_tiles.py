"""Tiled anomaly maps (map_tiles): the tile geometry, the stitching against the network run on each tile by hand, the
global path left as it was, and every consumer of maps (fit, maps, fused peaks, evaluate, model files, merge,
partial_fit, export, CLI) working on the stitched feature maps."""

import json

import numpy as np
import pytest
from PIL import Image

import gaussad
from gaussad import GaussianAD, InvalidParameterError
from gaussad.cli import main
from gaussad.intake.features import FeatureExtractor
from gaussad.intake.images import list_images
from gaussad.intake.tiles import (AUTO_MAX_TILES, Mosaic, auto_tiles, check_tiling, cut, map_side, starts, tile_boxes,
                                  tile_step)

from .conftest import TINY

# stage2 (stride 4) and stage7 (stride 32, the largest): every level's grid must line up with the tiles.
TILED = {**TINY, "map_levels": ["stage2", "stage7"], "map_method": "nearest", "map_coreset": 1.0}


def _covered(boxes, height: int, width: int) -> np.ndarray:
    count = np.zeros((height, width), int)
    for top, left, h, w in boxes:
        count[top:top + h, left:left + w] += 1
    return count


@pytest.mark.parametrize("size", [64, 96, 224, 320, 512])
def test_tiles_overlap_by_about_a_quarter_align_on_32_and_cover_the_map_image(size):
    step = tile_step(size)
    assert step % 32 == 0 and 32 <= step < size and abs((size - step) - size / 4) <= 16 + 1e-9
    for tiles in (2, 3, 8):
        side = map_side(size, tiles)
        assert starts(side, size) == [i * step for i in range(tiles)]  # k tiles along each side of a square image
        boxes = tile_boxes(side, side, size)
        assert len(boxes) == tiles ** 2 and _covered(boxes, side, side).min() >= 1
    for height, width in [(size + 32, 5 * size + 64), (size // 2 // 32 * 32 or 32, 3 * size)]:  # aspect-kept shapes
        boxes = tile_boxes(height, width, size)
        assert len({b[2:] for b in boxes}) == 1 and all(b[0] % 32 == 0 and b[1] % 32 == 0 for b in boxes)
        count = _covered(boxes, height, width)
        assert count.min() >= 1
        assert max(b[0] + b[2] for b in boxes) == height and max(b[1] + b[3] for b in boxes) == width
    assert tile_step(224) == 160 and map_side(224, 2) == 384 and tile_step(64) == 32


def test_tiling_needs_an_input_size_that_aligns():
    check_tiling(72, 1)  # untiled: any size
    for bad in (72, 32, 250):
        with pytest.raises(InvalidParameterError, match="input_size"):
            check_tiling(bad, 2)
    with pytest.raises(InvalidParameterError, match="input_size"):
        GaussianAD(**{**TILED, "input_size": 72}, map_tiles=2).fit([np.zeros((64, 64, 3), np.uint8)] * 2)


def test_mosaic_is_the_mean_of_the_covering_tiles_cells():
    """Random tile maps at strides 4 and 32: each stitched cell is the mean of the cells of the tiles covering it
    (a brute-force loop over cells as the oracle)."""
    rng = np.random.default_rng(0)
    height, width, size = 128, 192, 64
    boxes = tile_boxes(height, width, size)
    tiles = [[rng.normal(size=(3, 16, 16)).astype(np.float32), rng.normal(size=(2, 2, 2)).astype(np.float32)]
             for _ in boxes]
    mosaic = Mosaic(height, width)
    for box, fmaps in zip(boxes, tiles):
        mosaic.add(box, fmaps)
    for level, stride in enumerate((4, 32)):
        got = mosaic.result()[level]
        assert got.shape[1:] == (height // stride, width // stride)
        for y in range(got.shape[1]):
            for x in range(got.shape[2]):
                cells = [f[level][:, y - top // stride, x - left // stride]
                         for (top, left, h, w), f in zip(boxes, tiles)
                         if top <= y * stride < top + h and left <= x * stride < left + w]
                np.testing.assert_allclose(got[:, y, x], np.mean(cells, axis=0), rtol=1e-6, atol=1e-6)


def _images() -> list[np.ndarray]:
    """Two smooth non-square test images (so that the aspect-kept map image is tiled unevenly)."""
    rng = np.random.default_rng(1)
    base = [Image.fromarray((rng.random((12, 18, 3)) * 255).astype(np.uint8)).resize((150, 100), Image.BILINEAR)
            for _ in range(2)]
    return [np.asarray(img) for img in base]


def _stacked(extractor: FeatureExtractor, images: list) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Pooled features and feature maps of all ``images``, per level, whatever the batches."""
    batches = list(extractor.iter_features_and_maps(images))
    return ([np.concatenate(level) for level in zip(*(b[1] for b in batches))],
            [np.concatenate(level) for level in zip(*(b[2] for b in batches))])


@pytest.mark.parametrize("resize", ["square", "aspect"])
def test_stitched_maps_equal_the_network_run_on_each_tile_by_hand(resize):
    """The extractor's tiled feature maps against an independent stitch: the map image cut by hand, each tile run
    through the network alone, every cell the mean of the covering tiles' cells (to 1e-5); the pooled features are
    those of the untiled extractor (the whole image at the input size)."""
    images = _images()
    tiled = FeatureExtractor(TINY["backbone"], TINY["levels"], 64, map_levels=TILED["map_levels"], resize=resize,
                             map_tiles=3, batch_size=5, engine="onnxruntime")
    plain = FeatureExtractor(TINY["backbone"], TINY["levels"], 64, map_levels=TILED["map_levels"], resize=resize,
                             engine="onnxruntime")
    pooled, fmaps = _stacked(tiled, images)
    pooled_plain, fmaps_plain = _stacked(plain, images)
    for a, b in zip(pooled, pooled_plain):
        np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-12)
    for i, source in enumerate(images):
        big = tiled.prepare_tiled(source)[1]
        height, width = big.shape[1:]
        assert (height, width) == ((128, 128) if resize == "square" else (96, 160))  # 150 x 100 at about 128 x 128
        boxes = tile_boxes(height, width, 64)
        assert len(boxes) == (9 if resize == "square" else 8)
        per_tile = [plain.runner.run(cut(big, box)[None])[len(TINY["levels"]):] for box in boxes]
        for level, stride in enumerate((4, 32)):
            total = np.zeros((fmaps[level].shape[1], height // stride, width // stride))
            count = np.zeros((height // stride, width // stride))
            for (top, left, h, w), outs in zip(boxes, per_tile):
                total[:, top // stride:(top + h) // stride, left // stride:(left + w) // stride] += outs[level][0]
                count[top // stride:(top + h) // stride, left // stride:(left + w) // stride] += 1
            np.testing.assert_allclose(fmaps[level][i], total / count, rtol=1e-5, atol=1e-5)
            assert fmaps[level].shape[2:] != fmaps_plain[level].shape[2:]  # the tiled maps are finer


def test_tiles_run_at_most_batch_size_at_a_time(monkeypatch):
    """Memory stays bounded: a batch holds about batch_size tiles' worth of map images, and no network run sees
    more than batch_size inputs, however many tiles an image has."""
    extractor = FeatureExtractor(TINY["backbone"], TINY["levels"], 64, map_levels=["stage2"], map_tiles=4,
                                 batch_size=3)
    runner = extractor.runner
    sizes: list[int] = []
    run = runner.run
    monkeypatch.setattr(runner, "run", lambda x: (sizes.append(len(x)), run(x))[1])
    assert extractor.images_per_batch == 1
    list(extractor.iter_features_and_maps(_images() * 2))
    assert max(sizes) <= 3 and sum(sizes) == 4 * (1 + 16)


@pytest.fixture(scope="module")
def files(tiny_category):
    return list_images(tiny_category / "train" / "good")


@pytest.fixture(scope="module")
def tiled(files):
    return GaussianAD(**TILED, map_tiles=2).fit(files)


def test_map_tiles_1_is_the_untiled_model_and_tiles_leave_the_global_scores(files, tiny_category, tiled):
    """map_tiles=1 is today's model (the same maps); with tiles the global scores stay those of the whole image."""
    test = list_images(tiny_category / "test", recursive=True)
    plain, one = GaussianAD(**TILED).fit(files), GaussianAD(**TILED, map_tiles=1).fit(files)
    levels, maps = plain.score_with_maps(test)
    levels_one, maps_one = one.score_with_maps(test)
    np.testing.assert_array_equal(maps_one, maps)
    np.testing.assert_array_equal(levels_one, levels)
    levels_tiled, maps_tiled = tiled.score_with_maps(test)
    np.testing.assert_allclose(levels_tiled, levels, rtol=1e-12)
    np.testing.assert_allclose(tiled.score_samples(test), plain.score_samples(test), rtol=1e-12)
    assert maps_tiled.shape == maps.shape == (len(test), 64, 64) and not np.allclose(maps_tiled, maps)


def test_tiled_maps_localise_and_every_map_consumer_works(tiny_root, tiny_category, tiled):
    """evaluate (pixel AUROC, hit rate, map maxima, the fused score) and the fused score's leave-one-image-out peaks
    run on tiled maps as on untiled ones."""
    from gaussad.tools.evaluate import evaluate

    report = evaluate(tiny_root / "brick", protocol="full", **TILED, map_tiles=2)
    r = report["categories"]["brick"]
    assert report["map_tiles"] == 2 and r["pixel_auroc"] > 0.7 and 0.0 <= r["hit_rate"] <= 1.0
    assert 0.5 < r["max_map_auroc"] <= 1.0 and 0.5 < r["fused_auroc"] <= 1.0
    fused = GaussianAD(**TILED, map_tiles=2, image_score="fused").fit(list_images(tiny_category / "train" / "good"))
    assert fused.map_calibration_.shape == (10,) and np.all(fused.map_calibration_ > 0)
    test = list_images(tiny_category / "test", recursive=True)
    levels, peaks, amaps = fused.score_images(test, with_maps=True)
    assert np.all(peaks >= amaps.reshape(len(test), -1).max(axis=1) - 1e-4)


def test_model_files_keep_map_tiles_and_old_files_load_untiled(tiled, tiny_category, tmp_path):
    test = list_images(tiny_category / "test", recursive=True)[:3]
    path = tmp_path / "tiled.gaussad"
    tiled.save(path)
    loaded = gaussad.load(path)
    assert loaded.map_tiles == 2 and loaded.state_.layout.settings["map_tiles"] == 2
    np.testing.assert_allclose(loaded.anomaly_map(test), tiled.anomaly_map(test), rtol=1e-5, atol=1e-5)
    from gaussad.detector.persistence import read_model_file

    meta, _ = read_model_file(path)
    assert meta["map_tiles"] == 2
    from gaussad.detector.params import from_stored
    from gaussad.detector.state import feature_settings

    old = {k: v for k, v in meta.items() if k != "map_tiles"}  # a file from before map_tiles existed
    assert from_stored(old)["map_tiles"] == 1 and feature_settings(old)["map_tiles"] == 1


def test_merge_and_partial_fit_refuse_other_tiles(tiled, files):
    with pytest.raises(InvalidParameterError, match="map_tiles"):
        tiled.merge(GaussianAD(**TILED).fit(files))
    merged = tiled.merge(GaussianAD(**TILED, map_tiles=2).fit(files))
    assert merged.map_tiles == 2 and merged.n_samples_ == 20
    grown = GaussianAD(**TILED, map_tiles=2).partial_fit(files[:5]).partial_fit(files[5:])
    assert grown.n_samples_ == 10 and grown.state_.layout.settings["map_tiles"] == 2
    with pytest.raises(InvalidParameterError, match="map_tiles"):
        grown.set_params(map_tiles=3).partial_fit(files[:2])


def test_bad_map_tiles_are_refused_with_the_parameter_named(files):
    for bad in (0, 9, 2.0, True):
        with pytest.raises(InvalidParameterError, match="map_tiles"):
            GaussianAD(**TILED, map_tiles=bad).fit(files)
    with pytest.raises(InvalidParameterError, match="map_tiles=2 tiles the anomaly maps, but map_levels is empty"):
        GaussianAD(**TINY, map_tiles=2).fit(files)


def test_export_with_maps_refuses_a_tiled_model_in_one_line(tiled):
    from gaussad.tools.export import export_detector

    with pytest.raises(gaussad.GaussadError, match=r"^--maps: this model's maps are tiled \(map_tiles=2\)"):
        export_detector(tiled, maps=True)


def test_cli_map_tiles(tiny_category, tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["fit", "--help"])
    assert "--map-tiles K|auto" in capsys.readouterr().out
    args = ["--input-size", "64", "--levels", ",".join(TINY["levels"]), "--preset", "paper", "--map-levels",
            "stage2,stage7", "--map-method", "nearest"]
    out = tmp_path / "m.gaussad"
    assert main(["fit", str(tiny_category / "train" / "good"), "-o", str(out), *args, "--map-tiles", "2"]) == 0
    assert gaussad.load(out).map_tiles == 2 and "anomaly maps from 2 x 2 tiles per image" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exc:
        main(["fit", str(tiny_category / "train" / "good"), "-o", str(out), *args, "--map-tiles", "0"])
    assert exc.value.code == 2 and "map_tiles must be 'auto' or an integer 1..8" in capsys.readouterr().err
    report = tmp_path / "report.json"
    assert main(["evaluate", str(tiny_category), "--json", str(report), *args, "--map-tiles", "2"]) == 0
    assert json.loads(report.read_text())["map_tiles"] == 2 and "tiles=2" in capsys.readouterr().out
    # auto, decided per category from its training images: 64 px images at S = 64 are not tiled
    assert main(["evaluate", str(tiny_category), "--json", str(report), *args, "--map-tiles", "auto"]) == 0
    figures = json.loads(report.read_text())
    assert figures["map_tiles"] == "auto" and figures["categories"]["brick"]["map_tiles"] == 1
    assert "tiles=auto (brick 1)" in capsys.readouterr().out


def test_int8_network_runs_the_tiles_too(files, tiny_category, tiled):
    """precision='int8': the quantized network (calibrated on whole images at the input size) runs the tiles as well;
    its maps follow the fp32 ones."""
    test = list_images(tiny_category / "test", recursive=True)
    int8 = GaussianAD(**TILED, map_tiles=2, precision="int8").fit(files)
    maps, reference = int8.anomaly_map(test), tiled.anomaly_map(test)
    assert maps.shape == reference.shape and np.isfinite(maps).all()
    assert np.corrcoef(maps.ravel(), reference.ravel())[0, 1] > 0.8


def test_service_map_of_a_tiled_model_is_its_tiled_overlay(tiled, tiny_category, tmp_path):
    """serve's /map draws the tiled model's own map over a non-square upload."""
    import io

    from fastapi.testclient import TestClient

    from gaussad.intake.images import load_image
    from gaussad.detector.heatmap import heat_scale, render
    from gaussad.service.app import create_app, load_models

    folder = tmp_path / "models"
    folder.mkdir()
    tiled.save(folder / "tiled.gaussad")
    upload = tmp_path / "crop.png"
    Image.open(list_images(tiny_category / "test" / "patch")[0]).crop((0, 0, 64, 40)).save(upload)
    with TestClient(create_app(load_models(folder))) as client:
        resp = client.post("/models/tiled/map", files={"file": ("crop.png", upload.read_bytes(), "image/png")})
    assert resp.status_code == 200
    got = np.asarray(Image.open(io.BytesIO(resp.content)))
    want = np.asarray(render(load_image(upload), tiled.anomaly_map([upload])[0], heat_scale(tiled.state_.map_calibration),
                             float(resp.headers["x-gaussad-score"]), resp.headers["x-gaussad-anomalous"] == "true"))
    assert got.shape == want.shape and np.abs(got.astype(int) - want).max() <= 2


def test_tune_ranks_map_tiles_by_their_maps(files):
    """tune's tiles axis: the candidates share the global score (same image AUROC), their maps differ."""
    from gaussad.tools.tune import GRIDS, tune

    assert GRIDS["tiles"] == {"map_tiles": (1, 2, 3)}
    result = tune(files, grid={"map_tiles": (1, 2)}, base={**TILED, "preset": "recommended"}, refit=False)
    rows = {r["settings"]["map_tiles"]: r for r in result.ranking}
    assert rows[1]["image_auroc"] == pytest.approx(rows[2]["image_auroc"], abs=1e-12)
    assert rows[1]["pixel_auroc"] != rows[2]["pixel_auroc"]
    # 2 held out: too few for the pixel AUROC to rank, so the preset's own 1 (untiled) is kept (issue 35)
    assert result.chosen is rows[1] and result.chosen["default"]
    assert "pixel AUROC not used below" in result.choice or result.choice == "the default ranks first"


@pytest.mark.parametrize("size", [64, 224, 320])
def test_auto_tiles_take_the_most_tiles_whose_map_image_the_images_fill(size):
    """'auto': k tiles only when the images have at least the k-tile map image's side, so tiles never upscale."""
    two = map_side(size, 2)
    assert auto_tiles(two - 1, size) == 1 and auto_tiles(two, size) == 2
    assert auto_tiles(map_side(size, 3), size, most=3) == 3 and auto_tiles(map_side(size, 3) - 1, size, most=3) == 2
    assert auto_tiles(100 * size, size) == AUTO_MAX_TILES == 2
    assert auto_tiles(100 * size, size + 1) == 1  # an input size tiles cannot align on: untiled, not refused
    assert f"under about {map_side(224, 2)} px at S = 224" in gaussad.detector.params.BY_NAME["map_tiles"].help


def test_auto_tiles_are_decided_at_fit_from_the_images_and_kept(files, tmp_path):
    """map_tiles='auto' (the recommended preset's): the fitted model is the one fitted with the number the rule gives
    for its images (2 for 128 px images at S = 64, 1 for 64 px ones), and its file keeps that number."""
    big = [np.asarray(Image.open(f).convert("RGB").resize((128, 128))) for f in files]
    auto = GaussianAD(**TILED, map_tiles="auto").fit(big)
    assert auto.setting("map_tiles") == "auto" and auto.map_tiles_ == 2 and auto.summary()["map_tiles"] == 2
    np.testing.assert_array_equal(auto.anomaly_map(big[:3]), GaussianAD(**TILED, map_tiles=2).fit(big).anomaly_map(big[:3]))
    small = GaussianAD(**TILED, map_tiles="auto").fit(files)
    assert small.map_tiles_ == 1
    np.testing.assert_array_equal(small.anomaly_map(files[:3]), GaussianAD(**TILED, map_tiles=1).fit(files).anomaly_map(files[:3]))
    mixed = GaussianAD(**TILED, map_tiles="auto").fit(big[:4] + list(files[:6]))  # the median image decides
    assert mixed.map_tiles_ == 1
    path = tmp_path / "auto.gaussad"
    auto.save(path)
    loaded = gaussad.load(path)
    assert loaded.map_tiles == loaded.map_tiles_ == 2
    np.testing.assert_allclose(loaded.anomaly_map(big[:3]), auto.anomaly_map(big[:3]), rtol=1e-6, atol=1e-6)
    grown = GaussianAD(**TILED, map_tiles="auto").partial_fit(big[:5]).partial_fit(files[:5])  # the first chunk decides
    assert grown.map_tiles_ == 2 and grown.n_samples_ == 10
    # since issue 30 no preset tiles: the recommended one's input size follows the images instead
    assert [GaussianAD(preset=p).setting("map_tiles") for p in ("recommended", "fast", "paper")] == [1, 1, 1]
    with pytest.raises(gaussad.GaussadError, match="map_tiles 'auto' are decided from the training images"):
        GaussianAD(**TILED, map_tiles="auto").feature_extractor()
    from gaussad.tools.export import export_detector

    with pytest.raises(gaussad.GaussadError, match=r"tiled \(map_tiles=2 decided by auto\)"):
        export_detector(auto, maps=True)


def test_scores_without_maps_run_no_tiles(tiled, tiny_category, monkeypatch):
    """The global score needs the whole image only: scoring, predicting and extracting pooled features of a tiled
    model run no tile (they would cost 1 + K*K network runs per image for nothing), and give the scores of the pass
    that also made its maps."""
    test = list_images(tiny_category / "test", recursive=True)
    levels, _ = tiled.score_with_maps(test)
    extractor = tiled.feature_extractor()

    def no_tiles(*args, **kwargs):
        raise AssertionError("tiles run for a score without maps")

    monkeypatch.setattr(extractor, "_tiled_maps", no_tiles)
    monkeypatch.setattr(extractor, "prepare_tiled", no_tiles)
    np.testing.assert_allclose(tiled.level_scores(test), levels, rtol=1e-12)
    assert tiled.predict(test).shape == (len(test),)
    np.testing.assert_array_equal(np.concatenate([p[0] for _, p in extractor.iter_features(test)]),
                                  tiled.extract_features(test)[0])
    with pytest.raises(AssertionError, match="tiles run"):
        tiled.anomaly_map(test[:1])


def test_input_size_auto_follows_the_images_and_never_upscales(tmp_path):
    """input_size='auto' (the recommended preset's, issue 30): about 1.7x the native size, a multiple of 32, where
    the median training image is at least that large, else native; decided at fit from the headers, kept in the
    model file; 'native' asks for the backbone's own size whatever the preset."""
    from PIL import Image

    from gaussad.intake.features import auto_input_size, auto_settings
    from gaussad.detector.params import resolved

    assert [auto_input_size(side, "efficientnet-lite0") for side in (900, 384, 383, 318, None)] == [384, 384, 224,
                                                                                                      224, 224]
    assert auto_input_size(420, "efficientnet-lite1") == 416 and auto_input_size(415, "efficientnet-lite1") == 240
    assert auto_input_size(900, "efficientnet-lite2") == 448 and auto_input_size(900, None) is None
    rng = np.random.default_rng(0)
    paths = {}
    for name, side in (("big", 400), ("small", 120)):
        folder = tmp_path / name
        folder.mkdir()
        paths[name] = []
        for i in range(4):
            paths[name].append(folder / f"{i}.png")
            Image.fromarray(rng.integers(0, 256, (side, side, 3), dtype=np.uint8)).save(paths[name][-1])
    default = resolved(GaussianAD().get_params())
    assert default["input_size"] == "auto" and default["map_tiles"] == 1
    assert auto_settings(paths["big"], default) == {"input_size": 384}
    assert auto_settings(paths["small"] + paths["big"][:3], default) == {"input_size": 224}  # the median decides
    assert auto_settings(paths["big"], resolved(GaussianAD(input_size="native").get_params())) == {}
    assert resolved(GaussianAD(input_size="native").get_params())["input_size"] is None
    assert [GaussianAD(preset=p).setting("input_size") for p in ("recommended", "fast", "paper")] == ["auto", None,
                                                                                                       None]
    model = GaussianAD(levels=["stem", "stage1"], map_levels=["stage2"], engine="torch").fit(paths["big"])
    assert model.input_size_ == 384 and model.feature_extractor().input_size == 384
    model.save(tmp_path / "m.gaussad")
    loaded = gaussad.load(tmp_path / "m.gaussad").set_params(engine="torch")
    assert loaded.input_size == loaded.input_size_ == 384
    np.testing.assert_allclose(loaded.level_scores(paths["big"][:2]), model.level_scores(paths["big"][:2]), rtol=1e-9)
