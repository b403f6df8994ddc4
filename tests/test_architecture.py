"""The code's shape: one parameter table behind every spelling of a parameter, the scikit-learn contract, a light
``import gaussad``, no import cycles, no use of another module's private names, a thin model.py, and model files of
gaussad 0.1.0 still loading with the same scores."""

import ast
import copy
import inspect
import json
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import gaussad
from gaussad import GaussadError, GaussianAD, InvalidParameterError, NotFittedError
from gaussad.detector import params
from gaussad.cli import build_parser

SRC = Path(gaussad.__file__).parent
DATA = Path(__file__).parent / "data"


def _modules() -> dict[str, Path]:
    return {".".join(p.relative_to(SRC.parent).with_suffix("").parts).removesuffix(".__init__"): p
            for p in SRC.rglob("*.py")}


def _imports(name: str, path: Path) -> list[tuple[str, list[str]]]:
    """(imported gaussad module, names taken from it) for every import statement, lazy ones included."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            base = package
            for _ in range(max(node.level - 1, 0)):
                base = base.rpartition(".")[0]
            module = (f"{base}.{node.module}" if node.module else base) if node.level else node.module or ""
            out.append((module, [a.name for a in node.names]))
        elif isinstance(node, ast.Import):
            out += [(a.name, []) for a in node.names]
    return [(m, names) for m, names in out if m == "gaussad" or m.startswith("gaussad.")]


def test_no_import_cycles_in_the_package():
    """Package edges count (issue 31): a module taking a name from a package's ``__init__`` (``from . import
    register``, ``from gaussad import __version__``) depends on that ``__init__`` and on everything it imports, lazily
    or not; only the submodules named in ``from PACKAGE import submodule`` are edges to themselves instead."""
    modules = _modules()
    graph = {name: set() for name in modules}
    for name, path in modules.items():
        for module, names in _imports(name, path):
            for target in [f"{module}.{n}" for n in names if f"{module}.{n}" in modules] or [module]:
                if target in modules and target != name:
                    graph[name].add(target)
    state: dict[str, int] = {}

    def visit(node: str, trail: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                pytest.fail("import cycle: " + " -> ".join(trail[trail.index(nxt):] + [nxt]))
            if nxt not in state:
                visit(nxt, trail + [nxt])
        state[node] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])


def test_no_module_uses_another_modules_private_names():
    modules = _modules()
    offences = []
    for name, path in modules.items():
        for module, names in _imports(name, path):
            offences += [f"{name} imports {module}.{n}" for n in names if n.startswith("_") and not n.startswith("__")]
    assert not offences


def test_model_module_stays_thin():
    assert len((SRC / "detector" / "model.py").read_text().splitlines()) <= 350


# The wings, from the bottom: a module imports only from its own wing, the wings below it, and the foundation
# (errors, version). core holds the numeric core, intake files -> features, detector the estimator and its decisions;
# the three rooms users enter (tools, service, cli) sit on the detector, cli above everything it starts.
WINGS = ("core", "intake", "detector", "tools", "service", "cli")
FOUNDATION = {"gaussad.errors", "gaussad.version"}


def _wing(module: str) -> str | None:
    part = module.split(".")[1] if module.count(".") else None
    return part if part in WINGS else None


def test_wings_import_only_downwards():
    modules = _modules()
    offences = []
    for name, path in modules.items():
        here = _wing(name)
        for module, names in _imports(name, path):
            for target in [f"{module}.{n}" for n in names if f"{module}.{n}" in modules] or [module]:
                there = _wing(target)
                if name in FOUNDATION and target not in FOUNDATION:
                    offences.append(f"{name} (foundation) imports {target}")
                elif here and there is None and target not in FOUNDATION:
                    offences.append(f"{name} imports {target}, outside the wings")
                elif here and there and WINGS.index(there) > WINGS.index(here):
                    offences.append(f"{name} ({here}) imports {target} ({there}, above it)")
    assert not offences, "\n".join(offences)
    # the numeric core runs without images' networks: no torch or ONNX in it, lazily or not
    for name, path in modules.items():
        if _wing(name) == "core":
            text = path.read_text()
            assert "import torch" not in text and "import onnx" not in text, name


def test_the_package_top_level_stays_small():
    top = sorted(p.name for p in SRC.glob("*.py"))
    assert len(top) <= 8, top
    assert sorted(p.name for p in SRC.iterdir() if p.is_dir() and (p / "__init__.py").exists()) == sorted(WINGS)


def test_old_module_paths_import_the_moved_modules_with_a_warning():
    """README of 0.1 documented gaussad.tune.tune, gaussad.synthetic.add_defect, gaussad.heatmap.render,
    gaussad.bank.StreamingCoreset, gaussad.results.ResultRow and ``from gaussad import distributed``."""
    code = ("import warnings, sys\nwarnings.simplefilter('error')\nimport gaussad\n"
            "try:\n    import gaussad.tune\nexcept DeprecationWarning as w:\n    print(w)\n"
            "warnings.simplefilter('ignore')\n"
            "from gaussad.tune import tune\nfrom gaussad import distributed\n"
            "from gaussad.backbones.efficientnet_net import EfficientNetBackbone\n"
            "import gaussad.tools.tune, gaussad.tools.distributed, gaussad.intake.backbones.efficientnet_net as e\n"
            "assert tune is gaussad.tools.tune.tune and distributed is gaussad.tools.distributed\n"
            "assert EfficientNetBackbone is e.EfficientNetBackbone\n"
            "assert gaussad.tools.tune.__spec__.name == 'gaussad.tools.tune'\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == ("gaussad.tune moved to gaussad.tools.tune; the old path will go in a later version "
                                  "(CHANGELOG.md)")
    from gaussad.moved import MOVED

    assert {f"gaussad.{new}" for new in MOVED.values()} <= set(_modules())


def test_every_parameter_is_in_the_table_and_everywhere_it_should_be(tmp_path):
    signature = inspect.signature(GaussianAD.__init__).parameters
    names = [n for n in signature if n != "self"]
    assert names == [p.name for p in params.PARAMS]
    assert {n: signature[n].default for n in names} == params.defaults()
    assert set(GaussianAD().get_params()) == set(names)
    # the CLI options of fit are exactly the table's rows with a flag
    fit = build_parser()._subparsers._group_actions[0].choices["fit"]
    dests = {a.dest for a in fit._actions}
    assert {p.name for p in params.PARAMS if p.flag} <= dests
    assert not ({"seed", "reduction_text"} & dests)
    # model files store exactly the stored rows, learned ones from the fitted state
    rng = np.random.default_rng(0)
    model = GaussianAD(backbone=None, fpr=0.05).fit_features([rng.normal(size=(20, 3))])
    meta = model.metadata()
    assert {p.name for p in params.PARAMS if p.stored} <= set(meta)
    assert not {p.name for p in params.PARAMS if not p.stored} & set(meta)
    model.save(tmp_path / "m.gaussad")
    loaded = gaussad.load(tmp_path / "m.gaussad")
    kept = [p.name for p in params.PARAMS if p.stored and p.learned is None]
    assert {k: loaded.setting(k) for k in kept} == {k: model.setting(k) for k in kept}


def test_scikit_learn_clone_set_params_and_errors():
    from sklearn.base import clone

    est = GaussianAD(preset="recommended", fpr=0.02)
    twin = clone(est)
    assert twin is not est and twin.get_params() == est.get_params() and "state_" not in vars(twin)
    assert est.set_params(fpr=0.05) is est and est.fpr == 0.05
    with pytest.raises(ValueError, match="invalid parameter"):
        est.set_params(nonsense=1)
    with pytest.raises(NotFittedError) as info:
        GaussianAD().score_features([np.zeros((1, 3))])
    assert isinstance(info.value, ValueError) and isinstance(info.value, AttributeError)
    assert isinstance(info.value, GaussadError)
    with pytest.raises(InvalidParameterError) as info:
        GaussianAD(backbone=None, fpr=2.0).fit_features([np.zeros((3, 2))])
    assert isinstance(info.value, ValueError) and isinstance(info.value, GaussadError)
    assert not hasattr(GaussianAD(), "n_samples_")  # fitted attributes are absent before fit


def test_import_and_plain_features_need_no_torch_or_onnx():
    code = """
import sys


class Blocked:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("torch", "onnx", "onnxruntime"):
            raise ImportError(f"{name} is blocked in this test")


sys.meta_path.insert(0, Blocked())
import numpy as np
import gaussad
rng = np.random.default_rng(0)
m = gaussad.GaussianAD(backbone=None).fit_features([rng.normal(size=(30, 4)), rng.normal(size=(30, 2))])
s = m.score_features([rng.normal(size=(3, 4)), rng.normal(size=(3, 2))])
assert s.shape == (3,) and np.isfinite(s).all()
print("ok")
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr
    out = subprocess.run([sys.executable, "-c", "import gaussad, sys; assert 'torch' not in sys.modules"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr


def test_intake_settings_take_effect_after_first_use(tiny_category):
    from .conftest import TINY

    files = sorted((tiny_category / "train" / "good").iterdir())[:4]
    model = GaussianAD(**TINY, engine="torch").fit(files)
    first = model.feature_extractor()
    model.set_params(batch_size=3, max_pixels=10)
    assert model.feature_extractor() is first and first.batch_size == 3
    with pytest.raises(GaussadError, match="exceeds the limit of 10"):
        model.score_samples(files[:1])
    model.set_params(max_pixels=params.DEFAULT_MAX_PIXELS, engine="onnxruntime")
    assert model.feature_extractor().engine == "onnxruntime"
    np.testing.assert_allclose(model.score_samples(files), GaussianAD(**TINY, engine="torch").fit(files)
                               .score_samples(files), rtol=1e-4)
    with pytest.raises(InvalidParameterError, match="batch_size"):
        model.set_params(batch_size=-1).score_samples(files)


def test_fitted_models_copy_and_pickle(tiny_category):
    from .conftest import TINY

    files = sorted((tiny_category / "train" / "good").iterdir())[:4]
    model = GaussianAD(**TINY).fit(files)
    expected = model.score_samples(files)
    for twin in (copy.deepcopy(model), pickle.loads(pickle.dumps(model))):
        np.testing.assert_allclose(twin.score_samples(files), expected, rtol=1e-6)


def test_model_files_of_version_0_1_0_load_with_the_same_results():
    expected = json.loads((DATA / "expected-0.1.0.json").read_text())
    plain = gaussad.load(DATA / "plain-0.1.0.gaussad")
    test = [np.array(t) for t in expected["plain"]["test"]]
    levels = plain.level_scores_features(test)
    np.testing.assert_allclose(levels, expected["plain"]["levels"], rtol=1e-12)
    decisions, pvalues = plain.decide(levels)
    assert decisions.tolist() == expected["plain"]["decisions"]
    np.testing.assert_allclose(pvalues, expected["plain"]["pvalues"], rtol=1e-12)
    image = gaussad.load(DATA / "image-0.1.0.gaussad")
    inputs = list(np.load(DATA / "image-0.1.0-inputs.npy"))
    lv, amaps = image.score_with_maps(inputs)
    np.testing.assert_allclose(lv, expected["image"]["levels"], rtol=1e-4)
    np.testing.assert_allclose(amaps.reshape(len(inputs), -1).max(1), expected["image"]["map_max"], rtol=1e-4)
    np.testing.assert_allclose(amaps.reshape(len(inputs), -1).mean(1), expected["image"]["map_mean"], rtol=1e-4)


def test_merge_and_partial_fit_refuse_other_features(tiny_category, tmp_path):
    from .conftest import TINY

    files = sorted((tiny_category / "train" / "good").iterdir())[:6]
    a = GaussianAD(**TINY).fit(files[:3])
    b = GaussianAD(**{**TINY, "normalize": "native"}).fit(files[3:])
    with pytest.raises(InvalidParameterError, match="normalize"):
        a.merge(b)
    a.save(tmp_path / "a.gaussad")
    loaded = gaussad.load(tmp_path / "a.gaussad")
    loaded.backbone = "efficientnet-lite1"
    with pytest.raises(InvalidParameterError, match="backbone"):
        loaded.partial_fit(files[3:])


def test_recommended_preset_takes_the_backbones_map_levels():
    assert GaussianAD(preset="recommended").setting("map_levels") == (
        "stage2", "stage3", "stage4", "stage5", "stage6", "stage7")
    assert GaussianAD(backbone="resnet18", preset="recommended").setting("map_levels") == ("layer2", "layer3")
    assert GaussianAD(backbone="resnet18", preset="paper").setting("map_levels") == ()
    # no preset named: the recommended one (issue 13), and model files say so
    assert GaussianAD().setting("preset") == "recommended"
    assert GaussianAD(backbone="resnet18").setting("map_levels") == ("layer2", "layer3")
    assert GaussianAD(backbone=None, preset="recommended").setting("map_levels") == ()


def test_no_function_in_the_package_is_longer_than_80_lines():
    long = []
    for name, path in _modules().items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno - node.lineno >= 80:
                long.append(f"{name}.{node.name}: {node.end_lineno - node.lineno + 1} lines")
    assert not long


# What deciding means: a decision rule's methods, the model's shortcuts to them, and the modules that hold the laws.
DECIDING_CALLS = {"rule", "decide", "score_threshold", "level_thresholds", "target_fpr", "rule_for", "fpr_note",
                  "calibration_summary", "describe"}
DECIDING_MODULES = {"gaussad.detector.decision", "gaussad.core.threshold", "gaussad.core.fusion"}


def test_the_command_line_and_the_service_decide_nothing_themselves():
    """They format what the inference pipeline (gaussad.detector.inference) answers: no call of a decision rule's
    methods but through ``inference.``, no import of the modules that hold the rules and their laws (issue 31)."""
    offences = []
    for name, path in _modules().items():
        if _wing(name) not in ("cli", "service"):
            continue
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr in DECIDING_CALLS
                    and not (isinstance(node.func.value, ast.Name) and node.func.value.id == "inference")):
                offences.append(f"{name}:{node.lineno} calls .{node.func.attr}()")
        offences += [f"{name} imports {module}" for module, _ in _imports(name, path) if module in DECIDING_MODULES]
    assert not offences, "\n".join(offences)


def test_a_new_parameter_in_a_copy_of_the_table_reaches_the_cli_the_file_and_the_reports(tiny_category, monkeypatch,
                                                                                         tmp_path):
    """Issue 31: one row is the whole truth. A row added to a copy of the table becomes a ``fit`` option checked as
    the row says, a setting model files store (and a file with a bad value for it is refused, one without it reads
    its default), and a column of evaluate's report and of ``GET /models``. The constructor's signature is the one
    place a real parameter adds by hand: scikit-learn's rule of explicit arguments, held by the test above."""
    from gaussad.detector.persistence import validate_meta
    from gaussad.service.catalog import model_info
    from gaussad.tools.evaluate import evaluate
    from .conftest import TINY

    row = params.Param("smoothing", 0.5, params.fraction(), "a new setting", flag="--smoothing",
                       parse=float, report=True)
    table = params.PARAMS + (row,)
    monkeypatch.setattr(params, "PARAMS", table)
    monkeypatch.setattr(params, "BY_NAME", {p.name: p for p in table})
    monkeypatch.setattr(GaussianAD, "smoothing", 0.5, raising=False)  # what the constructor would store
    # the command line: fit has the option, checked by the row
    fit = build_parser()._subparsers._group_actions[0].choices["fit"]
    args = fit.parse_args([str(tiny_category), "-o", "m.gaussad", "--smoothing", "0.25"])
    assert params.from_args(args, params.cli_names("model"))["smoothing"] == 0.25
    with pytest.raises(SystemExit):
        fit.parse_args([str(tiny_category), "-o", "m.gaussad", "--smoothing", "2"])
    # the file: a fitted model stores it, the metadata check refuses a bad value, an older file reads the default
    model = GaussianAD(**TINY).fit(sorted((tiny_category / "train" / "good").iterdir())[:4])
    model.smoothing = 0.25
    meta = json.loads(json.dumps(model.metadata()))
    assert meta["smoothing"] == 0.25
    validate_meta(meta)
    with pytest.raises(ValueError, match="smoothing"):
        validate_meta({**meta, "smoothing": 2.0})
    assert params.from_stored({k: v for k, v in meta.items() if k != "smoothing"})["smoothing"] == 0.5
    # the reports
    assert model_info("m", model, None)["smoothing"] == 0.25
    report = evaluate(tiny_category, **{**TINY, "map_levels": []})
    assert report["smoothing"] == 0.5


def test_the_extractor_cache_key_has_a_field_for_each_row_that_shapes_the_extractor():
    """The intake cannot read the table (it lies below it): the key's fields and the table's ``extractor`` rows are
    held equal here, so a new row that shapes the extractor cannot be left out of the key."""
    from dataclasses import fields

    from gaussad.intake.features import ExtractorKey

    assert sorted(f.name for f in fields(ExtractorKey)) == sorted(p.name for p in params.PARAMS if p.extractor)
    assert {p.name for p in params.PARAMS if p.features} - {p.name for p in params.PARAMS if p.extractor} == {
        "map_method", "map_pool", "map_grid"}  # they shape the map statistics, not the extractor
