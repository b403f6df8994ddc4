import pytest
import torch

from gaussad.intake.backbones import create_backbone, get_spec, list_backbones, resolve_levels
from gaussad.intake.backbones.base import read_state_dict
from gaussad.intake.backbones.efficientnet import LEVEL_NAMES, _bundled_weights
from gaussad.errors import GaussadError
from gaussad.intake.images import load_image, preprocess


def test_registry_lists_lite_and_b_series():
    names = list_backbones()
    for n in ("efficientnet-lite0", "efficientnet-lite1", "efficientnet-lite2", "efficientnet-b4"):
        assert n in names
    assert [get_spec(f"efficientnet-lite{i}").input_size for i in range(3)] == [224, 240, 260]
    with pytest.raises(GaussadError, match="unknown backbone"):
        get_spec("resnet-9000")


def test_lite0_weights_are_real_imagenet_weights():
    """The bundled weights classify scikit-image's cat photo as a cat (ImageNet classes 281-285)."""
    from skimage import data

    bb = create_backbone("efficientnet-lite0")
    bb.net.load_state_dict(read_state_dict(_bundled_weights("efficientnet-lite0")))
    x = torch.from_numpy(preprocess(load_image(data.chelsea()), 224))[None]
    with torch.no_grad():
        top = int(bb.net(x).argmax())
    assert 281 <= top <= 285


def test_levels_match_the_paper_layout():
    bb = create_backbone("efficientnet-lite0", input_size=64)
    assert bb.level_channels == (32, 16, 24, 40, 80, 112, 192, 320, 1280)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        maps = bb.forward_levels(x, list(range(9)))
        head = bb.net.extract_features(x)
    assert [m.shape[1] for m in maps] == list(bb.level_channels)
    torch.testing.assert_close(maps[-1], head)
    with torch.no_grad():
        subset = bb.forward_levels(x, [2, 4])
    torch.testing.assert_close(subset[0], maps[2])
    torch.testing.assert_close(subset[1], maps[4])


def test_resolve_levels_names_indices_and_errors():
    assert resolve_levels(LEVEL_NAMES, None) == list(range(9))
    assert resolve_levels(LEVEL_NAMES, ["head", "stem", "3", 3]) == [0, 3, 8]
    with pytest.raises(GaussadError, match="unknown level"):
        resolve_levels(LEVEL_NAMES, ["stage9"])
    with pytest.raises(GaussadError, match="out of range"):
        resolve_levels(LEVEL_NAMES, [9])


def test_b_series_needs_a_weights_file():
    with pytest.raises(GaussadError, match="weights"):
        create_backbone("efficientnet-b0")


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_b0_loads_a_local_weights_file(tmp_path, suffix):
    """A user's own EfficientNet-B0 weights load strictly and give the same features as the source network."""
    from efficientnet_pytorch import EfficientNet

    torch.manual_seed(0)
    ref = EfficientNet.from_name("efficientnet-b0", image_size=64).eval()
    ref.set_swish(memory_efficient=False)
    path = tmp_path / f"b0{suffix}"
    state = {k: v.contiguous() for k, v in ref.state_dict().items()}
    if suffix == ".pth":
        torch.save(state, path)
    else:
        from safetensors.torch import save_file

        save_file(state, str(path))
    bb = create_backbone("efficientnet-b0", input_size=64, weights=path)
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(bb.forward_levels(x, [8])[0], ref.extract_features(x))


def test_wrong_weights_file_is_refused_clearly(tmp_path):
    with pytest.raises(GaussadError, match="do not fit"):
        create_backbone("efficientnet-b0", weights=_bundled_weights("efficientnet-lite0"))
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"not a torch file")
    with pytest.raises(GaussadError, match="cannot read weights"):
        create_backbone("efficientnet-b0", weights=junk)


@pytest.mark.parametrize("name", list_backbones())
def test_registry_contract(name):
    """Every registered backbone: unique level names, recommended map levels among them, and, for those that can be
    built without a user's file, a network whose levels are the registry's with the channels it declares, the
    levels asked for (any subset) equal to the same levels of a full pass."""
    spec = get_spec(name)
    assert spec.name == name and spec.input_size > 0 and spec.description
    assert len(set(spec.level_names)) == len(spec.level_names) > 0
    assert spec.map_levels and set(spec.map_levels) <= set(spec.level_names)
    assert (spec.bundled_weights is None) == spec.needs_weights_file
    if spec.needs_weights_file:
        return
    bb = create_backbone(name, input_size=64)
    assert tuple(bb.level_names) == spec.level_names and len(bb.level_channels) == len(spec.level_names)
    assert not bb.training and not any(p.requires_grad for p in bb.parameters())
    x = torch.randn(2, 3, 64, 64)
    every = list(range(len(spec.level_names)))
    with torch.no_grad():
        maps = bb.forward_levels(x, every)
        subset = bb.forward_levels(x, every[1::3])
    assert [tuple(m.shape[:2]) for m in maps] == [(2, c) for c in bb.level_channels]
    sides = [m.shape[2] for m in maps]
    assert sides == sorted(sides, reverse=True)  # shallowest first: resolution never grows with depth
    for got, i in zip(subset, every[1::3]):
        torch.testing.assert_close(got, maps[i], rtol=0, atol=0)
