"""Choosing settings without a single defective image: the search behind ``gaussad tune``.

The training images are split (seeded) into a fit part and a held-out part. Every held-out good image is scored as
it is and, once more, with one synthetic defect pasted in (:func:`gaussad.tools.synthetic.add_defect`: a misplaced patch of
another training image, a scratch, a Perlin-noise blob or a colour spot, cycling in that order; masks known). Each
candidate setting of a grid is fitted on the fit part and ranked by the image AUROC of its image score on held-out
goods against synthetic defects, then by the pixel AUROC of its anomaly maps. Features are extracted once per
network input (input size, normalisation, resize, levels) and shared by every candidate that differs only in its
anomaly maps. The default (the base settings: measured as a candidate of its own when the grid lacks it) is kept
unless the best candidate is clearly better (:func:`choose`: by more than :data:`CLEARLY` standard errors of the
paired difference, over bootstrap draws of the held-out images); the chosen setting is refitted on all training
images.

Why not ``GaussianAD(preset="auto")``: a preset is a fixed table of settings that :func:`gaussad.detector.params.effective`
resolves *before* fitting (the feature extractor, validation and model files all read it), and ``fit_features``,
``partial_fit``, ``merge`` and the distributed fit see no pixels to paste defects into. A search inside ``fit``
would make ``get_params()`` stop describing the model. So, as scikit-learn keeps ``GridSearchCV`` beside the
estimators, the search is its own function and returns an ordinary fitted :class:`GaussianAD` whose parameters are
the chosen ones.
"""

from __future__ import annotations

import itertools
import json
import math
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Mapping, Sequence

from ..detector import params
from ..errors import DataError, InvalidParameterError

if TYPE_CHECKING:
    import numpy as np

    from ..intake.features import FeatureExtractor
    from ..detector.model import GaussianAD

# The command line builds its parser from GRIDS, so that importing this module stays light: numpy, the model and
# the network are imported by the functions that need them.

HELD_OUT = 0.2  # fraction of the searched training images held out as goods (and, with a defect, as defects)
MIN_IMAGES = 5  # at least 3 to fit and 2 held out
DEFAULT_BUDGET = 250  # training images the search uses at most (the final refit uses all)
MAP_SIDE = 224  # every candidate's pixel AUROC is measured on maps and masks of this side, whatever its input size
BASE: dict[str, Any] = {"preset": "recommended"}  # the settings a grid changes, before it changes them
SEARCH_ONLY = {"threshold": "chi2", "calibration": None, "verbose": False}  # no calibration fits during the search
# Below this many held-out goods (20 training images at HELD_OUT) the pixel AUROC rests on one or two pasted defects:
# its differences are noise (8 x 8 images, 2 held out: 0.645 to 0.745 over six settings tied at image AUROC), so
# ties on image AUROC keep grid order, the cheapest (native size, coarsest maps) first.
MIN_HELD_FOR_PIXELS = 4
# A candidate replaces the default only when it beats it by more than CLEARLY standard errors of the difference (a
# one-sided test at about 2 %): with a few dozen held-out images a +0.009 AUROC is noise, and the candidate may cost
# several times the default's scoring time. The standard errors come from BOOTSTRAP paired draws of the held-out
# goods and defects; a pixel AUROC draw uses PIXELS_PER_IMAGE seeded pixels of each drawn image.
CLEARLY = 2.0
BOOTSTRAP = 400
PIXELS_PER_IMAGE = 256


@dataclass(frozen=True)
class Scaled:
    """An input size relative to the backbone's native one: ``factor`` x native, rounded to a multiple of 32."""

    factor: float

    def size(self, native: int) -> int:
        return max(32, int(round(native * self.factor / 32)) * 32)


_SIZES = ("native", Scaled(10 / 7), Scaled(12 / 7))  # native, about 1.4x and 1.7x (224 -> 320 and 384 px)
_MAPS = ({"map_grid": "coarsest"},  # the backbone's map levels averaged down to the coarsest grid, a bank each
         {"map_grid": "finest", "map_levels": ("stage4", "stage5", "stage6", "stage7")})  # stride 16, one bank
# A grid: axis -> values. A value that is a mapping sets several parameters at once (the axis name is then only a
# label); any other value sets the parameter the axis is named after. A new parameter is one more line.
GRIDS: dict[str, dict[str, tuple]] = {
    "small": {"input_size": _SIZES, "maps": _MAPS},
    "sizes": {"input_size": _SIZES},
    "maps": {"maps": _MAPS},
    "scores": {"image_score": ("global", "fused")},
    "tiles": {"map_tiles": (1, 2, 3)},  # the global score does not change: the pixel AUROC decides
    "brightness": {"brightness": ("match", "keep")},  # the recommended preset's first, so a tie keeps it
    # the pretrained network first (every preset's), so a tie keeps it; 5 epochs at most, the validation choosing
    "adapt": {"adapt": (0, 5)},
}


def _image_score_global(model: GaussianAD, pooled: list[np.ndarray], amaps: np.ndarray | None,
                        fmaps: list | None) -> np.ndarray:
    return model.score_features(pooled)


def _image_score_map_max(model: GaussianAD, pooled: list[np.ndarray], amaps: np.ndarray | None,
                         fmaps: list | None) -> np.ndarray:
    return amaps.reshape(len(amaps), -1).max(axis=1)


def _image_score_fused(model: GaussianAD, pooled: list[np.ndarray], amaps: np.ndarray | None,
                       fmaps: list | None) -> np.ndarray:
    """The fused score a saved model gives (``image_score='fused'``): its global distances and map peaks."""
    return model.scores(model.level_scores_features(pooled), model.state_.map_peaks_of(fmaps))


# What an image score is called in the ranking, and how a candidate's is computed from (model, pooled features,
# anomaly maps, raw feature maps per image); the ranking uses the candidate's own ``image_score``.
IMAGE_SCORES: dict[str, Callable[[GaussianAD, list[np.ndarray], np.ndarray | None, list | None], np.ndarray]] = {
    "global": _image_score_global, "map-max": _image_score_map_max, "fused": _image_score_fused}
# A fused candidate is calibrated as its saved model will be (cross-conformal out-of-fold scores and
# leave-one-image-out map peaks, which its score is made of); the others skip calibration during the search.
FUSED_SEARCH = {"threshold": "conformal", "calibration": "cv"}


@dataclass
class TuneResult:
    """What :func:`tune` found: the ranking (best first), the chosen settings, and the model refitted with them."""

    ranking: list[dict[str, Any]]
    best_params: dict[str, Any]
    model: GaussianAD | None
    n_fit: int
    n_held_out: int
    seconds: float
    timings: dict[str, float] = field(default_factory=dict)
    choice: str = ""  # why the chosen setting was chosen (the default kept, or how much better the other one is)

    @property
    def chosen(self) -> dict[str, Any]:
        """The ranking's row of the chosen setting."""
        return next(r for r in self.ranking if r["chosen"])

    def to_json(self) -> dict[str, Any]:
        return {"best_params": _jsonable(self.best_params), "n_fit": self.n_fit, "n_held_out": self.n_held_out,
                "choice": self.choice, "chosen_rank": self.chosen["rank"],
                "seconds": round(self.seconds, 2), "timings": {k: round(v, 2) for k, v in self.timings.items()},
                "ranking": [{**r, "settings": _jsonable(r["settings"])} for r in self.ranking]}


def _jsonable(settings: Mapping[str, Any]) -> dict[str, Any]:
    return json.loads(json.dumps({k: list(v) if isinstance(v, tuple) else v for k, v in settings.items()}))


def candidates(grid: str | Mapping[str, Sequence[Any]], base: Mapping[str, Any] | None = None) -> list[dict[str, Any]]:
    """The settings of every point of ``grid`` (a name of :data:`GRIDS` or an axis -> values mapping), in grid
    order, each checked with the parameter table on top of ``base`` (default :data:`BASE`)."""
    base = dict(BASE if base is None else base)
    if isinstance(grid, str):
        if grid not in GRIDS:
            raise InvalidParameterError(f"unknown grid {grid!r}; choose one of: {', '.join(GRIDS)}")
        grid = GRIDS[grid]
    if not isinstance(grid, Mapping) or not grid:
        raise InvalidParameterError(f"a grid must be a non-empty mapping of axis -> values, got {grid!r}")
    from ..intake.backbones import get_spec

    native = get_spec(base.get("backbone", "efficientnet-lite0")).input_size
    axes = []
    for axis, values in grid.items():
        if isinstance(values, (str, bytes)) or not isinstance(values, Sequence) or not values:
            raise InvalidParameterError(f"grid axis {axis!r}: give a non-empty list of values, got {values!r}")
        options = []
        for value in values:
            option = dict(value) if isinstance(value, Mapping) else {axis: value}
            unknown = sorted(set(option) - set(params.BY_NAME))
            if unknown:
                raise InvalidParameterError(f"grid axis {axis!r}: {', '.join(unknown)} is not a GaussianAD parameter")
            if isinstance(option.get("input_size"), Scaled):
                option["input_size"] = option["input_size"].size(native)
            options.append(option)
        axes.append(options)
    out = []
    for combo in itertools.product(*axes):
        setting = {k: v for option in combo for k, v in option.items()}
        full = {**params.defaults(), **base, **setting}
        try:
            params.validate(full)
        except InvalidParameterError as exc:
            raise InvalidParameterError(f"grid setting {setting}: {exc}") from None
        if params.effective(full, "image_score") not in IMAGE_SCORES:
            raise InvalidParameterError(f"grid setting {setting}: tune ranks the image scores "
                                        f"{', '.join(IMAGE_SCORES)}, not {params.effective(full, 'image_score')!r}")
        out.append(setting)
    return out


def split(n: int, budget: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(fit, held-out) indices of ``n`` training images: at most ``budget`` of them drawn (seeded), :data:`HELD_OUT`
    of those (at least 2) held out."""
    import numpy as np

    if isinstance(budget, bool) or not isinstance(budget, (int, np.integer)) or budget < MIN_IMAGES:
        raise InvalidParameterError(f"budget must be an integer >= {MIN_IMAGES} (training images the search uses), "
                                    f"got {budget!r}")
    if n < MIN_IMAGES:
        raise DataError(f"tuning needs at least {MIN_IMAGES} training images (3 to fit, 2 held out), got {n}")
    used = np.random.default_rng(seed).permutation(n)[:budget]
    n_held = max(2, int(round(HELD_OUT * len(used))))
    return np.sort(used[n_held:]), np.sort(used[:n_held])


def _feature_key(setting: Mapping[str, Any]) -> str:
    """What shapes the network's input and pooled features (the table's extractor rows but the map levels, which a
    group extracts as the union of its members', and the engine and precision a search runs in): candidates with
    the same key share one extraction."""
    r = params.resolved(setting)
    return json.dumps({p.name: r[p.name] for p in params.PARAMS
                       if p.extractor and p.name not in ("map_levels", "engine", "precision")},
                      sort_keys=True, default=str)


def _map_level_indices(setting: Mapping[str, Any]) -> list[int]:
    from ..intake.backbones import get_spec, resolve_levels

    levels = params.effective(setting, "map_levels")
    if levels is None or (not isinstance(levels, (str, int)) and not list(levels)):
        return []
    return resolve_levels(get_spec(setting["backbone"]).level_names, levels)


def _own_pooled(pooled: list[np.ndarray], levels: list[int], spread: list[int], own: list[int]) -> list[np.ndarray]:
    """A candidate's pooled features from its group's extraction: the group pooled the spread (``pool='avg+std'``)
    of every level in ``spread`` (the members' map levels together); a level that is not among the candidate's own
    map levels ``own`` keeps only its average, the first half of its columns, as the candidate's model pools it."""
    return [p[:, :p.shape[1] // 2] if lv in spread and lv not in own else p for p, lv in zip(pooled, levels)]


def _score(setting: dict[str, Any], fit: tuple, held: tuple, extracted: FeatureExtractor, union: list[int],
           masks: np.ndarray, labels: np.ndarray) -> dict[str, Any]:
    """Fit one candidate on the fit part's features and measure it on the held-out goods and synthetic defects."""
    from .evaluate import roc_auc
    from ..detector.model import GaussianAD

    t0 = time.perf_counter()
    score = params.effective(setting, "image_score")
    own = _map_level_indices(setting)
    fit = (_own_pooled(fit[0], extracted.levels, extracted.spread_levels, own), fit[1])
    held = (_own_pooled(held[0], extracted.levels, extracted.spread_levels, own), held[1])
    model = GaussianAD(**{**setting, **SEARCH_ONLY, **(FUSED_SEARCH if score == "fused" else {})}).fit_features(
        fit[0], extracted.level_names)
    row: dict[str, Any] = {"settings": setting, "image_auroc": None, "global_auroc": None, "map_max_auroc": None,
                           "pixel_auroc": None}
    amaps = held_maps = None
    if own:
        pick = [union.index(i) for i in own]
        model.fit_map_features([[m[i] for i in pick] for m in fit[1]])
        held_maps = [[m[i] for i in pick] for m in held[1]]
        amaps = model.anomaly_map_features(held_maps, MAP_SIDE)
        row["map_max_auroc"] = roc_auc(labels, IMAGE_SCORES["map-max"](model, held[0], amaps, held_maps))
        row["pixel_auroc"] = roc_auc(masks.ravel(), amaps.ravel())
    row["global_auroc"] = roc_auc(labels, IMAGE_SCORES["global"](model, held[0], amaps, held_maps))
    row["image_score"] = score
    row["scores"] = IMAGE_SCORES[score](model, held[0], amaps, held_maps)
    row["image_auroc"] = roc_auc(labels, row["scores"])
    row["maps"] = amaps
    row["seconds"] = round(time.perf_counter() - t0, 2)
    return row


def _held_out_images(images: list, fit: np.ndarray, held: np.ndarray, seed: int, max_pixels: int
                     ) -> tuple[list[np.ndarray], np.ndarray]:
    """The held-out goods as arrays followed by the same images with one defect each; the masks (MAP_SIDE square)."""
    import numpy as np
    from PIL import Image

    from ..intake.images import load_image
    from .synthetic import PASTED_DEFECTS, add_defect

    goods, bad, masks = [], [], []
    for k, i in enumerate(held):
        good = np.asarray(load_image(images[i], int(i), max_pixels))
        donor_index = int(fit[(k * 7919) % len(fit)])  # another training image, spread over the fit part
        donor = np.asarray(load_image(images[donor_index], donor_index, max_pixels))
        image, mask = add_defect(good, donor, np.random.default_rng([seed, k]), PASTED_DEFECTS[k % len(PASTED_DEFECTS)])
        goods.append(good)
        bad.append(image)
        masks.append(np.asarray(Image.fromarray(mask).resize((MAP_SIDE, MAP_SIDE), Image.Resampling.NEAREST)))
    all_masks = np.concatenate([np.zeros((len(goods), MAP_SIDE, MAP_SIDE), bool), np.asarray(masks, bool)])
    return goods + bad, all_masks


def _rank_key(row: dict[str, Any], pixels: bool) -> tuple[float, float, int]:
    """Image AUROC, then (with ``pixels``) pixel AUROC, then grid order: ties go to the cheaper setting."""
    pixel = row["pixel_auroc"] if pixels and row["pixel_auroc"] is not None else -1.0
    return -row["image_auroc"], -pixel, row["candidate"]


def _in_use(setting: Mapping[str, Any], images: list) -> dict[str, Any]:
    """Every parameter's value as a fit on ``images`` would use it ('auto' decided): two settings that agree here
    give the same model."""
    from ..detector.resolve import resolve
    from ..intake.backbones import get_spec

    r = {k: v for k, v in resolve(setting, images).items() if k != "verbose"}
    if r["input_size"] is None and r["backbone"] is not None:  # 'native', spelled as the size 'auto' gives
        r["input_size"] = get_spec(r["backbone"]).input_size
    return r


def _paired_differences(best: dict[str, Any], default: dict[str, Any], labels: np.ndarray, masks: np.ndarray | None,
                        seed: int) -> tuple[float, float, float | None, float | None]:
    """How much ``best`` beats ``default`` on the held-out images: (image AUROC difference, its standard error, pixel
    AUROC difference, its standard error); the pixel pair is None without ``masks``. The standard errors are the
    spread of the differences over :data:`BOOTSTRAP` draws (with replacement, goods and defects apart) of the held-out
    images, both candidates scored on the same draw: their scores move together, which a per-candidate standard
    error ignores. A pixel draw reads every 8th row and column of the drawn images' maps."""
    import numpy as np

    from .evaluate import roc_auc

    rng = np.random.default_rng([seed, 35])
    goods, bad = np.flatnonzero(labels == 0), np.flatnonzero(labels == 1)
    with_pixels = masks is not None and best["maps"] is not None and default["maps"] is not None
    if with_pixels:
        cut = np.s_[:, ::8, ::8]
        maps = (best["maps"][cut], default["maps"][cut])
        truth = masks[cut]
    image_diffs, pixel_diffs = [], []
    for _ in range(BOOTSTRAP):
        idx = np.r_[rng.choice(goods, goods.size), rng.choice(bad, bad.size)]
        image_diffs.append(roc_auc(labels[idx], best["scores"][idx]) - roc_auc(labels[idx], default["scores"][idx]))
        if with_pixels and truth[idx].any():
            pixel_diffs.append(roc_auc(truth[idx], maps[0][idx]) - roc_auc(truth[idx], maps[1][idx]))
    d_image = best["image_auroc"] - default["image_auroc"]
    if not with_pixels or len(pixel_diffs) < 2:
        return d_image, float(np.std(image_diffs, ddof=1)), None, None
    return (d_image, float(np.std(image_diffs, ddof=1)), best["pixel_auroc"] - default["pixel_auroc"],
            float(np.std(pixel_diffs, ddof=1)))


def choose(ranking: list[dict[str, Any]], labels: np.ndarray, masks: np.ndarray, pixels: bool, seed: int
           ) -> tuple[dict[str, Any], str]:
    """The row to refit and why: the first of the ranking where it beats the default (the row marked ``default``) by
    more than :data:`CLEARLY` standard errors of the paired difference in image AUROC, or, where the two tie exactly
    on image AUROC (settings that change only the maps of a global image score), on pixel AUROC (with ``pixels``);
    else the default. The decisions are made on the image score: a better map alone does not replace the default
    where the image AUROCs differ within noise (on magnetic tile the synthetic defects' pixel AUROC favoured 384 px
    by 3.5 standard errors, a setting 7x slower whose real maps were worse: EXPERIMENTS.md, issue 35)."""
    default = next(r for r in ranking if r["default"])
    best = ranking[0]
    if best is default:
        return default, "the default ranks first"
    d_image, se_image, d_pixel, se_pixel = _paired_differences(best, default, labels, masks if pixels else None, seed)
    name = describe(best["settings"])
    if d_image > CLEARLY * se_image:
        return best, (f"{name} beats the default by {d_image:+.4f} image AUROC, "
                      f"{_in_errors(d_image, se_image)} standard errors of the difference")
    if d_image == 0 and d_pixel is not None and d_pixel > CLEARLY * se_pixel:
        return best, (f"{name} ties the default on image AUROC and beats it by {d_pixel:+.4f} pixel AUROC, "
                      f"{_in_errors(d_pixel, se_pixel)} standard errors of the difference")
    gains = f"{d_image:+.4f} image AUROC (SE of the difference {se_image:.4f})"
    if d_pixel is not None:
        gains += f", {d_pixel:+.4f} pixel AUROC (SE {se_pixel:.4f})"
    why = "" if pixels else f"; pixel AUROC not used below {MIN_HELD_FOR_PIXELS} held-out images"
    return default, (f"kept the default: the best, {name}, is not clearly better ({gains}; it must win by more than "
                     f"{CLEARLY:g} SE{why})")


def _in_errors(d: float, se: float) -> str:
    return "infinitely many" if se == 0 else f"{d / se:.1f}"


def _group_features(first: dict[str, Any], union: list[int], images: list, fit_files: list, scored: list,
                    timings: dict[str, float], verbose: bool) -> tuple[Any, tuple, tuple]:
    """The extractor of a group of settings that share their features (the union of their map levels), and the
    features of the fit part and of the held-out images (timed into ``timings``)."""
    from ..detector import resolve
    from ..intake.backbones import get_spec

    names = get_spec(first["backbone"]).level_names
    # input_size and map_tiles 'auto' decided as the refit on these images decides them
    settings = resolve.resolve({**first, **SEARCH_ONLY, "verbose": verbose, "map_levels": [names[i] for i in union]},
                               images)
    extractor = resolve.extractor(settings)
    t0 = time.perf_counter()
    if settings["adapt"]:  # the network fine-tuned on the fit part only, as a fit on it would be; never on held-out
        extractor.adapt(fit_files, settings["adapt"], settings["adapt_stop"], settings["random_state"], verbose=verbose)
        timings["adapt_s"] = timings.get("adapt_s", 0.0) + time.perf_counter() - t0
        t0 = time.perf_counter()
    size = extractor.input_size
    fit = resolve.features(extractor, fit_files, f"tune {size} px: fit", bool(union), verbose)
    held = resolve.features(extractor, scored, f"tune {size} px: held-out", bool(union), verbose)
    timings[f"features_{size}px_s"] = timings.get(f"features_{size}px_s", 0.0) + time.perf_counter() - t0
    return extractor, fit, held


def tune(images: Sequence[Any], *, grid: str | Mapping[str, Sequence[Any]] = "small", budget: int = DEFAULT_BUDGET,
         base: Mapping[str, Any] | None = None, seed: int = 0, refit: bool = True, verbose: bool = False
         ) -> TuneResult:
    """Rank the settings of ``grid`` on held-out good images against synthetic defects made from them, and (with
    ``refit``) fit the best on all ``images``. ``base``: the parameters the grid starts from (default
    :data:`BASE`, the recommended preset); its threshold and calibration apply to the refitted model only.
    The same images, grid, budget, base and seed give the same ranking and choice. The base itself is measured too
    (first, where the grid lacks a setting that fits the same model) and kept unless a candidate is clearly better
    (:func:`choose`); ties keep grid order."""
    import numpy as np

    from ..detector.model import GaussianAD
    from ..intake.images import image_list

    started = time.perf_counter()
    base = {**params.defaults(), **(BASE if base is None else base), "random_state": seed}
    images = image_list(images)
    points = candidates(grid, base)
    default = _in_use(base, images)
    same = [_in_use({**base, **c}, images) == default for c in points]
    if not any(same):
        points, same = [{}, *points], [True, *same]
    settings = [{**base, **c} for c in points]
    fit_idx, held_idx = split(len(images), budget, seed)
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    scored, masks = _held_out_images(images, fit_idx, held_idx, seed, int(base["max_pixels"]))
    timings["defects_s"] = time.perf_counter() - t0
    labels = np.r_[np.zeros(len(held_idx)), np.ones(len(held_idx))]
    fit_files = [images[i] for i in fit_idx]
    groups: dict[str, list[int]] = {}
    for i, s in enumerate(settings):
        groups.setdefault(_feature_key(s), []).append(i)
    bar = None
    if verbose:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(settings), desc="tune: settings", unit="setting", dynamic_ncols=True)
    rows: list[dict[str, Any] | None] = [None] * len(settings)
    try:
        for members in groups.values():
            union = sorted({lv for i in members for lv in _map_level_indices(settings[i])})
            extractor, fit, held = _group_features(settings[members[0]], union, images, fit_files, scored, timings,
                                                   verbose)
            for i in members:
                rows[i] = {"candidate": i, "default": same[i] and i == same.index(True),
                           **_score(settings[i], fit, held, extractor, union, masks, labels),
                           # an adapted network: the epoch its validation kept (0: the pretrained one)
                           **({"adapt_kept_epoch": extractor.adaptation["kept_epoch"]} if extractor.adaptation
                              else {})}
                if bar is not None:
                    bar.update(1)
            del fit, held
    finally:
        if bar is not None:
            bar.close()
    pixels = len(held_idx) >= MIN_HELD_FOR_PIXELS
    ranking = sorted((r for r in rows if r is not None), key=lambda r: _rank_key(r, pixels))
    for rank, r in enumerate(ranking, 1):
        r["rank"] = rank
        r["settings"] = changed(r["settings"], base)
    pick, choice = choose(ranking, labels, masks, pixels, seed)
    for r in ranking:
        r["chosen"] = r is pick
        del r["scores"], r["maps"]
    best = {**base, **pick["settings"]}
    best_params = {k: v for k, v in best.items() if k != "verbose"}
    model = None
    if refit:
        t0 = time.perf_counter()
        model = GaussianAD(**{**best_params, "verbose": verbose}).fit(images)
        timings["refit_s"] = time.perf_counter() - t0
    return TuneResult(ranking, best_params, model, len(fit_idx), len(held_idx), time.perf_counter() - started, timings,
                      choice)


def changed(setting: Mapping[str, Any], base: Mapping[str, Any]) -> dict[str, Any]:
    """The parameters of ``setting`` that differ from ``base`` (what a grid point sets)."""
    return {k: v for k, v in setting.items() if base.get(k) != v}


def describe(setting: Mapping[str, Any]) -> str:
    """One short text for a setting: ``input_size=320 map_grid=finest map_levels=stage4,...``."""
    if not setting:
        return "(the default)"
    parts = []
    for k, v in setting.items():
        text = "native" if v is None else ",".join(map(str, v)) if isinstance(v, (list, tuple)) else str(v)
        parts.append(f"{k}={text}")
    return " ".join(parts)


def as_flags(setting: Mapping[str, Any]) -> str:
    """A setting as the command-line flags that give it (``--input-size 384 --map-grid finest``)."""
    parts = []
    for k, v in setting.items():
        text = "native" if v is None else ",".join(map(str, v)) if isinstance(v, (list, tuple)) else str(v)
        flag = params.BY_NAME[k].flag if k in params.BY_NAME else None
        parts.append(f"{flag} {text}" if flag else f"{k}={text}")
    return " ".join(parts) or "(the base setting: no flags)"


def auroc_se(auroc: float, n_good: int, n_bad: int) -> float:
    """The standard error of an AUROC from ``n_good`` and ``n_bad`` images (Hanley and McNeil 1982, Radiology 143):
    how far apart two candidates' image AUROCs must be before the held-out images tell them apart."""
    a = min(max(float(auroc), 1e-9), 1 - 1e-9)
    q1, q2 = a / (2 - a), 2 * a * a / (1 + a)
    var = (a * (1 - a) + (n_bad - 1) * (q1 - a * a) + (n_good - 1) * (q2 - a * a)) / (n_good * n_bad)
    return math.sqrt(max(var, 0.0))


def _marks(row: dict[str, Any]) -> str:
    return "/".join(m for m, on in (("default", row["default"]), ("chosen", row["chosen"])) if on)


def format_ranking(result: TuneResult) -> str:
    """The ranking as a plain-text table, best first: each candidate's image AUROC with its standard error (the
    held-out images are few: differences within about two standard errors are noise) and its cost."""
    head = ["rank", "image AUROC", "+/- SE", "global", "map max", "pixel AUROC", "fit+score s", "", "setting"]
    fmt = lambda v: "-" if v is None else f"{v:.4f}"  # noqa: E731
    se = lambda v: "-" if v is None else f"{auroc_se(v, result.n_held_out, result.n_held_out):.4f}"  # noqa: E731
    rows = [[str(r["rank"]), fmt(r["image_auroc"]), se(r["image_auroc"]), fmt(r["global_auroc"]), fmt(r["map_max_auroc"]),
             fmt(r["pixel_auroc"]), f"{r['seconds']:.1f}", _marks(r),
             describe(r["settings"]) + (f" (kept epoch {r['adapt_kept_epoch']})" if "adapt_kept_epoch" in r else "")]
            for r in result.ranking]
    widths = [max(len(x) for x in col) for col in zip(head, *rows)]
    line = lambda cells: "  ".join(c.ljust(w) for c, w in zip(cells, widths)).rstrip()  # noqa: E731
    title = (f"held-out goods vs synthetic defects ({result.n_held_out} + {result.n_held_out}; fitted on "
             f"{result.n_fit}); ranked by image AUROC of the image score "
             f"({result.ranking[0]['image_score']}), then "
             f"{'pixel AUROC' if result.n_held_out >= MIN_HELD_FOR_PIXELS else 'grid order (too few held out for pixel AUROC)'}")
    return "\n".join([title, line(head), line(["-" * w for w in widths])] + [line(r) for r in rows])
