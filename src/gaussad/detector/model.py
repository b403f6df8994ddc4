"""The detector's public face: :class:`GaussianAD`, a thin scikit-learn-style estimator over the parameter table
(:mod:`.params`), the feature extractor (:mod:`.features`), streaming statistics (:mod:`.fitting`), the learned
state (:mod:`.state`), decision rules (:mod:`.decision`) and model files (:mod:`.persistence`)."""

from __future__ import annotations

import os
from dataclasses import replace
from typing import TYPE_CHECKING, Any, Iterator, Sequence

import numpy as np

from . import params
from ..version import __version__
from .decision import DecisionRule, summary
from ..errors import DataError, GaussadError, InvalidParameterError
from ..intake.features import ExtractorCache, normalization_meta
from .fitting import Trainer, layout_of, refuse_differences
from ..intake.images import image_list
from .persistence import read_model, save_model
from .state import DetectorState, FittedAttributes, Layout, check_features

if TYPE_CHECKING:
    from ..intake.features import FeatureExtractor
    from ..intake.images import ImageSource  # noqa: F401


class GaussianAD(FittedAttributes):
    """Anomaly detector of Rippel et al. (ICPR 2020), in scikit-learn style.

    ``fit`` learns a Gaussian per feature level from normal images; the image score is the mean over levels of
    the Mahalanobis distances, **higher = more anomalous** (as PyOD; scikit-learn's outlier detectors use the
    opposite sign). ``threshold`` and ``fpr`` are the default decision rule of
    ``predict``/``decide``. Settings left at None come from ``preset``. Plain feature arrays
    (``backbone=None``, :meth:`fit_features`) need neither torch nor images.

    Attributes
    ----------
    state_ : DetectorState
        Everything fit learns (statistics, Gaussians, banks, calibration, an adapted network: ``adaptation_``).
    levels_, level_names_ : list
        The backbone levels modelled (indices and names).
    input_size_ : int or None
        Network input side S (``input_size='auto'`` decided at fit).
    gaussians_, stats_ : list
        Per-level Gaussians and moment statistics.
    map_levels_, map_level_names_, map_gaussians_, map_stats_, map_banks_ : list
        The anomaly-map part.
    map_tiles_ : int
        Tiles a side of the anomaly maps (``map_tiles='auto'`` decided at fit).
    n_samples_ : int
        Number of training images.
    feature_dims_, dofs_ : list of int
        Per-level dimension, and degrees of freedom of each level's chi-square law.
    calibration_scores_ : ndarray or None
        Scores of held-out normal images, for the conformal rule.
    map_calibration_ : ndarray
        Leave-one-image-out map peaks of the training images (fused image score).
    skipped_ : list of (str, str)
        Images left out by ``on_error="skip"``, with the reason.
    """

    def __init__(self, backbone: str | None = "efficientnet-lite0", levels: Sequence[int | str] | None = None,
                 input_size: int | None = None, weights: str | os.PathLike | None = None,
                 estimator: str = "ledoit-wolf", reduction: str | None = None, variance: float = 0.99,
                 normalize: str | None = None, resize: str | None = None, brightness: str | None = None,
                 adapt: int = 0, adapt_stop: str = "validation", pool: str | None = None, map_levels: Sequence[int | str] | None = None, map_method: str | None = None,
                 map_pool: int | None = None, map_coreset: float = 0.1, map_grid: str | None = None,
                 map_tiles: int | str | None = None, precision: str = "fp32", preset: str | None = None,
                 image_score: str | None = None, threshold: str | None = None, fpr: float = 0.01,
                 calibration: float | str | None = None, calibration_folds: int = 5,
                 random_state: int | None = 0, batch_size: int = 16, engine: str = "auto", verbose: bool = False,
                 max_pixels: int = params.DEFAULT_MAX_PIXELS, decoder: str = "pil"):
        self.backbone, self.levels, self.input_size, self.weights = backbone, levels, input_size, weights
        self.estimator, self.reduction, self.variance = estimator, reduction, variance
        self.normalize, self.resize, self.brightness, self.pool = normalize, resize, brightness, pool
        self.decoder, self.adapt, self.adapt_stop = decoder, adapt, adapt_stop
        self.map_levels, self.map_method, self.map_pool, self.map_coreset = map_levels, map_method, map_pool, map_coreset
        self.preset, self.image_score, self.threshold, self.fpr = preset, image_score, threshold, fpr
        self.map_grid, self.map_tiles, self.precision = map_grid, map_tiles, precision
        self.calibration, self.calibration_folds, self.random_state = calibration, calibration_folds, random_state
        self.batch_size, self.engine, self.verbose, self.max_pixels = batch_size, engine, verbose, max_pixels

    # ----- parameters ---------------------------------------------------------------------------------------
    def get_params(self, deep: bool = True) -> dict[str, Any]:
        """Constructor parameters by name (scikit-learn's ``get_params``; nothing nested, so ``deep`` changes nothing)."""
        return {p.name: getattr(self, p.name) for p in params.PARAMS}

    def set_params(self, **values: Any) -> "GaussianAD":
        """Set constructor parameters (checked at the next ``fit``); an unknown name raises ``ValueError``."""
        unknown = sorted(set(values) - set(params.BY_NAME))
        if unknown:
            raise InvalidParameterError(f"invalid parameter(s) {', '.join(unknown)} for GaussianAD; valid: "
                                        f"{', '.join(params.BY_NAME)}")
        for name, value in values.items():
            setattr(self, name, value)
        return self

    def setting(self, name: str) -> Any:
        """The value in use of a parameter: the explicit one, else the preset's."""
        return params.effective(self.get_params(), name)

    def __getstate__(self) -> dict:  # copies leave the feature extractor (an inference session) behind
        return {k: v for k, v in self.__dict__.items() if k != "_extractors"}

    # ----- features -----------------------------------------------------------------------------------------
    def feature_extractor(self) -> "FeatureExtractor":
        """The feature extractor of this model's settings: built once, rebuilt when a setting that shapes it changes;
        batch size and pixel limit always follow the current parameters."""
        if self.backbone is None:
            raise GaussadError("this model works on plain feature arrays (backbone=None): use fit_features/score_features")
        for name in ("batch_size", "max_pixels", "engine", "decoder", "precision"):
            params.check_value(name, getattr(self, name))
        params.check_precision(self.get_params())
        state = self.__dict__.get("state_")
        cache = self.__dict__.setdefault("_extractors", ExtractorCache())
        return cache.get(params.resolved(self.get_params()), *((state.layout, state.network, state.adapted)
                                                                if state is not None else ()))

    def iter_features(self, images: Sequence["ImageSource"], desc: str = "features", on_error: str = "fail",
                      skipped: list | None = None, maps: bool = True
                      ) -> Iterator[tuple[np.ndarray, list[np.ndarray], list[np.ndarray]]]:
        """Batches of (image indices, pooled features per level, raw feature maps per map level, none without
        ``maps``), with a progress bar when ``verbose``; ``on_error="skip"`` leaves unreadable images out, adding
        (index, message) to ``skipped``."""
        from ..intake.features import progress_bar

        images = list(images)
        bar = progress_bar(len(images), desc, self.verbose)
        try:
            yield from self.feature_extractor().iter_features_and_maps(images, bar, on_error, skipped, maps)
        finally:
            if bar is not None:
                bar.close()

    def extract_features(self, images: Sequence["ImageSource"], desc: str = "features", on_error: str = "fail",
                         skipped: list | None = None) -> list[np.ndarray]:  # one (n_kept, C_l) array per level
        chunks = [pooled for _, pooled, _ in self.iter_features(images, desc, on_error, skipped, maps=False)]
        if not chunks:
            return [np.zeros((0, d)) for d in self.feature_extractor().level_dims]
        return [np.concatenate(level) for level in zip(*chunks)]

    # ----- fitting ------------------------------------------------------------------------------------------
    def _trainer(self, images: bool = True, calibration: list | None = None, on_error: str = "fail",
                 tiles_from: list | None = None) -> Trainer:
        """A :class:`~gaussad.detector.fitting.Trainer` for this model's settings (validated); for images, with its
        feature extractor's batches and layout, the 'auto' settings first decided on ``tiles_from`` (the images of a
        new fit), the network adapted on ``calibration`` (with ``adapt``) and its int8 graph calibrated on them."""
        params.validate(self.get_params())
        settings = params.resolved(self.get_params())
        if not images:
            return Trainer(settings)
        if tiles_from is not None:
            self.__dict__.setdefault("_extractors", ExtractorCache()).decide(tiles_from, settings)
        if calibration is not None:
            self.feature_extractor().fit_network(calibration, settings, on_error, self.verbose)
        return Trainer(settings, self.iter_features, layout_of(self.feature_extractor(), settings))

    def fit(self, images: Sequence["ImageSource"], y=None, *, on_error: str = "fail") -> "GaussianAD":
        """Learn one Gaussian per level from normal images (paths, PIL images or uint8 arrays).

        ``on_error="skip"`` leaves out unreadable images (listed in ``skipped_``). ``calibration_scores_``: with
        ``calibration="cv"`` out-of-fold scores of every image, with a fraction those of the held-out images. With
        ``adapt`` or ``precision="int8"`` the network is first adapted or quantized (:meth:`FeatureExtractor.fit_network`)."""
        images = image_list(images)
        self.__dict__.pop("state_", None)
        trainer = self._trainer(calibration=images, on_error=on_error, tiles_from=images)
        self.skipped_ = trainer.skipped
        self.state_ = replace(trainer.fit_images(images, on_error), **self.feature_extractor().fitted_network())
        return self

    def partial_fit(self, images: Sequence["ImageSource"], y=None, *, on_error: str = "fail") -> "GaussianAD":
        """Add images to the running statistics and refit; chunks give the same statistics as one ``fit``.

        Memory banks of ``nearest`` maps keep their members and add the new images' locations greedily (with a
        coreset below 1 they differ from one fit's). Calibration scores are dropped: call :meth:`calibrate` after
        the last chunk. The settings that shape the features must be those the model was fitted with.
        """
        if self.precision == "int8" or (self.adapt and not self.__dict__.get("state_")):
            what = "with precision='int8'" if self.precision == "int8" else "of a new model with adapt"
            raise InvalidParameterError(f"partial_fit {what} is not supported: fit all images at once")
        images = image_list(images)
        trainer = self._trainer(tiles_from=None if self.__dict__.get("state_") else images)
        trainer.skipped = self.skipped_ = self.__dict__.get("skipped_", [])
        self.state_ = trainer.partial_fit_images(images, self.__dict__.get("state_"), on_error)
        return self

    def fit_features(self, features: Sequence[np.ndarray], level_names: Sequence[str] | None = None) -> "GaussianAD":
        """Fit from plain per-level feature arrays (n, d_l), for users with their own features; ``level_names``
        names the levels in messages (default level0, level1, ...)."""
        trainer = self._trainer(images=False)
        self.__dict__.pop("state_", None)
        feats = check_features(features)
        layout = Layout.plain(len(feats))
        self.state_ = trainer.fit_arrays(feats, layout if level_names is None else
                                         replace(layout, level_names=list(level_names)))
        return self

    def partial_fit_features(self, features: Sequence[np.ndarray]) -> "GaussianAD":
        """Add plain per-level feature arrays to the running statistics and refit (drops calibration scores)."""
        trainer, prev = self._trainer(images=False), self.__dict__.get("state_")
        self.state_ = trainer.partial_fit_arrays(check_features(features, prev.feature_dims if prev else None), prev)
        return self

    def fit_map_features(self, per_image: Sequence[Sequence[np.ndarray]]) -> "GaussianAD":
        """Fit only the anomaly-map part from raw feature maps of normal images (per image, one (C, H, W) array per
        map level), replacing any earlier one; for evaluation harnesses that reuse extracted feature maps."""
        state = self.__dict__.get("state_") or DetectorState(Layout([], [], None), [], [])  # maps only
        self.state_ = self._trainer(images=False).fit_maps(state, per_image)
        return self

    def calibrate(self, images: Sequence["ImageSource"], *, on_error: str = "fail") -> "GaussianAD":
        """Set ``calibration_scores_`` from held-out normal images scored by this fitted model (for conformal); a
        fused image score also takes their map peaks as the map evidence's calibration."""
        if not self.rule().fused:
            self._state()
            return self.calibrate_features(self.extract_features(list(images), "calibration", on_error))
        levels, peaks, _ = self.score_images(list(images), on_error)
        return self._calibrated(levels.mean(axis=1), peaks)

    def calibrate_features(self, features: Sequence[np.ndarray]) -> "GaussianAD":
        """Set ``calibration_scores_`` from plain per-level features of held-out normal samples (not for a fused
        image score, whose calibration needs the images' maps: :meth:`calibrate`)."""
        if self.rule().fused:
            raise GaussadError("a fused image score calibrates on images (their maps too): use calibrate(images)")
        return self._calibrated(self.score_features(features))

    def _calibrated(self, scores: np.ndarray, peaks: np.ndarray | None = None) -> "GaussianAD":
        if scores.size == 0:
            raise DataError("no calibration samples given")
        self.state_ = self._state().with_calibration(scores, "calibrate").with_map_calibration(peaks)
        return self

    def merge(self, other: "GaussianAD") -> "GaussianAD":
        """A new model fitted on the union of both training sets (feature settings must agree; banks are joined)."""
        if not isinstance(other, GaussianAD):
            raise InvalidParameterError(f"merge takes another GaussianAD, got {type(other).__name__}")
        mine, theirs = self._state(), other._state()
        refuse_differences(mine.layout.differences(theirs.layout)
                           + ([] if mine.feature_dims == theirs.feature_dims else ["feature dimensions"]))
        merged = GaussianAD(**self.get_params())
        params.validate(merged.get_params())
        merged.state_ = mine.merge(theirs, self.estimator, self.reduction, float(self.variance))
        return merged

    # ----- scoring ------------------------------------------------------------------------------------------
    def level_scores_features(self, features: Sequence[np.ndarray]) -> np.ndarray:
        """Mahalanobis distance of each sample to each level's Gaussian: (n, n_levels)."""
        state = self._state()
        return state.level_distances(check_features(features, state.feature_dims))

    def score_features(self, features: Sequence[np.ndarray]) -> np.ndarray:
        """Image scores from plain features: the mean over levels of the distances."""
        return self.level_scores_features(features).mean(axis=1)

    def level_scores(self, images: Sequence["ImageSource"]) -> np.ndarray:
        """Per-level Mahalanobis distances of images: (n, n_levels)."""
        self._state()
        return self.level_scores_features(self.extract_features(images, "score"))

    def score_samples(self, images: Sequence["ImageSource"]) -> np.ndarray:
        """Anomaly score of each image, higher = more anomalous: the mean over levels of the distances, or with a
        fused image score ``-log10`` of the combined p-value of the global score and the map peak."""
        return self.scores(*self._evidence(images, self.rule()))

    def scores(self, level_scores: np.ndarray, map_peaks: np.ndarray | None = None) -> np.ndarray:
        """Image scores from per-level distances (n, L) (and map peaks, for a fused image score)."""
        return self.rule().scores(self._state(), level_scores, map_peaks)

    def _evidence(self, images: Sequence["ImageSource"], rule: DecisionRule) -> tuple[np.ndarray, np.ndarray | None]:
        """What ``rule`` decides on: per-level distances, and map peaks for a fused image score."""
        return self.score_images(images)[:2] if rule.fused else (self.level_scores(images), None)

    def anomaly_map(self, images: Sequence["ImageSource"]) -> np.ndarray:
        """Anomaly maps (n, S, S) float32 at the input size, normal locations about 1 (:meth:`DetectorState.level_maps`)."""
        return self.score_with_maps(images)[1]

    def score_with_maps(self, images: Sequence["ImageSource"], on_error: str = "fail",
                        skipped: list | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Per-level distances (n, L) and anomaly maps (n, S, S) from one pass over the images."""
        levels, _, amaps = self.score_images(images, on_error, skipped, with_maps=True)
        return levels, amaps

    def score_images(self, images: Sequence["ImageSource"], on_error: str = "fail", skipped: list | None = None,
                     with_maps: bool = False) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None]:
        """Per-level distances (n, L), map peaks (n,) (nearest maps; :meth:`DetectorState.map_peaks`) and, with
        ``with_maps``, anomaly maps (n, S, S), from one pass over the images."""
        state = self._state().with_maps()
        pooled, peaks, amaps = state.score_batches(self.iter_features(images, "score", on_error, skipped), with_maps)
        return self.level_scores_features(pooled), peaks, amaps

    def anomaly_map_features(self, per_image: Sequence[Sequence[np.ndarray]], size: int | None = None) -> np.ndarray:
        """Anomaly maps (n, size, size) from raw feature maps (per image, one (C, H, W) array per map level); size
        defaults to the model's input size."""
        return self._state(need_fit=False).with_maps().anomaly_maps_of(per_image, size)

    # ----- decisions ----------------------------------------------------------------------------------------
    def rule(self, fpr: float | None = None, threshold: str | None = None) -> DecisionRule:
        """The decision rule at ``fpr``/``threshold`` (default: the model's own), for its image score."""
        return DecisionRule(self.setting("threshold") if threshold is None else threshold,
                            self.fpr if fpr is None else fpr, self.setting("image_score"))

    def level_thresholds(self, fpr: float, threshold: str = "chi2") -> np.ndarray:
        """Per-level distance thresholds at false-positive rate ``fpr`` per level (``chi2`` or ``hotelling``)."""
        return self.rule(fpr, threshold).level_thresholds(self._state())

    def score_threshold(self, fpr: float | None = None, threshold: str | None = None) -> float:
        """A threshold on the image score at target false-positive rate ``fpr`` (:meth:`DecisionRule.score_threshold`)."""
        return self.rule(fpr, threshold).score_threshold(self._state())

    def decide(self, level_scores: np.ndarray, fpr: float | None = None, threshold: str | None = None,
               map_peaks: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Decisions (1 = anomalous) and p-values from per-level distances (n, n_levels) and, for a fused image
        score, the map peaks (:class:`DecisionRule`)."""
        return self.rule(fpr, threshold).decide(self._state(), level_scores, map_peaks)

    def predict(self, images: Sequence["ImageSource"], fpr: float | None = None,
                threshold: str | None = None) -> np.ndarray:
        """1 for images judged anomalous at target false-positive rate ``fpr`` (default: the model's), else 0."""
        levels, peaks = self._evidence(images, self.rule(fpr, threshold))
        return self.decide(levels, fpr, threshold, peaks)[0]

    # ----- model files --------------------------------------------------------------------------------------
    def save(self, path: str | os.PathLike) -> None:
        """Write the fitted model to one file, atomically (:mod:`gaussad.detector.persistence`); refused, as loading would
        refuse it, when its own rule cannot apply (conformal without calibration scores, e.g. after ``merge``)."""
        state = self._state()
        self.rule().check(state, f"{os.fspath(path)}: not saved: ")
        save_model(path, self.metadata(), state.to_arrays())

    def summary(self) -> dict[str, Any]:
        """The fitted model in brief: backbone, levels, training images, decision rule and its calibration."""
        return {"backbone": self.backbone, "preset": self.setting("preset"), **summary(self.rule(), self._state())}

    def metadata(self) -> dict[str, Any]:
        """JSON-serialisable description of the fitted model (stored in the model file)."""
        state = self._state()
        return {"gaussad_version": __version__, **params.stored_values(self.get_params()), "normalization":
                normalization_meta(self.backbone, *(self.setting(k) for k in ("normalize", "resize", "brightness"))),
                **state.metadata()}

def load(path: str | os.PathLike) -> GaussianAD:
    """Load a model written by :meth:`GaussianAD.save`; anything else raises ModelFormatError."""
    values, state = read_model(path)
    model = GaussianAD(**values)
    model.state_ = state
    return model


GaussianAD.__doc__ = GaussianAD.__doc__.replace("    Attributes\n", params.numpydoc() + "\n    Attributes\n", 1)
