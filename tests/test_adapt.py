"""Adapting the network to the product (issue 33, ``adapt``): the trained part of each backbone, the objective falling
on the training images, only the trained part moving, the validation's choice, determinism, interruption, and the
adapted network through model files, export, int8, partial_fit, merge, tune and the Dask fit."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

import gaussad
from gaussad import GaussianAD
from gaussad.detector.model import load
from gaussad.errors import GaussadError, InvalidParameterError, ModelFormatError
from gaussad.intake import adapt as adapting
from gaussad.intake.backbones import create_backbone, get_spec
from gaussad.intake.images import list_images

# Small and quick: 64 px inputs, a level before and three after the trained part's start (stage4 of EfficientNet).
ADAPT = {"backbone": "efficientnet-lite0", "input_size": 64, "levels": ["stage2", "stage4", "stage6", "head"],
         "preset": "paper", "adapt": 3, "adapt_stop": "last"}


@pytest.fixture(scope="module")
def train(tiny_category) -> list[Path]:
    return list_images(tiny_category / "train" / "good")


@pytest.fixture(scope="module")
def test_images(tiny_category) -> list[Path]:
    return sorted((tiny_category / "test").rglob("*.png"))


@pytest.fixture(scope="module")
def adapted(train) -> GaussianAD:
    return GaussianAD(**ADAPT).fit(train)


def _resnet():
    from gaussad.intake.backbones.resnet_net import create

    return create("resnet18")


@pytest.mark.parametrize("make", [lambda: create_backbone("efficientnet-lite0", 64, None),
                                  lambda: create_backbone("mobilenet_v2", 64, None), _resnet],
                         ids=["efficientnet", "mobilenet", "resnet"])
def test_the_trained_part_runs_from_its_input_alone(make):
    """From level s - 1's map, ``forward_levels(start=s)`` gives the full pass's deeper maps, and it reads only
    ``tail_modules(s)``: the earlier parameters set to NaN change nothing."""
    net = make().eval()
    n = len(net.level_names)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        full = net.forward_levels(x, list(range(n)))
        for start in range(1, n):
            tail = {id(p) for m in net.tail_modules(start) for p in m.parameters()}
            saved = {k: p.clone() for k, p in net.named_parameters() if id(p) not in tail}
            for k, p in net.named_parameters():
                if id(p) not in tail:
                    p.fill_(float("nan"))
            part = net.forward_levels(full[start - 1], list(range(start, n)), start=start)
            for k, p in net.named_parameters():
                if k in saved:
                    p.copy_(saved[k])
            assert len(part) == n - start
            for a, b in zip(part, full[start:]):
                torch.testing.assert_close(a, b)
    assert adapting.trained_start(net.level_names) == n // 2


def _objective(model: GaussianAD, reference: GaussianAD, images) -> float:
    """The mean over the trained levels of the Mahalanobis distance / sqrt(dim) of ``model``'s features to the
    Gaussians of ``reference``'s (pretrained) features (numpy, independent of the training code)."""
    from gaussad.core.gaussian import LevelGaussian, MomentStats

    start = adapting.trained_start(get_spec("efficientnet-lite0").level_names)
    ref, mine = reference.extract_features(images), model.extract_features(images)
    out = []
    for lv, r, m in zip(model.levels_, ref, mine):
        if lv >= start:
            g = LevelGaussian.fit(MomentStats.from_array(r), "ledoit-wolf")
            out.append(np.mean(g.distances(m)) / np.sqrt(g.dim))
    return float(np.mean(out))


@pytest.fixture(scope="module")
def forty(tmp_path_factory) -> list[Path]:
    """40 training images: with the 10 of the tiny set the pretrained features sit at their own Gaussians' minimum."""
    from gaussad.tools.synthetic import build_texture_dataset

    root = build_texture_dataset(tmp_path_factory.mktemp("forty"), size=64, n_train=40, n_test_good=2, n_test_bad=2,
                                 categories=["brick"])
    return list_images(root / "brick" / "train" / "good")


def test_adaptation_draws_the_training_features_towards_the_pretrained_gaussians(forty):
    pretrained = GaussianAD(**{**ADAPT, "adapt": 0}).fit(forty)
    one, four = (GaussianAD(**{**ADAPT, "adapt": n}).fit(forty) for n in (1, 4))
    assert _objective(four, pretrained, forty) < 0.95 * _objective(one, pretrained, forty)
    record = four.adaptation_
    assert record["kept_epoch"] == 4 and record["stop"] == "last" and record["trained_from"] == "stage4"
    assert [h["epoch"] for h in record["history"]] == [0, 1, 2, 3, 4]
    assert record["history"][-1]["objective"] < record["history"][1]["objective"]


def test_only_the_trained_part_moves(adapted, train):
    """Stem .. stage3 and every batch-norm statistic stay the pretrained ones; stage4 .. head moved."""
    pretrained = create_backbone("efficientnet-lite0", 64, None).state_dict()
    module = adapted.feature_extractor().module.backbone
    trained = set(adapting.trained_keys(adapted.feature_extractor().module))
    assert set(adapted.state_.adapted) == trained
    moved = {k for k, v in module.state_dict().items()  # the classifier is random and unused: not compared
             if not k.startswith("net._fc.") and not torch.equal(v, pretrained[k])}
    assert moved and moved <= trained
    assert not any("running" in k for k in moved)
    assert all(k.startswith(("net._blocks.", "net._conv_head", "net._bn1")) for k in trained)
    assert not any(k.startswith(("net._blocks.0.", "net._conv_stem")) for k in trained)


def test_the_same_seed_adapts_alike_and_another_does_not(forty):
    """The seed orders the batches (40 images: 3 of them an epoch) and draws the held-out images."""
    settings = {**ADAPT, "adapt": 2}
    first, again = (GaussianAD(**settings).fit(forty) for _ in range(2))
    other = GaussianAD(**settings, random_state=7).fit(forty)
    for k, v in first.state_.adapted.items():
        np.testing.assert_array_equal(again.state_.adapted[k], v)
    assert any(not np.array_equal(other.state_.adapted[k], v) for k, v in first.state_.adapted.items())


def test_the_validation_keeps_its_best_epoch(train):
    """stop='validation': the kept epoch is the first with the highest held-out AUROC of those run, training stops
    two epochs after it, and where it is epoch 0 the model holds no adapted tensors (the pretrained network)."""
    model = GaussianAD(**{**ADAPT, "adapt": 4, "adapt_stop": "validation"}).fit(train)
    record = model.adaptation_
    aurocs = [h["validation_auroc"] for h in record["history"]]
    assert all(a is not None and 0 <= a <= 1 for a in aurocs)
    assert record["kept_epoch"] == int(np.argmax(aurocs))
    assert len(aurocs) - 1 == min(4, record["kept_epoch"] + adapting.PATIENCE)
    assert record["held_out"] == max(2, round(0.15 * len(train)))
    if record["kept_epoch"] == 0:
        assert model.state_.adapted is None
        pretrained = GaussianAD(**{**ADAPT, "adapt": 0}).fit(train)
        np.testing.assert_allclose(model.score_samples(train[:3]), pretrained.score_samples(train[:3]), rtol=1e-6)
    else:
        assert set(model.state_.adapted) == set(adapting.trained_keys(model.feature_extractor().module))


def test_an_interrupted_adaptation_leaves_the_network_as_it_was(train, monkeypatch):
    model = GaussianAD(**ADAPT)
    calls = {"n": 0}
    real = torch.optim.Adam.step

    def interrupted(self, *a, **k):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return real(self, *a, **k)

    monkeypatch.setattr(torch.optim.Adam, "step", interrupted)
    with pytest.raises(KeyboardInterrupt):
        model.fit(train)
    assert not hasattr(model, "state_")
    pretrained = create_backbone("efficientnet-lite0", 64, None).state_dict()
    for k, v in model.feature_extractor().module.backbone.state_dict().items():
        assert k.startswith("net._fc.") or torch.equal(v, pretrained[k]), k


def test_an_adapted_model_round_trips_and_refits_from_the_pretrained_network(adapted, train, test_images, tmp_path):
    path = tmp_path / "adapted.gaussad"
    adapted.save(path)
    loaded = load(path)
    assert loaded.adapt == 3 and loaded.adaptation_ == adapted.adaptation_
    np.testing.assert_array_equal(loaded.score_samples(test_images), adapted.score_samples(test_images))
    pretrained = GaussianAD(**{**ADAPT, "adapt": 0}).fit(train)
    assert np.abs(pretrained.score_samples(test_images) - adapted.score_samples(test_images)).max() > 1e-3
    refit = GaussianAD(**ADAPT).fit(train).fit(train)  # a second fit adapts the pretrained network again
    np.testing.assert_allclose(refit.score_samples(test_images), adapted.score_samples(test_images), rtol=1e-6)
    plain = loaded.set_params(adapt=0).fit(train)  # and adapt=0 on the same object is the pretrained network
    assert plain.state_.adapted is None
    np.testing.assert_allclose(plain.score_samples(test_images), pretrained.score_samples(test_images), rtol=1e-6)


def _resave(src: Path, dst: Path, meta_change=None, array_change=None) -> Path:
    from gaussad.detector.persistence import read_model_file, save_model

    meta, arrays = read_model_file(src)
    if meta_change:
        meta_change(meta)
    if array_change:
        array_change(arrays)
    save_model(dst, meta, arrays)
    return dst


def test_damaged_adapted_files_are_refused(adapted, tmp_path):
    good = tmp_path / "a.gaussad"
    adapted.save(good)
    key = sorted(adapted.state_.adapted)[0]

    def nan(arrays):
        arrays["adapted." + key] = np.full_like(arrays["adapted." + key], np.nan)

    def stray(arrays):
        arrays["adapted.net._conv_stem.weight"] = np.zeros((32, 3, 3, 3), np.float32)

    def unadapted(meta):
        meta["adapt"] = 0

    for change, words in (({"array_change": nan}, "NaN"), ({"meta_change": unadapted}, "adapt 0")):
        with pytest.raises(ModelFormatError, match=words):
            load(_resave(good, tmp_path / "bad.gaussad", **change))
    def dropped(arrays):
        del arrays["adapted." + key]

    strayed = load(_resave(good, tmp_path / "stray.gaussad", array_change=stray))  # a tensor it does not train
    with pytest.raises(GaussadError, match="adapted weights do not fit this network.*_conv_stem"):
        strayed.score_samples([np.zeros((64, 64, 3), np.uint8)])
    partial = load(_resave(good, tmp_path / "partial.gaussad", array_change=dropped))  # one trained tensor missing
    with pytest.raises(GaussadError, match=f"missing: {key}"):
        partial.score_samples([np.zeros((64, 64, 3), np.uint8)])


def test_export_and_int8_run_the_adapted_network(adapted, train, test_images):
    from gaussad.tools.export import export_detector
    import onnxruntime as ort
    from PIL import Image

    data, _ = export_detector(adapted)
    sess = ort.InferenceSession(data, providers=["CPUExecutionProvider"])
    assert sess.get_modelmeta().custom_metadata_map["gaussad.adapt"] == "3 of 3 epochs"
    levels = adapted.level_scores(test_images)
    for i, p in enumerate(test_images):
        out = dict(zip([o.name for o in sess.get_outputs()],
                       sess.run(None, {"image": np.asarray(Image.open(p).convert("RGB"))[None]})))
        np.testing.assert_allclose(out["levels"][0], levels[i], rtol=1e-4)
    int8 = GaussianAD(**ADAPT, precision="int8").fit(train)
    assert int8.state_.network is not None and int8.state_.adapted is not None
    fp32 = adapted.score_samples(test_images)
    pretrained8 = GaussianAD(**{**ADAPT, "adapt": 0}, precision="int8").fit(train).score_samples(test_images)
    adapted8 = int8.score_samples(test_images)
    assert np.abs(adapted8 - fp32).mean() < np.abs(pretrained8 - fp32).mean()  # quantized from the adapted network


def test_partial_fit_keeps_the_adapted_network_and_merge_refuses_it(adapted, train, test_images):
    grown = load_copy(adapted)
    grown.partial_fit(test_images[:2])
    assert grown.state_.adapted is adapted.state_.adapted or all(
        np.array_equal(grown.state_.adapted[k], v) for k, v in adapted.state_.adapted.items())
    assert grown.adaptation_ == adapted.adaptation_ and grown.n_samples_ == adapted.n_samples_ + 2
    with pytest.raises(InvalidParameterError, match="of a new model with adapt"):
        GaussianAD(**ADAPT).partial_fit(train)
    with pytest.raises(GaussadError, match="merge of adapted models"):
        adapted.merge(adapted)
    with pytest.raises(InvalidParameterError, match="backbone=None"):
        GaussianAD(backbone=None, adapt=2).fit_features([np.random.default_rng(0).normal(size=(5, 3))])


def load_copy(model: GaussianAD) -> GaussianAD:
    import copy

    return copy.deepcopy(model)


def test_tune_measures_adapt_on_its_own_features(train):
    """adapt 0 and 2 are two feature groups (each candidate fitted on its own network's features), both ranked, the
    adaptation (on the search's fit part) timed apart."""
    from gaussad.tools.tune import _feature_key, tune

    from gaussad.detector import params

    assert _feature_key({**params.defaults(), **ADAPT, "adapt": 0}) != _feature_key({**params.defaults(), **ADAPT})
    result = tune(train, grid={"adapt": (0, 2)}, base=ADAPT, budget=10, refit=False)
    rows = {r["settings"].get("adapt", ADAPT["adapt"]): r for r in result.ranking}
    assert set(rows) >= {0, 2}
    assert rows[0]["global_auroc"] is not None and rows[2]["global_auroc"] is not None
    assert result.timings["adapt_s"] > 0


def test_cli_fit_adapts_and_reports_it(train, tiny_category, tmp_path, capsys):
    from gaussad.cli import main

    out = tmp_path / "m.gaussad"
    main(["fit", str(tiny_category / "train" / "good"), "-o", str(out), "--preset", "paper", "--input-size", "64",
          "--levels", "stage2,stage4,head", "--adapt", "2", "--adapt-stop", "last"])
    said = capsys.readouterr().out
    assert "adapted the network: 2 of 2 epochs run" in said and "kept epoch 2" in said
    model = load(out)
    assert model.adapt == 2 and model.adaptation_["kept_epoch"] == 2 and model.state_.adapted
    assert model.summary()["adaptation"]["kept_epoch"] == 2
    assert gaussad.GaussianAD().adapt == 0  # every preset keeps the pretrained network


def test_the_service_scores_with_the_adapted_network_and_says_so(adapted, test_images, tmp_path):
    pytest.importorskip("fastapi")
    from fastapi.testclient import TestClient

    from gaussad.service.app import create_app, load_models

    adapted.save(tmp_path / "tuned.gaussad")
    with TestClient(create_app(load_models(tmp_path))) as c:
        info = c.get("/models").json()[0]
        files = [("files", (p.name, p.read_bytes(), "image/png")) for p in test_images[:3]]
        body = c.post("/models/tuned/score", files=files).json()
    assert info["adaptation"]["kept_epoch"] == 3 and info["adaptation"]["stop"] == "last"
    np.testing.assert_allclose([r["score"] for r in body["results"]], adapted.score_samples(test_images[:3]),
                               rtol=1e-6)


def test_mobilenet_adapts_its_deeper_half(train):
    """The adaptation knows no backbone: MobileNetV2 trains the modules after its stage3 (levels from stage4)."""
    model = GaussianAD(**{**ADAPT, "backbone": "mobilenet_v2", "adapt": 1})
    model.fit(train)
    net = model.feature_extractor().module.backbone
    first = net.level_ends[3] + 1
    assert model.adaptation_["trained_from"] == "stage4"
    assert {int(k.split(".")[1]) for k in model.state_.adapted} == set(range(first, len(net.features)))


def test_cli_tune_ranks_the_adapted_network_with_every_epoch_kept(tiny_category, tmp_path, capsys):
    import json

    from gaussad.cli import main

    out = tmp_path / "t.gaussad"
    main(["tune", str(tiny_category / "train" / "good"), "-o", str(out), "--grid", "adapt", "--adapt-stop", "last",
          "--json"])
    said = json.loads(capsys.readouterr().out)
    rows = {r["settings"].get("adapt", 0): r for r in said["ranking"]}
    assert set(rows) == {0, 5} and rows[5]["adapt_kept_epoch"] == 5 and "adapt_kept_epoch" not in rows[0]
    assert load(out).adapt_stop == "last"
