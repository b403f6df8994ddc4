"""CLI behaviour on bad input: the pixel limit, skip/fail summaries, unusable output paths, interrupted saves."""

import json
import shutil

import numpy as np
import pytest

import gaussad
import gaussad.intake.files as files
from gaussad.cli import main

from .conftest import TINY

TINY_ARGS = ["--input-size", str(TINY["input_size"]), "--levels", ",".join(TINY["levels"])]


def _error_line(capsys) -> str:
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("gaussad: error: "), lines
    return lines[0]


@pytest.fixture(scope="module")
def fitted_model(tiny_category, tmp_path_factory):
    path = tmp_path_factory.mktemp("cli") / "brick.gaussad"
    assert main(["fit", str(tiny_category), "-o", str(path), "--quiet", *TINY_ARGS]) == 0
    return path


def test_max_pixels_option(tiny_category, fitted_model, tmp_path, capsys):
    good = tiny_category / "test" / "good"  # 64 x 64 = 4096-pixel images
    n = len(list(good.iterdir()))
    assert main(["score", str(fitted_model), str(good), "--json", "--max-pixels", "4095"]) == 1
    out = json.loads(capsys.readouterr().out)
    assert out["results"] == [] and len(out["skipped"]) == n
    assert all("4096 pixels exceeds the limit of 4095" in s["error"] for s in out["skipped"])
    assert main(["score", str(fitted_model), str(good), "--json", "--max-pixels", "4096"]) == 0
    assert len(json.loads(capsys.readouterr().out)["results"]) == n
    assert main(["fit", str(tiny_category), "-o", str(tmp_path / "m"), "--quiet", "--max-pixels", "100", *TINY_ARGS]) == 2
    assert "exceeds the limit of 100" in _error_line(capsys) and not (tmp_path / "m").exists()


@pytest.mark.parametrize("value", ["0", "-3", "many"])
def test_max_pixels_must_be_positive(fitted_model, tiny_category, value, capsys):
    with pytest.raises(SystemExit) as info:
        main(["score", str(fitted_model), str(tiny_category), "--max-pixels", value])
    assert info.value.code == 2 and "argument --max-pixels: " in capsys.readouterr().err


def test_text_summary_counts_skipped_images(fitted_model, tiny_category, tmp_path, capsys):
    folder = tmp_path / "mixed"
    shutil.copytree(tiny_category / "test" / "good", folder)
    (folder / "zero.png").write_bytes(b"")
    (folder / "cut.jpg").write_bytes(b"\xff\xd8\xff\xe0 truncated")
    assert main(["score", str(fitted_model), str(folder)]) == 0
    err = capsys.readouterr().err
    assert "zero.png: empty file (0 bytes)" in err and "cut.jpg: " in err
    assert "; 2 skipped" in err


def test_fit_with_nothing_readable(tmp_path, capsys):
    (tmp_path / "bad").mkdir()
    for name in ("a.png", "b.jpg", "c.png", "d.png"):
        (tmp_path / "bad" / name).write_bytes(b"not an image")
    assert main(["fit", str(tmp_path / "bad"), "-o", str(tmp_path / "m"), "--on-error", "skip", "--quiet", *TINY_ARGS]) == 2
    assert "no readable training images" in _error_line(capsys)


def test_fit_refuses_a_folder_as_output_before_fitting(tiny_category, tmp_path, capsys, monkeypatch):
    from gaussad.detector.model import GaussianAD

    monkeypatch.setattr(GaussianAD, "fit", lambda *a, **k: pytest.fail("fitted before checking the output"))
    assert main(["fit", str(tiny_category), "-o", str(tmp_path), "--quiet"]) == 2
    assert "is a folder; give the model file's name" in _error_line(capsys)


def test_interrupted_fit_keeps_the_previous_model(tiny_category, fitted_model, tmp_path, capsys, monkeypatch):
    """Ctrl-C while the new model is being written: exit 130, the old model intact, no temporary left."""
    target = tmp_path / "model.gaussad"
    shutil.copy(fitted_model, target)
    before = target.read_bytes()

    def interrupted(fd, data):
        files.os.write(fd, data[: len(data) // 2])
        raise KeyboardInterrupt

    monkeypatch.setattr(files, "write_all", interrupted)
    assert main(["fit", str(tiny_category), "-o", str(target), "--quiet", "--estimator", "oas", *TINY_ARGS]) == 130
    assert "gaussad: interrupted" in capsys.readouterr().err
    assert target.read_bytes() == before and [p.name for p in tmp_path.iterdir()] == ["model.gaussad"]
    assert gaussad.load(target).estimator == "ledoit-wolf"
    assert np.isfinite(gaussad.load(target).stats_[0].s4)
