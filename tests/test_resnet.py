"""ResNet backbones from a user's weights file in torchvision's layout (random weights: none can be bundled)."""

import numpy as np
import pytest
import torch

from gaussad.intake.backbones import create_backbone, get_spec, list_backbones
from gaussad.intake.backbones.resnet import LEVEL_NAMES
from gaussad.intake.backbones.resnet_net import create
from gaussad.errors import GaussadError

RESNETS = ("resnet18", "resnet34", "resnet50", "resnet101", "wide_resnet50_2")

# Independent expectations of torchvision's files (torchvision.models.resnet18/50/wide_resnet50_2 state dicts):
# entry counts including the BatchNorm num_batches_tracked buffers, and parameter counts as torchvision documents.
TORCHVISION = {
    "resnet18": {"entries": 122, "params": 11_689_512},
    "resnet50": {"entries": 320, "params": 25_557_032},
    "wide_resnet50_2": {"entries": 320, "params": 68_883_240},
}
RESNET18_KEYS = {  # a sample of torchvision resnet18's keys, with shapes
    "conv1.weight": (64, 3, 7, 7),
    "bn1.running_mean": (64,),
    "bn1.num_batches_tracked": (),
    "layer1.0.conv1.weight": (64, 64, 3, 3),
    "layer1.1.bn2.bias": (64,),
    "layer2.0.downsample.0.weight": (128, 64, 1, 1),
    "layer2.0.downsample.1.running_var": (128,),
    "layer3.1.conv2.weight": (256, 256, 3, 3),
    "layer4.1.bn2.running_var": (512,),
    "fc.weight": (1000, 512),
    "fc.bias": (1000,),
}


@pytest.fixture(scope="module")
def r18_file(tmp_path_factory):
    """A random resnet18 saved as torchvision saves it: torch.save(model.state_dict())."""
    torch.manual_seed(0)
    net = create("resnet18").eval()
    path = tmp_path_factory.mktemp("resnet") / "resnet18-random.pth"
    torch.save(net.state_dict(), path)
    return path, net


def test_registry_lists_resnets_as_needing_a_weights_file():
    for name in RESNETS:
        spec = get_spec(name)
        assert name in list_backbones()
        assert spec.needs_weights_file and spec.bundled_weights is None
        assert spec.description.endswith("local weights file required")
        assert spec.input_size == 224
        assert spec.level_names == ("stem", "layer1", "layer2", "layer3", "layer4")
        assert spec.map_levels == ("layer2", "layer3")
        assert spec.native_normalization == ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    assert get_spec("efficientnet-lite0").map_levels == ("stage2", "stage3", "stage4", "stage5", "stage6", "stage7")
    assert get_spec("efficientnet-b4").map_levels == get_spec("efficientnet-lite0").map_levels
    with pytest.raises(GaussadError, match="--weights"):
        create_backbone("resnet18")


def test_cli_lists_resnets(capsys):
    from gaussad.cli import main

    assert main(["backbones"]) == 0
    rows = {line.split()[0]: line for line in capsys.readouterr().out.splitlines()}
    for name in RESNETS:
        assert rows[name].endswith("local weights file required")


def test_state_dict_layout_is_torchvisions():
    state = create("resnet18").state_dict()
    for key, shape in RESNET18_KEYS.items():
        assert tuple(state[key].shape) == shape, key
    downsampled = sorted({k.split(".downsample")[0] for k in state if ".downsample." in k})
    assert downsampled == ["layer2.0", "layer3.0", "layer4.0"]
    for name, expected in TORCHVISION.items():
        with torch.device("meta"):  # shapes only: no memory, no initialisation time
            net = create(name)
        assert len(net.state_dict()) == expected["entries"], name
        assert sum(p.numel() for p in net.parameters()) == expected["params"], name
    with torch.device("meta"):
        wide = create("wide_resnet50_2").state_dict()
    assert tuple(wide["layer1.0.conv1.weight"].shape) == (128, 64, 1, 1)  # twice ResNet-50's inner width
    assert tuple(wide["layer1.0.downsample.0.weight"].shape) == (256, 64, 1, 1)
    assert tuple(wide["layer4.2.conv3.weight"].shape) == (2048, 1024, 1, 1)


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_user_file_loads_strictly(tmp_path, r18_file, suffix):
    _, ref = r18_file
    state = {k: v.contiguous() for k, v in ref.state_dict().items()}
    path = tmp_path / f"r18{suffix}"
    if suffix == ".pth":
        torch.save(state, path)
    else:
        from safetensors.torch import save_file

        save_file(state, str(path))
    bb = create_backbone("resnet18", weights=path)
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        for got, want in zip(bb.forward_levels(x, range(5)), ref.forward_levels(x, range(5))):
            torch.testing.assert_close(got, want, rtol=0, atol=0)
        torch.testing.assert_close(bb(x), ref(x))  # the classifier came along too
    # a file without the classifier loads as well (the fc. keys are ignored both ways)
    headless = tmp_path / "headless.pth"
    torch.save({k: v for k, v in state.items() if not k.startswith("fc.")}, headless)
    create_backbone("resnet18", weights=headless)


def test_wrapped_data_parallel_checkpoint_loads(tmp_path, r18_file):
    """A {"state_dict": ...} wrapper with DataParallel's module. prefix loads, classifier included."""
    _, ref = r18_file
    path = tmp_path / "wrapped.pth"
    torch.save({"state_dict": {f"module.{k}": v for k, v in ref.state_dict().items()}}, path)
    bb = create_backbone("resnet18", weights=path)
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(bb(x), ref(x), rtol=0, atol=0)


@pytest.mark.parametrize("name,channels", [("resnet18", (64, 64, 128, 256, 512)),
                                           ("resnet50", (64, 256, 512, 1024, 2048))])
def test_level_channels_and_strides(name, channels):
    net = create(name).eval()
    assert net.level_names == LEVEL_NAMES and net.level_channels == channels
    x = torch.randn(2, 3, 64, 96)
    with torch.no_grad():
        maps = net.forward_levels(x, list(range(5)))
        subset = net.forward_levels(x, [1, 3])
        stem = net.relu(net.bn1(net.conv1(x)))
    assert [m.shape[1] for m in maps] == list(channels)
    assert [(64 // m.shape[2], 96 // m.shape[3]) for m in maps] == [(s, s) for s in (2, 4, 8, 16, 32)]
    torch.testing.assert_close(maps[0], stem)  # the stem is post-ReLU, before the max-pool
    torch.testing.assert_close(subset[0], maps[1])
    torch.testing.assert_close(subset[1], maps[3])


def test_onnx_runtime_equals_torch(r18_file):
    from gaussad.intake.features import FeatureExtractor

    path, _ = r18_file
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (64, 64, 3), dtype=np.uint8) for _ in range(3)]
    outs = {}
    for engine in ("onnxruntime", "torch"):
        fx = FeatureExtractor("resnet18", None, 64, path, engine=engine, map_levels=get_spec("resnet18").map_levels)
        (_, pooled, maps), = fx.iter_features_and_maps(images)
        outs[engine] = pooled + maps
    assert [o.shape for o in outs["torch"]] == [(3, 64), (3, 64), (3, 128), (3, 256), (3, 512),
                                                (3, 128, 8, 8), (3, 256, 4, 4)]
    for got, want in zip(outs["onnxruntime"], outs["torch"]):
        scale = float(np.abs(want).max())
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6 * scale)


def test_fit_and_score_round_trip(tmp_path, r18_file, tiny_category):
    import gaussad

    path, _ = r18_file
    train = sorted((tiny_category / "train" / "good").glob("*.png"))
    test = sorted((tiny_category / "test").rglob("*.png"))
    model = gaussad.GaussianAD(backbone="resnet18", weights=path, input_size=64, engine="torch").fit(train)
    assert model.level_names_ == list(LEVEL_NAMES)
    scores = model.score_samples(test)
    assert scores.shape == (len(test),) and np.isfinite(scores).all()
    saved = tmp_path / "r18.gaussad"
    model.save(saved)
    again = gaussad.load(saved)
    np.testing.assert_allclose(again.level_scores(test), model.level_scores(test), rtol=1e-6)
    # the default's fused score: -log10 of interpolated p-values, which stretch the engines' float32 differences
    np.testing.assert_allclose(again.score_samples(test), scores, rtol=1e-4)


def test_renamed_key_is_refused_naming_it(tmp_path, r18_file):
    _, ref = r18_file
    state = dict(ref.state_dict())
    state["layer3.1.bn1.running_mean_renamed"] = state.pop("layer3.1.bn1.running_mean")
    path = tmp_path / "renamed.pth"
    torch.save(state, path)
    with pytest.raises(GaussadError) as info:
        create_backbone("resnet18", weights=path)
    message = str(info.value)
    assert "\n" not in message and "do not fit this resnet18" in message
    assert "missing: layer3.1.bn1.running_mean;" in message
    assert "unexpected: layer3.1.bn1.running_mean_renamed" in message


def test_other_resnet_file_is_refused(tmp_path, r18_file):
    path, _ = r18_file
    with pytest.raises(GaussadError, match="do not fit this resnet34 .*missing: layer1.2"):
        create_backbone("resnet34", weights=path)


class Payload:
    """A non-tensor object a pickle could carry."""


def test_pickled_object_is_refused(tmp_path, r18_file):
    _, ref = r18_file
    path = tmp_path / "object.pth"
    torch.save({**ref.state_dict(), "extra": Payload()}, path)
    with pytest.raises(GaussadError) as info:
        create_backbone("resnet18", weights=path)
    message = str(info.value)
    assert "\n" not in message and "\x1b" not in message
    assert "cannot read weights (refused: it holds pickled objects" in message and "Payload" in message
