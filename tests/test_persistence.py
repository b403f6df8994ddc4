import json
import pickle

import numpy as np
import pytest

import gaussad
from gaussad import GaussianAD, ModelFormatError
from gaussad.persistence import FORMAT_VERSION


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


def _rewrite_header(path, **changes):
    """Rewrite the safetensors JSON header of ``path`` with some metadata changed."""
    raw = path.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8 : 8 + n])
    header["__metadata__"].update(changes)
    new = json.dumps(header).encode()
    path.write_bytes(len(new).to_bytes(8, "little") + new + raw[8 + n :])


def test_other_format_version_is_refused(model_file):
    _, path = model_file
    _rewrite_header(path, format_version=str(FORMAT_VERSION + 1))
    with pytest.raises(ModelFormatError, match="format version"):
        gaussad.load(path)


def test_tampered_arrays_are_refused(model_file):
    _, path = model_file
    raw = bytearray(path.read_bytes())
    raw[-5] ^= 0xFF
    path.write_bytes(bytes(raw))
    with pytest.raises(ModelFormatError, match="damaged"):
        gaussad.load(path)


def test_foreign_files_are_refused_without_executing_code(tmp_path):
    class Boom:
        def __reduce__(self):
            return (open, (str(tmp_path / "pwned"), "w"))

    pkl = tmp_path / "evil.gaussad"
    pkl.write_bytes(pickle.dumps(Boom()))
    with pytest.raises(ModelFormatError, match="not a gaussad model"):
        gaussad.load(pkl)
    assert not (tmp_path / "pwned").exists()
    from safetensors.numpy import save_file

    other = tmp_path / "other.safetensors"
    save_file({"w": np.zeros(3)}, str(other))
    with pytest.raises(ModelFormatError, match="not a gaussad model"):
        gaussad.load(other)
    with pytest.raises(ModelFormatError, match="no such file"):
        gaussad.load(tmp_path / "nope.gaussad")


def test_truncated_file_is_refused(model_file):
    _, path = model_file
    path.write_bytes(path.read_bytes()[:200])
    with pytest.raises(ModelFormatError, match=path.name):
        gaussad.load(path)
