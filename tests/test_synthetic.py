"""Tests for gaussad.tools.synthetic: the offline texture data set in MVTec AD layout."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("skimage")

from gaussad.tools import synthetic  # noqa: E402
from gaussad.errors import DataError  # noqa: E402
from gaussad.tools.synthetic import DEFECTS, available_textures, build_texture_dataset  # noqa: E402

SMALL = dict(size=64, n_train=6, n_test_good=3, n_test_bad=5, seed=0)


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _pngs(folder: Path) -> list[Path]:
    return sorted(folder.glob("*.png"))


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_texture_dataset(tmp_path_factory.mktemp("synth") / "data", **SMALL)


def test_bundled_textures_load_offline() -> None:
    names = available_textures()
    assert set(names) >= {"brick", "grass", "gravel"}
    for name in names:
        tex = synthetic._texture(name, 64)
        assert tex.ndim == 3 and tex.shape[2] == 3 and min(tex.shape[:2]) >= 64


def test_layout_and_counts(built: Path) -> None:
    assert isinstance(built, Path)
    cats = sorted(p.name for p in built.iterdir())
    assert cats == sorted(available_textures())
    for cat in cats:
        d = built / cat
        assert len(_pngs(d / "train" / "good")) == 6
        assert [p.name for p in _pngs(d / "train" / "good")][0] == "000.png"
        assert len(_pngs(d / "test" / "good")) == 3
        bad = {kind: _pngs(d / "test" / kind) for kind in DEFECTS}
        assert sum(len(v) for v in bad.values()) == 5
        assert all(len(v) >= 2 for v in bad.values())
        assert sorted(p.name for p in (d / "test").iterdir()) == sorted(["good", *DEFECTS])
        for kind, images in bad.items():
            masks = _pngs(d / "ground_truth" / kind)
            assert [m.name for m in masks] == [f"{p.stem}_mask.png" for p in images]


def test_images_are_rgb_uint8_and_masks_binary(built: Path) -> None:
    for img_path in built.rglob("*.png"):
        arr = np.asarray(Image.open(img_path))
        assert arr.dtype == np.uint8
        if img_path.parent.parent.name == "ground_truth":
            assert arr.shape == (64, 64)
            assert set(np.unique(arr)) <= {0, 255}
            frac = (arr == 255).mean()
            assert 0 < frac < 0.5
        else:
            assert arr.shape == (64, 64, 3)


def test_normal_images_are_not_identical(built: Path) -> None:
    for cat in available_textures():
        arrays = [np.asarray(Image.open(p)) for p in _pngs(built / cat / "train" / "good")]
        arrays += [np.asarray(Image.open(p)) for p in _pngs(built / cat / "test" / "good")]
        for i in range(len(arrays)):
            for j in range(i + 1, len(arrays)):
                assert not np.array_equal(arrays[i], arrays[j])


@pytest.mark.parametrize("kind", DEFECTS)
def test_make_defect_changes_only_masked_pixels(kind: str) -> None:
    brick = synthetic._texture("brick", 96)
    gravel = synthetic._texture("gravel", 96)
    fracs = []
    for seed in range(25):
        rng = np.random.default_rng(seed)
        clean = synthetic._crop(brick, rng, 96, (0, brick.shape[0]))
        other = synthetic._crop(gravel, rng, 96, (0, gravel.shape[0]))
        image, mask = synthetic._make_defect(clean, rng, kind, other)
        assert image.shape == clean.shape and image.dtype == np.uint8
        assert mask.shape == clean.shape[:2] and mask.dtype == bool
        assert 0 < mask.mean() < 0.5
        changed = np.any(image != clean, axis=2)
        assert not np.any(changed & ~mask)
        diff = np.abs(image.astype(int) - clean.astype(int)).mean(axis=2)
        assert diff[mask].mean() > 15
        assert changed[mask].mean() > 0.5
        fracs.append(mask.mean())
    if kind == "patch":
        assert 0.04 <= min(fracs) and max(fracs) <= 0.16
    else:
        assert max(fracs) < 0.1


def test_make_defect_rejects_unknown_kind() -> None:
    clean = np.zeros((32, 32, 3), np.uint8)
    with pytest.raises(ValueError, match="unknown defect"):
        synthetic._make_defect(clean, np.random.default_rng(0), "dent", clean)


def test_written_defects_match_clean_crops_outside_mask(built: Path) -> None:
    pool = available_textures()
    for cat in pool:
        samples = list(synthetic._generate(cat, pool, 64, 6, 3, 5, 0))
        bad = [s for s in samples if s.mask is not None]
        assert len(bad) == 5
        for s in samples:
            written = np.asarray(Image.open(built / cat / s.folder / f"{s.stem}.png"))
            np.testing.assert_array_equal(written, s.image)
        for s in bad:
            kind = Path(s.folder).name
            mask = np.asarray(Image.open(built / cat / "ground_truth" / kind / f"{s.stem}_mask.png")) == 255
            np.testing.assert_array_equal(mask, s.mask)
            changed = np.any(s.image != s.clean, axis=2)
            assert changed.any()
            assert not np.any(changed & ~mask)


def test_deterministic_across_directories(tmp_path: Path, built: Path) -> None:
    again = build_texture_dataset(tmp_path / "b", **SMALL)
    assert _files(again) == _files(built)
    other_seed = build_texture_dataset(tmp_path / "c", **{**SMALL, "seed": 1})
    assert _files(other_seed) != _files(built)


def test_category_content_does_not_depend_on_selection(tmp_path: Path, built: Path) -> None:
    only = build_texture_dataset(tmp_path / "one", categories=["grass"], **SMALL)
    assert [p.name for p in only.iterdir()] == ["grass"]
    assert _files(only / "grass") == _files(built / "grass")


def test_skips_complete_category(tmp_path: Path) -> None:
    root = build_texture_dataset(tmp_path / "d", categories=["brick"], **SMALL)
    sentinel = root / "brick" / "sentinel.txt"
    sentinel.write_text("kept")
    first = root / "brick" / "train" / "good" / "000.png"
    mtime = first.stat().st_mtime_ns
    build_texture_dataset(root, categories=["brick"], **SMALL)
    assert sentinel.exists()
    assert first.stat().st_mtime_ns == mtime
    assert sorted(p.name for p in root.iterdir()) == ["brick"]


def test_rebuilds_category_made_with_other_settings(tmp_path: Path) -> None:
    root = build_texture_dataset(tmp_path / "e", categories=["brick"], **SMALL)
    (root / "brick" / "sentinel.txt").write_text("stale")
    build_texture_dataset(root, categories=["brick"], **{**SMALL, "n_train": 4})
    assert not (root / "brick" / "sentinel.txt").exists()
    assert len(_pngs(root / "brick" / "train" / "good")) == 4
    assert json.loads((root / "brick" / ".gaussad_synthetic.json").read_text())["n_train"] == 4
    assert sorted(p.name for p in root.iterdir()) == ["brick"]


def test_refuses_to_replace_foreign_folder(tmp_path: Path) -> None:
    (tmp_path / "brick" / "train" / "good").mkdir(parents=True)
    with pytest.raises(DataError, match="not made by gaussad"):
        build_texture_dataset(tmp_path, categories=["brick"], **SMALL)
    assert not any((tmp_path / "brick" / "train" / "good").iterdir())


def test_interrupted_build_leaves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = {"n": 0}
    real = synthetic._make_defect

    def flaky(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(synthetic, "_make_defect", flaky)
    with pytest.raises(KeyboardInterrupt):
        build_texture_dataset(tmp_path / "f", categories=["gravel"], **SMALL)
    assert list((tmp_path / "f").iterdir()) == []
    monkeypatch.setattr(synthetic, "_make_defect", real)
    build_texture_dataset(tmp_path / "f", categories=["gravel"], **SMALL)
    assert len(_pngs(tmp_path / "f" / "gravel" / "train" / "good")) == 6


@pytest.mark.parametrize(
    "kwargs",
    [
        {"size": 8},
        {"size": 64.0},
        {"n_train": 0},
        {"n_test_bad": -1},
        {"seed": -1},
        {"categories": ["marble"]},
    ],
)
def test_rejects_bad_arguments(tmp_path: Path, kwargs: dict) -> None:
    with pytest.raises(ValueError):
        build_texture_dataset(tmp_path, **{**SMALL, **kwargs})


def test_accepts_numpy_integers(tmp_path: Path) -> None:
    args = {**SMALL, "size": np.int64(32), "n_train": np.int32(2)}
    root = build_texture_dataset(tmp_path, categories=["brick"], **args)
    assert np.asarray(Image.open(root / "brick" / "train" / "good" / "001.png")).shape == (32, 32, 3)


def test_stale_leftovers_of_killed_builds_are_removed(tmp_path: Path) -> None:
    staging = tmp_path / synthetic._STAGING
    stale = staging / "brick.tmp-1-dead" / "train" / "good"
    stale.mkdir(parents=True)
    fresh = staging / "grass.tmp-2-live"
    fresh.mkdir()
    past = time.time() - 2 * synthetic._STALE_S
    os.utime(staging / "brick.tmp-1-dead", (past, past))
    build_texture_dataset(tmp_path, categories=["brick"], **SMALL)
    assert not (staging / "brick.tmp-1-dead").exists()
    assert fresh.is_dir()
    fresh.rmdir()
    build_texture_dataset(tmp_path, categories=["brick"], **SMALL)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["brick"]


def test_large_size_upscales_texture(tmp_path: Path) -> None:
    root = build_texture_dataset(tmp_path, size=600, n_train=1, n_test_good=0, n_test_bad=2, categories="grass")
    arr = np.asarray(Image.open(root / "grass" / "test" / "scratch" / "000.png"))
    assert arr.shape == (600, 600, 3)
    assert not (root / "grass" / "test" / "good").exists()
