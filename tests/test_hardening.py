"""Regression tests of the second hardening round (issue 18): each reproduction of the probe gives a clear one-line
error (CLI exit 2, HTTP 4xx, or a GaussadError subclass) or correct output."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

import gaussad
from gaussad import DataError, GaussadError, GaussianAD, InvalidParameterError
from gaussad.cli import main

from .conftest import TINY

RNG = np.random.default_rng(7)
TRAIN = [RNG.normal(size=(40, 5)), RNG.normal(size=(40, 3))]


def _cli_error(argv, capsys) -> str:
    """Run the CLI expecting exit 2 (argparse or GaussadError); returns stderr."""
    try:
        code = main(argv)
    except SystemExit as exc:
        code = exc.code
    err = capsys.readouterr().err
    assert code == 2, err
    assert "Traceback" not in err
    return err


@pytest.fixture(scope="module")
def tiny_model(tiny_category, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("hardening") / "tiny.gaussad"
    assert main(["fit", str(tiny_category), "-o", str(path), "--quiet", "--backbone", TINY["backbone"],
                 "--input-size", str(TINY["input_size"]), "--levels", ",".join(TINY["levels"])]) == 0
    return path


# 1. an fpr that underflows across the levels
def test_tiny_fpr_is_refused_everywhere(tiny_model, tiny_category, tmp_path, capsys):
    err = _cli_error(["score", str(tiny_model), str(tiny_category / "test" / "good"), "--fpr", "5e-324"], capsys)
    assert "fpr must be a fraction in [1e-12, 1)" in err
    out = tmp_path / "t.gaussad"
    _cli_error(["fit", str(tiny_category), "-o", str(out), "--fpr", "5e-324"], capsys)
    assert not out.exists()
    model = GaussianAD(backbone=None).fit_features(TRAIN)
    with pytest.raises(InvalidParameterError, match="fpr"):
        model.decide(model.level_scores_features(TRAIN), fpr=5e-324)


# 4. --maps errors
def test_maps_into_an_existing_file_is_refused_before_scoring(tiny_model, tiny_category, tmp_path, capsys):
    target = tmp_path / "not-a-folder"
    target.write_text("x")
    err = _cli_error(["score", str(tiny_model), str(tiny_category / "test" / "good"), "--maps", str(target)], capsys)
    assert "not a folder" in err


def test_an_image_changed_between_scoring_and_overlay_is_skipped(tiny_category, tmp_path, monkeypatch, capsys):
    import json

    import gaussad.intake.images as images

    model_path = tmp_path / "maps.gaussad"
    assert main(["fit", str(tiny_category), "-o", str(model_path), "--quiet", "--input-size", "64",
                 "--levels", "stem,stage1", "--map-levels", "stage1", "--map-method", "nearest"]) == 0
    files = sorted((tiny_category / "test" / "good").iterdir())[:3]
    real = images.load_image

    def gone(source, *args, **kwargs):
        if Path(source) == files[1]:
            raise gaussad.ImageError(f"{source}: cannot open (no such file)")
        return real(source, *args, **kwargs)

    monkeypatch.setattr(images, "load_image", gone)  # what the overlay writer reads, not the scoring pipeline
    assert main(["score", str(model_path), *map(str, files), "--maps", str(tmp_path / "out"), "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)["results"]
    assert len(rows) == 3 and rows[1]["map"] is None and "no such file" in rows[1]["map_error"]
    assert Path(rows[0]["map"]).is_file() and Path(rows[2]["map"]).is_file()


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs resource limits")
def test_file_size_limit_while_writing_overlays_gives_one_line(tiny_category, tmp_path):
    model_path = tmp_path / "maps.gaussad"
    assert main(["fit", str(tiny_category), "-o", str(model_path), "--quiet", "--input-size", "64",
                 "--levels", "stem,stage1", "--map-levels", "stage1"]) == 0
    code = ("import resource, sys; resource.setrlimit(resource.RLIMIT_FSIZE, (2000, 2000)); "
            "from gaussad.cli import main; sys.exit(main(sys.argv[1:]))")
    out = subprocess.run([sys.executable, "-c", code, "score", str(model_path), str(tiny_category / "test" / "good"),
                          "--maps", str(tmp_path / "out"), "--quiet"], capture_output=True, text=True, timeout=300)
    assert out.returncode == 2 and "cannot write overlay" in out.stderr and "Traceback" not in out.stderr
    assert not [p for p in (tmp_path / "out").iterdir() if p.name.endswith(".tmp")]


# 7.-11. bad values, before any work
@pytest.mark.parametrize("argv, expected", [
    (["score", "{model}", "{images}", "--batch-size", "-1"], "batch_size must be an integer"),
    (["score", "{model}", "{images}", "--batch-size", "0"], "batch_size must be an integer"),
    (["fit", "{train}", "-o", "{tmp}/m.gaussad", "--seed", "-1", "--calibration", "0.2"], "random_state must be"),
    (["fit", "{train}", "-o", "{tmp}/m.gaussad", "--input-size", "-5"], "input_size must be 'auto', 'native' or an integer 1..4096"),
    (["fit", "{train}", "-o", "{tmp}/m.gaussad", "--input-size", "4097"], "input_size must be 'auto', 'native' or an integer 1..4096"),
    (["fit", "{train}", "-o", "{tmp}/" + "m" * 300 + ".gaussad"], "file name too long"),
    (["fit", "{train}", "-o", "{tmp}"], "is a folder"),
    (["serve", "{tmp}", "--max-file-mb", "nan"], "--max-file-mb"),
    (["serve", "{tmp}", "--max-file-mb", "inf"], "--max-file-mb"),
    (["serve", "{tmp}", "--port", "70000"], "--port"),
    (["evaluate", "{train}", "--json", "{tmp}"], "is a folder"),
])
def test_bad_values_give_one_line_before_work(argv, expected, tiny_model, tiny_category, tmp_path, capsys):
    fill = {"model": str(tiny_model), "images": str(tiny_category / "test" / "good"), "train": str(tiny_category),
            "tmp": str(tmp_path)}
    started = time.perf_counter()
    err = _cli_error([a.format(**fill) for a in argv], capsys)
    assert expected in err
    assert time.perf_counter() - started < 30  # no fit or evaluation ran first (those take minutes here)


def test_a_long_but_valid_model_name_is_written(tiny_category, tmp_path):
    out = tmp_path / ("m" * 240 + ".gaussad")
    assert main(["fit", str(tiny_category), "-o", str(out), "--quiet", "--input-size", "64", "--levels", "stem"]) == 0
    gaussad.load(out)


# 10. a model file that score would refuse is never written
def test_merged_conformal_model_is_not_saved_without_calibration(tmp_path):
    a = GaussianAD(backbone=None, threshold="conformal", calibration=0.2).fit_features([t[:20] for t in TRAIN])
    b = GaussianAD(backbone=None, threshold="chi2").fit_features([t[20:] for t in TRAIN])  # no calibration scores
    merged = a.merge(b)
    with pytest.raises(GaussadError, match="not saved: the conformal threshold needs calibration scores"):
        merged.save(tmp_path / "m.gaussad")
    assert not (tmp_path / "m.gaussad").exists()
    merged.calibrate_features([RNG.normal(size=(19, 5)), RNG.normal(size=(19, 3))])
    merged.save(tmp_path / "m.gaussad")
    assert gaussad.load(tmp_path / "m.gaussad").score_threshold() > 0


# 12. signals clean up; stale temporaries are removed
SLOW_SAVE = """
import signal, sys, time
signal.signal(signal.SIGINT, signal.default_int_handler)  # a child of a background job starts with Ctrl-C ignored
import numpy as np
import gaussad.intake.files as files
real = files.write_all
def slow(fd, data):  # half the bytes, then a long pause: the signal arrives mid-save
    real(fd, data[: len(data) // 2])
    time.sleep(60)
files.write_all = slow
"""


def _signal_mid_save(script: str, folder: Path, sig: int) -> tuple[int, str]:
    """Run ``SLOW_SAVE + script`` in a child, send ``sig`` once its temporary exists; (exit code, stderr)."""
    proc = subprocess.Popen([sys.executable, "-c", SLOW_SAVE + script], stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 600  # a loaded machine can be slow to get there; normally a few seconds
    while not list(folder.glob(".m.gaussad.*.tmp")) and time.time() < deadline:
        time.sleep(0.05)
    assert list(folder.glob(".m.gaussad.*.tmp")), "the save never started"
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=60)
    return proc.returncode, err


def test_ctrl_c_during_save_leaves_no_temporary(tmp_path):
    code, _ = _signal_mid_save(f"""
from gaussad import GaussianAD
model = GaussianAD(backbone=None).fit_features([np.random.default_rng(0).normal(size=(30, 4))])
try:
    model.save({str(tmp_path / "m.gaussad")!r})
except KeyboardInterrupt:
    sys.exit(130)
""", tmp_path, signal.SIGINT)
    assert code == 130
    assert not list(tmp_path.iterdir()), [p.name for p in tmp_path.iterdir()]


def test_cli_turns_sigterm_into_a_clean_exit(tiny_category, tmp_path):
    code, err = _signal_mid_save(f"""
from gaussad.cli import main
sys.exit(main(["fit", {str(tiny_category)!r}, "-o", {str(tmp_path / "m.gaussad")!r}, "--quiet", "--input-size", "64",
               "--levels", "stem", "--engine", "torch"]))
""", tmp_path, signal.SIGTERM)
    assert code == 143 and "gaussad: terminated" in err
    assert not list(tmp_path.iterdir())


def test_stale_temporaries_of_a_killed_run_are_removed(tmp_path):
    target = tmp_path / "m.gaussad"
    stale = tmp_path / ".m.gaussad.0123456789ab.tmp"
    fresh = tmp_path / ".m.gaussad.ba9876543210.tmp"
    other = tmp_path / ".other.gaussad.0123456789ab.tmp"
    for p in (stale, fresh, other):
        p.write_bytes(b"half")
    old = time.time() - 2 * 3600
    os.utime(stale, (old, old))
    os.utime(other, (old, old))
    GaussianAD(backbone=None).fit_features(TRAIN).save(target)
    assert not stale.exists() and fresh.exists() and other.exists()


# 13.-14. decide() refuses what it cannot decide on
@pytest.mark.parametrize("levels, message", [
    (np.array([[1.0, np.nan]]), "NaN"),
    (np.array([[1.0, 2.0, 3.0]]), "one column per level"),
    (np.array([[1.0, -2.0]]), "non-negative"),
    ([["a", "b"]], "numbers"),
])
def test_decide_refuses_nan_wrong_shapes_and_negative_values(levels, message):
    model = GaussianAD(backbone=None).fit_features(TRAIN)
    with pytest.raises(DataError, match=message) as info:
        model.decide(levels)
    assert isinstance(info.value, ValueError)


# 15.-16. strings, numpy integers and other raw exceptions
def test_a_folder_name_instead_of_a_list_is_refused(tiny_category):
    for folder in (str(tiny_category), tiny_category):
        with pytest.raises(DataError, match="give a list of images"):
            GaussianAD(**TINY).fit(folder)


def test_one_level_as_a_string_and_numpy_integers(tiny_category):
    files = sorted((tiny_category / "train" / "good").iterdir())[:4]
    assert GaussianAD(input_size=64, levels="stem").fit(files).level_names_ == ["stem"]
    assert GaussianAD(input_size=64, levels=[np.int64(1)]).fit(files).level_names_ == ["stage1"]


@pytest.mark.parametrize("make", [
    lambda: GaussianAD(backbone=None).merge(GaussianAD(backbone=None).fit_features(TRAIN)),
    lambda: GaussianAD(backbone=None, batch_size=2.5).fit_features(TRAIN),
    lambda: GaussianAD(backbone=None, batch_size="4").fit_features(TRAIN),
    lambda: GaussianAD(backbone=None, random_state=-1, calibration=0.2).fit_features(TRAIN),
    lambda: GaussianAD(backbone=None).fit_features([np.zeros((10, 0))]),
])
def test_bad_api_input_raises_gaussad_errors(make):
    with pytest.raises(GaussadError) as info:
        make()
    assert isinstance(info.value, ValueError) and str(info.value)


def test_a_conformal_model_file_without_calibration_scores_is_refused_at_load(tmp_path):
    import json

    from gaussad.detector.persistence import read_model_file, save_model

    path = tmp_path / "m.gaussad"
    GaussianAD(backbone=None, threshold="chi2").fit_features(TRAIN).save(path)
    meta, arrays = read_model_file(path)
    save_model(path, {**meta, "threshold": "conformal", "calibration": 0.2}, arrays)  # signed, but unusable
    with pytest.raises(gaussad.ModelFormatError, match="conformal threshold needs calibration scores"):
        gaussad.load(path)
    assert json.dumps(meta)  # the untouched metadata stays serialisable


@pytest.mark.parametrize("make, error, message", [
    (lambda: GaussianAD(backbone=None).fit_features(TRAIN).merge("x"), InvalidParameterError, "another GaussianAD"),
    (lambda: gaussad.load(None), gaussad.ModelFormatError, "path is needed"),
    (lambda: GaussianAD(backbone=None, map_method="nearest").fit_features(TRAIN).fit_map_features(
        [[np.ones((2, 3, 3))], [np.ones((3, 3, 3))]]), DataError, "same channels"),
    (lambda: GaussianAD(input_size=32, levels=["stem"]).fit([1, 2, 3, 4]), gaussad.ImageError, "image #0: unsupported"),
])
def test_more_bad_api_input(make, error, message):
    with pytest.raises(error, match=message):
        make()
