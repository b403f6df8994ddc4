"""The command line on folders as people keep them (sub-folders walked, rows named by relative path, distinct
overlay names), errors that need no work reported first, and a start-up that imports only what the command needs."""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

import gaussad
from gaussad.cli import main, overlay_names

from .conftest import TINY

TINY_ARGS = ["--preset", "paper", "--input-size", str(TINY["input_size"]), "--levels", ",".join(TINY["levels"])]
MAP_ARGS = [*TINY_ARGS, "--map-levels", "stage2,stage3", "--map-method", "gaussian"]


def _error_line(capsys) -> str:
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("gaussad"), lines
    return lines[0]


@pytest.fixture(scope="module")
def map_model(tiny_category, tmp_path_factory):
    path = tmp_path_factory.mktemp("folders") / "brick.gaussad"
    assert main(["fit", str(tiny_category), "-o", str(path), "--quiet", *MAP_ARGS]) == 0
    return path


def test_score_walks_sub_folders_and_names_rows_by_relative_path(map_model, tiny_category, capsys):
    test = tiny_category / "test"  # good/, patch/, scratch/: the same file names in each
    expected = sorted(str(p.relative_to(test)) for p in test.rglob("*.png"))
    assert main(["score", str(map_model), str(test), "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)["results"]
    assert [r["path"] for r in rows] == expected and "good/000.png" in expected and "patch/000.png" in expected
    assert main(["score", str(map_model), str(test), "--quiet"]) == 0
    table = capsys.readouterr().out.splitlines()[1:]
    assert [line.split()[0] for line in table] == expected
    assert main(["score", str(map_model), str(test), "--no-recursive"]) == 2
    assert "no images found (looked for" in _error_line(capsys)


def test_several_sources_keep_the_folder_as_given(map_model, tiny_category, capsys):
    good, patch = tiny_category / "test" / "good", tiny_category / "test" / "patch"
    assert main(["score", str(map_model), str(good), str(patch), str(patch / "000.png"), "--json"]) == 0
    names = [r["path"] for r in json.loads(capsys.readouterr().out)["results"]]
    assert names[0] == str(good / "000.png") and str(patch / "000.png") in names[:-1]
    assert names[-1] == str(patch / "000.png") and len(names) == 6 + 3 + 1


def test_fit_walks_sub_folders_unless_told_not_to(tiny_category, tmp_path, capsys):
    train = tmp_path / "train"
    for sub in ("day", "night"):
        (train / sub).mkdir(parents=True)
        for p in sorted((tiny_category / "train" / "good").glob("*.png"))[:5]:
            (train / sub / p.name).write_bytes(p.read_bytes())
    (train / "day" / "broken.png").write_bytes(b"\x89PNG broken")
    model = tmp_path / "m.gaussad"
    assert main(["fit", str(train), "-o", str(model), "--json", "--on-error", "skip", *TINY_ARGS]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["n_images"] == 10 and [s["path"] for s in summary["skipped"]] == ["day/broken.png"]
    assert main(["fit", str(train), "-o", str(model), "--quiet", "--no-recursive", *TINY_ARGS]) == 2
    assert "no images found" in _error_line(capsys)


def test_an_mvtec_category_still_fits_on_train_good(tiny_category, tmp_path, capsys):
    model = tmp_path / "m.gaussad"
    assert main(["fit", str(tiny_category), "-o", str(model), "--json", *TINY_ARGS]) == 0
    assert json.loads(capsys.readouterr().out)["n_images"] == 10  # not the test images below the category


def test_symlink_loops_hidden_folders_and_non_images_are_skipped(tmp_path):
    from gaussad.intake.images import find_images, list_images

    for sub in ("a", "a/deeper", ".hidden", "b"):
        (tmp_path / sub).mkdir(parents=True, exist_ok=True)
        (tmp_path / sub / "x.png").write_bytes(b"x")
        (tmp_path / sub / "notes.txt").write_bytes(b"x")
    (tmp_path / "a" / "deeper" / "loop").symlink_to(tmp_path / "a")  # a folder that contains itself
    (tmp_path / "b" / "gone.png").symlink_to(tmp_path / "nowhere.png")  # reported when read, as before
    files, names = find_images([tmp_path], recursive=True)
    assert names == ["a/deeper/x.png", "a/x.png", "b/gone.png", "b/x.png"]
    assert files == [tmp_path / n for n in names]
    assert [p.name for p in list_images(tmp_path / "a")] == ["x.png"]  # the library default stays flat


def test_overlay_names_are_distinct_and_stay_inside_the_folder():
    names = ["a/x.png", "c/x_2.png", "b/x.png", "x.png", "x.jpg", "X.png", "../up.png", "/abs/y.png", "y/z.png",
             "x_map-2.png", "s" * 255 + ".png"]
    out = overlay_names(names)
    assert out[:6] == ["a/x_map.png", "c/x_2_map.png", "b/x_map.png", "x_map.png", "x_map-2.png", "X_map-3.png"]
    assert out[6:8] == ["up/up_map.png", "y_map.png"]  # a file given by absolute path: its name only (issue 35)
    assert len({o.casefold() for o in out}) == len(out)
    assert all(not o.startswith("/") and ".." not in o.split("/") for o in out)
    assert all(len(part.encode()) <= 255 for o in out for part in o.split("/"))


def test_maps_of_same_named_images_never_overwrite_one_another(map_model, tiny_category, tmp_path, capsys):
    """The old bug: a/x.png, c/x_2.png, b/x.png gave two rows pointing to out/x_2_map.png."""
    src = tiny_category / "test"
    for folder, name, image in (("a", "x.png", "patch/000.png"), ("c", "x_2.png", "good/000.png"),
                                ("b", "x.png", "scratch/000.png")):
        (tmp_path / folder).mkdir()
        (tmp_path / folder / name).write_bytes((src / image).read_bytes())
    out = tmp_path / "out"
    images = [str(tmp_path / p) for p in ("a/x.png", "c/x_2.png", "b/x.png")]
    assert main(["score", str(map_model), *images, "--maps", str(out), "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)["results"]
    maps = [r["map"] for r in rows]
    assert len(set(maps)) == 3 and all(Path(m).is_file() for m in maps)
    assert all(Path(m).resolve().is_relative_to(out.resolve()) for m in maps)
    assert sorted(Path(m).relative_to(out).as_posix() for m in maps) == ["x_2_map.png", "x_map-2.png", "x_map.png"]
    assert sorted(str(p.relative_to(out)) for p in out.rglob("*.png")) == sorted(
        str(Path(m).relative_to(out)) for m in maps)
    # A folder: the overlays mirror the relative names.
    assert main(["score", str(map_model), str(src), "--maps", str(tmp_path / "mirror"), "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)["results"]
    assert {r["path"]: str(Path(r["map"]).relative_to(tmp_path / "mirror")) for r in rows}["patch/000.png"] \
        == "patch/000_map.png"
    assert len({r["map"] for r in rows}) == len(rows) == 12


@pytest.mark.parametrize("case", ["output is a folder", "parent is a file", "name too long", "unwritable parent",
                                  "maps is a file", "empty folder", "unknown level",
                                  "report name too long"])
def test_errors_that_need_no_work_come_before_any_model_or_image(case, tiny_category, map_model, tmp_path, capsys,
                                                                 monkeypatch):
    import gaussad.intake.images
    import gaussad.detector.model

    def never(*a, **k):
        pytest.fail("a model was loaded or an image read before the error")

    monkeypatch.setattr(gaussad.detector.model, "load", never)
    monkeypatch.setattr(gaussad.detector.model.GaussianAD, "fit", never)
    monkeypatch.setattr(gaussad.intake.images, "load_image", never)
    (tmp_path / "file").write_bytes(b"x")
    (tmp_path / "empty").mkdir()
    fit = ["fit", str(tiny_category), "--quiet", *TINY_ARGS]
    score = ["score", str(map_model), str(tiny_category / "test")]
    argv, needle = {
        "output is a folder": (fit + ["-o", str(tmp_path)], "is a folder"),
        "parent is a file": (fit + ["-o", str(tmp_path / "file" / "m.gaussad")], "file is not a folder"),
        "name too long": (fit + ["-o", str(tmp_path / ("m" * 300))], "file name too long"),
        "unwritable parent": (fit + ["-o", str(tmp_path / "locked" / "m.gaussad")], "permission denied"),
        "maps is a file": (score + ["--maps", str(tmp_path / "file")], "not a folder"),
        "empty folder": (["score", str(map_model), str(tmp_path / "empty")], "no images found"),
        "unknown level": (fit[:-1] + ["stage9", "-o", str(tmp_path / "m")], "unknown level 'stage9'"),
        "report name too long": (["evaluate", str(tiny_category), "--report", str(tmp_path / ("r" * 300))],
                                 "file name too long"),
    }[case]
    if case == "unwritable parent":  # root may write anywhere: make the permission check say no
        (tmp_path / "locked").mkdir()
        real = os.access
        monkeypatch.setattr(os, "access", lambda p, mode, **k: Path(p) != tmp_path / "locked" and real(p, mode, **k))
    assert main(argv) == 2
    assert needle in _error_line(capsys)
    assert not (tmp_path / "m").exists()


@pytest.mark.parametrize("argv, needle", [
    (["fit", "x", "-o", "m", "--backbone", "nope"], "unknown backbone 'nope'"),
    (["score", "m", "x", "--fpr", "2"], "argument --fpr"),
    (["score", "m"], "the following arguments are required"),
    (["frobnicate"], "invalid choice"),
])
def test_argument_errors_are_one_line(argv, needle, capsys):
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 2 and needle in _error_line(capsys)


# ----- start-up ---------------------------------------------------------------------------------------------
BLOCK_TORCH = textwrap.dedent("""
    import sys

    class BlockTorch:
        def find_spec(self, name, path=None, target=None):
            if name == "torch" or name.startswith("torch."):
                raise ImportError(f"torch is blocked here ({name})")

    sys.meta_path.insert(0, BlockTorch())
    from gaussad.cli import main
    code = main(sys.argv[1:])
    assert "torch" not in sys.modules
    sys.exit(code)
""")


def test_help_and_argument_errors_import_neither_numpy_nor_the_model():
    code = ("import sys\nfrom gaussad.cli import main\nfor argv in (['--help'], ['fit', '--help'], ['score', 'm', 'x', "
            "'--fpr', '2']):\n    try:\n        main(argv)\n    except SystemExit:\n        pass\n"
            "heavy = sorted({'numpy', 'scipy', 'torch', 'PIL', 'onnxruntime', 'gaussad.detector.model'} & set(sys.modules))\n"
            "assert not heavy, heavy\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


def test_score_and_fit_on_a_cached_engine_never_import_torch(tiny_category, tmp_path, capsys):
    model = tmp_path / "m.gaussad"
    assert main(["fit", str(tiny_category), "-o", str(model), "--quiet", *TINY_ARGS]) == 0  # caches the engine
    test = tiny_category / "test"
    assert main(["score", str(model), str(test), "--json"]) == 0
    with_torch = json.loads(capsys.readouterr().out)["results"]

    def blocked(*argv):
        proc = subprocess.run([sys.executable, "-c", BLOCK_TORCH, *argv], capture_output=True, text=True)
        assert proc.returncode == 0, proc.stderr
        return proc.stdout

    without = json.loads(blocked("score", str(model), str(test), "--json", "--engine", "onnxruntime"))["results"]
    assert [r["path"] for r in without] == [r["path"] for r in with_torch]
    np.testing.assert_allclose([r["score"] for r in without], [r["score"] for r in with_torch], rtol=1e-9)
    # Every image skipped: the empty feature arrays' widths come from the graph too.
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "a.png").write_bytes(b"not an image")
    proc = subprocess.run([sys.executable, "-c", BLOCK_TORCH, "score", str(model), str(tmp_path / "junk"), "--json"],
                          capture_output=True, text=True)
    assert proc.returncode == 1 and len(json.loads(proc.stdout)["skipped"]) == 1, proc.stderr
    blocked("fit", str(tiny_category), "-o", str(tmp_path / "again.gaussad"), "--quiet", *TINY_ARGS)
    assert gaussad.load(tmp_path / "again.gaussad").n_samples_ == 10
