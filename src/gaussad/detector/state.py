"""The learned state of a detector: per-level statistics and Gaussians, the anomaly-map part (Gaussians shared by
all positions, or memory banks) and the calibration scores. Plain numpy: it knows nothing of images, torch or files
(model files read and write it through :meth:`DetectorState.to_arrays` / :meth:`DetectorState.from_arrays`)."""

from __future__ import annotations

import os
from dataclasses import dataclass, field, replace
from operator import attrgetter
from typing import Any, Iterable, Sequence

import numpy as np

from ..core import maps
from . import params
from ..core.bank import NearestBank
from ..intake.engine import LEGACY_INT8_FORMAT
from ..errors import DataError, GaussadError, NotFittedError
from ..core.gaussian import MAX_ABS, LevelGaussian, MomentStats

# The settings besides the layout that shape the features (statistics made with others cannot be combined), and
# what files from before a feature setting existed meant by it: rows of the parameter table (``features``, ``legacy``).
FEATURE_SETTINGS = params.FEATURE_SETTINGS
FEATURE_DEFAULTS = params.FEATURE_LEGACY
# How calibration scores were made: a held-out fraction (split conformal), out-of-fold scores (cross-conformal), or
# other normal images scored by the final model (``calibrate``).
CALIBRATIONS = ("split", "cv", "calibrate")
ADAPTED = "adapted."  # model-file array names of the adapted network's tensors: ADAPTED + the backbone's state-dict key


@dataclass(frozen=True)
class Layout:
    """Which backbone levels a state describes, at which input size, and the other settings that shaped its
    features (``settings``: values of :data:`FEATURE_SETTINGS`)."""

    levels: list[int]
    level_names: list[str]
    input_size: int | None
    map_levels: list[int] = field(default_factory=list)
    map_level_names: list[str] = field(default_factory=list)
    settings: dict[str, Any] = field(default_factory=lambda: {"backbone": None})

    @classmethod
    def plain(cls, n_levels: int) -> "Layout":
        """Plain feature arrays: levels numbered ``level0``, ``level1``, ..."""
        return cls(list(range(n_levels)), [f"level{i}" for i in range(n_levels)], None)

    def setting(self, name: str) -> Any:
        """A feature setting of these features; for files from before it existed (and plain features), the value
        they meant (:data:`FEATURE_DEFAULTS`)."""
        return self.settings.get(name, FEATURE_DEFAULTS.get(name))

    def differences(self, other: "Layout") -> list[str]:
        """What differs between the features of two layouts, as 'name (a vs b)' texts."""
        pairs = {"levels": (self.levels, other.levels), "input size": (self.input_size, other.input_size),
                 "map levels": (self.map_levels, other.map_levels)}
        pairs.update({k: (self.settings.get(k), other.settings.get(k)) for k in set(self.settings) | set(other.settings)})
        return [f"{name} ({a!r} vs {b!r})" for name, (a, b) in sorted(pairs.items()) if a != b]


def feature_settings(values: dict[str, Any]) -> dict[str, Any]:
    """The :data:`FEATURE_SETTINGS` of resolved parameter values (only the backbone for plain features)."""
    if values.get("backbone") is None:
        return {"backbone": None}
    out = {k: values.get(k, FEATURE_DEFAULTS.get(k)) for k in FEATURE_SETTINGS}
    out["weights"] = None if out["weights"] is None else os.fspath(out["weights"])
    return out


def check_features(features: Sequence[np.ndarray], dims: list[int] | None = None) -> list[np.ndarray]:
    """Plain per-level feature arrays as float64 (n, d_l), checked: 2-D, equal sample counts, the fitted
    dimensions ``dims`` when given, finite and small enough for the moment statistics."""
    if isinstance(features, np.ndarray):
        features = [features]
    feats = [np.asarray(f, dtype=np.float64) for f in features]
    if not feats or any(f.ndim != 2 for f in feats):
        raise DataError("features must be a list of 2-D arrays (n_samples, n_features), one per level")
    if len({f.shape[0] for f in feats}) != 1:
        raise DataError("every level must have the same number of samples")
    if any(f.shape[1] == 0 for f in feats):
        raise DataError("every level needs at least one feature (an array of shape (n, 0) was given)")
    if dims is not None and [f.shape[1] for f in feats] != list(dims):
        raise DataError(f"feature dimensions {[f.shape[1] for f in feats]} do not match the fitted model's {list(dims)}")
    for i, f in enumerate(feats):
        bad = int((~np.isfinite(f)).any(axis=1).sum())
        if bad:
            raise DataError(f"level {i}: {bad} sample(s) have NaN or infinite features")
        if f.size and np.abs(f).max() > MAX_ABS:
            raise DataError(f"level {i}: feature values up to {np.abs(f).max():.3g} exceed {MAX_ABS:.0e}, where "
                            "the moment statistics would overflow; rescale the features")
    return feats


def prepare_maps(fmaps: Sequence[np.ndarray], method: str, pool: int, grid: str = "coarsest") -> list[np.ndarray]:
    """Raw feature maps as a map method scores them: averaged over ``pool`` x ``pool`` neighbourhoods; with
    ``grid='finest'`` upsampled to the finest map level's grid and concatenated into one map (:func:`maps.to_finest`),
    else, for memory banks (``nearest``), down to the coarsest map level's grid (so each image costs that grid's
    number of bank queries)."""
    if grid == "finest":
        return maps.to_finest(fmaps, pool)
    if method == "nearest":
        return maps.to_grid(fmaps, pool)
    return [maps.local_mean(np.asarray(f, dtype=np.float32), pool) for f in fmaps]


@dataclass
class DetectorState:
    """Everything ``fit`` learns. ``gaussians`` is empty while fewer than 2 samples were seen (incremental fitting
    keeps the statistics until then)."""

    layout: Layout
    stats: list[MomentStats]
    gaussians: list[LevelGaussian]
    map_method: str = "gaussian"
    map_pool: int = 1
    map_stats: list[MomentStats] = field(default_factory=list)
    map_gaussians: list[LevelGaussian] = field(default_factory=list)
    map_banks: list[NearestBank] = field(default_factory=list)
    calibration_scores: np.ndarray | None = None
    calibration_method: str | None = None  # how the scores were made: split, cv, calibrate (None: unknown/none)
    map_grid: str = "coarsest"  # the grid map levels are brought to: "coarsest" (per-level banks) or "finest"
    # Leave-one-image-out map peaks of the training images: the fused score's calibration of the map evidence (with
    # the out-of-fold ``calibration_scores`` of the global score); None without a fused score.
    map_calibration: np.ndarray | None = None
    # The int8 network (precision='int8'): a serialised ONNX graph quantized at fit on its first training images; the
    # model file carries it, since no other machine has those images to calibrate on again. None for fp32. With it,
    # the format of its weights (a name of gaussad.intake.engine.INT8_FORMATS: whether it scores alike on every CPU) and the
    # instruction set of the CPU it was calibrated on (gaussad.intake.engine.cpu_isa; None where the file does not say).
    network: bytes | None = None
    int8_format: str | None = None
    int8_isa: str | None = None
    # The adapted network (adapt > 0, gaussad.intake.adapt): the trained tensors by the backbone's state-dict key (None
    # where the validation kept the pretrained network), and the adaptation's record (epoch kept, per-epoch figures).
    adapted: dict[str, np.ndarray] | None = None
    adaptation: dict[str, Any] | None = None

    # ----- building --------------------------------------------------------------------------------------------
    @classmethod
    def fit(cls, layout: Layout, stats: list[MomentStats], estimator: str, reduction: str | None, variance: float,
            map_method: str = "gaussian", map_pool: int = 1, map_stats: list[MomentStats] | None = None,
            map_banks: list[NearestBank] | None = None, allow_few: bool = False,
            map_grid: str = "coarsest") -> "DetectorState":
        """Gaussians from moment statistics (``allow_few``: keep fewer than 2 samples without Gaussians)."""
        n = stats[0].n
        if n < 2 and not allow_few:
            raise DataError(f"need at least 2 training samples, got {n}")
        try:
            gaussians = [LevelGaussian.fit(s, estimator, reduction, float(variance)) for s in stats] if n >= 2 else []
            map_gaussians = [LevelGaussian.fit(s, "ledoit-wolf") for s in map_stats or []] if n >= 2 else []
        except ValueError as exc:
            raise DataError(str(exc)) from None
        return cls(layout, stats, gaussians, map_method, int(map_pool), list(map_stats or []), map_gaussians,
                   list(map_banks or []), map_grid=map_grid)

    def with_calibration(self, scores: np.ndarray | None, method: str | None = None) -> "DetectorState":
        """The same state with other calibration scores (None: without), made by ``method`` (:data:`CALIBRATIONS`)."""
        if scores is None:
            return replace(self, calibration_scores=None, calibration_method=None, map_calibration=None)
        return replace(self, calibration_scores=np.asarray(scores, dtype=np.float64), calibration_method=method)

    def with_map_calibration(self, peaks: np.ndarray | None) -> "DetectorState":
        """The same state with other calibration peaks of the map evidence (None: without)."""
        return replace(self, map_calibration=None if peaks is None else np.asarray(peaks, dtype=np.float64))

    def merge(self, other: "DetectorState", estimator: str, reduction: str | None, variance: float) -> "DetectorState":
        """The state of the union of both training sets: statistics added exactly, memory banks joined, and the
        calibrations (global scores, and a fused score's map peaks) joined where both states have the same kind. Each
        part's scores were made against a model of fewer images (its folds, its smaller bank), so against the
        merged model they err large: conservative p-values, as after a feedback update (:mod:`gaussad.service.feedback`)."""
        if self.network is not None or other.network is not None:
            raise GaussadError("merge of int8 models is not supported (each network is calibrated on its own training "
                               "images): fit the union with precision='int8', or merge fp32 models")
        if self.adaptation is not None or other.adaptation is not None:
            raise GaussadError("merge of adapted models is not supported (each network is fine-tuned on its own "
                               "training images): fit the union with adapt")
        map_stats = [a.merge(b) for a, b in zip(self.map_stats, other.map_stats)]
        banks = [a.merge(b) for a, b in zip(self.map_banks, other.map_banks)]
        out = DetectorState.fit(self.layout, [a.merge(b) for a, b in zip(self.stats, other.stats)], estimator,
                                reduction, variance, self.map_method, self.map_pool, map_stats, banks,
                                map_grid=self.map_grid)
        parts = (self, other)
        if any(p.calibration_scores is None for p in parts) or len({p.map_calibration is None for p in parts}) > 1:
            return out  # nothing to join: a conformal decision then asks for calibrate()
        method = self.calibration_method if self.calibration_method == other.calibration_method else None
        out = out.with_calibration(np.concatenate([p.calibration_scores for p in parts]), method)
        return out if self.map_calibration is None else out.with_map_calibration(
            np.concatenate([p.map_calibration for p in parts]))

    # ----- facts -----------------------------------------------------------------------------------------------
    @property
    def fitted(self) -> bool:
        return bool(self.gaussians)

    @property
    def n_samples(self) -> int:
        return int(self.stats[0].n)

    @property
    def feature_dims(self) -> list[int]:
        return [s.dim for s in self.stats]

    @property
    def dofs(self) -> list[int]:
        """Degrees of freedom of each level's chi-square law (its dimension after reduction)."""
        return [g.dof for g in self.gaussians]

    @property
    def has_maps(self) -> bool:
        return bool(self.map_gaussians or self.map_banks)

    # ----- scoring ---------------------------------------------------------------------------------------------
    def level_distances(self, features: Sequence[np.ndarray]) -> np.ndarray:
        """Mahalanobis distance of each sample to each level's Gaussian: (n, n_levels)."""
        try:
            scores = np.stack([g.distances(f) for g, f in zip(self.gaussians, features)], axis=1)
        except ValueError as exc:
            raise DataError(str(exc)) from None
        if np.isnan(scores).any():
            raise DataError("the model gives NaN distances: its statistics are damaged (a forged model file?)")
        return scores

    def with_maps(self) -> "DetectorState":
        """This state, refused when it has no anomaly maps."""
        if not self.has_maps:
            raise GaussadError("this model has no anomaly maps: fit it with map_levels (or preset='recommended')")
        return self

    def level_maps(self, fmaps: Sequence[np.ndarray]) -> list[np.ndarray]:
        """Per map level (B, H_l, W_l) float32 maps of a batch of raw feature maps, by this state's map method.

        Location vectors are first averaged over ``map_pool`` x ``map_pool`` neighbourhoods. ``gaussian`` maps:
        each map level has one Gaussian shared by all positions, a location's value is its Mahalanobis distance
        divided by sqrt(dof). ``nearest`` maps: a location's value is its distance to the nearest vector of the
        level's memory bank divided by the bank's scale. Either way typical normal locations score about 1.
        """
        fmaps = prepare_maps(fmaps, self.map_method, self.map_pool, self.map_grid)
        try:
            if self.map_banks:
                return [bank.distances(maps.patch_vectors(f, np.float32)).reshape(f.shape[0], *f.shape[2:])
                        for bank, f in zip(self.map_banks, fmaps)]
            return maps.level_maps(self.map_gaussians, fmaps)
        except ValueError as exc:
            raise DataError(f"the model's anomaly-map statistics do not fit this backbone's feature maps ({exc})") from None

    def map_peaks(self, fmaps: Sequence[np.ndarray], image_ids: np.ndarray | None = None) -> np.ndarray:
        """(B,) the map evidence of a batch of raw feature maps: the largest cell of the banks' mean map on the
        common grid (the peak of the anomaly map before its bilinear upsampling, which keeps the peak). With
        ``image_ids`` (training images) each image's own bank members are skipped: leave-one-image-out peaks, the
        out-of-fold calibration scores of the fused score."""
        if not self.map_banks:
            raise GaussadError("the fused score needs nearest-neighbour anomaly maps (map_method='nearest')")
        fmaps = prepare_maps(fmaps, self.map_method, self.map_pool, self.map_grid)
        b, _, h, w = fmaps[0].shape
        ids = None if image_ids is None else np.repeat(np.asarray(image_ids, dtype=np.int64), h * w)
        try:
            grid = np.mean([bank.distances(maps.patch_vectors(f, np.float32), ids) for bank, f in
                            zip(self.map_banks, fmaps)], axis=0)
        except ValueError as exc:
            raise DataError(f"the model's memory banks do not fit this backbone's feature maps ({exc})") from None
        return grid.reshape(b, h * w).max(axis=1).astype(np.float64)

    def maps_and_peaks(self, fmaps: Sequence[np.ndarray], size: int) -> tuple[np.ndarray, np.ndarray]:
        """(B, size, size) anomaly maps and (B,) :meth:`map_peaks` of a batch from one query of the banks (the
        peak is the largest cell of the mean of the level maps, on their common grid)."""
        levels = self.level_maps(fmaps)
        grid = np.mean(levels, axis=0)
        return maps.combine(levels, size), grid.reshape(len(grid), -1).max(axis=1).astype(np.float64)

    def map_peaks_of(self, per_image: Sequence[Sequence[np.ndarray]], image_ids: np.ndarray | None = None
                     ) -> np.ndarray:
        """(n,) :meth:`map_peaks` of raw feature maps given per image (shapes may differ between images)."""
        out = np.empty(len(per_image))
        for idx, fm in maps.shape_groups(per_image):
            out[idx] = self.map_peaks([f.astype(np.float32) for f in fm], None if image_ids is None else
                                      np.asarray(image_ids)[idx])
        return out

    def score_batches(self, batches: Iterable[tuple[Any, list[np.ndarray], list[np.ndarray]]], with_maps: bool
                      ) -> tuple[list[np.ndarray], np.ndarray | None, np.ndarray | None]:
        """Pooled features per level (n, C_l), map peaks (n,) (None without memory banks) and, ``with_maps``, anomaly
        maps (n, S, S) of (indices, pooled, raw maps) batches, each batch's maps from one query of the banks."""
        from threadpoolctl import threadpool_limits

        size = self.layout.input_size
        pooled, peaks, out_maps = [], [], []
        # Map products are small: one BLAS thread, so that idle BLAS threads do not spin on the cores the inference
        # engine needs (BENCHMARKS.md: maps cost x2.15 of scoring without this limit, x1.87 with it).
        with threadpool_limits(1, user_api="blas"):
            for _, batch, fmaps in batches:
                pooled.append(batch)
                if not self.map_banks:
                    out_maps.append(self.anomaly_maps(fmaps, size) if with_maps else None)
                    continue
                amaps, peak = self.maps_and_peaks(fmaps, size) if with_maps else (None, self.map_peaks(fmaps))
                peaks.append(peak)
                out_maps.append(amaps)
        if not pooled:
            return ([np.zeros((0, d)) for d in self.feature_dims], np.zeros(0) if self.map_banks else None,
                    np.zeros((0, size, size), np.float32) if with_maps else None)
        return ([np.concatenate(level) for level in zip(*pooled)], np.concatenate(peaks) if peaks else None,
                np.concatenate(out_maps) if with_maps else None)

    def anomaly_maps(self, fmaps: Sequence[np.ndarray], size: int) -> np.ndarray:
        """(B, size, size) maps of a batch of raw feature maps: levels upsampled and averaged."""
        return maps.combine(self.level_maps(fmaps), size)

    def anomaly_maps_of(self, per_image: Sequence[Sequence[np.ndarray]], size: int | None = None) -> np.ndarray:
        """(n, size, size) maps from raw feature maps given per image (one (C, H, W) array per map level; shapes
        may differ between images); size defaults to the input size."""
        size = size or self.layout.input_size
        out = np.empty((len(per_image), size, size), dtype=np.float32)
        for idx, fm in maps.shape_groups(per_image):
            out[idx] = self.anomaly_maps([f.astype(np.float32) for f in fm], size)
        return out

    # ----- model files -----------------------------------------------------------------------------------------
    def to_arrays(self) -> dict[str, np.ndarray]:
        """The arrays a model file stores, by name."""
        arrays: dict[str, np.ndarray] = {}
        for i, (g, s) in enumerate(zip(self.gaussians, self.stats)):
            arrays.update(g.to_arrays(f"level{i}.gauss."))
            arrays.update(s.to_arrays(f"level{i}.stats."))
        for i, (g, s) in enumerate(zip(self.map_gaussians, self.map_stats)):
            arrays.update(g.to_arrays(f"map{i}.gauss."))
            arrays.update(s.to_arrays(f"map{i}.stats."))
        for i, b in enumerate(self.map_banks):
            arrays[f"bank{i}.vectors"] = b.vectors
            arrays[f"bank{i}.ids"] = b.ids
        if self.calibration_scores is not None:
            arrays["calibration.scores"] = np.asarray(self.calibration_scores, dtype=np.float64)
        if self.map_calibration is not None:
            arrays["calibration.map_peaks"] = np.asarray(self.map_calibration, dtype=np.float64)
        if self.network is not None:
            arrays["network.int8"] = np.frombuffer(self.network, dtype=np.uint8)
        arrays.update({ADAPTED + k: np.asarray(v, dtype=np.float32) for k, v in (self.adapted or {}).items()})
        return {k: np.ascontiguousarray(v) for k, v in arrays.items()}

    def metadata(self) -> dict[str, Any]:
        """The learned part of a model file's metadata."""
        lay = self.layout
        return {
            "levels": list(lay.levels), "level_names": list(lay.level_names), "input_size": lay.input_size,
            "map_levels": list(lay.map_levels), "map_level_names": list(lay.map_level_names),
            "map_tiles": int(lay.setting("map_tiles")), "map_gaussians": [g.meta() for g in self.map_gaussians],
            "map_banks": [{"seen": b.seen, "scale": b.scale} for b in self.map_banks],
            "n_samples": self.n_samples, "feature_dims": self.feature_dims,
            "gaussians": [g.meta() for g in self.gaussians],
            "n_calibration": None if self.calibration_scores is None else int(self.calibration_scores.size),
            "calibration_method": self.calibration_method,
            **({} if self.map_calibration is None else {"n_map_calibration": int(self.map_calibration.size)}),
            **({} if self.network is None else {"int8": self.int8_info()}),
            **({} if self.adaptation is None else {"adaptation": self.adaptation}),
        }

    def adaptation_brief(self) -> dict[str, Any] | None:
        """The adaptation's record in brief (None without one): epochs asked and run, the one kept, how it chose, the
        held-out AUROC by epoch (validation) and the seconds."""
        if self.adaptation is None:
            return None
        a = self.adaptation
        return {"epochs": a.get("epochs"), "run": max(len(a.get("history", [])) - 1, 0), "kept_epoch": a.get("kept_epoch"),
                "stop": a.get("stop"), "validation_auroc": [h.get("validation_auroc") for h in a.get("history", [])],
                "seconds": a.get("seconds")}

    def int8_info(self) -> dict[str, str | None] | None:
        """The int8 network's weight format and the instruction set it was calibrated on (None for fp32)."""
        return None if self.network is None else {"format": self.int8_format, "calibrated_on": self.int8_isa}

    @classmethod
    def from_arrays(cls, meta: dict[str, Any], arrays: dict[str, np.ndarray]) -> "DetectorState":
        """Rebuild a state from a model file's (schema-checked) metadata and arrays; inconsistencies raise
        ValueError."""
        n_levels, n_maps = len(meta["levels"]), len(meta["map_gaussians"])
        gaussians = [LevelGaussian.from_arrays(arrays, f"level{i}.gauss.", meta["gaussians"][i]) for i in range(n_levels)]
        stats = [MomentStats.from_arrays(arrays, f"level{i}.stats.") for i in range(n_levels)]
        map_gaussians = [LevelGaussian.from_arrays(arrays, f"map{i}.gauss.", meta["map_gaussians"][i])
                         for i in range(n_maps)]
        map_stats = [MomentStats.from_arrays(arrays, f"map{i}.stats.") for i in range(n_maps)]
        banks = [NearestBank(arrays[f"bank{i}.vectors"], arrays[f"bank{i}.ids"], b["seen"], meta["map_coreset"],
                             float(b["scale"])) for i, b in enumerate(meta.get("map_banks", []))]
        if any(len(b.vectors) > b.seen for b in banks):
            raise ValueError("a memory bank holds more vectors than the locations it summarises")
        dims = [s.dim for s in stats]
        if dims != list(meta["feature_dims"]) or any(g.dim != d for g, d in zip(gaussians, dims)):
            raise ValueError(f"array shapes {dims} do not match the metadata {meta['feature_dims']}")
        if any(g.dim != s.dim for g, s in zip(map_gaussians, map_stats)):
            raise ValueError("map Gaussians and map statistics differ in dimension")
        calibration = arrays.get("calibration.scores")
        if calibration is not None and (calibration.ndim != 1 or not np.all(np.isfinite(calibration))):
            raise ValueError("calibration scores must be a 1-D array of finite numbers")
        if meta.get("n_calibration") != (None if calibration is None else int(calibration.size)):
            raise ValueError(f"{meta.get('n_calibration')} calibration scores in the metadata, "
                             f"{0 if calibration is None else calibration.size} stored")
        peaks = arrays.get("calibration.map_peaks")
        if peaks is not None and (peaks.ndim != 1 or peaks.size == 0 or not banks):
            raise ValueError("calibration.map_peaks must be a non-empty 1-D array, in a model with memory banks")
        if meta.get("n_map_calibration") != (None if peaks is None else int(peaks.size)):
            raise ValueError(f"{meta.get('n_map_calibration')} map calibration peaks in the metadata, "
                             f"{0 if peaks is None else peaks.size} stored")
        counts = {s.n for s in stats}
        if counts != {meta["n_samples"]}:
            raise ValueError(f"sample counts {sorted(counts)} do not match n_samples {meta['n_samples']}")
        layout = Layout(list(meta["levels"]), list(meta["level_names"]), meta["input_size"], list(meta["map_levels"]),
                        list(meta["map_level_names"]), feature_settings(meta))
        method = meta.get("calibration_method")
        if method is not None and (method not in CALIBRATIONS or calibration is None):
            raise ValueError(f"calibration_method must be one of {', '.join(CALIBRATIONS)} with calibration scores")
        network = arrays.get("network.int8")
        # int8 files that record no format were written before formats were recorded, all in LEGACY_INT8_FORMAT
        int8 = meta.get("int8") or {"format": LEGACY_INT8_FORMAT, "calibrated_on": None}
        adapted = {k.removeprefix(ADAPTED): v for k, v in arrays.items() if k.startswith(ADAPTED)} or None
        return cls(layout, stats, gaussians, meta["map_method"], int(meta["map_pool"]), map_stats, map_gaussians,
                   banks, calibration, method, meta.get("map_grid", "coarsest"), peaks,
                   *((None, None, None) if network is None else
                     (network.tobytes(), int8["format"], int8["calibrated_on"])), adapted, meta.get("adaptation"))


def _learned(attr: str, doc: str, need_fit: bool = True) -> property:
    """A fitted attribute read from the learned state (NotFittedError before ``fit``)."""
    return property(lambda self: attrgetter(attr)(self._state(need_fit)), doc=doc)


class FittedAttributes:
    """The fitted attributes (names ending in ``_``) of an estimator whose learned state is ``state_``: read from
    the state, NotFittedError before ``fit``."""

    def _state(self, need_fit: bool = True) -> DetectorState:
        state = self.__dict__.get("state_")
        if state is None or (need_fit and not state.fitted):
            raise NotFittedError("this GaussianAD is not fitted yet: call fit first")
        return state

    levels_ = _learned("layout.levels", "Backbone level indices modelled.", False)
    level_names_ = _learned("layout.level_names", "Names of the modelled levels.", False)
    input_size_ = _learned("layout.input_size", "Network input side S.", False)
    map_levels_ = _learned("layout.map_levels", "Anomaly-map level indices.", False)
    map_level_names_ = _learned("layout.map_level_names", "Anomaly-map level names.", False)

    @property
    def map_tiles_(self) -> int:
        """Tiles a side of the anomaly maps (``map_tiles='auto'`` decided at fit; 1 = untiled)."""
        return int(self._state(False).layout.setting("map_tiles"))
    stats_ = _learned("stats", "Per-level moment statistics.", False)
    map_stats_ = _learned("map_stats", "Per-map-level moment statistics (gaussian maps).", False)
    map_banks_ = _learned("map_banks", "Per-map-level memory banks (nearest maps).", False)
    gaussians_ = _learned("gaussians", "Per-level Gaussians.")
    map_gaussians_ = _learned("map_gaussians", "Per-map-level Gaussians (gaussian maps).")
    n_samples_ = _learned("n_samples", "Number of training images.")
    feature_dims_ = _learned("feature_dims", "Per-level feature dimension.")
    dofs_ = _learned("dofs", "Degrees of freedom of each level's chi-square law (dimension after reduction).")
    adaptation_ = _learned("adaptation", "The adaptation's record (adapt > 0): epoch kept, per-epoch figures.")

    @property
    def calibration_scores_(self) -> np.ndarray:
        """Held-out normal scores for the conformal rule (absent without calibration)."""
        scores = self._state().calibration_scores
        if scores is None:
            raise AttributeError("this model has no calibration scores: fit with calibration or call calibrate")
        return scores

    @property
    def map_calibration_(self) -> np.ndarray:
        """Leave-one-image-out map peaks of the training images: the fused image score's calibration of the map
        evidence (absent without a fused image score)."""
        peaks = self._state().map_calibration
        if peaks is None:
            raise AttributeError("this model has no map calibration: fit it with image_score='fused'")
        return peaks

    @property
    def has_maps(self) -> bool:
        """Whether this model is fitted with anomaly maps."""
        return self.__dict__.get("state_") is not None and self.state_.has_maps
