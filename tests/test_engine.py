"""Inference engines: ONNX Runtime against torch eager, the on-disk graph cache, the streaming pipeline."""

import warnings

import numpy as np
import pytest
from PIL import Image

from gaussad import GaussadError, GaussianAD
from gaussad.intake import engine as engine_mod
from gaussad.intake.features import FeatureExtractor
from gaussad.intake.images import list_images, load_image

from .conftest import TINY

TINY_FE = {"backbone": TINY["backbone"], "input_size": TINY["input_size"], "levels": TINY["levels"]}


@pytest.fixture(scope="module")
def images(tiny_category):
    return list_images(tiny_category / "train" / "good") + list_images(tiny_category / "test" / "good")


def _assert_close(a: np.ndarray, b: np.ndarray) -> None:
    """Element-wise: ONNX Runtime within 1e-4 relative of torch eager, plus 2e-4 absolute for values near 0
    (features here reach 5-50; the largest absolute gap beyond 1e-4 relative measured 8e-5)."""
    assert a.shape == b.shape
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=2e-4)


def test_auto_engine_is_onnxruntime_and_unknown_names_are_refused(monkeypatch):
    assert engine_mod.resolve_engine("auto") == "onnxruntime"
    assert FeatureExtractor(**TINY_FE).engine == "onnxruntime"
    with pytest.raises(GaussadError, match="unknown engine"):
        FeatureExtractor(**TINY_FE, engine="tensorrt")
    with pytest.raises(GaussadError, match="unknown engine"):
        GaussianAD(**TINY, engine="tensorrt").fit([np.zeros((8, 8), np.uint8)] * 2)
    monkeypatch.setattr(engine_mod, "onnxruntime_available", lambda: False)
    monkeypatch.setattr(engine_mod, "openvino_available", lambda: True)
    assert engine_mod.resolve_engine("auto") == "openvino"
    monkeypatch.setattr(engine_mod, "openvino_available", lambda: False)
    assert engine_mod.resolve_engine("auto") == "torch"
    with pytest.raises(GaussadError, match="pip install onnx onnxruntime"):
        engine_mod.resolve_engine("onnxruntime")


def test_onnxruntime_features_match_torch(images):
    ort = FeatureExtractor(**TINY_FE, engine="onnxruntime", batch_size=4).extract(images)
    ref = FeatureExtractor(**TINY_FE, engine="torch", batch_size=4).extract(images)
    assert [f.shape for f in ort] == [f.shape for f in ref] == [(len(images), d) for d in (32, 16, 24, 40)]
    for a, b in zip(ort, ref):
        assert a.dtype == np.float64
        _assert_close(a, b)


def test_feature_maps_match_torch_and_get_their_own_graph(images, tmp_path, monkeypatch):
    monkeypatch.setenv("GAUSSAD_CACHE", str(tmp_path))
    out = {}
    for engine in ("onnxruntime", "torch"):
        fe = FeatureExtractor(**TINY_FE, map_levels=["stage2", "stage3"], engine=engine, batch_size=4)
        runs = list(fe.iter_features_and_maps(images[:6]))
        out[engine] = [np.concatenate(level) for level in zip(*[pooled + maps for _, pooled, maps in runs])]
    shapes = [a.shape for a in out["onnxruntime"]]
    assert shapes[4:] == [(6, 24, 16, 16), (6, 40, 8, 8)]
    for a, b in zip(out["onnxruntime"], out["torch"]):
        _assert_close(a, b)
    FeatureExtractor(**TINY_FE).runner
    names = [p.name for p in tmp_path.glob("*.onnx")]
    assert len(names) == 2 and sum(n.startswith("efficientnet-lite0-pooled-maps-") for n in names) == 1


def test_all_levels_at_native_size_match_torch(images):
    """The full 9-level graph of the paper at 224 px, on random input (one batch, to stay quick)."""
    fe_ort = FeatureExtractor(TINY["backbone"], engine="onnxruntime")
    fe_torch = FeatureExtractor(TINY["backbone"], engine="torch")
    x = np.random.default_rng(0).standard_normal((3, 3, 224, 224), dtype=np.float32)
    for a, b in zip(fe_ort.runner.run(x), fe_torch.runner.run(x)):
        _assert_close(a, b)


def test_scores_agree_across_engines(tiny_category):
    train = list_images(tiny_category / "train" / "good")
    test = list_images(tiny_category / "test" / "patch")
    scores = {e: GaussianAD(**TINY, engine=e).fit(train).score_samples(test) for e in ("onnxruntime", "torch")}
    np.testing.assert_allclose(scores["onnxruntime"], scores["torch"], rtol=1e-4)


def test_graph_is_exported_once_and_keyed(tmp_path, monkeypatch):
    monkeypatch.setenv("GAUSSAD_CACHE", str(tmp_path))
    x = np.random.default_rng(1).standard_normal((2, 3, 64, 64), dtype=np.float32)
    first = FeatureExtractor(**TINY_FE).runner.run(x)
    files = list(tmp_path.glob("*.onnx"))
    assert len(files) == 1 and files[0].name.startswith("efficientnet-lite0-pooled-")

    def no_export(*args, **kwargs):
        raise AssertionError("exported again although the cached graph matches")

    monkeypatch.setattr(engine_mod, "export_onnx", no_export)
    again = FeatureExtractor(**TINY_FE)
    for a, b in zip(again.runner.run(x), first):
        np.testing.assert_array_equal(a, b)
    assert again._module is None  # a cache hit does not even build the torch network
    monkeypatch.undo()
    monkeypatch.setenv("GAUSSAD_CACHE", str(tmp_path))
    FeatureExtractor(**{**TINY_FE, "levels": ["stem", "stage1"]}).runner
    FeatureExtractor(**{**TINY_FE, "input_size": 32}).runner
    assert len(list(tmp_path.glob("*.onnx"))) == 3
    assert not [p for p in tmp_path.iterdir() if p.suffix != ".onnx"]  # no temporary files left behind


def test_graph_key_follows_the_weights_file(tmp_path):
    a, b = tmp_path / "a.pth", tmp_path / "b.pth"
    a.write_bytes(b"one set of weights")
    b.write_bytes(b"another set of weights")
    key_a = engine_mod.graph_key("pooled", "efficientnet-b0", a, 64, [0, 1])
    key_b = engine_mod.graph_key("pooled", "efficientnet-b0", b, 64, [0, 1])
    assert key_a["gaussad.weights_sha256"] != key_b["gaussad.weights_sha256"]
    assert {k for k in key_a if key_a[k] != key_b[k]} == {"gaussad.weights_sha256"}


def test_missing_weights_file_is_a_clear_error_with_either_engine(tmp_path):
    for engine in ("onnxruntime", "torch"):
        with pytest.raises(GaussadError, match="weights file not found"):
            FeatureExtractor("efficientnet-b0", input_size=64, weights=tmp_path / "absent.pth", engine=engine).runner
        with pytest.raises(GaussadError, match="weights file not found"):
            FeatureExtractor("efficientnet-b0", input_size=64, weights=tmp_path, engine=engine).runner


@pytest.mark.parametrize("damage", ["garbage", "truncated", "other-key"])
def test_damaged_or_foreign_cache_file_is_rebuilt(tmp_path, monkeypatch, damage):
    monkeypatch.setenv("GAUSSAD_CACHE", str(tmp_path))
    x = np.random.default_rng(2).standard_normal((2, 3, 64, 64), dtype=np.float32)
    expected = FeatureExtractor(**TINY_FE).runner.run(x)
    (path,) = tmp_path.glob("*.onnx")
    good = path.read_bytes()
    if damage == "garbage":
        path.write_bytes(b"\x00not an onnx file" * 100)
    elif damage == "truncated":
        path.write_bytes(good[: len(good) // 2])
    else:  # a valid graph, but exported for other levels: its stored key does not match
        other = engine_mod.export_onnx(FeatureExtractor(**{**TINY_FE, "levels": ["stem"]}).module, 64,
                                       {"gaussad.levels": "0"})
        path.write_bytes(other)
    got = FeatureExtractor(**TINY_FE).runner.run(x)
    for a, b in zip(got, expected):
        np.testing.assert_allclose(a, b, rtol=1e-6)
    assert len(got) == len(expected)
    assert path.read_bytes() != b"" and engine_mod.OnnxRuntimeEngine(path).metadata["gaussad.levels"] == "0,1,2,3"


def test_unwritable_cache_falls_back_to_memory(tmp_path, monkeypatch):
    blocker = tmp_path / "file"
    blocker.write_text("a file where the cache folder should be")
    monkeypatch.setenv("GAUSSAD_CACHE", str(blocker / "cache"))
    x = np.random.default_rng(3).standard_normal((1, 3, 64, 64), dtype=np.float32)
    with pytest.warns(UserWarning, match="cannot cache the ONNX graph"):
        out = FeatureExtractor(**TINY_FE).runner.run(x)
    assert [o.shape for o in out] == [(1, 32), (1, 16), (1, 24), (1, 40)]


class CountingSources:
    """A sequence of generated images that records how far ahead of the consumer it has been read."""

    def __init__(self, n: int):
        self.n, self.requested = n, set()

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> np.ndarray:
        self.requested.add(i)
        return np.full((40, 40, 3), i % 256, np.uint8)


def test_streaming_reads_only_a_few_batches_ahead():
    sources = CountingSources(120)
    fe = FeatureExtractor(**{**TINY_FE, "levels": ["stem"]}, batch_size=8, workers=2)
    seen, max_ahead = 0, 0
    for idx, feats in fe.iter_features(sources):
        np.testing.assert_array_equal(idx, np.arange(seen, seen + len(idx)))
        seen += len(idx)
        max_ahead = max(max_ahead, len(sources.requested) - seen)
    assert seen == 120
    assert max_ahead <= 3 * 8


def test_jpeg_draft_only_for_large_jpegs(tmp_path):
    rng = np.random.default_rng(4)
    coarse = Image.fromarray(rng.integers(0, 256, (6, 6, 3), dtype=np.uint8))
    smooth = np.asarray(coarse.resize((600, 600), Image.BICUBIC))
    big, small, png = tmp_path / "big.jpg", tmp_path / "small.jpg", tmp_path / "big.png"
    Image.fromarray(smooth).save(big, quality=95)
    Image.fromarray(smooth[:100, :100]).save(small, quality=95)
    Image.fromarray(smooth).save(png)
    assert load_image(big, draft=64).size == (75, 75)  # 600 px: 1/8 scale keeps both sides >= 64
    assert load_image(big, draft=200).size == (300, 300)
    assert load_image(big, draft=301).size == (600, 600)  # under 2x the input: full decode
    assert load_image(small, draft=64).size == (100, 100)
    assert load_image(png, draft=64).size == (600, 600)
    gray = tmp_path / "gray.jpg"
    Image.fromarray(smooth[:, :, 0]).save(gray, quality=95)
    assert load_image(gray, draft=100).mode == "RGB" and load_image(gray, draft=100).size == (150, 150)
    full = FeatureExtractor(**TINY_FE, draft=False).prepare(big)
    drafted = FeatureExtractor(**TINY_FE).prepare(big)
    assert drafted.shape == full.shape == (3, 64, 64)
    assert np.abs(drafted - full).mean() < 0.03  # same picture, small pixel differences (normalised units)


def test_warnings_do_not_leak_from_export(tmp_path, monkeypatch):
    monkeypatch.setenv("GAUSSAD_CACHE", str(tmp_path))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        FeatureExtractor(**{**TINY_FE, "levels": ["stem"]}).runner


def test_aspect_kept_inputs_match_torch_and_keep_the_order(tmp_path, monkeypatch):
    """Images of several sizes run in runs of equal shape through the any-size graph; features come back in input
    order and equal scoring each image alone, and ONNX Runtime matches torch on them."""
    monkeypatch.setenv("GAUSSAD_CACHE", str(tmp_path))
    rng = np.random.default_rng(6)
    sizes = [(64, 64), (40, 100), (40, 100), (100, 40), (64, 64), (30, 120), (40, 100)]
    imgs = [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for w, h in sizes]
    out = {}
    for engine in ("onnxruntime", "torch"):
        fe = FeatureExtractor(**TINY_FE, map_levels=["stage3"], engine=engine, batch_size=4, resize="aspect")
        runs = list(fe.iter_features_and_maps(imgs))
        assert np.concatenate([idx for idx, _, _ in runs]).tolist() == list(range(len(imgs)))
        out[engine] = runs
        alone = [fe.extract([img])[0][0] for img in imgs]
        np.testing.assert_allclose(fe.extract(imgs)[0], np.stack(alone), rtol=1e-5, atol=1e-6)
    for (_, pa, ma), (_, pb, mb) in zip(out["onnxruntime"], out["torch"]):
        assert ma[0].shape == mb[0].shape and ma[0].shape[2] != 0
        for a, b in zip(pa + ma, pb + mb):
            _assert_close(a, b)
    from gaussad.intake.images import aspect_size

    expected = [aspect_size(w, h, TINY["input_size"]) for w, h in sizes]
    got = [m[0].shape[2:] for _, _, m in out["torch"] for _ in range(m[0].shape[0])]
    assert got == [(th // 8, tw // 8) for tw, th in expected]  # stage3 has stride 8


@pytest.mark.parametrize("engine", ["onnxruntime", "torch"])
def test_std_pooling_is_each_map_channels_spread(images, engine):
    """pool='avg+std': a map level's pooled vector is its channels' average then the square root of their
    (population) standard deviation over the map, computed here in numpy from the raw maps of the same pass; other
    levels pool as before."""
    settings = {**TINY_FE, "map_levels": ["stage2", "stage3"], "engine": engine, "batch_size": 4}
    plain = FeatureExtractor(**settings).extract(images[:6])
    runs = list(FeatureExtractor(**settings, pool="avg+std").iter_features_and_maps(images[:6]))
    pooled = [np.concatenate(level) for level in zip(*[p for _, p, _ in runs])]
    maps = [np.concatenate(level).astype(np.float64) for level in zip(*[m for _, _, m in runs])]
    assert [p.shape[1] for p in pooled] == [32, 16, 48, 80]  # stem, stage1 as before; stage2, stage3 doubled
    for level in (0, 1):
        _assert_close(pooled[level], plain[level])
    for level, fmap in zip((2, 3), maps):
        flat = fmap.reshape(*fmap.shape[:2], -1)
        _assert_close(pooled[level], np.hstack([flat.mean(axis=2), np.sqrt(flat.std(axis=2))]))
    assert FeatureExtractor(**settings, pool="avg+std").level_dims == [32, 16, 48, 80]
    with pytest.raises(GaussadError, match="unknown pool"):
        FeatureExtractor(**settings, pool="max")


@pytest.mark.parametrize("engine", ["onnxruntime", "torch"])
def test_pooled_mean_of_a_large_map_is_exact_to_float32(engine):
    """The pooled average of the stem's 192 x 192 map (384 px input, the any-size graph) against the float64 mean of
    the map from the same pass: within 2e-6 of the level's scale. ONNX Runtime's one-step mean was 3e-5 off on a plain
    gray image (its float32 rounding errors all of one sign) and 1.6e-5 on bottle's, enough for 5e-3 relative in the
    stem's Mahalanobis distances (PooledLevels takes means of row means since issue 34)."""
    rng = np.random.default_rng(9)
    images = [np.full((384, 384, 3), 200, np.uint8), rng.integers(0, 256, (384, 384, 3), dtype=np.uint8)]
    fe = FeatureExtractor(TINY["backbone"], levels=["stem"], map_levels=["stem"], input_size=384, engine=engine,
                          resize="aspect")
    ((_, (pooled,), (fmap,)),) = list(fe.iter_features_and_maps(images))
    exact = fmap.astype(np.float64).mean(axis=(2, 3))
    assert fmap.shape == (2, 32, 192, 192)
    assert np.abs(pooled - exact).max() < 2e-6 * np.abs(exact).max()
