"""engine='openvino': the cached ONNX graph in OpenVINO's CPU plugin against torch eager and ONNX Runtime, its int8
path, engine 'auto''s choice between the two runtimes, and the errors where OpenVINO is missing."""

import json
import sys

import numpy as np
import pytest

from gaussad import GaussadError, GaussianAD
from gaussad.intake import engine as engine_mod
from gaussad.cli import main
from gaussad.intake.features import FeatureExtractor
from gaussad.intake.images import list_images

from .conftest import TINY
from .test_engine import TINY_FE, _assert_close

needs_openvino = pytest.mark.skipif(not engine_mod.openvino_available(), reason="openvino is not installed")


@pytest.fixture(scope="module")
def images(tiny_category):
    return list_images(tiny_category / "train" / "good") + list_images(tiny_category / "test" / "good")


@needs_openvino
def test_openvino_features_match_torch(images):
    fe = FeatureExtractor(**TINY_FE, engine="openvino", batch_size=4)
    ov = fe.extract(images)
    ref = FeatureExtractor(**TINY_FE, engine="torch", batch_size=4).extract(images)
    assert fe.runner.name == "openvino" and fe.level_dims == [32, 16, 24, 40]
    assert [f.shape for f in ov] == [f.shape for f in ref] == [(len(images), d) for d in (32, 16, 24, 40)]
    for a, b in zip(ov, ref):
        assert a.dtype == np.float64
        _assert_close(a, b)


@needs_openvino
def test_any_size_maps_and_spread_match_torch(tmp_path, monkeypatch):
    """The recommended preset's graph (aspect-kept inputs of several shapes through one any-size graph, maps and the
    maps' spread pooled) in OpenVINO, against torch eager, and on the very graph file ONNX Runtime validated."""
    monkeypatch.setenv("GAUSSAD_CACHE", str(tmp_path))
    rng = np.random.default_rng(7)
    imgs = [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for w, h in [(64, 64), (40, 100), (100, 40), (40, 100)]]
    settings = {**TINY_FE, "map_levels": ["stage2", "stage3"], "pool": "avg+std", "resize": "aspect", "batch_size": 4}
    out = {}
    for engine in ("openvino", "torch"):
        runs = list(FeatureExtractor(**settings, engine=engine).iter_features_and_maps(imgs))
        out[engine] = [a for _, pooled, maps in runs for a in pooled + maps]
    assert len(out["openvino"]) == len(out["torch"]) > 6
    for a, b in zip(out["openvino"], out["torch"]):
        _assert_close(a, b)
    assert len(list(tmp_path.glob("*.onnx"))) == 1  # exported once, read by OpenVINO
    assert FeatureExtractor(**settings, engine="onnxruntime").runner.metadata["gaussad.levels"] == "0,1,2,3"


@needs_openvino
def test_scores_equal_onnxruntime_to_1e5(tiny_category):
    """The acceptance of issue 34: OpenVINO's scores within 1e-5 relative of ONNX Runtime's (measured: 3e-7 here)."""
    train = list_images(tiny_category / "train" / "good")
    test = list_images(tiny_category / "test", recursive=True)
    model = GaussianAD(**TINY, engine="onnxruntime").fit(train)
    ort = model.score_samples(test)
    ov = model.set_params(engine="openvino").score_samples(test)
    assert model.feature_extractor().runner.name == "openvino"
    np.testing.assert_allclose(ov, ort, rtol=1e-5)


@needs_openvino
def test_cli_score_with_engine_openvino(tiny_category, tmp_path, capsys):
    model = tmp_path / "brick.gaussad"
    args = ["--input-size", str(TINY["input_size"]), "--levels", ",".join(TINY["levels"]), "--preset", "paper"]
    assert main(["fit", str(tiny_category), "-o", str(model), "--quiet", *args]) == 0
    scores = {}
    for engine in ("onnxruntime", "openvino"):
        capsys.readouterr()
        assert main(["score", str(model), str(tiny_category / "test"), "--json", "--engine", engine]) == 0
        scores[engine] = [r["score"] for r in json.loads(capsys.readouterr().out)["results"]]
    np.testing.assert_allclose(scores["openvino"], scores["onnxruntime"], rtol=1e-5)


@needs_openvino
def test_int8_network_runs_in_openvino(tiny_category):
    """A model fitted with precision='int8' scores in OpenVINO from the network its file carries: OpenVINO's int8
    kernels round otherwise than ONNX Runtime's (features 0.2-1.6 % apart per level here, scores 1 %), both as close
    to the fp32 features as the int8 tests ask of ONNX Runtime (tests/test_int8.py, LEVEL_ERROR_BOUND)."""
    from .test_int8 import LEVEL_ERROR_BOUND, _level_errors

    train = list_images(tiny_category / "train" / "good")
    test = list_images(tiny_category / "test", recursive=True)
    network = GaussianAD(**TINY, precision="int8").fit(train).feature_extractor().network
    fe = {e: FeatureExtractor(**TINY_FE, precision="int8", network=network, engine=e)
          for e in ("onnxruntime", "openvino")}
    feats = {e: f.extract(test) for e, f in fe.items()}
    fp32 = FeatureExtractor(**TINY_FE).extract(test)
    assert fe["openvino"].runner.name == "openvino"
    assert max(_level_errors(fp32, feats["openvino"])) < LEVEL_ERROR_BOUND
    assert max(_level_errors(feats["onnxruntime"], feats["openvino"])) < 0.05


def test_openvino_missing_is_a_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "openvino", None)  # what `import openvino` meets where it is not installed
    assert not engine_mod.openvino_available()
    with pytest.raises(GaussadError, match="engine 'openvino' needs the onnx and openvino packages"):
        FeatureExtractor(**TINY_FE, engine="openvino")
    with pytest.raises(GaussadError, match="pip install onnx openvino"):
        GaussianAD(**TINY, engine="openvino").fit([np.zeros((8, 8), np.uint8)] * 2)
    monkeypatch.delenv("GAUSSAD_AUTO_ENGINE")
    assert engine_mod.auto_runtimes() == ("onnxruntime",)  # auto as before OpenVINO: ONNX Runtime, nothing timed


def _outputs(scale: float, gap: float) -> list[np.ndarray]:
    """Two outputs of an engine: one of magnitude up to ``scale`` whose largest element is off by ``gap``."""
    return [np.array([[scale, -scale / 2, 0.0]]) + np.array([[gap, 0.0, 0.0]]), np.array([[1.0, 2.0]])]


def test_relative_difference_is_in_units_of_each_outputs_scale():
    reference = _outputs(40.0, 0.0)
    assert engine_mod.relative_difference(reference, reference) == 0.0
    assert engine_mod.relative_difference(_outputs(40.0, 4e-4), reference) == pytest.approx(1e-5)
    # a feature near 0 off by a relative 100 % is still a small difference at the output's scale
    near_zero = [reference[0] + np.array([[0.0, 0.0, 1e-6]]), reference[1]]
    assert engine_mod.relative_difference(near_zero, reference) == pytest.approx(1e-6 / 40)
    assert engine_mod.relative_difference([np.zeros((1, 2)), np.ones((1, 1))],
                                          [np.zeros((1, 2)), np.ones((1, 1))]) == 0.0


@pytest.mark.parametrize("ov_seconds, gap, chosen", [
    (0.8, 0.0, "openvino"),  # faster, same outputs
    (0.8, 3.9e-4, "openvino"),  # faster, within 1e-5 of the scale (40)
    (0.8, 4.1e-4, "onnxruntime"),  # faster, but outputs 1.025e-5 apart
    (1.2, 0.0, "onnxruntime"),  # slower
    (1.0, 0.0, "onnxruntime"),  # a tie keeps ONNX Runtime
])
def test_auto_takes_openvino_only_when_faster_and_equal(ov_seconds, gap, chosen):
    outputs = {"onnxruntime": _outputs(40.0, 0.0), "openvino": _outputs(40.0, gap)}
    assert engine_mod.choose_engine({"onnxruntime": 1.0, "openvino": ov_seconds}, outputs) == chosen


@needs_openvino
@pytest.mark.parametrize("ov_seconds, chosen", [(0.5, "openvino"), (2.0, "onnxruntime")])
def test_auto_measures_once_per_graph_and_keeps_the_choice(tmp_path, monkeypatch, ov_seconds, chosen):
    """engine 'auto' with both runtimes: the first extractor times them (here: timings injected, the outputs real),
    writes its choice beside the graph and runs the chosen one; later ones, in this process or another, read it."""
    monkeypatch.setenv("GAUSSAD_CACHE", str(tmp_path))
    monkeypatch.delenv("GAUSSAD_AUTO_ENGINE")
    measured = []
    real = engine_mod.measure_engines

    def injected(engines, batch, repeats=engine_mod.CHOICE_REPEATS):
        measured.append(sorted(engines))
        _, outputs = real(engines, batch, repeats=0)
        return {"onnxruntime": 1.0, "openvino": ov_seconds}, outputs

    monkeypatch.setattr(engine_mod, "measure_engines", injected)
    assert FeatureExtractor(**TINY_FE).runner.name == chosen
    (choice,) = tmp_path.glob("engine-choice-*.json")
    record = json.loads(choice.read_text())
    assert record["engine"] == chosen and record["seconds"] == {"onnxruntime": 1.0, "openvino": ov_seconds}
    assert record["relative_difference"] <= engine_mod.AGREEMENT and record["batch"] == [4, 3, 64, 64]
    assert FeatureExtractor(**TINY_FE).runner.name == chosen
    assert measured == [["onnxruntime", "openvino"]]  # the second extractor read the choice
    choice.write_text("{not json")  # a damaged record is measured again
    assert FeatureExtractor(**TINY_FE).runner.name == chosen and len(measured) == 2
    # another graph (other levels) is measured on its own
    FeatureExtractor(**{**TINY_FE, "levels": ["stem"]}).runner
    assert len(measured) == 3 and len(list(tmp_path.glob("engine-choice-*.json"))) == 2


@needs_openvino
def test_auto_keeps_onnxruntime_where_outputs_differ(tmp_path, monkeypatch):
    """An int8 network whose OpenVINO features differ from ONNX Runtime's (different int8 rounding) stays in ONNX
    Runtime under 'auto', however fast OpenVINO is."""
    monkeypatch.setenv("GAUSSAD_CACHE", str(tmp_path))
    monkeypatch.delenv("GAUSSAD_AUTO_ENGINE")
    real = engine_mod.measure_engines
    monkeypatch.setattr(engine_mod, "measure_engines", lambda engines, batch, repeats=3: (
        {"onnxruntime": 1.0, "openvino": 0.1}, real(engines, batch, repeats=0)[1]))
    rng = np.random.default_rng(8)
    train = [rng.integers(0, 256, (64, 64, 3), dtype=np.uint8) for _ in range(6)]
    model = GaussianAD(**TINY, precision="int8").fit(train)
    assert model.feature_extractor().runner.name == "onnxruntime"
    (choice,) = tmp_path.glob("engine-choice-*.json")
    assert json.loads(choice.read_text())["relative_difference"] > engine_mod.AGREEMENT


@needs_openvino  # the choice is keyed by OpenVINO's version
def test_auto_keeps_onnxruntime_where_openvino_fails(tmp_path, monkeypatch):
    """A graph OpenVINO cannot compile (here: its engine made to raise) stays in ONNX Runtime under 'auto', the error
    kept in the choice's record; nothing fails."""
    monkeypatch.setenv("GAUSSAD_CACHE", str(tmp_path))
    monkeypatch.delenv("GAUSSAD_AUTO_ENGINE")

    def refuse(graph):
        raise RuntimeError("Exception from src/inference/src/cpp/core.cpp: unsupported operation")

    monkeypatch.setattr(engine_mod, "OpenVinoEngine", refuse)
    x = np.random.default_rng(10).standard_normal((2, 3, 64, 64), dtype=np.float32)
    fe = FeatureExtractor(**TINY_FE)
    assert fe.runner.name == "onnxruntime" and [o.shape for o in fe.runner.run(x)][0] == (2, 32)
    (choice,) = tmp_path.glob("engine-choice-*.json")
    assert "unsupported operation" in json.loads(choice.read_text())["openvino_error"]


def test_auto_engine_variable_is_checked(monkeypatch):
    monkeypatch.setenv("GAUSSAD_AUTO_ENGINE", "tensorrt")
    with pytest.raises(GaussadError, match=r"\$GAUSSAD_AUTO_ENGINE is 'tensorrt'; it may be 'fastest'"):
        engine_mod.auto_runtimes()
    monkeypatch.setenv("GAUSSAD_AUTO_ENGINE", "onnxruntime")
    assert engine_mod.auto_runtimes() == ("onnxruntime",)
