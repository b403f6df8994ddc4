"""The detector: pretrained multi-level features -> one Gaussian per level -> Mahalanobis scores."""

from __future__ import annotations

import math
import numbers
import os
from typing import Sequence

import numpy as np

from . import __version__, maps
from .backbones import get_spec, resolve_levels
from .bank import NearestBank
from .engine import resolve_engine
from .errors import DataError, GaussadError
from .features import NORMALIZATIONS, FeatureExtractor
from .gaussian import ESTIMATORS, MAX_ABS, REDUCTIONS, LevelGaussian, MomentStats
from .images import DEFAULT_MAX_PIXELS, RESIZES, ImageSource, check_max_pixels
from .threshold import (
    METHODS,
    chi2_pvalue,
    chi2_threshold,
    conformal_pvalue,
    conformal_threshold,
    hotelling_pvalue,
    hotelling_threshold,
)


# Backbone features are float32: a relative spread below its rounding level means identical images.
IDENTICAL_SPREAD_FLOAT32 = (64.0 * float(np.finfo(np.float32).eps)) ** 2

PRESETS: dict[str, dict] = {
    # The paper's recipe: ImageNet mean/std, global features only.
    "paper": {"normalize": "imagenet", "resize": "square", "map_levels": (), "map_method": "gaussian", "map_pool": 1},
    # Measured best here (EXPERIMENTS.md): the backbone's own input normalisation, the images' proportions kept,
    # and nearest-neighbour anomaly maps over 3 x 3 neighbourhoods of stage2-stage7 on the stage7 grid.
    "recommended": {"normalize": "native", "resize": "aspect",
                    "map_levels": ("stage2", "stage3", "stage4", "stage5", "stage6", "stage7"),
                    "map_method": "nearest", "map_pool": 3},
}
MAP_METHODS = ("gaussian", "nearest")


def _progress(total: int, desc: str, enabled: bool):
    """A tqdm bar on stderr, or None when progress is off."""
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="img", leave=False, dynamic_ncols=True)


class GaussianAD:
    """Anomaly detector of Rippel et al. (ICPR 2020), in scikit-learn style.

    ``fit`` learns a Gaussian per feature level from normal images; ``score_samples`` returns the mean over
    levels of the Mahalanobis distances (higher = more anomalous).  ``threshold`` (``chi2``, ``hotelling`` or
    ``conformal``) and ``fpr`` are the default decision rule of ``predict``/``decide``; ``calibration``, a
    fraction of the training images, is held out for conformal calibration scores before refitting on all.
    ``max_pixels`` caps the size of image files read (a decompression-bomb guard); it is an intake setting and is
    not stored in model files. ``map_levels``, ``map_method`` (``gaussian`` or ``nearest``), ``map_pool`` and
    ``map_coreset`` set the anomaly maps (:meth:`anomaly_map`); ``resize`` is ``square`` (the paper's) or
    ``aspect``; settings left at None come from ``preset`` (``paper`` by default, or ``recommended``).
    """

    def __init__(
        self,
        backbone: str | None = "efficientnet-lite0",
        levels: Sequence[int | str] | None = None,
        input_size: int | None = None,
        weights: str | os.PathLike | None = None,
        estimator: str = "ledoit-wolf",
        reduction: str | None = None,
        variance: float = 0.99,
        normalize: str | None = None,
        resize: str | None = None,
        map_levels: Sequence[int | str] | None = None,
        map_method: str | None = None,
        map_pool: int | None = None,
        map_coreset: float = 0.1,
        preset: str | None = None,
        threshold: str = "chi2",
        fpr: float = 0.01,
        calibration: float | None = None,
        random_state: int = 0,
        batch_size: int = 16,
        engine: str = "auto",
        verbose: bool = False,
        max_pixels: int = DEFAULT_MAX_PIXELS,
    ):
        self.backbone = backbone
        self.levels = levels
        self.input_size = input_size
        self.weights = weights
        self.estimator = estimator
        self.reduction = reduction
        self.variance = variance
        self.normalize = normalize
        self.resize = resize
        self.map_levels = map_levels
        self.map_method = map_method
        self.map_pool = map_pool
        self.map_coreset = map_coreset
        self.preset = preset
        self.threshold = threshold
        self.fpr = fpr
        self.calibration = calibration
        self.random_state = random_state
        self.batch_size = batch_size
        self.engine = engine
        self.verbose = verbose
        self.max_pixels = max_pixels

    # ----- parameters and features -------------------------------------------------------------
    def get_params(self) -> dict:
        """Constructor parameters, as scikit-learn's ``get_params``."""
        names = ("backbone", "levels", "input_size", "weights", "estimator", "reduction", "variance", "normalize",
                 "resize", "map_levels", "map_method", "map_pool", "map_coreset", "preset", "threshold", "fpr",
                 "calibration", "random_state", "batch_size", "verbose", "max_pixels", "engine")
        return {n: getattr(self, n) for n in names}

    def _validate_params(self) -> None:
        if self.estimator not in ESTIMATORS:
            raise GaussadError(f"unknown estimator {self.estimator!r}; choose one of: {', '.join(ESTIMATORS)}")
        if self.reduction not in REDUCTIONS:
            raise GaussadError(f"unknown reduction {self.reduction!r}; choose one of: none, pca, npca")
        if self.reduction is not None and not 0.0 < float(self.variance) < 1.0:
            raise GaussadError(f"variance must lie strictly between 0 and 1, got {self.variance}")
        if self.preset is not None and self.preset not in PRESETS:
            raise GaussadError(f"unknown preset {self.preset!r}; choose one of: {', '.join(PRESETS)}")
        if self._setting("normalize") not in NORMALIZATIONS:
            raise GaussadError(f"unknown normalize {self.normalize!r}; choose one of: {', '.join(NORMALIZATIONS)}")
        if self._setting("resize") not in RESIZES:
            raise GaussadError(f"unknown resize {self.resize!r}; choose one of: {', '.join(RESIZES)}")
        if self._setting("map_method") not in MAP_METHODS:
            raise GaussadError(f"unknown map_method {self.map_method!r}; choose one of: {', '.join(MAP_METHODS)}")
        pool = self._setting("map_pool")
        if isinstance(pool, bool) or not isinstance(pool, numbers.Integral) or pool < 1 or pool % 2 == 0:
            raise GaussadError(f"map_pool must be an odd integer >= 1 (a neighbourhood side), got {pool!r}")
        if not 0.0 < float(self.map_coreset) <= 1.0:
            raise GaussadError(f"map_coreset must be a fraction in (0, 1], got {self.map_coreset}")
        if int(self.batch_size) < 1:
            raise GaussadError(f"batch_size must be >= 1, got {self.batch_size}")
        check_max_pixels(self.max_pixels)
        if self.threshold not in METHODS:
            raise GaussadError(f"unknown threshold {self.threshold!r}; choose one of: {', '.join(METHODS)}")
        if not 0.0 < float(self.fpr) < 1.0:
            raise GaussadError(f"fpr must lie strictly between 0 and 1, got {self.fpr}")
        if self.calibration is not None and not 0.0 < float(self.calibration) < 1.0:
            raise GaussadError(f"calibration must be a fraction strictly between 0 and 1, got {self.calibration}")
        if self.random_state is not None and (isinstance(self.random_state, bool)
                                              or not isinstance(self.random_state, numbers.Integral)):
            raise GaussadError(f"random_state must be an integer or None, got {self.random_state!r}")
        if self.threshold == "conformal" and self.calibration is None:
            raise GaussadError("threshold='conformal' needs calibration scores of held-out normal images: "
                               "set calibration (e.g. 0.2; CLI: --calibration 0.2), or fit and then call calibrate(images)")
        resolve_engine(self.engine)

    def _setting(self, name: str):
        """An explicit constructor value, else the preset's (the paper's recipe when no preset is given)."""
        value = getattr(self, name)
        return PRESETS[self.preset or "paper"][name] if value is None else value

    def _extractor(self) -> FeatureExtractor:
        """The feature extractor for this model's backbone (built once, cached)."""
        cached = getattr(self, "_extractor_cache", None)
        if cached is not None:
            return cached
        if self.backbone is None:
            raise GaussadError("this model works on plain feature arrays (backbone=None): use fit_features/score_features")
        levels = getattr(self, "levels_", None)
        if levels is None:
            levels = self.levels
        map_levels = getattr(self, "map_levels_", None)
        if map_levels is None:
            map_levels = self._setting("map_levels")
        extractor = FeatureExtractor(
            self.backbone, levels, getattr(self, "input_size_", None) or self.input_size, self.weights, self.batch_size,
            normalize=self._setting("normalize"), map_levels=map_levels, max_pixels=self.max_pixels,
            engine=self.engine, resize=self._setting("resize"),
        )
        self._extractor_cache = extractor
        return extractor

    def extract_features(self, images: Sequence[ImageSource], desc: str = "features", on_error: str = "fail",
                         skipped: list | None = None) -> list[np.ndarray]:
        """Per-level pooled features of ``images``; with ``on_error="skip"`` unreadable images are left out
        and ``(index, message)`` pairs appended to ``skipped``."""
        images = list(images)
        bar = _progress(len(images), desc, self.verbose)
        try:
            return self._extractor().extract(images, bar, on_error, skipped)
        finally:
            if bar is not None:
                bar.close()

    # ----- fitting ------------------------------------------------------------------------------
    def fit(self, images: Sequence[ImageSource], y=None, *, on_error: str = "fail") -> "GaussianAD":
        """Learn one Gaussian per level from normal images (paths, PIL images or uint8 arrays).

        ``on_error="skip"`` leaves out unreadable images and lists them in ``skipped_``.  With ``calibration``
        set, that fraction of the images is held out, scored by a model fitted on the rest
        (``calibration_scores_``), and the final model is then fitted on all images.
        """
        self._validate_params()
        self._reset()
        images = list(images)
        if len(images) < 2:
            raise DataError(f"need at least 2 training images, got {len(images)}")
        split = self._calibration_split(len(images))
        parts = self._bank_parts()
        if split is None:
            stats, map_stats = self._accumulate(images, None, None, on_error, bank_parts=parts)
            return self._fit_checked(stats, map_stats, parts)
        keep, held = split
        stats, map_stats = self._accumulate([images[i] for i in keep], None, None, on_error, positions=keep,
                                            bank_parts=parts)
        self._fit_from_stats(stats, map_stats)
        batches: list = []
        all_stats, all_maps = self._accumulate([images[i] for i in held], stats, map_stats, on_error, positions=held,
                                               collect=batches, bank_parts=parts)
        held_features = [np.concatenate(level) for level in zip(*batches)] if batches else None
        return self._fit_calibrated(held_features, all_stats, all_maps, parts)

    def partial_fit(self, images: Sequence[ImageSource], y=None, *, on_error: str = "fail") -> "GaussianAD":
        """Add images to the running statistics and refit; chunks give the same statistics as one ``fit``.

        Memory banks of ``nearest`` maps keep their members and add the new images' locations greedily, so with a
        coreset below 1 they differ from one fit's banks. ``calibration`` is not applied here and earlier calibration scores are dropped (they belong to the
        previous model): call :meth:`calibrate` on held-out normal images after the last chunk.
        """
        self._validate_params()
        images = list(images)
        parts = self._bank_parts()
        stats, map_stats = self._accumulate(images, getattr(self, "stats_", None), getattr(self, "map_stats_", None),
                                            on_error, bank_parts=parts)
        self.__dict__.pop("calibration_scores_", None)
        return self._fit_from_stats(stats, map_stats, parts, allow_few=True)

    def fit_features(self, features: Sequence[np.ndarray]) -> "GaussianAD":
        """Fit from plain per-level feature arrays (n, d_l), for users with their own features."""
        self._validate_params()
        self._reset()
        feats = self._check_features(features, fitted=False)
        n = feats[0].shape[0]
        if n < 2:
            raise DataError(f"need at least 2 training samples, got {n}")
        split = self._calibration_split(n)
        if split is None:
            return self._fit_checked([MomentStats.from_array(f) for f in feats])
        keep, held = split
        stats = [MomentStats.from_array(f[keep]) for f in feats]
        self._fit_from_stats(stats)
        held_features = [f[held] for f in feats]
        return self._fit_calibrated(held_features, [s.update(f) for s, f in zip(stats, held_features)])

    def partial_fit_features(self, features: Sequence[np.ndarray]) -> "GaussianAD":
        """Add plain per-level feature arrays to the running statistics and refit (drops calibration scores)."""
        self._validate_params()
        prev = getattr(self, "stats_", None)
        feats = self._check_features(features, fitted=prev is not None)
        stats = [MomentStats.from_array(f) if prev is None else s.update(f) for s, f in zip(prev or feats, feats)]
        self.__dict__.pop("calibration_scores_", None)
        return self._fit_from_stats(stats, allow_few=True)

    def calibrate(self, images: Sequence[ImageSource], *, on_error: str = "fail") -> "GaussianAD":
        """Set ``calibration_scores_`` from held-out normal images scored by this fitted model (for conformal)."""
        self._check_fitted()
        return self.calibrate_features(self.extract_features(list(images), "calibration", on_error))

    def calibrate_features(self, features: Sequence[np.ndarray]) -> "GaussianAD":
        """Set ``calibration_scores_`` from plain per-level features of held-out normal samples."""
        scores = self.score_features(features)
        if scores.size == 0:
            raise DataError("no calibration samples given")
        self.calibration_scores_ = scores
        return self

    def _calibration_split(self, n: int) -> tuple[np.ndarray, np.ndarray] | None:
        """(fit, held-out) indices for ``calibration``: ceil(fraction * n) held out, by a seeded permutation."""
        if self.calibration is None:
            return None
        n_cal = math.ceil(float(self.calibration) * n)
        if n - n_cal < 2:
            raise DataError(f"calibration={self.calibration} holds out {n_cal} of {n} images, leaving fewer than 2 "
                            "to fit on")
        order = np.random.default_rng(self.random_state).permutation(n)
        return np.sort(order[n_cal:]), np.sort(order[:n_cal])

    def _fit_calibrated(self, held: list[np.ndarray] | None, stats: list[MomentStats],
                        map_stats: list[MomentStats] | None = None, bank_parts: list | None = None) -> "GaussianAD":
        """Score the held-out features with the current model (fitted without them), then refit on all ``stats``."""
        if held is None or held[0].shape[0] == 0:
            raise DataError("none of the calibration images could be read")
        scores = self.score_features(held)
        self._fit_checked(stats, map_stats, bank_parts)
        self.calibration_scores_ = scores
        return self

    def _fit_checked(self, stats: list[MomentStats], map_stats: list[MomentStats] | None = None,
                     bank_parts: list | None = None) -> "GaussianAD":
        """Fit from the statistics and check that the chosen threshold can be computed for this model."""
        self._fit_from_stats(stats, map_stats, bank_parts)
        if self.threshold == "hotelling":
            self._check_hotelling()
        return self

    def merge(self, other: "GaussianAD") -> "GaussianAD":
        """A new model fitted on the union of both models' training data (same settings required; memory banks are
        joined as they are)."""
        for attr in ("backbone", "levels_", "input_size_", "feature_dims_"):
            if getattr(self, attr, None) != getattr(other, attr, None):
                raise GaussadError(f"cannot merge models that differ in {attr.rstrip('_')}")
        if getattr(self, "map_levels_", []) != getattr(other, "map_levels_", []):
            raise GaussadError("cannot merge models that differ in map levels")
        for name in ("map_method", "map_pool"):
            if self._setting(name) != other._setting(name):
                raise GaussadError(f"cannot merge models that differ in {name}")
        merged = GaussianAD(**self.get_params())
        for attr in ("levels_", "level_names_", "input_size_", "map_levels_", "map_level_names_"):
            setattr(merged, attr, getattr(self, attr, None) or [])
        merged.input_size_ = self.input_size_
        merged._validate_params()
        map_stats = [a.merge(b) for a, b in zip(self.map_stats_, other.map_stats_)] if self.map_stats_ else None
        merged.map_banks_ = [a.merge(b) for a, b in zip(self.map_banks_, other.map_banks_)]
        return merged._fit_from_stats([a.merge(b) for a, b in zip(self.stats_, other.stats_)], map_stats)

    def _reset(self) -> None:
        for attr in ("stats_", "gaussians_", "levels_", "level_names_", "input_size_", "feature_dims_", "n_samples_",
                     "skipped_", "map_levels_", "map_level_names_", "map_stats_", "map_gaussians_", "map_banks_",
                     "calibration_scores_"):
            self.__dict__.pop(attr, None)
        self.__dict__.pop("_extractor_cache", None)

    def _accumulate(self, images: list, prev: list[MomentStats] | None, prev_maps: list[MomentStats] | None,
                    on_error: str, positions: Sequence[int] | None = None, collect: list | None = None,
                    bank_parts: list | None = None) -> tuple[list[MomentStats], list[MomentStats] | None]:
        """Stream images through the backbone, folding each batch into the moment statistics of the pooled
        features and (when map levels are set) either the statistics of every location of the feature maps
        (``gaussian`` maps) or, per level, the location vectors with their image ids into ``bank_parts``.

        ``positions`` are the images' indices in the caller's list (to name skipped in-memory images, and as image
        ids after those already in the banks); ``collect``, when given, receives each batch of pooled features.
        """
        from .images import describe

        extractor = self._extractor()
        skipped: list = []
        if prev is None:
            self.levels_ = list(extractor.levels)
            self.level_names_ = list(extractor.level_names)
            self.input_size_ = extractor.input_size
            self.map_levels_ = list(extractor.map_levels)
            self.map_level_names_ = list(extractor.map_level_names)
        stats, map_stats = prev, prev_maps
        pos = list(range(len(images))) if positions is None else [int(p) for p in positions]
        first_id = max((int(b.ids.max()) + 1 for b in getattr(self, "map_banks_", []) if b.ids.size), default=0)
        bar = _progress(len(images), "fit", self.verbose)
        try:
            for idx, batch, fmaps in extractor.iter_features_and_maps(images, bar, on_error, skipped):
                finite = np.all([np.isfinite(b).all(axis=1) for b in batch], axis=0)
                if not finite.all():
                    first = int(idx[np.argmin(finite)])
                    raise DataError(f"{describe(images[first], pos[first])}: the backbone gave NaN or infinite features "
                                    f"for {int((~finite).sum())} image(s) of this batch (damaged weights file?)")
                if collect is not None:
                    collect.append(batch)
                stats = [MomentStats.from_array(b) for b in batch] if stats is None else [
                    s.update(b) for s, b in zip(stats, batch)
                ]
                if fmaps:
                    map_stats = self._fold_maps(map_stats, bank_parts, fmaps,
                                                first_id + np.asarray([pos[i] for i in idx], dtype=np.int64))
        finally:
            if bar is not None:
                bar.close()
        self.skipped_ = getattr(self, "skipped_", []) + [(describe(images[i], pos[i]), msg) for i, msg in skipped]
        if stats is None:
            raise DataError("no readable training images given")
        self._check_spread(stats)
        return stats, map_stats

    def _check_spread(self, stats: list[MomentStats]) -> None:
        """Refuse training images whose features vary only at float32 rounding level (identical images)."""
        if self.estimator == "l2" and self.reduction is None:
            return
        for name, s in zip(self.level_names_, stats):
            if s.n >= 2 and s.relative_spread() <= IDENTICAL_SPREAD_FLOAT32:
                raise DataError(f"the {s.n} training images give identical features at level {name} (up to float32 "
                                "rounding): there is no variation to model; use images that show the normal variation")

    def _fold_maps(self, map_stats: list[MomentStats] | None, bank_parts: list | None, fmaps: Sequence[np.ndarray],
                   image_ids: np.ndarray) -> list[MomentStats] | None:
        """Add a batch of raw feature maps (images ``image_ids``) to the map statistics, or with ``bank_parts`` to
        the location vectors collected per level for the memory banks; returns the map statistics."""
        fmaps = self._map_inputs(fmaps)
        if bank_parts is None:
            return maps.accumulate(map_stats, fmaps)
        for level, f in zip(bank_parts, fmaps):
            level.append((maps.patch_vectors(f, np.float32), np.repeat(image_ids, f.shape[2] * f.shape[3])))
        return map_stats

    def _bank_parts(self) -> list | None:
        """Per-map-level lists to collect location vectors into when this model's maps use memory banks."""
        if self._setting("map_method") != "nearest":
            return None
        levels = getattr(self, "map_levels_", None) if hasattr(self, "stats_") else None
        wanted = self._setting("map_levels") if levels is None else levels
        return [[] for _ in wanted or ()]

    def _fit_banks(self, bank_parts: list | None) -> list[NearestBank]:
        """Banks extended with the collected location vectors (new banks when there are none yet)."""
        banks = getattr(self, "map_banks_", None) or []
        if not bank_parts or not bank_parts[0]:
            return banks
        seed = 0 if self.random_state is None else int(self.random_state)
        out = []
        for i, level in enumerate(bank_parts):
            vectors = np.concatenate([v for v, _ in level])
            ids = np.concatenate([k for _, k in level])
            level.clear()  # the per-batch copies are no longer needed: keeps the peak memory to one level's copy
            try:
                out.append(NearestBank.build(vectors, ids, float(self.map_coreset), seed, banks[i] if banks else None))
            except ValueError as exc:
                raise DataError(f"map level {self.map_level_names_[i]}: {exc}") from None
        return out

    def _fit_from_stats(self, stats: list[MomentStats], map_stats: list[MomentStats] | None = None,
                        bank_parts: list | None = None, allow_few: bool = False) -> "GaussianAD":
        n = stats[0].n
        banks = self._fit_banks(bank_parts)
        if n < 2:
            if allow_few:
                self.stats_, self.map_stats_, self.map_banks_ = stats, map_stats, banks
                return self
            raise DataError(f"need at least 2 training samples, got {n}")
        try:
            gaussians = [LevelGaussian.fit(s, self.estimator, self.reduction, float(self.variance)) for s in stats]
            map_gaussians = [LevelGaussian.fit(s, "ledoit-wolf") for s in map_stats or []]
        except ValueError as exc:
            raise DataError(str(exc)) from None
        self.stats_ = stats
        self.gaussians_ = gaussians
        self.map_stats_ = map_stats or []
        self.map_gaussians_ = map_gaussians
        self.map_banks_ = banks
        self.feature_dims_ = [s.dim for s in stats]
        self.n_samples_ = n
        if not hasattr(self, "levels_"):
            self.levels_ = list(range(len(stats)))
            self.level_names_ = [f"level{i}" for i in range(len(stats))]
            self.input_size_ = None
            self.map_levels_, self.map_level_names_ = [], []
        return self

    def _check_features(self, features: Sequence[np.ndarray], fitted: bool) -> list[np.ndarray]:
        if isinstance(features, np.ndarray):
            features = [features]
        feats = [np.asarray(f, dtype=np.float64) for f in features]
        if any(f.ndim != 2 for f in feats):
            raise DataError("features must be a list of 2-D arrays (n_samples, n_features), one per level")
        if len({f.shape[0] for f in feats}) != 1:
            raise DataError("every level must have the same number of samples")
        if fitted:
            dims = [f.shape[1] for f in feats]
            if dims != self.feature_dims_:
                raise DataError(f"feature dimensions {dims} do not match the fitted model's {self.feature_dims_}")
        for i, f in enumerate(feats):
            bad = int((~np.isfinite(f)).any(axis=1).sum())
            if bad:
                raise DataError(f"level {i}: {bad} sample(s) have NaN or infinite features")
            if f.size and np.abs(f).max() > MAX_ABS:
                raise DataError(f"level {i}: feature values up to {np.abs(f).max():.3g} exceed {MAX_ABS:.0e}, where "
                                "the moment statistics would overflow; rescale the features")
        return feats

    # ----- scoring ------------------------------------------------------------------------------
    def _check_fitted(self) -> None:
        if getattr(self, "gaussians_", None) is None:
            raise GaussadError("this GaussianAD is not fitted yet: call fit first")

    def level_scores_features(self, features: Sequence[np.ndarray]) -> np.ndarray:
        """Mahalanobis distance of each sample to each level's Gaussian: (n, n_levels)."""
        self._check_fitted()
        feats = self._check_features(features, fitted=True)
        try:
            scores = np.stack([g.distances(f) for g, f in zip(self.gaussians_, feats)], axis=1)
        except ValueError as exc:
            raise DataError(str(exc)) from None
        if np.isnan(scores).any():
            raise DataError("the model gives NaN distances: its statistics are damaged (a forged model file?)")
        return scores

    def score_features(self, features: Sequence[np.ndarray]) -> np.ndarray:
        """Image scores from plain features: the mean over levels of the distances."""
        return self.level_scores_features(features).mean(axis=1)

    def level_scores(self, images: Sequence[ImageSource]) -> np.ndarray:
        """Per-level Mahalanobis distances of images: (n, n_levels)."""
        self._check_fitted()
        return self.level_scores_features(self.extract_features(images, "score"))

    def score_samples(self, images: Sequence[ImageSource]) -> np.ndarray:
        """Anomaly score of each image (mean over levels of the distances; higher = more anomalous)."""
        return self.level_scores(images).mean(axis=1)

    def anomaly_map(self, images: Sequence[ImageSource]) -> np.ndarray:
        """Per-location anomaly maps at the model's input resolution: (n, S, S) float32.

        Location vectors are first averaged over ``map_pool`` x ``map_pool`` neighbourhoods. ``gaussian`` maps:
        each map level has one Gaussian shared by all positions, a location's value is its Mahalanobis distance
        divided by sqrt(dof). ``nearest`` maps: a location's value is its distance to the nearest vector of the
        level's memory bank divided by the bank's scale. Either way typical normal locations score about 1; levels
        are averaged after bilinear upsampling. Resize to an image's own size with :func:`gaussad.maps.upsample`.
        """
        return self.score_with_maps(images)[1]

    def score_with_maps(self, images: Sequence[ImageSource], on_error: str = "fail",
                        skipped: list | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Per-level distances (n, L) and anomaly maps (n, S, S) from one pass over the images."""
        self._check_fitted()
        if not self.has_maps:
            raise GaussadError("this model has no anomaly maps: fit it with map_levels (or preset='recommended')")
        from threadpoolctl import threadpool_limits

        images = list(images)
        bar = _progress(len(images), "score", self.verbose)
        pooled, out_maps = [], []
        # Map products are small: one BLAS thread, so that idle BLAS threads do not spin on the cores the inference
        # engine needs (BENCHMARKS.md: maps cost x2.15 of scoring without this limit, x1.87 with it).
        try:
            with threadpool_limits(1, user_api="blas"):
                for _, batch, fmaps in self._extractor().iter_features_and_maps(images, bar, on_error, skipped):
                    pooled.append(batch)
                    out_maps.append(maps.combine(self._level_maps(fmaps), self.input_size_))
        finally:
            if bar is not None:
                bar.close()
        if not pooled:
            return np.zeros((0, len(self.gaussians_))), np.zeros((0, self.input_size_, self.input_size_), np.float32)
        feats = [np.concatenate(level) for level in zip(*pooled)]
        return self.level_scores_features(feats), np.concatenate(out_maps)

    def fit_map_features(self, per_image: Sequence[Sequence[np.ndarray]]) -> "GaussianAD":
        """Fit only the anomaly-map part from raw feature maps of normal images (per image, one (C, H, W) array per
        map level), replacing any earlier one; for evaluation harnesses that reuse extracted feature maps."""
        self._validate_params()
        if len(per_image) < 2:
            raise DataError(f"need feature maps of at least 2 training images, got {len(per_image)}")
        if not getattr(self, "map_levels_", None):
            if self.backbone is not None:
                names = get_spec(self.backbone).level_names
                self.map_levels_ = resolve_levels(names, self._setting("map_levels"))
                self.map_level_names_ = [names[i] for i in self.map_levels_]
            else:
                self.map_levels_ = list(range(len(per_image[0])))
                self.map_level_names_ = [f"map{i}" for i in self.map_levels_]
        if len(self.map_levels_) != len(per_image[0]):
            raise DataError(f"feature maps of {len(per_image[0])} levels given, the model has {len(self.map_levels_)} "
                            "map levels")
        self.map_banks_, self.map_gaussians_, self.map_stats_ = [], [], []
        parts = [[] for _ in per_image[0]] if self._setting("map_method") == "nearest" else None
        stats = None
        for idx, fm in maps.shape_groups(per_image):
            stats = self._fold_maps(stats, parts, fm, idx)
        if parts is not None:
            self.map_banks_ = self._fit_banks(parts)
        else:
            self.map_stats_ = stats
            self.map_gaussians_ = [LevelGaussian.fit(s, "ledoit-wolf") for s in stats]
        return self

    def anomaly_map_features(self, per_image: Sequence[Sequence[np.ndarray]], size: int | None = None) -> np.ndarray:
        """Anomaly maps (n, size, size) from raw feature maps (per image, one (C, H, W) array per map level); size
        defaults to the model's input size."""
        if not self.has_maps:
            raise GaussadError("this model has no anomaly maps: fit it with map_levels (or preset='recommended')")
        size = size or self.input_size_
        out = np.empty((len(per_image), size, size), dtype=np.float32)
        for idx, fm in maps.shape_groups(per_image):
            out[idx] = maps.combine(self._level_maps([f.astype(np.float32) for f in fm]), size)
        return out

    @property
    def has_maps(self) -> bool:
        """Whether this fitted model computes anomaly maps."""
        return bool(getattr(self, "map_gaussians_", None) or getattr(self, "map_banks_", None))

    def _map_inputs(self, fmaps: Sequence[np.ndarray]) -> list[np.ndarray]:
        """Feature maps as the map method scores them: averaged over ``map_pool`` neighbourhoods and, for memory
        banks, down to the coarsest map level's grid (so each image costs that grid's number of bank queries)."""
        pool = self._setting("map_pool")
        if self._setting("map_method") == "nearest":
            return maps.to_grid(fmaps, pool)
        return [maps.local_mean(np.asarray(f, dtype=np.float32), pool) for f in fmaps]

    def _level_maps(self, fmaps: Sequence[np.ndarray]) -> list[np.ndarray]:
        """Per map level (B, H_l, W_l) float32 maps of a batch of raw feature maps, by this model's map method."""
        fmaps = self._map_inputs(fmaps)
        try:
            if self.map_banks_:
                return [bank.distances(maps.patch_vectors(f, np.float32)).reshape(f.shape[0], *f.shape[2:])
                        for bank, f in zip(self.map_banks_, fmaps)]
            return maps.level_maps(self.map_gaussians_, fmaps)
        except ValueError as exc:
            raise DataError(f"the model's anomaly-map statistics do not fit this backbone's feature maps ({exc})") from None

    @property
    def dofs_(self) -> list[int]:
        """Degrees of freedom of each level's chi-square law (its dimension after reduction)."""
        self._check_fitted()
        return [g.dof for g in self.gaussians_]

    def level_thresholds(self, fpr: float, threshold: str = "chi2") -> np.ndarray:
        """Per-level distance thresholds at false-positive rate ``fpr`` per level (``chi2`` or ``hotelling``)."""
        if threshold == "hotelling":
            self._check_hotelling()
            return np.array([hotelling_threshold(k, self.n_samples_, fpr) for k in self.dofs_])
        if threshold != "chi2":
            raise GaussadError(f"per-level thresholds exist for chi2 and hotelling, not {threshold!r}")
        return np.array([chi2_threshold(k, fpr) for k in self.dofs_])

    def _check_hotelling(self) -> None:
        """Refuse Hotelling thresholds where the F law is undefined (n <= dof at some level)."""
        n = self.n_samples_
        bad = [f"{name} {k}" for name, k in zip(self.level_names_, self.dofs_) if n <= k]
        if bad:
            raise GaussadError(
                f"hotelling thresholds need more training images than dimensions at every level, but the model is "
                f"fitted on {n} images and has {len(bad)} level(s) with as many dimensions or more ({', '.join(bad)}); "
                "use the conformal threshold, fewer levels, or a pca reduction"
            )

    def _calibration_scores(self) -> np.ndarray:
        scores = getattr(self, "calibration_scores_", None)
        if scores is None:
            raise GaussadError("the conformal threshold needs calibration scores: fit with calibration=0.2 (CLI: "
                               "--calibration 0.2) or call calibrate(held-out normal images)")
        return scores

    def _rule(self, fpr: float | None, threshold: str | None) -> tuple[float, str]:
        """The (fpr, method) to use: the arguments, or the model's own ``fpr``/``threshold``."""
        fpr = self.fpr if fpr is None else fpr
        threshold = self.threshold if threshold is None else threshold
        if threshold not in METHODS:
            raise GaussadError(f"unknown threshold {threshold!r}; choose one of: {', '.join(METHODS)}")
        if not 0.0 < float(fpr) < 1.0:
            raise GaussadError(f"fpr must lie strictly between 0 and 1, got {fpr}")
        return float(fpr), threshold

    def score_threshold(self, fpr: float | None = None, threshold: str | None = None) -> float:
        """A threshold on the image score (mean over levels) at target false-positive rate ``fpr``.

        conformal: the split-conformal quantile of ``calibration_scores_`` (``inf`` when ``fpr`` is below
        ``1 / (n_cal + 1)``).  chi2/hotelling: the mean of the per-level thresholds at ``fpr / n_levels``; an
        image whose score exceeds it has some level above its threshold, so under the per-level laws this
        score threshold keeps the false-positive rate at most ``fpr`` whatever the dependence between levels
        (it flags a subset of what :meth:`decide` flags).
        """
        self._check_fitted()
        fpr, threshold = self._rule(fpr, threshold)
        if threshold == "conformal":
            return conformal_threshold(self._calibration_scores(), fpr)
        return float(self.level_thresholds(fpr / len(self.gaussians_), threshold).mean())

    def decide(self, level_scores: np.ndarray, fpr: float | None = None,
               threshold: str | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Decisions (1 = anomalous) and p-values from per-level distances (n, n_levels).

        ``fpr`` and ``threshold`` default to the model's own.  chi2 and hotelling flag an image when any
        level exceeds its threshold at ``fpr / n_levels`` (Bonferroni), so under that law the false-positive
        rate stays at most ``fpr``; the p-value is the Bonferroni-adjusted minimum of the per-level p-values.
        conformal flags an image whose score (mean over levels) exceeds :meth:`score_threshold`; its p-value
        is the conformal p-value of the score, and ``p <= fpr`` exactly for flagged images.
        """
        self._check_fitted()
        fpr, threshold = self._rule(fpr, threshold)
        level_scores = np.atleast_2d(np.asarray(level_scores, dtype=np.float64))
        if threshold == "conformal":
            cal = self._calibration_scores()
            scores = level_scores.mean(axis=1)
            return (scores > conformal_threshold(cal, fpr)).astype(int), conformal_pvalue(scores, cal)
        n_levels = level_scores.shape[1]
        thresholds = self.level_thresholds(fpr / n_levels, threshold)
        if threshold == "hotelling":
            pvals = [hotelling_pvalue(level_scores[:, i], k, self.n_samples_) for i, k in enumerate(self.dofs_)]
        else:
            pvals = [chi2_pvalue(level_scores[:, i], k) for i, k in enumerate(self.dofs_)]
        pvalue = np.minimum(np.stack(pvals, axis=1).min(axis=1) * n_levels, 1.0)
        return (level_scores > thresholds).any(axis=1).astype(int), pvalue

    def predict(self, images: Sequence[ImageSource], fpr: float | None = None,
                threshold: str | None = None) -> np.ndarray:
        """1 for images judged anomalous at target false-positive rate ``fpr`` (default: the model's), else 0."""
        return self.decide(self.level_scores(images), fpr, threshold)[0]

    # ----- persistence --------------------------------------------------------------------------
    def save(self, path: str | os.PathLike) -> None:
        """Write the fitted model to one file, atomically (see :mod:`gaussad.persistence`)."""
        from .persistence import save_model

        self._check_fitted()
        save_model(self, path)

    def _normalization_meta(self) -> dict | None:
        """Mean/std actually applied to the input (None for plain-feature models)."""
        if self.backbone is None:
            return None
        mean, std = self._extractor().normalization
        shape = "square" if self._setting("resize") == "square" else "aspect kept, about S*S pixels, sides multiples of 32"
        return {"mean": list(mean), "std": list(std), "resize": f"{shape}, bilinear at pixel centres (cv2 INTER_LINEAR)"}

    def metadata(self) -> dict:
        """JSON-serialisable description of the fitted model (stored in the model file)."""
        self._check_fitted()
        return {
            "gaussad_version": __version__,
            "backbone": self.backbone,
            "weights": os.fspath(self.weights) if self.weights is not None else None,
            "levels": list(self.levels_),
            "level_names": list(self.level_names_),
            "input_size": self.input_size_,
            "preset": self.preset,
            "normalize": self._setting("normalize"),
            "normalization": self._normalization_meta(),
            "resize": self._setting("resize"),
            "map_levels": list(self.map_levels_),
            "map_level_names": list(self.map_level_names_),
            "map_gaussians": [g.meta() for g in self.map_gaussians_],
            "map_method": self._setting("map_method"),
            "map_pool": int(self._setting("map_pool")),
            "map_coreset": float(self.map_coreset),
            "map_banks": [{"seen": b.seen, "scale": b.scale} for b in self.map_banks_],
            "estimator": self.estimator,
            "reduction": self.reduction,
            "variance": float(self.variance),
            "n_samples": int(self.n_samples_),
            "feature_dims": list(self.feature_dims_),
            "gaussians": [g.meta() for g in self.gaussians_],
            "threshold": self.threshold,
            "fpr": float(self.fpr),
            "calibration": None if self.calibration is None else float(self.calibration),
            "random_state": None if self.random_state is None else int(self.random_state),
            "n_calibration": None if getattr(self, "calibration_scores_", None) is None
            else int(self.calibration_scores_.size),
        }
