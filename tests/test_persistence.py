"""Round trip of a model file; damaged, foreign and other-version files are tested in test_model_files.py."""

import numpy as np
import pytest

import gaussad
from gaussad import GaussianAD


@pytest.fixture
def model_file(tmp_path):
    rng = np.random.default_rng(0)
    model = GaussianAD(backbone=None, reduction="npca", variance=0.9).fit_features([rng.normal(size=(30, 8)), rng.normal(size=(30, 4))])
    path = tmp_path / "model.gaussad"
    model.save(path)
    return model, path


def test_roundtrip_keeps_scores_and_settings(model_file):
    model, path = model_file
    loaded = gaussad.load(path)
    x = [np.random.default_rng(1).normal(size=(5, 8)), np.random.default_rng(2).normal(size=(5, 4))]
    np.testing.assert_array_equal(loaded.level_scores_features(x), model.level_scores_features(x))
    assert (loaded.reduction, loaded.variance, loaded.dofs_) == ("npca", 0.9, model.dofs_)
    more = [np.random.default_rng(3).normal(size=(10, 8)), np.random.default_rng(4).normal(size=(10, 4))]
    np.testing.assert_allclose(
        loaded.partial_fit_features(more).level_scores_features(x), model.partial_fit_features(more).level_scores_features(x)
    )
