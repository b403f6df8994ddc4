"""Hostile, damaged and foreign model files are refused with ModelFormatError; nothing executes on load; saving is
atomic under failures and interruptions. See RELIABILITY.md."""

import json
import os
import pickle
import sys

import numpy as np
import pytest

import gaussad
import gaussad.intake.files as files
from gaussad import GaussadError, GaussianAD, ModelFormatError
from gaussad.detector.persistence import FORMAT_NAME, FORMAT_VERSION, checksum, read_model_file

from .conftest import in_child

RNG = np.random.default_rng(0)
TRAIN = [RNG.normal(size=(30, 8)), RNG.normal(size=(30, 4))]
PROBE = [RNG.normal(size=(5, 8)), RNG.normal(size=(5, 4))]


@pytest.fixture
def model_path(tmp_path):
    path = tmp_path / "model.gaussad"
    GaussianAD(backbone=None, preset="paper").fit_features(TRAIN).save(path)
    return path


def _refused(path, needle):
    with pytest.raises(ModelFormatError) as info:
        gaussad.load(path)
    assert str(path) in str(info.value) and needle in str(info.value), str(info.value)


def _forge(path, edit_meta=None, edit_arrays=None, meta_json=None):
    """Rewrite a model file with changes and a *recomputed* checksum, as a deliberate forger would."""
    from safetensors.numpy import save

    meta, arrays = read_model_file(path)
    if edit_meta:
        edit_meta(meta)
    if edit_arrays:
        edit_arrays(arrays)
    text = json.dumps(meta) if meta_json is None else meta_json
    header = {"format": FORMAT_NAME, "format_version": str(FORMAT_VERSION), "meta": text,
              "checksum": checksum(arrays, text)}
    path.write_bytes(save(arrays, metadata=header))


def test_an_unchanged_forgery_loads(model_path):
    """The forging helper itself writes valid files, so each refusal below is caused by its one change."""
    before = gaussad.load(model_path).level_scores_features(PROBE)
    _forge(model_path)
    np.testing.assert_array_equal(gaussad.load(model_path).level_scores_features(PROBE), before)


# ----- damage: caught by the checksum --------------------------------------------------------------------

def test_flipped_array_byte(model_path):
    raw = bytearray(model_path.read_bytes())
    raw[-5] ^= 0x01
    model_path.write_bytes(bytes(raw))
    _refused(model_path, "damaged (checksum mismatch)")


def test_edited_metadata_value_is_caught_by_the_checksum(model_path):
    """Metadata is covered too: a plausible edit (another estimator) that keeps valid JSON is refused."""
    raw = model_path.read_bytes()
    assert raw.count(b'ledoit-wolf') >= 1
    model_path.write_bytes(raw.replace(b'\\"estimator\\": \\"ledoit-wolf\\"', b'\\"estimator\\": \\"oas\\"        ', 1))
    assert model_path.read_bytes() != raw
    _refused(model_path, "damaged (checksum mismatch)")


@pytest.mark.parametrize("keep", [4, 8, 60, 0.5, -1], ids=["4B", "8B", "60B", "half", "minus1B"])
def test_truncated(model_path, keep):
    raw = model_path.read_bytes()
    n = int(len(raw) * keep) if isinstance(keep, float) else (len(raw) + keep if keep < 0 else keep)
    model_path.write_bytes(raw[:n])
    _refused(model_path, "not a gaussad model file, or a damaged one")


def test_empty_file(tmp_path):
    (tmp_path / "m.gaussad").write_bytes(b"")
    _refused(tmp_path / "m.gaussad", "empty file (0 bytes)")


# ----- foreign files -------------------------------------------------------------------------------------

class _Boom:
    """Unpickling this creates a file: evidence that code ran."""

    def __init__(self, target):
        self.target = target

    def __reduce__(self):
        return (open, (self.target, "w"))


def test_pickle_is_refused_unexecuted(tmp_path):
    target = tmp_path / "pwned"
    (tmp_path / "evil.gaussad").write_bytes(pickle.dumps(_Boom(str(target))))
    _refused(tmp_path / "evil.gaussad", "a Python pickle")
    assert not target.exists()


@pytest.mark.parametrize("zipped", [True, False], ids=["zip", "legacy"])
def test_torch_checkpoint_is_refused_unexecuted(tmp_path, zipped):
    import torch

    target = tmp_path / "pwned"
    path = tmp_path / "model.pth"
    torch.save({"w": torch.zeros(3), "evil": _Boom(str(target))}, path, _use_new_zipfile_serialization=zipped)
    _refused(path, "zip archive, such as a PyTorch" if zipped else "a Python pickle")
    assert not target.exists()


def test_other_foreign_files(tmp_path):
    from safetensors.numpy import save_file

    np.save(tmp_path / "a.npy", np.zeros(3))
    _refused(tmp_path / "a.npy", "a NumPy .npy file")
    save_file({"w": np.zeros(3)}, str(tmp_path / "other.safetensors"))
    _refused(tmp_path / "other.safetensors", "a safetensors file without gaussad metadata")
    (tmp_path / "notes.gaussad").write_text("just some text\n" * 20)
    _refused(tmp_path / "notes.gaussad", "not a gaussad model file")


@pytest.mark.parametrize("version", [str(FORMAT_VERSION + 1), "1", None], ids=["newer", "older", "missing"])
def test_other_format_version(model_path, version):
    from safetensors.numpy import save

    meta, arrays = read_model_file(model_path)
    text = json.dumps(meta)
    header = {"format": FORMAT_NAME, "meta": text, "checksum": checksum(arrays, text)}
    if version is not None:
        header["format_version"] = version
    model_path.write_bytes(save(arrays, metadata=header))
    if version == str(FORMAT_VERSION + 1):  # issue 32, N21: not "refit", which cannot help
        _refused(model_path, f"written by a newer gaussad (model format {version}; this gaussad")
        _refused(model_path, f"reads format {FORMAT_VERSION}): upgrade gaussad")
    else:
        _refused(model_path, f"model format version {version}, but this gaussad reads version {FORMAT_VERSION}; "
                             "refit the model")


# ----- absurd safetensors headers ------------------------------------------------------------------------

def _raw_file(path, header: dict, payload: bytes = b""):
    text = json.dumps(header).encode()
    path.write_bytes(len(text).to_bytes(8, "little") + text + payload)


def test_absurd_header_length(tmp_path):
    (tmp_path / "m.gaussad").write_bytes((2**63).to_bytes(8, "little") + b"{}" + b"\0" * 64)
    _refused(tmp_path / "m.gaussad", "not a gaussad model file, or a damaged one")


def test_absurd_tensor_shape(tmp_path):
    header = {"x": {"dtype": "F64", "shape": [10**12, 10**12], "data_offsets": [0, 8]},
              "__metadata__": {"format": FORMAT_NAME}}
    _raw_file(tmp_path / "m.gaussad", header, b"\0" * 8)
    _refused(tmp_path / "m.gaussad", "not a gaussad model file, or a damaged one")


def test_offsets_beyond_the_file(tmp_path):
    header = {"x": {"dtype": "F64", "shape": [1000], "data_offsets": [0, 8000]}, "__metadata__": {"format": FORMAT_NAME}}
    _raw_file(tmp_path / "m.gaussad", header, b"\0" * 16)
    _refused(tmp_path / "m.gaussad", "not a gaussad model file, or a damaged one")


# ----- forged files with a valid checksum: strict validation ---------------------------------------------

def _set(key, value):
    return lambda meta: meta.__setitem__(key, value)


FORGERIES = {
    "missing-array": (None, lambda a: a.pop("level0.gauss.mean"), "missing model entry 'level0.gauss.mean'"),
    "wrong-shape": (None, lambda a: a.__setitem__("level0.gauss.chol", np.eye(3)), "Cholesky factor of shape (3, 3)"),
    "dims-vs-metadata": (_set("feature_dims", [8, 5]), None, "do not match the metadata"),
    # found by the forged-file fuzzer (make fuzz): a 2-D mean whose first axis is the dimension loaded, then failed
    # to score ("operands could not be broadcast together with shapes (4,6) (6,0)")
    "mean-2d-empty": (None, lambda a: a.__setitem__("level0.gauss.mean", np.zeros((8, 0))), "level0.gauss.mean is not a vector"),
    "mean-column": (None, lambda a: a.__setitem__("level0.gauss.mean", a["level0.gauss.mean"].reshape(8, 1)),
                    "level0.gauss.mean is not a vector"),
    # found by the same fuzzer: a map Gaussian's mean poked to 1e300 loaded and gave NaN anomaly maps
    "huge-mean": (None, lambda a: a["level1.gauss.mean"].__setitem__(0, 1e300), "beyond 1e+60, which no fit produces"),
    "nan-in-array": (None, lambda a: a["level1.gauss.mean"].__setitem__(0, np.nan), "contains NaN or infinite"),
    "inf-in-stats": (None, lambda a: a["level0.stats.s2"].__setitem__((0, 0), np.inf), "contains NaN or infinite"),
    "float32-array": (None, lambda a: a.__setitem__("level0.gauss.mean", a["level0.gauss.mean"].astype(np.float32)),
                      "dtype float32, expected float64"),
    "negative-cholesky": (None, lambda a: a["level0.gauss.chol"].__setitem__((2, 2), -1.0), "positive diagonal"),
    "upper-cholesky": (None, lambda a: a["level0.gauss.chol"].__setitem__((0, 3), 1.0), "lower triangular"),
    "missing-key": (lambda m: m.pop("estimator"), None, "metadata lacks estimator"),
    "levels-not-a-list": (_set("levels", "abc"), None, "levels must be a non-empty list"),
    "absurd-input-size": (_set("input_size", 10**9), None, "input_size must be 1..4096"),
    "unknown-estimator": (_set("estimator", "banana"), None, "unknown estimator 'banana'"),
    "variance-out-of-range": (_set("variance", 7.0), None, "variance must be a fraction in (0, 1)"),
    "sample-count-mismatch": (_set("n_samples", 31), None, "sample counts [30] do not match n_samples 31"),
    "bool-as-number": (_set("n_samples", True), None, "n_samples must be an integer >= 2"),
    "per-level-estimator": (lambda m: m["gaussians"][1].__setitem__("estimator", "oas"), None,
                            "level 1: estimator/reduction differ"),
    "shrinkage-out-of-range": (lambda m: m["gaussians"][0].__setitem__("shrinkage", -0.5), None,
                               "shrinkage must lie in [0, 1]"),
    "map-levels-without-names": (_set("map_levels", [4]), None, "map_level_names must be one name per map level"),
    "map-gaussian-estimator": (lambda m: m.update(map_levels=[4], map_level_names=["stage4"],
                                                  map_gaussians=[{"estimator": "oas", "reduction": None}]), None,
                               "map_gaussians must describe every map level"),
    "unknown-preset": (_set("preset", "fastest"), None, "unknown preset 'fastest'"),
    "unknown-threshold": (_set("threshold", "banana"), None, "unknown threshold 'banana'"),
    "fpr-out-of-range": (_set("fpr", 2.0), None, "fpr must be a fraction in [1e-12, 1)"),
    "calibration-count": (_set("n_calibration", 5), None, "5 calibration scores in the metadata, 0 stored"),
    "nan-calibration": (lambda m: m.__setitem__("n_calibration", 2),
                        lambda a: a.__setitem__("calibration.scores", np.array([1.0, np.nan])), "NaN or infinite"),
    "meta-not-an-object": (lambda m: (m.clear(), m.update({"0": 1})) and None, None, "metadata lacks"),
}


@pytest.mark.parametrize("case", list(FORGERIES))
def test_forged_model_with_valid_checksum(model_path, case):
    edit_meta, edit_arrays, needle = FORGERIES[case]
    _forge(model_path, edit_meta, edit_arrays)
    _refused(model_path, needle)


FMAPS = [[m] for m in np.random.default_rng(7).normal(size=(6, 3, 4, 4))]  # per image, one map level


@pytest.fixture
def bank_model_path(tmp_path):
    """A model with a nearest-neighbour memory bank for one (feature-array) map level."""
    path = tmp_path / "bank.gaussad"
    GaussianAD(backbone=None, map_method="nearest", map_coreset=0.5).fit_features(TRAIN).fit_map_features(FMAPS).save(path)
    return path


def test_forged_projection_that_is_not_a_matrix(tmp_path):
    """A pca model whose components gained an axis loaded, then failed to score (found with the mean case above)."""
    path = tmp_path / "pca.gaussad"
    GaussianAD(backbone=None, reduction="pca", variance=0.8).fit_features(TRAIN).save(path)
    _forge(path, edit_arrays=lambda a: a.__setitem__("level0.gauss.components",
                                                      a["level0.gauss.components"][:, :, None].copy()))
    _refused(path, "level0.gauss.components is not a matrix")


def test_bank_model_round_trip(bank_model_path):
    model = gaussad.load(bank_model_path)
    assert model.setting("map_method") == "nearest" and len(model.map_banks_[0].vectors) == 48
    _forge(bank_model_path)
    again = gaussad.load(bank_model_path)
    np.testing.assert_array_equal(again.anomaly_map_features(FMAPS, 8), model.anomaly_map_features(FMAPS, 8))


BANK_FORGERIES = {
    "nan-bank": (None, lambda a: a["bank0.vectors"].__setitem__((0, 0), np.nan), "bank0.vectors contains NaN"),
    "float64-bank": (None, lambda a: a.__setitem__("bank0.vectors", a["bank0.vectors"].astype(np.float64)),
                     "non-empty 2-D float32"),
    "short-ids": (None, lambda a: a.__setitem__("bank0.ids", a["bank0.ids"][:-1]), "one non-negative int64"),
    "missing-bank": (None, lambda a: a.pop("bank0.ids"), "memory bank 0 is missing"),
    "bank-bigger-than-seen": (lambda m: m["map_banks"][0].__setitem__("seen", 3), None, "more vectors than"),
    "negative-scale": (lambda m: m["map_banks"][0].__setitem__("scale", -1.0), None, "map_banks must describe"),
    "vanishing-scale": (lambda m: m["map_banks"][0].__setitem__("scale", 1e-300), None, "map_banks must describe"),
    "huge-bank-values": (None, lambda a: a["bank0.vectors"].__setitem__((0, 0), 1e30), "where float32 distances"),
    "bank-for-gaussian-maps": (_set("map_method", "gaussian"), None, "map_banks must describe"),
    "unknown-map-method": (_set("map_method", "knn"), None, "unknown map_method 'knn'"),
    "even-map-pool": (_set("map_pool", 2), None, "map_pool must be an odd integer"),
}


@pytest.mark.parametrize("case", list(BANK_FORGERIES))
def test_forged_bank_with_valid_checksum(bank_model_path, case):
    edit_meta, edit_arrays, needle = BANK_FORGERIES[case]
    _forge(bank_model_path, edit_meta, edit_arrays)
    _refused(bank_model_path, needle)


@pytest.mark.parametrize("text, needle", [("{not json", "damaged model metadata"), ("[" * 100_000, "damaged model metadata"),
                                          ("[1, 2]", "metadata is not a JSON object")], ids=["invalid", "deep", "list"])
def test_forged_metadata_json(model_path, text, needle):
    _forge(model_path, meta_json=text)
    _refused(model_path, needle)


def test_model_path_problems(tmp_path):
    (tmp_path / "dir.gaussad").mkdir()
    _refused(tmp_path / "dir.gaussad", "is a folder, not a model file")
    _refused(tmp_path / "missing.gaussad", "cannot open (no such file)")
    (tmp_path / "loop.gaussad").symlink_to(tmp_path / "loop.gaussad")
    _refused(tmp_path / "loop.gaussad", "symbolic link loop")


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_loading_executes_nothing(tmp_path, model_path):
    """With an audit hook watching, loading hostile files raises no code-running or importing event."""
    import torch

    hostile = [tmp_path / "evil.gaussad", tmp_path / "random.gaussad", tmp_path / "ckpt.pth", tmp_path / "cut.gaussad"]
    hostile[0].write_bytes(pickle.dumps(_Boom(str(tmp_path / "pwned"))))
    hostile[1].write_bytes(np.random.default_rng(0).bytes(4096))
    torch.save({"evil": _Boom(str(tmp_path / "pwned"))}, hostile[2])
    hostile[3].write_bytes(model_path.read_bytes()[:300])
    forbidden = ("pickle.find_class", "exec", "compile", "os.system", "subprocess.Popen", "os.exec", "os.posix_spawn",
                 "os.spawn", "marshal.loads", "ctypes.dlopen", "import")

    def work():
        gaussad.load(model_path)  # lazy imports happen here, before watching
        seen = []
        sys.addaudithook(lambda event, args: seen.append(event) if event.startswith(forbidden) else None)
        outcomes = []
        for path in [*hostile, model_path]:
            try:
                gaussad.load(path)
                outcomes.append("loaded")
            except ModelFormatError:
                outcomes.append("refused")
        return 0, json.dumps([outcomes, sorted(set(seen))])

    code, text = in_child(work)
    assert code == 0
    assert json.loads(text) == [["refused"] * 4 + ["loaded"], []]
    assert not (tmp_path / "pwned").exists()


# ----- atomic writes -------------------------------------------------------------------------------------

def _half_then(exc):
    def writer(fd, data):
        os.write(fd, data[: len(data) // 2])
        raise exc

    return writer


@pytest.mark.parametrize("exc", [OSError(28, "No space left on device"), KeyboardInterrupt()], ids=["disk-full", "ctrl-c"])
def test_failed_save_keeps_the_previous_model_and_leaves_no_temp(model_path, monkeypatch, exc):
    before = model_path.read_bytes()
    newer = GaussianAD(backbone=None, estimator="oas").fit_features(TRAIN)
    monkeypatch.setattr(files, "write_all", _half_then(exc))
    with pytest.raises(GaussadError if isinstance(exc, OSError) else KeyboardInterrupt) as info:
        newer.save(model_path)
    if isinstance(exc, OSError):
        assert "cannot write model file (No space left on device)" in str(info.value)
    assert model_path.read_bytes() == before
    assert [p.name for p in model_path.parent.iterdir()] == [model_path.name]
    monkeypatch.undo()
    newer.save(model_path)
    assert gaussad.load(model_path).estimator == "oas"


def test_failed_rename_keeps_the_previous_model(model_path, monkeypatch):
    before = model_path.read_bytes()

    def refuse(src, dst):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(files.os, "replace", refuse)
    with pytest.raises(GaussadError, match="cannot write model"):
        GaussianAD(backbone=None, estimator="oas").fit_features(TRAIN).save(model_path)
    assert model_path.read_bytes() == before
    assert [p.name for p in model_path.parent.iterdir()] == [model_path.name]


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_hard_kill_mid_write_keeps_the_previous_model(model_path):
    """A killed process cannot clean up: its hidden temp file stays, but the model file is the old, valid one."""
    before = model_path.read_bytes()

    def work():
        def dying(fd, data):
            os.write(fd, data[: len(data) // 2])
            os._exit(9)  # no cleanup, no exception handlers: as SIGKILL or a power cut

        files.write_all = dying
        GaussianAD(backbone=None, estimator="oas").fit_features(TRAIN).save(model_path)
        return 0, "not killed"

    code, _ = in_child(work)
    assert code == 9
    assert model_path.read_bytes() == before
    gaussad.load(model_path)
    leftovers = [p.name for p in model_path.parent.iterdir() if p != model_path]
    assert len(leftovers) == 1 and leftovers[0].startswith(f".{model_path.name}.") and leftovers[0].endswith(".tmp")


def test_save_into_a_folder_or_unwritable_place(tmp_path, monkeypatch):
    model = GaussianAD(backbone=None).fit_features(TRAIN)
    (tmp_path / "dir.gaussad").mkdir()
    with pytest.raises(GaussadError, match="is a folder"):
        model.save(tmp_path / "dir.gaussad")
    real_open = os.open

    def denied(path, flags, *args):
        if os.fspath(path).endswith(".tmp"):
            raise PermissionError(13, "Permission denied")
        return real_open(path, flags, *args)

    monkeypatch.setattr(files.os, "open", denied)
    with pytest.raises(GaussadError, match="cannot write model file \\(Permission denied\\)"):
        model.save(tmp_path / "m.gaussad")
    assert list(tmp_path.iterdir()) == [tmp_path / "dir.gaussad"]


def test_saved_file_gets_ordinary_permissions(tmp_path):
    """The temp file is created with 0o666 minus the umask, so the model is as readable as any new file."""
    old = os.umask(0o022)
    try:
        GaussianAD(backbone=None).fit_features(TRAIN).save(tmp_path / "m.gaussad")
    finally:
        os.umask(old)
    assert (tmp_path / "m.gaussad").stat().st_mode & 0o777 == 0o644


def test_header_length_that_looks_like_pickle_magic_still_loads(model_path):
    """A safetensors file starts with its header length: 0x80 there is not a pickle (regression)."""
    for pad in range(300):
        _forge(model_path, _set("note", "x" * pad))
        if model_path.read_bytes()[:1] == b"\x80":
            break
    assert model_path.read_bytes()[:1] == b"\x80"
    np.testing.assert_allclose(gaussad.load(model_path).level_scores_features(PROBE),
                               GaussianAD(backbone=None).fit_features(TRAIN).level_scores_features(PROBE))


def test_files_from_before_the_recommended_default_say_paper(model_path, tmp_path):
    """Model files written while the paper's preset was the default stored no preset name; they hold the paper's
    settings and load, save and describe themselves as "paper", while a new model without a preset says
    "recommended" in its file."""
    _forge(model_path, edit_meta=lambda m: m.update(preset=None))
    old = gaussad.load(model_path)
    assert old.setting("preset") == "paper" and old.summary()["preset"] == "paper"
    old.save(tmp_path / "again.gaussad")
    assert read_model_file(tmp_path / "again.gaussad")[0]["preset"] == "paper"
    GaussianAD(backbone=None).fit_features(TRAIN).save(tmp_path / "new.gaussad")
    assert read_model_file(tmp_path / "new.gaussad")[0]["preset"] == "recommended"


def test_recommended_files_from_before_brightness_matching_keep_the_pixels(tiny_category, tmp_path):
    """Model files written before ``brightness`` existed stored no such key: a recommended one was fitted on the pixels
    as decoded, so it loads as ``'keep'`` and scores as it did, where a new recommended model matches brightness."""
    from gaussad.intake.images import list_images

    from .conftest import TINY

    images = list_images(tiny_category / "train" / "good")
    settings = {**TINY, "preset": "recommended", "map_levels": ["stage2", "stage3"]}
    path = tmp_path / "before.gaussad"
    before = GaussianAD(**settings, brightness="keep").fit(images)
    before.save(path)
    _forge(path, edit_meta=lambda m: (m.pop("brightness"), m["normalization"].pop("brightness")))
    assert "brightness" not in read_model_file(path)[0]
    old = gaussad.load(path)
    assert old.setting("brightness") == "keep" and old.feature_extractor().brightness == "keep"
    probe = [np.full((64, 64, 3), v, np.uint8) + np.arange(64, dtype=np.uint8)[:, None, None] for v in (30, 150)]
    np.testing.assert_allclose(old.level_scores(probe), before.level_scores(probe), rtol=1e-6)
    new = GaussianAD(**settings).fit(images)
    assert new.setting("brightness") == "match" and new.feature_extractor().brightness == "match"
    assert not np.allclose(new.level_scores(probe), before.level_scores(probe), rtol=1e-3)
