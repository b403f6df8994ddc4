import json
import subprocess
import sys

import numpy as np
import pytest

import gaussad
from gaussad.cli import main

from .conftest import TINY

TINY_ARGS = ["--preset", "paper", "--input-size", str(TINY["input_size"]), "--levels", ",".join(TINY["levels"])]


def test_fit_score_roundtrip(tiny_category, tmp_path, capsys):
    model = tmp_path / "brick.gaussad"
    assert main(["fit", str(tiny_category), "-o", str(model), "--quiet", *TINY_ARGS]) == 0
    assert model.is_file()
    good, bad = tiny_category / "test" / "good", tiny_category / "test" / "patch"
    capsys.readouterr()
    assert main(["score", str(model), str(good), str(bad), "--json", "--fpr", "0.05"]) == 0
    out = json.loads(capsys.readouterr().out)
    rows = out["results"]
    assert len(rows) == len(list(good.iterdir())) + len(list(bad.iterdir()))
    first = rows[0]
    assert set(first) == {"path", "score", "levels", "pvalue", "anomalous", "evidence"}
    assert list(first["levels"]) == TINY["levels"]
    # every row names what decided (issue 35): chi2's per-level thresholds at fpr / L and the levels above them
    from scipy.stats import chi2

    dofs = gaussad.load(model).state_.dofs
    expected = {n: np.sqrt(chi2.ppf(1 - 0.05 / len(dofs), k)) for n, k in zip(TINY["levels"], dofs)}
    for row in rows:
        why = row["evidence"]
        assert why["rule"] == "chi2" and why["level_thresholds"] == pytest.approx(expected, rel=1e-9)
        assert why["tripped"] == [n for n in TINY["levels"] if row["levels"][n] > expected[n]]
        assert row["anomalous"] == bool(why["tripped"]) and why["text"].startswith("flagged" if row["anomalous"]
                                                                                 else "ok")
    assert first["score"] == pytest.approx(np.mean(list(first["levels"].values())))
    assert main(["score", str(model), str(good), "--quiet"]) == 0
    table = capsys.readouterr().out.splitlines()
    assert table[0].split()[:2] == ["path", "score"] and len(table) == 1 + len(list(good.iterdir()))


def test_evaluate_writes_json_and_report(tiny_root, tmp_path, capsys):
    out, report = tmp_path / "r.json", tmp_path / "r.md"
    assert main(["evaluate", str(tiny_root), "--protocol", "paper", "--json", str(out), "--report", str(report), "--quiet", *TINY_ARGS]) == 0
    data = json.loads(out.read_text())
    assert data["protocol"] == "paper" and data["backbone"] == "efficientnet-lite0"
    assert set(data["categories"]) == {"brick", "gravel"}
    for cat in data["categories"].values():
        assert len(cat["fold_aurocs"]) == 5 and len(cat["level_aurocs"]) == 4
        assert cat["image_auroc"] == pytest.approx(np.mean(cat["fold_aurocs"]))
        assert set(cat["thresholds"]) == {"chi2", "hotelling", "conformal"}
        for method, by_alpha in cat["thresholds"].items():
            assert list(by_alpha) == ["0.01", "0.05", "0.1"]
            for cell in by_alpha.values():
                if method == "hotelling":  # 8 images per fold, 16..40 dimensions per level
                    assert cell["fpr"] is None and "more training images than dimensions" in cell["unavailable"]
                    continue
                assert len(cell["fpr_folds"]) == len(cell["tpr_folds"]) == 5
                assert cell["fpr"] == pytest.approx(np.mean(cell["fpr_folds"]))
                assert cell["tpr"] == pytest.approx(np.mean(cell["tpr_folds"]))
    aurocs = [c["image_auroc"] for c in data["categories"].values()]
    assert data["mean_image_auroc"] == pytest.approx(np.mean(aurocs))
    assert data["sem"] == pytest.approx(np.std(aurocs, ddof=1) / np.sqrt(2))
    assert "| brick |" in report.read_text() and "| brick | conformal | 0.05 |" in report.read_text()
    table = capsys.readouterr().out
    assert "mean +/- SEM" in table and "realised FPR" in table


def _run(*args):
    return subprocess.run([sys.executable, "-m", "gaussad", *args], capture_output=True, text=True)


@pytest.mark.parametrize(
    "make_args, needle",
    [
        (lambda d: ["fit", str(d / "empty"), "-o", str(d / "m")], "no images found"),
        (lambda d: ["fit", str(d / "nonexistent"), "-o", str(d / "m")], "nonexistent: no such folder"),
        (lambda d: ["fit", str(d / "one"), "-o", str(d / "m")], "at least 2"),
        (lambda d: ["fit", str(d / "corrupt"), "-o", str(d / "m")], "bad.png"),
        (lambda d: ["score", str(d / "junk.gaussad"), str(d / "one")], "junk.gaussad"),
    ],
)
def test_bad_input_gives_one_clear_error_line(tmp_path, make_args, needle):
    from PIL import Image

    (tmp_path / "empty").mkdir()
    (tmp_path / "one").mkdir()
    Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(tmp_path / "one" / "a.png")
    (tmp_path / "corrupt").mkdir()
    for name in ("a", "b", "c"):  # enough images for the default decision's calibration: the bad file decides
        Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(tmp_path / "corrupt" / f"{name}.png")
    (tmp_path / "corrupt" / "bad.png").write_bytes(b"\x89PNG garbage")
    (tmp_path / "junk.gaussad").write_bytes(b"hello")
    proc = _run(*make_args(tmp_path), "--quiet")
    assert proc.returncode != 0
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("gaussad: error:") and needle in lines[0], proc.stderr
    assert not (tmp_path / "m").exists()


def test_help_texts():
    proc = _run("--help")
    assert proc.returncode == 0 and "fit" in proc.stdout and "evaluate" in proc.stdout
    proc = _run("backbones")
    assert "efficientnet-lite0" in proc.stdout


def test_on_error_skip_and_fail(tiny_category, tmp_path, capsys):
    import shutil

    train = tmp_path / "train"
    shutil.copytree(tiny_category / "train" / "good", train)
    (train / "zzz_broken.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    model = tmp_path / "m.gaussad"
    assert main(["fit", str(train), "-o", str(model), "--quiet", *TINY_ARGS]) == 2
    assert "zzz_broken.png" in capsys.readouterr().err and not model.exists()
    assert main(["fit", str(train), "-o", str(model), "--json", "--on-error", "skip", *TINY_ARGS]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["n_images"] == 10 and [s["path"] for s in summary["skipped"]] == ["zzz_broken.png"]
    assert main(["score", str(model), str(train), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert len(out["results"]) == 10 and len(out["skipped"]) == 1 and "zzz_broken.png" in out["skipped"][0]["error"]
    assert main(["score", str(model), str(train), "--on-error", "fail", "--quiet"]) == 2


def test_fit_with_conformal_threshold_and_score_with_each_method(tiny_category, tmp_path, capsys):
    import gaussad

    model = tmp_path / "c.gaussad"
    assert main(["fit", str(tiny_category), "-o", str(model), "--json", "--calibration", "0.5", "--threshold",
                 "conformal", "--fpr", "0.34", "--seed", "1", *TINY_ARGS]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["threshold"] == "conformal" and summary["fpr"] == 0.34 and summary["n_calibration"] == 5
    cal = np.sort(gaussad.load(model).calibration_scores_)
    assert summary["score_threshold"] == pytest.approx(cal[3])  # ceil(6 * 0.66) = 4th smallest of 5
    good, bad = tiny_category / "test" / "good", tiny_category / "test" / "patch"

    assert main(["score", str(model), str(good), str(bad), "--json"]) == 0  # the model's own method and fpr
    out = json.loads(capsys.readouterr().out)
    assert out["threshold"] == "conformal" and out["fpr"] == 0.34
    for row in out["results"]:
        assert row["pvalue"] == pytest.approx((1 + np.sum(cal >= row["score"])) / 6)
        assert row["anomalous"] == (row["score"] > cal[3]) == (row["pvalue"] <= 0.34)

    assert main(["score", str(model), str(good), "--json", "--threshold", "chi2", "--fpr", "0.05"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["threshold"] == "chi2" and out["fpr"] == 0.05 and "Bonferroni" in out["rule"]

    # 5 calibration scores cannot support 0.05: the rule decides at 1/6, above every calibration score, and says so
    assert main(["score", str(model), str(good), str(bad), "--fpr", "0.05", "--json"]) == 0
    captured = capsys.readouterr()
    assert "deciding at 0.1667 instead of 0.05" in captured.err
    out = json.loads(captured.out)
    assert out["fpr"] == pytest.approx(1 / 6) and out["fpr_requested"] == 0.05
    assert [r["anomalous"] for r in out["results"]] == [int(r["score"] > cal[-1]) for r in out["results"]]

    assert main(["score", str(model), str(good), "--threshold", "hotelling"]) == 2
    assert "more training images than dimensions" in capsys.readouterr().err


def test_fit_conformal_without_calibration_calibrates_by_cross_validation(tiny_category, tmp_path, capsys):
    model = tmp_path / "m.gaussad"
    assert main(["fit", str(tiny_category), "-o", str(model), "--threshold", "conformal", "--fpr", "0.1",
                 *TINY_ARGS]) == 0
    out = capsys.readouterr().out
    assert "calibration: 10 out-of-fold scores (cross-conformal, 5 folds)" in out
    assert "finite conformal threshold for FPR >= 0.0909" in out
    summary = gaussad.load(model).summary()
    assert summary["calibration"]["method"] == "cv" and summary["calibration"]["n_scores"] == 10
    assert summary["calibration"]["score_threshold"] == pytest.approx(summary["threshold"]["score_threshold"])
    assert main(["fit", str(tiny_category), "-o", str(model), "--json", "--calibration", "cv", "--calibration-folds",
                 "3", *TINY_ARGS]) == 0
    fitted = json.loads(capsys.readouterr().out)
    assert fitted["threshold"] == "chi2" and fitted["calibration"]["method"] == "cv"
    assert fitted["calibration"]["min_fpr"] == pytest.approx(1 / 11) and fitted["n_calibration"] == 10


def test_engine_option_gives_the_same_scores(tiny_category, tmp_path, capsys):
    model = tmp_path / "brick.gaussad"
    assert main(["fit", str(tiny_category), "-o", str(model), "--quiet", "--engine", "torch", *TINY_ARGS]) == 0
    bad = tiny_category / "test" / "patch"
    scores = {}
    for engine in ("onnxruntime", "torch"):
        capsys.readouterr()
        assert main(["score", str(model), str(bad), "--json", "--engine", engine]) == 0
        scores[engine] = [r["score"] for r in json.loads(capsys.readouterr().out)["results"]]
    np.testing.assert_allclose(scores["onnxruntime"], scores["torch"], rtol=1e-4)
    with pytest.raises(SystemExit):
        main(["score", str(model), str(bad), "--engine", "tensorrt"])


def test_score_warns_when_a_batch_drifts_from_the_training_images(tiny_root, tmp_path, capsys):
    """Issue 30: the conformal guarantee holds for images like the training ones. ``score`` runs the service's drift
    tests on its batch: images of another texture (all flagged, p-values far below uniform) get a one-line warning
    and ``drift`` in --json; the training texture's own good images none."""
    import shutil

    model = tmp_path / "brick.gaussad"
    default = ["--input-size", str(TINY["input_size"]), "--levels", ",".join(TINY["levels"]), "--map-levels",
               "stage2,stage3"]  # the default preset: fused score, conformal decision
    assert main(["fit", str(tiny_root / "brick" / "train" / "good"), "-o", str(model), "--quiet", *default]) == 0
    for name, source in (("gravel", tiny_root / "gravel" / "test" / "good"), ("brick", tiny_root / "brick" / "train"
                                                                                       / "good")):
        folder = tmp_path / name
        folder.mkdir()
        for copy in range(4):  # the drift tests need at least 20 images
            for f in sorted(source.iterdir())[:6]:
                shutil.copyfile(f, folder / f"{copy}_{f.name}")
    capsys.readouterr()
    assert main(["score", str(model), str(tmp_path / "gravel")]) == 0
    err = capsys.readouterr().err.splitlines()
    warnings = [line for line in err if line.startswith("warning:")]
    assert len(warnings) == 1 and "unlike the training images" in warnings[0]
    assert main(["score", str(model), str(tmp_path / "gravel"), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["drift"]["alarm"] is True
    # the one line: the out-of-distribution one when most images lie far beyond every training score, else drift's
    assert ("above the target FPR" in warnings[0]) == (out["warnings"] == [])
    assert main(["score", str(model), str(tmp_path / "brick"), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["drift"]["alarm"] is False and out["drift"]["n"] == 24 and out["warnings"] == []


def test_unlike_training_names_batches_far_beyond_every_training_score():
    """Issue 35: one line when more than half of at least 5 images score above 3x the largest training score."""
    from gaussad.core.drift import unlike_training

    cal = np.array([5.0, 8.0, 10.0])
    assert unlike_training([31, 40, 50, 1, 2], cal).startswith("3 of 5 images score more than 3 times")
    assert unlike_training([31, 40, 1, 2, 3, 4], cal) is None  # half is not most: a batch with many gross defects
    assert unlike_training([31, 40, 50, 60], cal) is None  # too few images to speak of a batch
    assert unlike_training([29.9] * 10, cal) is None and unlike_training([99] * 10, None) is None
