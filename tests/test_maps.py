import dataclasses
import json

import numpy as np
import pytest
import torch
from PIL import Image

import gaussad
from gaussad import GaussianAD
from gaussad.cli import main
from gaussad.tools.evaluate import roc_auc
from gaussad.core.gaussian import LevelGaussian
from gaussad.intake.images import list_images
from gaussad.detector.heatmap import MIN_PANEL_WIDTH
from gaussad.core.maps import accumulate, combine, level_maps, to_grid, upsample

from .conftest import TINY

TINY_MAPS = {**TINY, "map_levels": ["stage2", "stage3"], "normalize": "native"}


def test_upsample_is_bilinear_at_pixel_centres():
    m = np.random.default_rng(0).random((5, 7)).astype(np.float32)
    ref = torch.nn.functional.interpolate(torch.from_numpy(m)[None, None], size=(20, 28), mode="bilinear", align_corners=False)
    np.testing.assert_allclose(upsample(m, (28, 20)), ref[0, 0].numpy(), atol=1e-5)


def test_level_maps_are_per_location_mahalanobis_with_a_shared_gaussian():
    """Each location's value equals its Mahalanobis distance under sklearn's LW fit on all training locations."""
    from sklearn.covariance import LedoitWolf

    rng = np.random.default_rng(1)
    train = rng.normal(size=(6, 5, 4, 3)).astype(np.float32)
    test = rng.normal(size=(2, 5, 4, 3)).astype(np.float32)
    stats = accumulate(accumulate(None, [train[:2]]), [train[2:]])
    g = LevelGaussian.fit(stats[0], "ledoit-wolf")
    vectors = train.transpose(0, 2, 3, 1).reshape(-1, 5).astype(np.float64)
    lw = LedoitWolf().fit(vectors)
    diff = test.transpose(0, 2, 3, 1).reshape(-1, 5) - vectors.mean(axis=0)
    expected = np.sqrt(np.einsum("ij,jk,ik->i", diff, np.linalg.inv(lw.covariance_), diff)) / np.sqrt(5)
    np.testing.assert_allclose(level_maps([g], [test])[0].ravel(), expected, rtol=1e-4)
    combined = combine(level_maps([g, g], [test, test]), 8)
    assert combined.shape == (2, 8, 8)


@pytest.mark.parametrize("shape", [(16, 16), (15, 10), (8, 8)])
def test_to_grid_is_adaptive_average_pooling(shape):
    rng = np.random.default_rng(2)
    fine, coarse = rng.normal(size=(2, 3, *shape)).astype(np.float32), rng.normal(size=(2, 4, 8, 5)).astype(np.float32)
    grid = (8, min(5, shape[1]))
    got = to_grid([fine, coarse])
    ref = torch.nn.functional.adaptive_avg_pool2d(torch.from_numpy(fine), grid).numpy()
    np.testing.assert_allclose(got[0], ref, rtol=1e-5, atol=1e-6)
    assert got[1].shape[2:] == ref.shape[2:]
    pooled = lambda f: torch.nn.functional.avg_pool2d(torch.from_numpy(f), 3, 1, 1, count_include_pad=False)
    got = to_grid([fine, coarse], 3)
    np.testing.assert_allclose(got[0], torch.nn.functional.adaptive_avg_pool2d(pooled(fine), grid).numpy(), rtol=1e-5,
                               atol=1e-6)
    np.testing.assert_allclose(got[1], torch.nn.functional.adaptive_avg_pool2d(pooled(coarse), grid).numpy(),
                               rtol=1e-5, atol=1e-6)


@pytest.fixture(scope="module")
def map_model(tiny_category):
    return GaussianAD(**TINY_MAPS).fit(list_images(tiny_category / "train" / "good"))


def test_maps_localise_synthetic_defects(map_model, tiny_category):
    from gaussad.tools.datasets import load_category
    from gaussad.tools.evaluate import load_masks

    cat = load_category(tiny_category)
    amaps = map_model.anomaly_map(cat.test_files)
    assert amaps.shape == (len(cat.test_files), 64, 64)
    assert roc_auc(load_masks(cat, 64).ravel(), amaps.ravel()) > 0.95  # 0.975 measured


def test_maps_survive_save_load_and_partial_fit(map_model, tiny_category, tmp_path):
    files = list_images(tiny_category / "train" / "good")
    test = list_images(tiny_category / "test" / "patch")[:2]
    path = tmp_path / "m.gaussad"
    map_model.save(path)
    loaded = gaussad.load(path)
    assert loaded.map_level_names_ == ["stage2", "stage3"]
    np.testing.assert_array_equal(loaded.anomaly_map(test), map_model.anomaly_map(test))
    chunked = GaussianAD(**TINY_MAPS).partial_fit(files[:4]).partial_fit(files[4:])
    np.testing.assert_allclose(chunked.anomaly_map(test), map_model.anomaly_map(test), rtol=1e-5, atol=1e-5)


TINY_NEAREST = {**TINY_MAPS, "map_method": "nearest", "map_pool": 3, "map_coreset": 1.0}


@pytest.fixture(scope="module")
def nearest_model(tiny_category):
    return GaussianAD(**TINY_NEAREST).fit(list_images(tiny_category / "train" / "good"))


def _raw_maps(model, files):
    """Per map level (n, C, H, W) feature maps straight from the extractor."""
    chunks = [fm for _, _, fm in model.iter_features(files)]
    return [np.concatenate(level) for level in zip(*chunks)]


def test_nearest_maps_equal_brute_force_and_localise(nearest_model, tiny_category):
    """Every map value is the distance of the 3x3-averaged location, averaged down to the coarsest level's grid, to the
    nearest training location over the bank's scale (scipy cdist, torch pooling and bilinear upsampling as the
    reference), and the maps find the defects."""
    from scipy.spatial.distance import cdist

    from gaussad.tools.datasets import load_category
    from gaussad.tools.evaluate import load_masks

    cat = load_category(tiny_category)
    grid = min(f.shape[2] for f in _raw_maps(nearest_model, cat.test_files[:1]))
    pool = lambda f: torch.nn.functional.adaptive_avg_pool2d(
        torch.nn.functional.avg_pool2d(torch.from_numpy(f), 3, 1, 1, count_include_pad=False), grid)
    train = _raw_maps(nearest_model, list_images(tiny_category / "train" / "good"))
    test = _raw_maps(nearest_model, cat.test_files)
    levels = []
    for bank, tr, te in zip(nearest_model.map_banks_, train, test):
        vecs = lambda f: pool(f).permute(0, 2, 3, 1).reshape(-1, f.shape[1]).numpy()
        d = cdist(vecs(te), vecs(tr)).min(axis=1).reshape(te.shape[0], 1, grid, grid) / bank.scale
        levels.append(torch.nn.functional.interpolate(torch.from_numpy(d), size=(64, 64), mode="bilinear",
                                                      align_corners=False)[:, 0].numpy())
    amaps = nearest_model.anomaly_map(cat.test_files)
    np.testing.assert_allclose(amaps, np.mean(levels, axis=0), rtol=1e-3, atol=1e-3)
    assert roc_auc(load_masks(cat, 64).ravel(), amaps.ravel()) > 0.94  # 0.964 measured


def test_nearest_maps_survive_save_load_chunks_and_merge(nearest_model, tiny_category, tmp_path):
    files = list_images(tiny_category / "train" / "good")
    test = list_images(tiny_category / "test" / "patch")[:2]
    path = tmp_path / "m.gaussad"
    nearest_model.save(path)
    loaded = gaussad.load(path)
    assert loaded.setting("map_method") == "nearest" and loaded.setting("map_pool") == 3
    expected = nearest_model.anomaly_map(test)
    np.testing.assert_array_equal(loaded.anomaly_map(test), expected)
    chunked = GaussianAD(**TINY_NEAREST).partial_fit(files[:1]).partial_fit(files[1:4]).partial_fit(files[4:])
    np.testing.assert_allclose(chunked.anomaly_map(test), expected, rtol=1e-5, atol=1e-5)
    half = len(files) // 2
    merged = GaussianAD(**TINY_NEAREST).fit(files[:half]).merge(GaussianAD(**TINY_NEAREST).fit(files[half:]))
    np.testing.assert_allclose(merged.anomaly_map(test), expected, rtol=1e-5, atol=1e-5)
    with pytest.raises(gaussad.GaussadError, match="differ in map_method"):
        nearest_model.merge(GaussianAD(**TINY_MAPS).fit(files))


def test_coreset_bank_keeps_its_fraction_and_grows_with_partial_fit(tiny_category):
    files = list_images(tiny_category / "train" / "good")
    model = GaussianAD(**{**TINY_NEAREST, "map_coreset": 0.25}).fit(files[:4])
    first = model.map_banks_[0]
    assert len(first.vectors) == int(np.ceil(0.25 * first.seen))
    model.partial_fit(files[4:])
    grown = model.map_banks_[0]
    assert grown.seen > first.seen and len(grown.vectors) == int(np.ceil(0.25 * grown.seen))
    assert {v.tobytes() for v in first.vectors} <= {v.tobytes() for v in grown.vectors}


def test_map_parameters_are_validated():
    for kwargs, needle in (({"map_method": "knn"}, "unknown map_method"), ({"map_pool": 2}, "map_pool must be an odd"),
                           ({"map_coreset": 0.0}, "map_coreset must be a fraction")):
        with pytest.raises(gaussad.GaussadError, match=needle):
            GaussianAD(backbone=None, **kwargs).fit_features([np.zeros((3, 2))])


def test_presets_resolve_settings():
    rec = GaussianAD(preset="recommended")
    assert rec.setting("normalize") == "native" and rec.setting("map_levels")
    paper = GaussianAD(preset="paper")
    assert paper.setting("normalize") == "imagenet" and not paper.setting("map_levels")
    assert GaussianAD().setting("normalize") == "native" and GaussianAD().setting("map_levels")  # the default
    assert GaussianAD(preset="recommended", normalize="imagenet").setting("normalize") == "imagenet"
    with pytest.raises(gaussad.GaussadError, match="unknown preset"):
        GaussianAD(preset="best").fit_features([np.zeros((3, 2))])
    with pytest.raises(gaussad.GaussadError, match="no anomaly maps"):
        GaussianAD(backbone=None).fit_features([np.random.default_rng(0).normal(size=(5, 2))]).anomaly_map([])


def test_cli_maps_and_pixel_auroc(tiny_root, tiny_category, tmp_path, capsys):
    args = ["--input-size", "64", "--levels", ",".join(TINY["levels"]), "--map-levels", "stage2,stage3", "--preset", "recommended"]
    model = tmp_path / "m.gaussad"
    assert main(["fit", str(tiny_category), "-o", str(model), "--quiet", *args]) == 0
    maps_dir = tmp_path / "maps"
    capsys.readouterr()
    assert main(["score", str(model), str(tiny_category / "test" / "patch"), "--maps", str(maps_dir), "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)["results"]
    for row in rows:
        with Image.open(row["map"]) as im, Image.open(tiny_category / "test" / "patch" / row["path"]) as src:
            # the image at its own size, centred on a canvas at least as wide as the legend panel, the panel under it
            assert im.width == max(src.width, MIN_PANEL_WIDTH) and im.height > src.height
    assert main(["score", str(model), str(tiny_category / "test" / "patch"), "--preset", "paper", "--quiet"]) == 2
    out = tmp_path / "r.json"
    assert main(["evaluate", str(tiny_root), "--protocol", "full", "--json", str(out), "--quiet", *args]) == 0
    report = json.loads(out.read_text())
    assert report["map_levels"] == ["stage2", "stage3"]
    pixel = {name: c["pixel_auroc"] for name, c in report["categories"].items()}
    assert pixel["brick"] > 0.94 and pixel["gravel"] > 0.66  # 0.959 and 0.689 measured
    assert report["mean_pixel_auroc"] == pytest.approx(np.mean(list(pixel.values()))) and report["mean_pixel_auroc"] > 0.8
    assert all("pixel_auroc" in c for c in report["categories"].values())


def test_aspect_kept_maps_of_mixed_sizes(tiny_category):
    """With resize='aspect' images of different proportions are scored in runs of equal shape: maps come back in
    input order at S x S, equal to scoring each image alone and to the raw-feature-map path used by evaluate."""
    from gaussad.detector.resolve import features

    def crops(folder):
        out = []
        for i, path in enumerate(list_images(folder)):
            arr = np.asarray(Image.open(path).convert("RGB"))
            out.append(arr[:, : 32 + 8 * (i % 4)] if i % 2 else arr[: 40 + 8 * (i % 3)])
        return out

    train, test = crops(tiny_category / "train" / "good"), crops(tiny_category / "test" / "patch")
    model = GaussianAD(**{**TINY_NEAREST, "resize": "aspect"}).fit(train)
    amaps = model.anomaly_map(test)
    assert amaps.shape == (len(test), 64, 64)
    alone = np.concatenate([model.anomaly_map([img]) for img in test])
    np.testing.assert_allclose(amaps, alone, rtol=1e-5, atol=1e-5)
    _, train_maps = features(model.feature_extractor(), train, "train", True)
    _, test_maps = features(model.feature_extractor(), test, "test", True)
    assert len({m[0].shape for m in test_maps}) > 1
    refit = GaussianAD(**{**TINY_NEAREST, "resize": "aspect"}).fit_map_features(train_maps)
    np.testing.assert_allclose(refit.anomaly_map_features(test_maps, 64), amaps, rtol=1e-4, atol=1e-4)


def test_to_finest_is_patchcore_upsample_and_concatenate():
    """Every level averaged 3 x 3 at its own resolution (torch avg_pool2d without padding counts), upsampled bilinearly
    (torch interpolate, pixel centres) to the finest grid, channels concatenated."""
    from gaussad.core.maps import to_finest

    rng = np.random.default_rng(3)
    fine, coarse = rng.normal(size=(2, 3, 12, 10)).astype(np.float32), rng.normal(size=(2, 4, 6, 5)).astype(np.float32)
    pool = lambda f: torch.nn.functional.avg_pool2d(torch.from_numpy(f), 3, 1, 1, count_include_pad=False)
    up = torch.nn.functional.interpolate(pool(coarse), size=(12, 10), mode="bilinear", align_corners=False)
    (got,) = to_finest([fine, coarse], 3)
    assert got.shape == (2, 7, 12, 10)
    np.testing.assert_allclose(got, torch.cat([pool(fine), up], dim=1).numpy(), rtol=1e-5, atol=1e-5)
    (plain,) = to_finest([fine, coarse], 1)
    np.testing.assert_allclose(plain[:, :3], fine)


def test_finest_grid_maps_have_one_bank_localise_and_survive_save_load(tiny_category, tmp_path):
    """map_grid='finest': one bank of concatenated vectors on the finest map level's grid; the maps equal the brute
    force distance of the concatenated vectors, find the defects and come back unchanged from a model file."""
    from scipy.spatial.distance import cdist

    from gaussad.tools.datasets import load_category
    from gaussad.tools.evaluate import hit_rate, load_masks
    from gaussad.core.maps import to_finest

    settings = {**TINY_NEAREST, "map_grid": "finest"}
    files = list_images(tiny_category / "train" / "good")
    model = GaussianAD(**settings).fit(files)
    assert len(model.map_banks_) == 1
    cat = load_category(tiny_category)
    train, test = _raw_maps(model, files), _raw_maps(model, cat.test_files)
    (tr,), (te,) = to_finest(train, 3), to_finest(test, 3)
    assert model.map_banks_[0].vectors.shape[1] == tr.shape[1] == sum(f.shape[1] for f in train)
    vecs = lambda f: f.transpose(0, 2, 3, 1).reshape(-1, f.shape[1])
    d = cdist(vecs(te), vecs(tr)).min(axis=1).reshape(te.shape[0], 1, *te.shape[2:]) / model.map_banks_[0].scale
    ref = torch.nn.functional.interpolate(torch.from_numpy(d.astype(np.float32)), size=(64, 64), mode="bilinear",
                                          align_corners=False)[:, 0].numpy()
    amaps = model.anomaly_map(cat.test_files)
    np.testing.assert_allclose(amaps, ref, rtol=1e-3, atol=1e-3)  # map_coreset 1.0: the bank holds every location
    masks = load_masks(cat, 64)
    assert roc_auc(masks.ravel(), amaps.ravel()) > 0.7
    assert hit_rate(amaps, masks, cat.test_labels) >= 0.5
    path = tmp_path / "finest.gaussad"
    model.save(path)
    loaded = gaussad.load(path)
    assert loaded.setting("map_grid") == "finest"
    np.testing.assert_allclose(loaded.anomaly_map(cat.test_files[:2]), amaps[:2], rtol=1e-5, atol=1e-5)
    with pytest.raises(gaussad.GaussadError, match="map_grid"):
        model.merge(GaussianAD(**TINY_NEAREST).fit(files))


def test_hit_rate_counts_map_maxima_inside_masks():
    from gaussad.tools.evaluate import hit_rate

    amaps = np.zeros((3, 4, 4), np.float32)
    masks = np.zeros((3, 4, 4), bool)
    labels = np.array([0, 1, 1])
    masks[1, 0, 0] = masks[2, 3, 3] = True
    amaps[1, 0, 0] = 5.0  # inside
    amaps[2, 0, 0] = 5.0  # outside
    assert hit_rate(amaps, masks, labels) == 0.5
    assert hit_rate(amaps, masks, np.array([0, 0, 0])) is None


@pytest.mark.parametrize("grid", ["coarsest", "finest"])
def test_leave_one_image_out_map_peaks_equal_banks_without_the_image(tiny_category, grid):
    """Training images' map peaks with their own bank members skipped equal the peaks under a model fitted without
    that image (full banks, so nothing but the image's own vectors differs); test peaks are the maps' maxima."""
    from gaussad.tools.datasets import load_category

    settings = {**TINY_NEAREST, "map_grid": grid}
    files = list_images(tiny_category / "train" / "good")
    extractor = GaussianAD(**settings)
    per_image = [list(level) for level in zip(*_raw_maps(extractor, files))]
    model = GaussianAD(**settings).fit_map_features(per_image)
    loo = model.state_.map_peaks_of(per_image, np.arange(len(per_image)))
    for i in (0, 3):
        without = GaussianAD(**settings).fit_map_features(per_image[:i] + per_image[i + 1:])
        banks = [dataclasses.replace(b, scale=full.scale) for b, full in zip(without.map_banks_, model.map_banks_)]
        state = dataclasses.replace(without.state_, map_banks=banks)  # the same scales, so only the members differ
        assert loo[i] == pytest.approx(state.map_peaks_of([per_image[i]])[0], rel=1e-4)
    cat = load_category(tiny_category)
    test = [list(level) for level in zip(*_raw_maps(extractor, cat.test_files))]
    peaks = model.state_.map_peaks_of(test)
    if grid == "finest":  # one bank: the peak is the largest cell, the upsampled map interpolates between cells
        top = GaussianAD(**settings).fit_map_features(per_image).anomaly_map_features(test, 64)
        top = top.reshape(len(top), -1).max(axis=1)
        assert np.all(peaks >= top - 1e-4) and np.all(peaks <= 1.1 * top)
    assert np.all(peaks > 0)


def test_evaluate_reports_fused_score_and_its_decision(tiny_root):
    from gaussad.tools.evaluate import evaluate, format_table

    report = evaluate(tiny_root / "brick", protocol="full", **TINY_NEAREST)
    r = report["categories"]["brick"]
    assert 0.5 < r["fused_auroc"] <= 1.0 and 0.0 <= r["hit_rate"] <= 1.0
    cell = r["thresholds"]["fused"]["0.1"]
    assert 0.0 <= cell["fpr"] <= 1.0 and 0.0 <= cell["tpr"] <= 1.0
    assert "fused" in format_table(report)


def test_fast_preset_has_the_recommended_settings_and_grid_is_checked():
    names = ("normalize", "resize", "map_levels", "map_method", "map_pool", "map_grid")
    fast, rec = GaussianAD(preset="fast"), GaussianAD(preset="recommended")
    assert [fast.setting(n) for n in names] == [rec.setting(n) for n in names]
    assert GaussianAD().setting("map_grid") == "coarsest"
    with pytest.raises(gaussad.GaussadError, match="unknown map_grid"):
        GaussianAD(backbone=None, map_grid="fine").fit_features([np.zeros((3, 2))])


def test_maps_given_per_image_are_scored_in_bounded_runs(monkeypatch):
    """Maps given per image (evaluate, tune) go through the banks in runs of at most maps.GROUP images of one shape,
    so their memory does not grow with the images; the banks, maps and leave-one-image-out peaks do not depend on
    the run length."""
    from gaussad.core import maps

    rng = np.random.default_rng(0)
    shapes = [(4, 4)] * 7 + [(4, 6)] * 3 + [(4, 4)] * 2
    per_image = [[rng.normal(size=(5, h, w)).astype(np.float32)] for h, w in shapes]
    runs = [(idx.tolist(), [f.shape for f in fm]) for idx, fm in maps.shape_groups(per_image, most=3)]
    assert runs == [([0, 1, 2], [(3, 5, 4, 4)]), ([3, 4, 5], [(3, 5, 4, 4)]), ([6], [(1, 5, 4, 4)]),
                    ([7, 8, 9], [(3, 5, 4, 6)]), ([10, 11], [(2, 5, 4, 4)])]
    settings = {"backbone": None, "map_method": "nearest", "map_pool": 1, "map_coreset": 0.5}
    ids = np.arange(len(per_image))

    def figures() -> tuple:
        model = GaussianAD(**settings).fit_map_features(per_image)
        return (model.map_banks_[0].vectors, model.anomaly_map_features(per_image, 12),
                model.state_.map_peaks_of(per_image, ids))

    whole = figures()
    monkeypatch.setattr(maps, "GROUP", 2)
    bounded = figures()
    assert np.array_equal(whole[0], bounded[0])
    np.testing.assert_allclose(bounded[1], whole[1], rtol=1e-5)
    np.testing.assert_allclose(bounded[2], whole[2], rtol=1e-5)
