"""pool='avg+std': the map levels' global features also hold each channel's spread over the map; model files,
merge, presets and the paper's path (pool='avg') keep what they meant."""

import numpy as np
import pytest

import gaussad
from gaussad import GaussianAD, InvalidParameterError
from gaussad.intake.images import list_images
from gaussad.detector.params import effective, from_stored
from gaussad.detector.persistence import read_model_file
from gaussad.detector.state import feature_settings

from .conftest import TINY

MAPPED = {**TINY, "map_levels": ["stage2", "stage3"], "map_method": "nearest", "map_coreset": 1.0}


@pytest.fixture(scope="module")
def files(tiny_category):
    return list_images(tiny_category / "train" / "good")


@pytest.fixture(scope="module")
def spread(files):
    return GaussianAD(**MAPPED, pool="avg+std").fit(files)


@pytest.mark.parametrize("backbone, pool", [("efficientnet-lite0", "avg+std"), ("efficientnet-lite1", "avg+std"),
                                           ("efficientnet-lite2", "avg+std"), ("mobilenet_v2", "avg"),
                                           ("efficientnet-b4", "avg"), ("resnet50", "avg"), (None, "avg")])
def test_presets_pool_as_documented(backbone, pool):
    """recommended and fast take the backbone's own pooling (the spread only where it was measured to help without
    loosening the chi2 rule: EfficientNet-Lite); paper averages; an explicit value wins."""
    for preset, expected in (("recommended", pool), ("fast", pool), (None, pool), ("paper", "avg")):
        assert effective({"preset": preset, "pool": None, "backbone": backbone}, "pool") == expected, preset
    assert effective({"preset": "paper", "pool": "avg+std", "backbone": backbone}, "pool") == "avg+std"


def test_std_changes_only_the_map_levels(files, tiny_category, spread):
    """Levels that are not map levels keep the average's features (equal distances); the map levels' Gaussians
    model twice the channels."""
    plain = GaussianAD(**MAPPED, pool="avg").fit(files)
    test = list_images(tiny_category / "test", recursive=True)
    assert spread.feature_dims_ == [32, 16, 48, 80] and plain.feature_dims_ == [32, 16, 24, 40]
    a, b = spread.level_scores(test), plain.level_scores(test)
    np.testing.assert_allclose(a[:, :2], b[:, :2], rtol=1e-12)
    assert not np.allclose(a[:, 2:], b[:, 2:])
    no_maps = GaussianAD(**TINY, pool="avg+std").fit(files)  # nothing to spread without map levels
    assert no_maps.feature_dims_ == [32, 16, 24, 40]


def test_model_files_keep_pool_and_old_files_load_with_the_average(spread, tiny_category, tmp_path):
    test = list_images(tiny_category / "test", recursive=True)[:4]
    path = tmp_path / "spread.gaussad"
    spread.save(path)
    loaded = gaussad.load(path)
    assert loaded.pool == "avg+std" and loaded.state_.layout.settings["pool"] == "avg+std"
    assert loaded.summary()["pool"] == "avg+std"  # what `gaussad fit --json` and GET /models report
    np.testing.assert_allclose(loaded.score_samples(test), spread.score_samples(test), rtol=1e-9)
    meta, _ = read_model_file(path)
    old = {k: v for k, v in meta.items() if k != "pool"}  # a file from before pool existed
    assert from_stored(old)["pool"] == "avg" and feature_settings(old)["pool"] == "avg"


def test_merge_refuses_another_pool_and_bad_values_are_named(spread, files):
    with pytest.raises(InvalidParameterError, match="pool"):
        spread.merge(GaussianAD(**MAPPED, pool="avg").fit(files))
    with pytest.raises(InvalidParameterError, match="unknown pool 'max'"):
        GaussianAD(**MAPPED, pool="max").fit(files)


def test_evaluate_reports_the_pooling(tiny_root):
    from gaussad.tools.evaluate import evaluate, format_table

    report = evaluate(tiny_root / "brick", protocol="full", **MAPPED, pool="avg+std")
    assert report["pool"] == "avg+std" and "pool=avg+std" in format_table(report).splitlines()[0]
    assert len(report["categories"]["brick"]["level_aurocs"]) == 4


def test_service_lists_the_pooling(spread):
    from fastapi.testclient import TestClient

    from gaussad.service.app import create_app

    with TestClient(create_app({"spread": spread})) as client:
        info = client.get("/models").json()[0]
    assert (info["pool"], info["map_tiles"]) == ("avg+std", 1)
