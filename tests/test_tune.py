"""Tests for gaussad.tools.tune (the settings search on synthetic defects) and synthetic.add_defect."""

from __future__ import annotations

import json

import numpy as np
import pytest

from gaussad import GaussianAD, InvalidParameterError, load
from gaussad.cli import main
from gaussad.errors import DataError
from gaussad.tools.synthetic import PASTED_DEFECTS, add_defect
from gaussad.tools.tune import _feature_key, candidates, split, tune

# Small, fast settings: 64-pixel input, the first levels, maps from stage2-3; the global image score, which the maps
# do not change (the recommended preset's fused score is a grid value where a test asks for it).
BASE = {"backbone": "efficientnet-lite0", "input_size": 64, "levels": ["stem", "stage1", "stage2", "stage3"],
        "preset": "recommended", "map_levels": ["stage2", "stage3"], "batch_size": 16, "image_score": "global"}


@pytest.fixture(scope="module")
def train_dir(tmp_path_factory):
    pytest.importorskip("skimage")
    from gaussad.tools.synthetic import build_texture_dataset

    root = build_texture_dataset(tmp_path_factory.mktemp("tune"), size=64, n_train=20, n_test_good=0, n_test_bad=0,
                                 categories=["brick"])
    return root / "brick" / "train" / "good"


@pytest.mark.parametrize("kind", PASTED_DEFECTS)
def test_add_defect_changes_only_the_masked_pixels_and_repeats_for_a_seed(kind):
    rng = np.random.default_rng(5)
    image = rng.integers(0, 256, (120, 90, 3)).astype(np.uint8)
    donor = rng.integers(0, 256, (60, 80, 3)).astype(np.uint8)  # another size: resized to the image's
    out, mask = add_defect(image, donor, np.random.default_rng(1), kind)
    again, mask2 = add_defect(image, donor, np.random.default_rng(1), kind)
    assert out.shape == image.shape and out.dtype == np.uint8 and mask.shape == image.shape[:2]
    assert np.array_equal(out, again) and np.array_equal(mask, mask2)
    assert np.array_equal(out[~mask], image[~mask])  # outside the mask nothing changes
    assert mask.any() and np.any(out[mask] != image[mask])
    assert mask.mean() < 0.1  # a small defect
    rows, cols = np.nonzero(mask)
    assert rows.min() >= 120 // 8 - 1 and cols.min() >= 90 // 8 - 1  # starts inside the central part


def test_add_defect_refuses_other_input():
    image = np.zeros((32, 32, 3), np.uint8)
    with pytest.raises(ValueError, match="unknown defect kind"):
        add_defect(image, image, np.random.default_rng(0), "crack")
    with pytest.raises(ValueError, match="uint8 H x W x 3"):
        add_defect(image[:, :, 0], image, np.random.default_rng(0), "spot")


def test_split_is_seeded_disjoint_and_bounded_by_the_budget():
    fit, held = split(100, 30, seed=3)
    assert len(held) == 6 and len(fit) == 24 and not set(fit) & set(held)
    assert all(np.array_equal(a, b) for a, b in zip((fit, held), split(100, 30, seed=3)))
    assert not np.array_equal(held, split(100, 30, seed=4)[1])
    fit, held = split(7, 250, seed=0)
    assert len(fit) + len(held) == 7 and len(held) == 2


def test_tune_ranks_a_known_better_map_setting_first_and_is_deterministic(train_dir):
    # map_pool 15 averages every location over a 15 x 15 neighbourhood of a 16 x 16 (stage2) or 8 x 8 (stage3) map:
    # the map can no longer say where a defect is, so its pixel AUROC must be lower than that of the unpooled map.
    # The global score does not use the maps, so both candidates must tie on image AUROC and the pixel AUROC
    # decides. The worse one is first in grid order, so grid order cannot explain the result. The grid lacks the
    # preset's own map_pool (3): the default is measured beside it, and with 4 held-out images nothing beats it
    # clearly, so it is kept.
    files = sorted(train_dir.glob("*.png"))
    result = tune(files, grid={"map_pool": (15, 1)}, base=BASE, refit=False, seed=0)
    rows = {json.dumps(r["settings"]): r for r in result.ranking}
    assert set(rows) == {"{}", '{"map_pool": 1}', '{"map_pool": 15}'}
    better, worse, default = rows['{"map_pool": 1}'], rows['{"map_pool": 15}'], rows["{}"]
    assert result.ranking.index(better) < result.ranking.index(worse)
    assert better["image_auroc"] == worse["image_auroc"] == default["image_auroc"]
    assert better["pixel_auroc"] > worse["pixel_auroc"] + 0.05
    assert (result.n_fit, result.n_held_out) == (16, 4)
    assert default["default"] and default["chosen"] and [r["chosen"] for r in result.ranking].count(True) == 1
    assert result.choice.startswith("kept the default: the best, map_pool=1, is not clearly better")
    assert result.best_params["map_pool"] is None  # the base's own value: the preset's
    again = tune(files, grid={"map_pool": (15, 1)}, base=BASE, refit=False, seed=0)
    strip = lambda res: [{k: v for k, v in r.items() if k != "seconds"} for r in res.ranking]  # noqa: E731
    assert strip(again) == strip(result) and again.choice == result.choice


def test_a_clearly_better_setting_replaces_the_default_and_a_grid_point_can_be_the_default(tmp_path):
    """Issue 35: with 10 held-out goods and 10 synthetic defects, unpooled maps beat a default that pools every map
    over 15 x 15 locations by far more than two standard errors of the paired difference: tune takes them. A grid
    point that fits the same model as the base is the default itself (nothing extra measured)."""
    pytest.importorskip("skimage")
    from gaussad.tools.synthetic import build_texture_dataset

    root = build_texture_dataset(tmp_path, size=64, n_train=50, n_test_good=0, n_test_bad=0, categories=["brick"])
    files = sorted((root / "brick" / "train" / "good").glob("*.png"))
    result = tune(files, grid={"map_pool": (15, 1)}, base={**BASE, "map_pool": 15}, refit=False, seed=0)
    assert [(r["settings"], r["default"], r["chosen"]) for r in result.ranking] == \
        [({"map_pool": 1}, False, True), ({}, True, False)]
    assert result.chosen["pixel_auroc"] > result.ranking[1]["pixel_auroc"] + 0.1
    assert "map_pool=1 ties the default on image AUROC" in result.choice and "standard errors" in result.choice
    assert result.best_params["map_pool"] == 1 and result.to_json()["chosen_rank"] == 1


def test_a_grid_point_that_fits_the_same_model_as_the_base_is_the_default(tmp_path):
    """'auto' and 'native' input sizes, and the native size spelled as a number, are one setting where the images are
    too small for 'auto' to enlarge them: tune measures the base once, as that grid point (was: twice, the base
    prepended beside its own grid point)."""
    from PIL import Image

    from gaussad.tools.tune import _in_use

    files = []
    for i in range(3):
        files.append(tmp_path / f"{i}.png")
        Image.fromarray(np.full((40, 60, 3), 100 + i, np.uint8)).save(files[-1])
    base = {**GaussianAD().get_params(), **BASE, "input_size": "auto"}
    same = [_in_use({**base, "input_size": v}, files) for v in ("auto", "native", 224)]
    assert same[0] == same[1] == same[2] and same[0]["input_size"] == 224
    assert _in_use({**base, "input_size": 320}, files) != same[0]


def test_the_paired_standard_error_matches_the_spread_over_fresh_held_out_sets():
    """The bootstrap standard error of the difference between two candidates' AUROCs on the same images (their
    scores correlated) matches the spread of that difference over independently drawn held-out sets."""
    from gaussad.tools.evaluate import roc_auc
    from gaussad.tools.tune import _paired_differences

    def draw(rng):
        shared = rng.normal(size=80)  # what both candidates see of an image
        shift = np.r_[np.zeros(40), np.ones(40)]
        return shared + 1.2 * shift + 0.5 * rng.normal(size=80), shared + 0.9 * shift + 0.5 * rng.normal(size=80)

    labels = np.r_[np.zeros(40), np.ones(40)]
    rng = np.random.default_rng(0)
    spread = np.std([roc_auc(labels, a) - roc_auc(labels, b) for a, b in (draw(rng) for _ in range(1000))])
    a, b = draw(rng)
    rows = [{"scores": s, "image_auroc": roc_auc(labels, s), "maps": None, "pixel_auroc": None} for s in (a, b)]
    d, se, d_pixel, se_pixel = _paired_differences(rows[0], rows[1], labels, None, seed=0)
    assert d == pytest.approx(rows[0]["image_auroc"] - rows[1]["image_auroc"])
    assert se == pytest.approx(spread, rel=0.3) and (d_pixel, se_pixel) == (None, None)
    # a per-candidate (unpaired) error would be several times larger: the pairing is what makes it small
    from gaussad.tools.tune import auroc_se

    assert np.hypot(auroc_se(rows[0]["image_auroc"], 40, 40), auroc_se(rows[1]["image_auroc"], 40, 40)) > 1.5 * spread


def test_candidates_with_other_map_levels_are_measured_on_their_own_pooled_features(train_dir):
    """Candidates sharing one extraction pool the spread (pool='avg+std') of every member's map levels; each is
    measured on the features its own model pools: the same figures as when it is searched alone (its own
    extraction), and pool itself is never shared between candidates."""
    files = sorted(train_dir.glob("*.png"))
    grid = {"maps": ({"map_levels": ("stage2", "stage3")}, {"map_levels": ("stage3",)})}
    together = {json.dumps(r["settings"], sort_keys=True): r for r in
                tune(files, grid=grid, base=BASE, refit=False, seed=0).ranking}
    alone = tune(files, grid={"maps": grid["maps"][1:]}, base=BASE, refit=False, seed=0).ranking[0]
    row = together[json.dumps(alone["settings"], sort_keys=True)]
    for key in ("global_auroc", "map_max_auroc", "pixel_auroc"):
        assert row[key] == pytest.approx(alone[key], abs=1e-12), key
    from gaussad.intake.features import FeatureExtractor
    from gaussad.tools.tune import _own_pooled

    settings = dict(backbone=BASE["backbone"], levels=BASE["levels"], input_size=64, normalize="native",
                    resize="aspect", pool="avg+std")
    union = FeatureExtractor(**settings, map_levels=["stage2", "stage3"])
    own = FeatureExtractor(**settings, map_levels=["stage3"])
    assert (union.spread_levels, own.spread_levels) == ([2, 3], [3])
    cut = _own_pooled(union.extract(files[:6]), union.levels, union.spread_levels, own.map_levels)
    expected = own.extract(files[:6])
    assert [c.shape for c in cut] == [e.shape for e in expected] == [(6, 32), (6, 16), (6, 24), (6, 80)]
    for c, e in zip(cut, expected):
        np.testing.assert_allclose(c, e, rtol=1e-5, atol=1e-6)
    full = GaussianAD(**BASE).get_params()
    assert _feature_key({**full, "pool": "avg"}) != _feature_key({**full, "pool": "avg+std"})


def test_the_brightness_grid_measures_each_setting_on_its_own_features(train_dir):
    """``--grid brightness`` ranks the preset's ``match`` against ``keep``; brightness shapes the network's input, so
    the two never share an extraction: each row has the figures of that setting searched alone."""
    files = sorted(train_dir.glob("*.png"))
    together = tune(files, grid="brightness", base=BASE, refit=False, seed=0).ranking
    brightness = lambda row: GaussianAD(**{**BASE, **row["settings"]}).setting("brightness")  # noqa: E731
    rows = {brightness(r): r for r in together}
    assert set(rows) == {"keep", "match"} and len(together) == 2
    for value in ("keep", "match"):  # alone: 'keep' is ranked beside the base (the preset's 'match')
        alone = {brightness(r): r for r in tune(files, grid={"brightness": (value,)}, base=BASE, refit=False,
                                                seed=0).ranking}[value]
        for key in ("global_auroc", "map_max_auroc", "pixel_auroc"):
            assert rows[value][key] == pytest.approx(alone[key], abs=1e-12), (value, key)
    assert rows["keep"]["global_auroc"] != rows["match"]["global_auroc"]
    full = GaussianAD(**BASE).get_params()
    assert _feature_key({**full, "brightness": "keep"}) != _feature_key({**full, "brightness": "match"})


def test_candidates_expand_a_grid_and_resolve_relative_input_sizes():
    points = candidates("small")
    assert len(points) == 6
    assert sorted({p["input_size"] for p in points}, key=str) == [320, 384, "native"]
    assert {p["map_grid"] for p in points} == {"coarsest", "finest"}
    assert candidates({"map_pool": (1, 3), "fpr": (0.01,)}, BASE) == [{"map_pool": 1, "fpr": 0.01},
                                                                      {"map_pool": 3, "fpr": 0.01}]


@pytest.mark.parametrize("grid, needle", [
    ("huge", "unknown grid 'huge'; choose one of: small"),
    ({"colour": (1, 2)}, "colour is not a GaussianAD parameter"),
    ({"input_size": (0,)}, "input_size must be 'auto', 'native' or an integer"),
    ({"map_pool": 3}, "give a non-empty list of values"),
    ({}, "non-empty mapping"),
    ({"image_score": ("global", "fused"), "map_method": ("gaussian",)}, "image_score='fused' needs nearest"),
])
def test_bad_grids_give_one_clear_error(grid, needle):
    with pytest.raises(InvalidParameterError, match=needle.replace("(", r"\(")):
        candidates(grid, BASE)


def test_bad_budget_and_too_few_images_give_clear_errors(train_dir):
    files = sorted(train_dir.glob("*.png"))
    with pytest.raises(InvalidParameterError, match="budget must be an integer >= 5"):
        tune(files, grid={"map_pool": (1,)}, base=BASE, budget=4)
    with pytest.raises(DataError, match="at least 5 training images"):
        tune(files[:4], grid={"map_pool": (1,)}, base=BASE)


def test_cli_tune_prints_the_ranking_saves_the_best_and_json_parses(tiny_category, tmp_path, capsys):
    out = tmp_path / "tuned.gaussad"
    assert main(["tune", str(tiny_category), "-o", str(out), "--grid", "maps", "--budget", "6", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert [r["rank"] for r in report["ranking"]] == [1, 2]
    assert (report["n_fit"], report["n_held_out"]) == (4, 2)
    model = load(out)
    assert model.n_samples_ == 10  # the refit uses every training image (train/good), not only the budget
    chosen = [r for r in report["ranking"] if r["chosen"]]
    assert len(chosen) == 1 and chosen[0]["rank"] == report["chosen_rank"]
    for name, value in ({} if chosen[0]["default"] else chosen[0]["settings"]).items():
        got = model.get_params()[name]
        assert (list(got) if isinstance(got, tuple) else got) == value
    assert {k: v for k, v in report["best_params"].items() if k in ("map_grid", "preset")} == \
        {"map_grid": model.map_grid, "preset": "recommended"}
    assert sum(r["default"] for r in report["ranking"]) == 1 and report["choice"]

    assert main(["tune", str(tiny_category), "-o", str(tmp_path / "b.gaussad"), "--grid", "maps", "--budget", "6"]) == 0
    printed = capsys.readouterr()
    text = printed.out
    assert "rank  image AUROC" in text and "map_grid=finest" in text and "map_grid=coarsest" in text
    assert "wrote" in text and "then grid order (too few held out for pixel AUROC)" in text
    # 2 held-out images cannot show a setting clearly better: the default is kept, and the line says why (issue 35)
    assert f"chose: the default ({report['choice']}); refitted on 10 images" in text
    assert "default/chosen" in text and "Warning" not in printed.err


@pytest.mark.parametrize("args, needle", [
    (["--budget", "2"], "--budget: expected a value in 5..1e+06"),
    (["--grid", "huge"], "invalid choice: 'huge'"),
])
def test_cli_tune_refuses_bad_options(tiny_category, tmp_path, capsys, args, needle):
    with pytest.raises(SystemExit) as exc:
        main(["tune", str(tiny_category), "-o", str(tmp_path / "m.gaussad"), *args])
    assert exc.value.code == 2
    assert needle in capsys.readouterr().err
    assert not (tmp_path / "m.gaussad").exists()


def test_the_scores_grid_ranks_the_fused_score_beside_the_global_one(train_dir):
    files = sorted(train_dir.glob("*.png"))
    result = tune(files, grid="scores", base={**BASE, "image_score": None}, seed=1, refit=False)
    rows = {r["image_score"]: r for r in result.ranking}
    assert set(rows) == {"global", "fused"}
    glob, fused = rows["global"], rows["fused"]
    assert glob["settings"] == {"image_score": "global"} and fused["settings"] == {"image_score": "fused"}
    assert GaussianAD(**{**BASE, "image_score": None}).setting("image_score") == "fused"  # the preset's own
    # The same Gaussians and banks: every figure but the ranked image score is shared by the two candidates.
    for key in ("global_auroc", "map_max_auroc", "pixel_auroc"):
        assert fused[key] == pytest.approx(glob[key], abs=1e-12), key
    assert glob["image_auroc"] == pytest.approx(glob["global_auroc"], abs=1e-12)
    assert 0.0 <= fused["image_auroc"] <= 1.0
    # The ranking follows the image AUROC of each candidate's own score.
    assert result.ranking[0]["image_auroc"] >= result.ranking[1]["image_auroc"]


def test_settings_the_held_out_images_cannot_separate_keep_the_default(tmp_path, recwarn):
    """Issue 32: 8 x 8 noise images, 2 held out: both input sizes tie on image AUROC and the pixel AUROC of two pasted
    defects, which is noise, favours 160 px (was: 160 px chosen on it, without a word). Issue 35: the default (64 px,
    the base's size) is kept unless a setting is clearly better, and the choice says why."""
    from PIL import Image

    rng = np.random.default_rng(0)
    for i in range(8):
        Image.fromarray(rng.integers(100, 140, (8, 8, 3), dtype=np.uint8)).save(tmp_path / f"{i}.png")
    files = sorted(tmp_path.glob("*.png"))
    result = tune(files, grid={"input_size": (160, 64)}, base=BASE, refit=False)
    first, second = result.ranking
    assert result.n_held_out == 2 and first["settings"] == {"input_size": 160} and second["settings"] == {}
    assert first["image_auroc"] == second["image_auroc"] and first["pixel_auroc"] > second["pixel_auroc"]
    assert second["default"] and second["chosen"] and result.best_params["input_size"] == 64
    assert "kept the default" in result.to_json()["choice"] and "pixel AUROC not used below 4" in result.choice
    assert not [w for w in recwarn if "tune" in str(w.message)]


def test_the_ranking_shows_each_candidates_uncertainty_and_the_choice_as_flags():
    """Issue 35: the AUROC's standard error (Hanley-McNeil) matches the spread of AUROCs over repeated draws of
    that many held-out images; the choice reads as the flags that give it."""
    from sklearn.metrics import roc_auc_score

    from gaussad.tools.tune import as_flags, auroc_se

    rng = np.random.default_rng(0)
    aurocs = [roc_auc_score(np.r_[np.zeros(40), np.ones(40)], np.r_[rng.normal(size=40), rng.normal(1.5, 1, 40)])
              for _ in range(2000)]
    assert auroc_se(float(np.mean(aurocs)), 40, 40) == pytest.approx(np.std(aurocs), rel=0.15)
    assert as_flags({"input_size": 384, "map_levels": ("stage4", "stage5")}) == \
        "--input-size 384 --map-levels stage4,stage5"
    assert as_flags({}) == "(the base setting: no flags)"
