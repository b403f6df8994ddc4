"""The parameter table: every setting of :class:`gaussad.GaussianAD` declared once, with the presets beside it.

Each :class:`Param` holds the default, the check of a value, the help text, whether model files store it and
how the command line spells it. ``get_params``/``set_params``, validation (at ``fit``, ``merge`` and load), the
model-file metadata and the CLI options all derive from :data:`PARAMS`, so adding a parameter means one row
here plus its line in ``GaussianAD.__init__`` (a test checks that the two agree).

This module knows no numerics, images or torch: choice lists that belong to other modules are plain tuples here.
"""

from __future__ import annotations

import math
import numbers
import os
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Mapping

from ..core import ESTIMATORS, REDUCTIONS, THRESHOLDS
from ..errors import GaussadError, InvalidParameterError
from ..intake import (ADAPT_STOPS, AUTO_LARGE_INPUT, AUTO_MAX_TILES, BRIGHTNESS, MAX_ADAPT_EPOCHS, DECODERS, DEFAULT_MAX_PIXELS, ENGINES,
                      NORMALIZATIONS, POOLS, PRECISIONS, RESIZES, check_precision)

MAP_METHODS = ("gaussian", "nearest")
MAP_GRIDS = ("coarsest", "finest")
IMAGE_SCORES = ("global", "fused")
MAX_INPUT_SIZE = 4096  # largest network input side (EfficientNet-B7 uses 600)
MAX_MAP_POOL = 15
MAX_MAP_TILES = 8  # 64 tiles per image: about 64 network runs per image for its map
# Smallest target false-positive rate: below it the per-level rates (fpr / levels) approach float64's underflow and
# thresholds stop being computable; no inspection runs at 1e-12 anyway.
MIN_FPR = 1e-12

# With threshold='conformal' and no calibration given: cross-conformal below CV_BELOW training images (every image
# calibrates), else the DEFAULT_SPLIT fraction held out (one extra fit instead of K).
CV_BELOW = 500
DEFAULT_SPLIT = 0.2

# The preset of a model that names none. It was "paper" before issue 13: the paper's recipe flagged 55 % of bottle's
# good test images with a conformal threshold calibrated on 40 training images, the recommended one 5 % (EXPERIMENTS.md,
# "Recommended as the default preset").
DEFAULT_PRESET = "recommended"
# A preset's value for map_levels and pool meaning "what the backbone's registry entry recommends" (plain features,
# no backbone: no map levels, the average).
BACKBONE_CHOICE = "backbone"
_WITHOUT_BACKBONE = {"map_levels": (), "pool": "avg"}
PRESETS: dict[str, dict[str, Any]] = {
    # The paper's recipe: ImageNet mean/std at the native size, global features only, chi2 thresholds.
    "paper": {"input_size": None, "normalize": "imagenet", "resize": "square", "brightness": "keep", "pool": "avg",
              "map_levels": (), "map_method": "gaussian", "map_pool": 1, "map_grid": "coarsest", "map_tiles": 1,
              "image_score": "global", "threshold": "chi2"},
    # Measured best here (EXPERIMENTS.md): the backbone's own input normalisation, the images' proportions kept,
    # and nearest-neighbour anomaly maps over 3 x 3 neighbourhoods of the backbone's map levels (its registry entry's
    # ``map_levels``: stage2-stage7 for EfficientNet, on the stage7 grid; layer2-layer3 for ResNet); and the
    # registry entry's ``pool``: for EfficientNet-Lite the map levels' global features also hold each channel's
    # spread over the map (square root of its standard deviation), elsewhere the paper's average.
    # Since issue 30 it decides by the fused image score (the global score and the map peak as conformal p-values,
    # Fisher's combination, full conformal prediction): the chi2 law does not hold on these features (it flagged
    # 10-100 % of good parts at a 1 % target), the conformal law does. The input size follows the training images
    # (``input_size='auto'``), and the maps are untiled: a larger input gives large images their detail in one
    # network pass per image, where tiles cost 1 + K*K passes (docs/guide/thresholds.md, "Which decision rule").
    # Since issue 33 each image's brightness is matched to one grey level before the network: tile's goods vary in
    # brightness from photo to photo, and the Gaussians spent their spread on it (EXPERIMENTS.md, "Issue 33:
    # matching brightness before the network").
    "recommended": {"input_size": "auto", "normalize": "native", "resize": "aspect", "brightness": "match",
                    "pool": BACKBONE_CHOICE, "map_levels": BACKBONE_CHOICE, "map_method": "nearest", "map_pool": 3,
                    "map_grid": "coarsest", "map_tiles": 1, "image_score": "fused", "threshold": "conformal"},
}
# The recommended preset at the backbone's native input size whatever the images' size: the same decision, one
# cheaper network pass per image on large images.
PRESETS["fast"] = {**PRESETS["recommended"], "input_size": None}


def _fail(name: str, expected: str, value: Any) -> None:
    raise InvalidParameterError(f"{name} must be {expected}, got {value!r}")


def _is_int(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _is_real(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(float(value))


def choice(options: Iterable[Any]) -> Callable[[str, Any], None]:
    options = tuple(options)

    def check(name: str, value: Any) -> None:
        if not isinstance(value, (str, type(None))) or value not in options:
            shown = ", ".join("none" if o is None else str(o) for o in options)
            raise InvalidParameterError(f"unknown {name} {value!r}; choose one of: {shown}")

    return check


def integer(lo: int, hi: float = math.inf, odd: bool = False) -> Callable[[str, Any], None]:
    def check(name: str, value: Any) -> None:
        if not _is_int(value) or not lo <= value <= hi or (odd and value % 2 == 0):
            span = f">= {lo}" if hi == math.inf else f"{lo}..{hi}"
            _fail(name, f"an {'odd ' if odd else ''}integer {span}", value)

    return check


def fraction(include_one: bool = False, minimum: float = 0.0) -> Callable[[str, Any], None]:
    """A number in (0, 1) (``include_one``: (0, 1]; ``minimum``: [minimum, 1))."""
    def check(name: str, value: Any) -> None:
        low_ok = _is_real(value) and (float(value) >= minimum if minimum else float(value) > 0.0)
        if not low_ok or not (float(value) < 1.0 or (include_one and float(value) == 1.0)):
            span = f"[{minimum:g}, 1)" if minimum else f"(0, 1{']' if include_one else ')'}"
            _fail(name, f"a fraction in {span}", value)

    return check


def _calibration(name: str, value: Any) -> None:
    if value != "cv":
        try:
            fraction()(name, value)
        except InvalidParameterError:
            _fail(name, "a fraction in (0, 1) to hold out, or 'cv' (cross-conformal)", value)


def optional(check: Callable[[str, Any], None]) -> Callable[[str, Any], None]:
    def checked(name: str, value: Any) -> None:
        if value is not None:
            check(name, value)

    return checked


def _levels(name: str, value: Any) -> None:
    if isinstance(value, str) or _is_int(value):
        return  # one level
    if isinstance(value, bytes) or not isinstance(value, Iterable):
        _fail(name, "a list of level names or indices", value)
    for level in value:
        if not (isinstance(level, str) or _is_int(level)):
            _fail(name, "a list of level names or indices", value)


def _backbone(name: str, value: Any) -> None:
    from ..intake.backbones import list_backbones

    if value is not None and value not in list_backbones():
        raise InvalidParameterError(f"unknown backbone {value!r}; choose one of: {', '.join(list_backbones())}")


def _path(name: str, value: Any) -> None:
    if not isinstance(value, (str, os.PathLike)):
        _fail(name, "a file path", value)


def _boolean(name: str, value: Any) -> None:
    if not isinstance(value, (bool, numbers.Integral)):
        _fail(name, "True or False", value)


def _seed(name: str, value: Any) -> None:
    if not _is_int(value) or not 0 <= value < 2**63:
        _fail(name, "a non-negative integer or None", value)


# ----- command-line spelling ----------------------------------------------------------------------------------
def _text_list(text: str) -> list[str]:
    return [s.strip() for s in text.split(",") if s.strip()]


def _map_level_list(text: str) -> list[str]:
    """'none' turns maps off; otherwise comma-separated levels."""
    return [] if text.strip().lower() == "none" else _text_list(text)


def _none_or_text(text: str) -> str | None:
    return None if text == "none" else text


def _calibration_text(text: str) -> str | float:
    return text if text == "cv" else _float_text(text)


def _input_size(name: str, value: Any) -> None:
    if value not in ("auto", "native") and not (_is_int(value) and 1 <= value <= MAX_INPUT_SIZE):
        _fail(name, f"'auto', 'native' or an integer 1..{MAX_INPUT_SIZE}", value)


def _input_size_text(text: str) -> int | str:
    """'auto', 'native' (the backbone's own size) or a number of pixels."""
    word = text.strip().lower()
    return word if word in ("auto", "native") else _int_text(text)


def _tiles(name: str, value: Any) -> None:
    if value != "auto" and not (_is_int(value) and 1 <= value <= MAX_MAP_TILES):
        _fail(name, f"'auto' or an integer 1..{MAX_MAP_TILES}", value)


def _tiles_text(text: str) -> int | str:
    return "auto" if text == "auto" else _int_text(text)


def _int_text(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise ValueError(f"expected an integer, got {text!r}") from None


def _float_text(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise ValueError(f"expected a number, got {text!r}") from None


@dataclass(frozen=True)
class Param:
    """One parameter: ``check(name, value)`` raises :class:`InvalidParameterError` for a bad value.

    ``stored``: written to model files; ``learned`` names the fitted attribute whose value is stored instead
    (the levels actually resolved, for example). ``preset``: None means "the preset's value". ``flag`` and
    ``parse`` spell it on the command line (no flag: not a CLI option); ``group`` is the CLI option group.
    ``features``: it shapes the features, so statistics fitted with other values cannot be combined (``merge``,
    ``partial_fit``; :data:`gaussad.detector.state.FEATURE_SETTINGS`); ``legacy``: what model files written before the
    parameter existed meant by its absence. ``extractor``: it shapes the feature extractor, so it is a field of the
    extractor's cache key (:class:`gaussad.intake.features.ExtractorKey`). ``report``: the reports show it (``evaluate``'s, ``GET /models``:
    :func:`reported`), as None where the setting ``needs`` is empty (map settings without map levels).
    """

    name: str
    default: Any
    check: Callable[[str, Any], None]
    help: str
    stored: bool = True
    learned: str | None = None
    preset: bool = False
    flag: str | None = None
    parse: Callable[[str], Any] | None = None
    metavar: str | None = None
    choices: tuple | None = None
    group: str = "model"
    features: bool = False
    legacy: Any = None
    extractor: bool = False
    report: bool = False
    needs: str | None = None


PARAMS: tuple[Param, ...] = (
    Param("backbone", "efficientnet-lite0", _backbone, "feature network (see `gaussad backbones`)",
          features=True, flag="--backbone", report=True, extractor=True),
    Param("levels", None, optional(_levels),
          "comma-separated levels by name or index (EfficientNet, MobileNetV2: stem,stage1..stage7,head = 0..8; "
          "ResNet: stem,layer1..layer4 = 0..4); default all",
          learned="levels_", flag="--levels", parse=_text_list, report=True, extractor=True),
    Param("input_size", None, optional(_input_size),
          "input size S in pixels: the side of the square input, or with --resize aspect the side of a square of "
          "the same area; native = the backbone's own size (paper and fast presets); auto (recommended preset): "
          f"decided at fit from the training images' size: about {AUTO_LARGE_INPUT:g}x native (384 px for "
          "EfficientNet-Lite0) where the median training image is at least that large, else native (never "
          "upscaling)", learned="input_size_", preset=True, flag="--input-size", parse=_input_size_text,
          metavar="S|auto|native", report=True, extractor=True),
    Param("weights", None, optional(_path),
          "local weights file for the backbone (.pth/.pt state dict or .safetensors); required for "
          "efficientnet-b0..b7 and the ResNets", features=True, flag="--weights", parse=str, metavar="FILE", extractor=True),
    Param("estimator", "ledoit-wolf", choice(ESTIMATORS), "covariance estimator or baseline", flag="--estimator",
          choices=ESTIMATORS, report=True),
    Param("reduction", None, choice(REDUCTIONS),
          "pca keeps the high-variance components, npca the low-variance ones", flag="--reduction",
          parse=_none_or_text, choices=("none", "pca", "npca"), report=True),
    Param("variance", 0.99, fraction(), "explained-variance threshold for pca/npca", flag="--variance",
          parse=_float_text, report=True, needs="reduction"),
    Param("normalize", None, optional(choice(NORMALIZATIONS)),
          "input normalisation: ImageNet mean/std as the paper, or the backbone's own training normalisation "
          "(EfficientNet-Lite: (x-127)/128)", preset=True, features=True, flag="--normalize", choices=NORMALIZATIONS, report=True, extractor=True),
    Param("resize", None, optional(choice(RESIZES)),
          "square: plain resize to S x S as the paper; aspect: keep the image's proportions at about S x S "
          "pixels (sides multiples of 32)", preset=True, features=True, flag="--resize", choices=RESIZES, report=True, extractor=True),
    Param("brightness", None, optional(choice(BRIGHTNESS)),
          "match: scale each resized image so that its mean grey level is that of ImageNet's mean colour (117) "
          "before normalising, so that a photo's overall brightness (lighting that drifts between shots) does not "
          "move its score; a defect that only makes the whole image brighter or darker is then not seen. keep: "
          "the pixels as decoded (the paper)", preset=True, features=True, legacy="keep", flag="--brightness",
          choices=BRIGHTNESS, report=True, extractor=True),
    Param("adapt", 0, integer(0, MAX_ADAPT_EPOCHS),
          "fine-tune the network's deeper half (EfficientNet: stage4 .. head) on the training images for up to N "
          "epochs with Rippel et al.'s objective (arXiv 2108.04116: their pooled features drawn towards the "
          "pretrained features' Gaussians; batch norm frozen, Adam 1e-4); the adapted weights go into the model file "
          "(about 13 MB for EfficientNet-Lite0). 0 = the pretrained network (every preset: no adaptation beat it on "
          "the measured sets, EXPERIMENTS.md)", features=True, legacy=0, flag="--adapt", parse=_int_text,
          metavar="N", report=True, extractor=True),
    Param("adapt_stop", "validation", choice(ADAPT_STOPS),
          "which adapted epoch to keep: validation = the authors' guard against forgetting: 0.15 of the images held "
          "out with a pasted synthetic defect each, the epoch whose global score ranks them best (the pretrained "
          "network where none beats it; 2 epochs without a better one stop it); last = every image trains, the "
          "last epoch is kept", features=True, legacy="validation", flag="--adapt-stop", choices=ADAPT_STOPS,
          report=True, needs="adapt", extractor=True),
    Param("pool", None, optional(choice(POOLS)),
          "global features of each level: avg = each channel's average over the feature map (the paper); avg+std "
          "= for the map levels also each channel's spread over the map, the square root of its standard deviation "
          "(a small defect moves a channel's spread more than its average), the other levels their average; "
          "nothing changes without map levels. The recommended preset takes the backbone's own (EfficientNet-Lite: "
          "avg+std; others: avg)", preset=True, features=True, legacy="avg", flag="--pool", choices=POOLS, report=True, extractor=True),
    Param("map_levels", None, optional(_levels), "comma-separated levels for anomaly maps, or 'none'",
          learned="map_levels_", preset=True, flag="--map-levels", parse=_map_level_list, report=True, extractor=True),
    Param("map_method", None, optional(choice(MAP_METHODS)),
          "anomaly-map scoring: one Gaussian per level shared by all positions, or the distance to the nearest "
          "location of a memory bank of training locations", preset=True, features=True, flag="--map-method", choices=MAP_METHODS, report=True, needs="map_levels"),
    Param("map_pool", None, optional(integer(1, MAX_MAP_POOL, odd=True)),
          "average location vectors over K x K neighbourhoods before scoring them (odd K; 1 = off)", preset=True,
          features=True, flag="--map-pool", parse=_int_text, metavar="K", report=True, needs="map_levels"),
    Param("map_coreset", 0.1, fraction(include_one=True),
          "fraction of the training locations kept in each memory bank (greedy k-centre coreset; nearest maps "
          "only)", flag="--map-coreset", parse=_float_text, metavar="F"),
    Param("map_grid", None, optional(choice(MAP_GRIDS)),
          "where map levels meet: coarsest = each level averaged down to the coarsest map level's grid and scored "
          "on its own (one bank per level); finest = PatchCore's recipe, every level upsampled to the finest map "
          "level's grid and concatenated into one vector per location (one bank)", preset=True, features=True, legacy="coarsest", flag="--map-grid",
          choices=MAP_GRIDS, report=True, needs="map_levels"),
    Param("map_tiles", None, optional(_tiles),
          "tile the anomaly maps: the image resized to about K tiles of side S along each side (S + (K-1) x the tile "
          "step, tiles overlapping by about S/4), each tile run through the network at S, the map levels' feature "
          "maps stitched (overlaps averaged) into one; the image score still comes from the whole image at S. About "
          "1 + K*K network runs per image (1 = off); input size a multiple of 32, maps export refuses it. auto: "
          "decided at fit from the training images' size, the most tiles up to "
          f"{AUTO_MAX_TILES} whose map image is no larger than the images (1 for images under about 384 px at "
          "S = 224)",
          learned="map_tiles_", preset=True, features=True, legacy=1, flag="--map-tiles", parse=_tiles_text, metavar="K|auto", report=True, extractor=True),
    Param("precision", "fp32", choice(PRECISIONS),
          "network arithmetic: fp32, or int8 = the network statically quantized at fit (ONNX Runtime, QDQ, "
          "per-channel 7-bit weights, which score alike on CPUs with and without VNNI, the first three convolutions "
          "and the last in fp32; uint8 activations calibrated on 64 training images spread over the list), about 2x "
          "faster on CPU for a small AUROC change (BENCHMARKS.md), the quantized network (a few MB) stored in the "
          "model file; needs an ONNX engine (onnxruntime, openvino or auto)", flag="--precision", choices=PRECISIONS, report=True, extractor=True),
    Param("preset", None, optional(choice(PRESETS)),
          "recommended (default): the fused image score decided by its conformal law at --fpr, the input size "
          "following the training images (input_size auto), the backbone's own input normalisation, aspect-kept "
          "resize, and nearest-neighbour anomaly maps from the backbone's map levels (EfficientNet: "
          "stage2-stage7; see README for the figures); fast: recommended at the backbone's native input size; "
          "paper: the paper's recipe (global features only, ImageNet normalisation, square resize, chi2)",
          flag="--preset", choices=tuple(PRESETS), report=True),
    Param("image_score", None, optional(choice(IMAGE_SCORES)),
          "image score and decision: global = the mean over levels of the Mahalanobis distances; fused = the global "
          "score and the anomaly map's peak, each a p-value against out-of-fold scores of the training images "
          "(cross-conformal global scores, leave-one-image-out map peaks), combined: -log10 of Fisher's combination "
          "ranks, and decides at --fpr by full conformal prediction (needs nearest-neighbour maps, the conformal "
          "threshold and calibration cv, its defaults)", preset=True, flag="--image-score",
          choices=IMAGE_SCORES),
    Param("threshold", None, optional(choice(THRESHOLDS)),
          "decision rule: chi2 per level (the paper), hotelling (finite-sample F law per level) or conformal "
          "(quantile of held-out or out-of-fold normal scores; see --calibration); a fused image score decides by "
          "conformal only, and that is then the default", preset=True, flag="--threshold",
          choices=THRESHOLDS, group="threshold"),
    Param("fpr", 0.01, fraction(minimum=MIN_FPR), "target false-positive rate", flag="--fpr", parse=_float_text,
          group="threshold"),
    Param("calibration", None, optional(_calibration),
          "conformal calibration scores: 'cv' (cross-conformal: every image scored by a model fitted without its "
          "fold) or a fraction to hold out (e.g. 0.2, split conformal); the final model is fitted on all images. "
          f"Default: none, except with the conformal threshold: cv below {CV_BELOW} training images, else "
          f"{DEFAULT_SPLIT}", flag="--calibration", parse=_calibration_text, metavar="cv|FRACTION",
          group="threshold"),
    Param("calibration_folds", 5, integer(2, 1000),
          "folds of cross-conformal calibration (calibration='cv'); fewer images than folds: one image per fold",
          flag="--calibration-folds", parse=_int_text, metavar="K", group="threshold"),
    Param("random_state", 0, optional(_seed), "seed of the random calibration split, of the coreset and of the adaptation (its held-out images, defects and batch order)",
          flag="--seed", parse=_int_text, metavar="N", group="threshold"),
    Param("batch_size", 16, integer(1, 4096), "images per forward pass", stored=False, flag="--batch-size",
          parse=_int_text, metavar="N", group="intake"),
    Param("engine", "auto", choice(ENGINES),
          "inference engine: onnxruntime (the network exported once to ONNX, cached under $GAUSSAD_CACHE or "
          "~/.cache/gaussad), openvino (the same graph in OpenVINO's CPU plugin, fp32; pip install openvino), torch "
          "(eager), or auto = onnxruntime when installed, or openvino where installed too and faster on the graph "
          "with the same features to 1e-5 (timed once per graph, the choice cached beside it); all give the same "
          "scores",
          stored=False, flag="--engine", choices=ENGINES, group="intake", extractor=True),
    Param("verbose", False, _boolean, "progress bars on stderr", stored=False),
    Param("max_pixels", DEFAULT_MAX_PIXELS, integer(1),
          "refuse image files with more pixels than N, checked before decoding (decompression-bomb guard)",
          stored=False, flag="--max-pixels", parse=_int_text, metavar="N", group="intake"),
    Param("decoder", "pil", choice(DECODERS),
          "image decoders: pil = Pillow only (faster in the threaded pipeline: Pillow releases the GIL while it "
          "decodes, pyspng does not); auto = pyspng for PNG and simplejpeg (libjpeg-turbo) for JPEG where installed "
          "and exact (the same pixels as Pillow), faster for one image at a time", stored=False, flag="--decoder",
          choices=DECODERS, group="intake"),
)
BY_NAME: dict[str, Param] = {p.name: p for p in PARAMS}
# The settings besides the network layout (levels, input size) that shape the features, and what model files from
# before one of them existed meant by its absence: read off the table.
FEATURE_SETTINGS: tuple[str, ...] = tuple(p.name for p in PARAMS if p.features)
FEATURE_LEGACY: dict[str, Any] = {p.name: p.legacy for p in PARAMS if p.legacy is not None}


def defaults() -> dict[str, Any]:
    """Every parameter at its default."""
    return {p.name: p.default for p in PARAMS}


def effective(params: Mapping[str, Any], name: str) -> Any:
    """A parameter's value in use: the explicit one, else the preset's (``DEFAULT_PRESET`` when none is given); the
    threshold of a fused image score, unless given, is conformal (the only one it decides by), and a preset's fused
    image score is the global one where there are no nearest-neighbour maps to fuse."""
    value = params.get(name)
    if name == "preset":
        return value or DEFAULT_PRESET
    if value is None and name == "threshold" and effective(params, "image_score") == "fused":
        return "conformal"
    if name == "input_size" and value == "native":
        return None  # the backbone's own size, whatever the preset
    if value is None and BY_NAME[name].preset:
        value = PRESETS[params.get("preset") or DEFAULT_PRESET][name]
        if name == "image_score" and value == "fused" and not _has_nearest_maps(params):
            return "global"  # nothing to fuse: the preset's conformal decision on the global score
        if value == BACKBONE_CHOICE:
            if params.get("backbone") is None:
                return _WITHOUT_BACKBONE[name]
            from ..intake.backbones import get_spec

            return getattr(get_spec(params["backbone"]), name)
    return value


def _has_nearest_maps(params: Mapping[str, Any]) -> bool:
    """Whether the settings give nearest-neighbour anomaly maps, the evidence a fused image score needs besides the
    global score (plain features and models without map levels have none)."""
    return (params.get("backbone", BY_NAME["backbone"].default) is not None
            and bool(list(effective(params, "map_levels") or ())) and effective(params, "map_method") == "nearest")


def resolved(params: Mapping[str, Any]) -> dict[str, Any]:
    """Every parameter's value in use (:func:`effective`)."""
    return {name: effective(params, name) for name in params}


def check_value(name: str, value: Any) -> None:
    """Check one value against its row of the table."""
    BY_NAME[name].check(name, value)


def validate(params: Mapping[str, Any]) -> None:
    """Check every parameter, then the combinations; the first problem raises :class:`InvalidParameterError`."""
    unknown = sorted(set(params) - set(BY_NAME))
    if unknown:
        raise InvalidParameterError(f"unknown parameter(s) {', '.join(unknown)}; valid: {', '.join(BY_NAME)}")
    for p in PARAMS:
        p.check(p.name, params.get(p.name, p.default))
    if params.get("backbone") is not None:
        from ..intake.backbones import get_spec, resolve_levels

        names = get_spec(params["backbone"]).level_names
        for name in ("levels", "map_levels"):
            value = effective(params, name)
            if value is not None and (name == "levels" or list(value)):
                try:
                    resolve_levels(names, value)
                except GaussadError as exc:
                    raise InvalidParameterError(f"{name}: {exc}") from None
    check_precision(params)
    if params.get("adapt") and "backbone" in params and params["backbone"] is None:
        raise InvalidParameterError("adapt fine-tunes the backbone, backbone=None has none: use adapt=0")
    _check_fused(params)
    _check_tiles(params)


def _check_fused(params: Mapping[str, Any]) -> None:
    """A fused image score decides by conformal p-values of out-of-fold scores of nearest-neighbour map evidence:
    refuse the settings it cannot work with, naming both."""
    if effective(params, "image_score") != "fused":
        return
    method, calibration = effective(params, "threshold"), params.get("calibration")
    if method != "conformal":
        raise InvalidParameterError(f"image_score='fused' decides by conformal p-values, threshold={method!r} cannot "
                                    "apply: use threshold='conformal' or image_score='global'")
    if calibration not in (None, "cv"):
        raise InvalidParameterError(f"image_score='fused' calibrates on out-of-fold scores of every training image, "
                                    f"calibration={calibration!r} cannot apply: use calibration='cv' (its default) or "
                                    "image_score='global'")
    if effective(params, "map_method") != "nearest":
        raise InvalidParameterError(f"image_score='fused' needs nearest-neighbour anomaly maps, map_method="
                                    f"{effective(params, 'map_method')!r} cannot apply: use map_method='nearest' or "
                                    "image_score='global'")
    if params.get("backbone") is not None and not list(effective(params, "map_levels") or ()):
        raise InvalidParameterError("image_score='fused' needs anomaly maps, but map_levels is empty: set map_levels "
                                    "or use image_score='global'")


def _check_tiles(params: Mapping[str, Any]) -> None:
    """Tiles shape only the anomaly maps: refuse them for a model without maps rather than ignore them."""
    tiles = effective(params, "map_tiles")
    if tiles != "auto" and tiles > 1 and params.get("backbone") is not None and not list(effective(params, "map_levels") or ()):
        raise InvalidParameterError(f"map_tiles={tiles} tiles the anomaly maps, but map_levels is empty: set "
                                    "map_levels (or preset='recommended') or map_tiles=1")


def calibration_for(params: Mapping[str, Any], n: int) -> str | float | None:
    """The calibration ``fit`` uses on ``n`` images: the given one; with a fused image score and none given, 'cv';
    with the conformal threshold and none given, 'cv' below :data:`CV_BELOW` images, else :data:`DEFAULT_SPLIT`;
    otherwise None."""
    if params.get("calibration") is not None:
        return params.get("calibration")
    if effective(params, "image_score") == "fused":
        return "cv"
    if effective(params, "threshold") != "conformal":
        return None
    return "cv" if n < CV_BELOW else DEFAULT_SPLIT


def numpydoc(indent: str = "    ") -> str:
    """A numpydoc ``Parameters`` section of the table (for :class:`GaussianAD`'s docstring)."""
    lines = [f"{indent}Parameters", f"{indent}----------"]
    for p in PARAMS:
        kind = "None = the preset's" if p.preset else f"default {p.default!r}"
        lines += [f"{indent}{p.name} : {kind}", f"{indent}    {p.help}" + ("" if p.stored else " (not stored in model files)")]
    return "\n".join(lines) + "\n"


# ----- model files ---------------------------------------------------------------------------------------------
def reported(params: Mapping[str, Any], fitted: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The settings a report shows (the rows marked ``report``, in table order): each value in use, a learned one as
    ``fitted`` gives it (the levels' names, the input size 'auto' decided...), None where the setting it ``needs``
    is empty (the map settings of a model without map levels, the variance without a reduction)."""
    fitted = fitted or {}

    def value(name: str) -> Any:
        return fitted[name] if name in fitted else effective(params, name)

    return {p.name: None if p.needs and not value(p.needs) else _json_value(value(p.name)) for p in PARAMS if p.report}


def _json_value(value: Any) -> Any:
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if isinstance(value, tuple):
        return list(value)
    if _is_int(value):
        return int(value)
    if isinstance(value, numbers.Real) and not isinstance(value, bool):
        return float(value)
    return value


def stored_values(params: Mapping[str, Any]) -> dict[str, Any]:
    """The stored, not learned, parameters as model files keep them: preset settings written out resolved."""
    return {p.name: _json_value(effective(params, p.name)) for p in PARAMS if p.stored and p.learned is None}


def from_stored(meta: Mapping[str, Any]) -> dict[str, Any]:
    """Constructor parameters of a model file's metadata; keys that older files lack get the value those files
    meant (the paper's preset settings, the default threshold). Files from before ``DEFAULT_PRESET`` became
    "recommended" stored no preset name for the paper's preset, which was then the default: they load as "paper"."""
    out = {}
    for p in PARAMS:
        if not p.stored:
            continue
        fallback = PRESETS["paper"][p.name] if p.preset else p.default
        out[p.name] = meta.get(p.name, fallback)
    if out.get("preset") is None:
        out["preset"] = "paper"
    return out


# ----- command line --------------------------------------------------------------------------------------------
def add_options(parser: Any, names: Iterable[str], model_defaults: bool = False) -> None:
    """Add the CLI options of ``names`` to an argparse parser or group. ``model_defaults``: the default is None,
    meaning "the value stored in the model", and the help says so."""
    import argparse

    for name in names:
        p = BY_NAME[name]

        def parse(text: str, p: Param = p) -> Any:
            try:
                value = p.parse(text) if p.parse else text
                p.check(p.name, value)
            except (ValueError, GaussadError) as exc:
                raise argparse.ArgumentTypeError(str(exc)) from None
            return value

        if model_defaults:
            default, note = None, "default: the model's"
        elif p.preset:
            default, note = None, "default from --preset"
        else:
            default = p.default
            note = None if default is None else f"default {default}"
        kwargs: dict[str, Any] = {"default": default, "help": p.help + (f"; {note}" if note else "")}
        if p.choices is not None:
            kwargs["choices"] = p.choices  # spelled as text; from_args applies ``parse`` (e.g. "none" -> None)
        else:
            kwargs["type"] = parse
        if p.metavar:
            kwargs["metavar"] = p.metavar
        parser.add_argument(p.flag, dest=name, **kwargs)


def from_args(args: Any, names: Iterable[str]) -> dict[str, Any]:
    """The parameters of ``names`` from parsed CLI arguments (choice texts through their ``parse``)."""
    out = {}
    for name in names:
        p, value = BY_NAME[name], getattr(args, name)
        out[name] = p.parse(value) if p.choices is not None and p.parse is not None and value is not None else value
    return out


def cli_names(*groups: str) -> list[str]:
    """Names of the CLI parameters of the given groups, in table order."""
    return [p.name for p in PARAMS if p.flag is not None and p.group in groups]
