"""Fitting: streaming statistics for ``fit``, batches of pooled features and raw feature maps folded into moment statistics
and streaming memory-bank coresets, so that no image is held after its batch, and the calibration scores of the conformal rule
(split, or cross-conformal from per-fold statistics gathered in the same pass) (plain numpy)."""

from __future__ import annotations

import contextlib
import math
from dataclasses import replace
from typing import Any, Callable, Iterable, Iterator, Sequence

import numpy as np

from ..core import maps
from ..core.bank import NearestBank, StreamingCoreset
from .decision import DecisionRule
from ..errors import DataError, InvalidParameterError
from ..core.gaussian import LevelGaussian, MomentStats
from .params import calibration_for
from .state import DetectorState, Layout, feature_settings, prepare_maps

# Backbone features are float32: a relative spread below its rounding level means identical images.
IDENTICAL_SPREAD_FLOAT32 = (64.0 * float(np.finfo(np.float32).eps)) ** 2
# A distributed fit's partitions keep this many times the bank's coreset fraction as candidates, so that the client's
# greedy selection over them chooses among more than it keeps (EXPERIMENTS.md, "Distributed fit").
PART_OVERSAMPLE = 4.0


class Accumulator:
    """Running statistics of the pooled features, plus per map level either the statistics of every location
    (``gaussian`` maps) or a :class:`~gaussad.core.bank.StreamingCoreset` of the location vectors with their image ids
    (``nearest`` maps: ``coresets``), so that a fit holds its banks and one buffer of vectors, not every image's.

    ``prepare`` turns raw feature maps into the vectors the map method scores (:meth:`DetectorState.map_inputs`);
    ``names`` name the map levels in errors.
    """

    def __init__(self, prepare, stats: list[MomentStats] | None = None, map_stats: list[MomentStats] | None = None,
                 coresets: list[StreamingCoreset] | None = None, names: Sequence[str] = (), keep_locations: bool = False):
        self.stats = stats
        self.map_stats = map_stats or None
        self.prepare = prepare
        self.coresets = coresets
        self.names = list(names)
        # With ``keep_locations`` (a fused image score) every location vector is also kept, to score it against the
        # finished banks (:meth:`banks`): that fit's memory grows with the images, the price of its map calibration.
        self.kept: list[list] | None = [[] for _ in coresets or []] if keep_locations else None
        self.peaks: np.ndarray | None = None  # leave-one-image-out map peaks (:meth:`banks`)

    def add(self, pooled: Sequence[np.ndarray], fmaps: Sequence[np.ndarray] = (),
            image_ids: np.ndarray | None = None) -> None:
        """Fold one batch: pooled (B, C_l) arrays per level and, when map levels are set, raw (B, C, H, W) maps."""
        self.stats = [MomentStats.from_array(b) for b in pooled] if self.stats is None else [
            s.update(b) for s, b in zip(self.stats, pooled)]
        if fmaps:
            self.add_maps(fmaps, image_ids)

    def add_maps(self, fmaps: Sequence[np.ndarray], image_ids: np.ndarray) -> None:
        """Fold one batch of raw (B, C, H, W) feature maps, one per map level, of images ``image_ids``."""
        fmaps = self.prepare(fmaps)
        if self.coresets is None:
            self.map_stats = maps.accumulate(self.map_stats, fmaps)
            return
        for i, (coreset, f) in enumerate(zip(self.coresets, fmaps)):
            vectors, ids = maps.patch_vectors(f, np.float32), np.repeat(image_ids, f.shape[2] * f.shape[3])
            with self._level(i):
                coreset.add(vectors, ids)
            if self.kept is not None:
                self.kept[i].append((vectors, ids))

    def banks(self) -> list[NearestBank]:
        """The banks of the coresets (the base banks when no location was added; none without either), built level
        by level, each coreset's copies released as its bank is made. With kept locations, each is also scored by
        its level's bank with its own image's members skipped, and :attr:`peaks` becomes the leave-one-image-out map
        peak of every image (:meth:`DetectorState.map_peaks`)."""
        out, cells, ids = [], [], None
        for i, coreset in enumerate(self.coresets or []):
            with self._level(i):
                bank = coreset.result()
            if bank is None:
                return []
            out.append(bank)
            if self.kept is not None and self.kept[i]:
                vectors, ids = (np.concatenate(part) for part in zip(*self.kept[i]))
                self.kept[i].clear()
                cells.append(bank.distances(vectors, ids))
                del vectors
        if cells:
            self.peaks = image_peaks(np.mean(cells, axis=0), ids)
        return out

    @contextlib.contextmanager
    def _level(self, i: int) -> Iterator[None]:
        """Bank errors (ValueError) as a DataError naming map level ``i``."""
        try:
            yield
        except ValueError as exc:
            name = self.names[i] if i < len(self.names) else f"map{i}"
            raise DataError(f"map level {name}: {exc}") from None


def image_peaks(cells: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """The largest value of each image's cells (``ids``: the image of each cell), in the order of the image ids."""
    images, which = np.unique(ids, return_inverse=True)
    peaks = np.full(images.size, -np.inf, dtype=np.float64)
    np.maximum.at(peaks, which, cells.astype(np.float64))
    return peaks


def check_finite(pooled: Sequence[np.ndarray], idx: np.ndarray, name_of) -> None:
    """Refuse a batch in which the backbone gave NaN or infinite features (``name_of(i)`` names source i)."""
    finite = np.all([np.isfinite(b).all(axis=1) for b in pooled], axis=0)
    if not finite.all():
        first = int(idx[np.argmin(finite)])
        raise DataError(f"{name_of(first)}: the backbone gave NaN or infinite features for {int((~finite).sum())} "
                        "image(s) of this batch (damaged weights file?)")


def check_spread(stats: Iterable[MomentStats], names: Sequence[str]) -> None:
    """Refuse training images whose features vary only at float32 rounding level (identical images)."""
    for name, s in zip(names, stats):
        if s.n >= 2 and s.relative_spread() <= IDENTICAL_SPREAD_FLOAT32:
            raise DataError(f"the {s.n} training images give identical features at level {name} (up to float32 "
                            "rounding): there is no variation to model; use images that show the normal variation")


def calibration_split(n: int, fraction: float | None, seed: int | None) -> tuple[np.ndarray, np.ndarray] | None:
    """(fit, held-out) indices: ceil(fraction * n) held out by a seeded permutation; None without a fraction."""
    if fraction is None:
        return None
    n_cal = math.ceil(float(fraction) * n)
    if n - n_cal < 2:
        raise DataError(f"calibration={fraction} holds out {n_cal} of {n} images, leaving fewer than 2 to fit on")
    order = np.random.default_rng(seed).permutation(n)
    return np.sort(order[n_cal:]), np.sort(order[:n_cal])


def cv_folds(n: int, k: int, seed: int | None) -> np.ndarray:
    """Fold number of each of ``n`` positions: a seeded permutation cut into ``min(k, n)`` near-equal folds."""
    k = min(int(k), n)
    if n - math.ceil(n / k) < 3:  # Ledoit-Wolf does not shrink with 2 samples: a fold model needs 3
        raise DataError(f"cross-conformal calibration with {k} folds of {n} images leaves fewer than 3 images to fit "
                        "each fold's model on: the conformal decision (the default preset's) needs at least 4 training "
                        "images; give more, or decide by chi2 (threshold='chi2', --threshold chi2)")
    fold = np.empty(n, dtype=np.int64)
    for f, part in enumerate(np.array_split(np.random.default_rng(seed).permutation(n), k)):
        fold[part] = f
    return fold


class CrossFolds:
    """Cross-conformal calibration, collected in the one streaming pass of ``fit``: each fold's moment statistics and
    the pooled features of every image. The model without fold f is the statistics of all images minus fold f's
    (:meth:`MomentStats.subtract`); it scores fold f's images, so every image gets an out-of-fold score."""

    def __init__(self, fold_of: np.ndarray):
        self.fold_of = fold_of
        self.stats: list[list[MomentStats] | None] = [None] * (int(fold_of.max()) + 1)
        self.features: list[list[np.ndarray]] = []
        self.positions: list[np.ndarray] = []

    def add(self, positions: np.ndarray, pooled: Sequence[np.ndarray]) -> None:
        """Fold one batch of pooled features (per level, rows in ``positions`` order) into its folds' statistics."""
        positions = np.asarray(positions, dtype=np.int64)
        self.features.append(list(pooled))
        self.positions.append(positions)
        folds = self.fold_of[positions]
        for f in np.unique(folds):
            part = [b[folds == f] for b in pooled]
            prev = self.stats[f]
            self.stats[f] = [MomentStats.from_array(b) for b in part] if prev is None else [
                s.update(b) for s, b in zip(prev, part)]

    def merge(self, other: "CrossFolds") -> "CrossFolds":
        """The folds of both (the same fold assignment, disjoint images)."""
        out = CrossFolds(self.fold_of)
        out.stats = [_merge_optional(a, b) for a, b in zip(self.stats, other.stats)]
        out.features, out.positions = self.features + other.features, self.positions + other.positions
        return out

    def scores(self, total: list[MomentStats], fit: Callable[[list[MomentStats]], DetectorState]) -> np.ndarray:
        """Out-of-fold image scores, in the order of the images' positions; ``fit`` makes a state of statistics."""
        if not self.positions:
            raise DataError("none of the calibration images could be read")
        positions = np.concatenate(self.positions)
        feats = [np.concatenate(level) for level in zip(*self.features)]
        folds = self.fold_of[positions]
        scores = np.empty(positions.size)
        for f, fold_stats in enumerate(self.stats):
            if fold_stats is None:
                continue
            rows = folds == f
            state = fit([t.subtract(s) for t, s in zip(total, fold_stats)])
            scores[rows] = state.level_distances([x[rows] for x in feats]).mean(axis=1)
        return scores[np.argsort(positions, kind="stable")]


class Trainer:
    """What ``fit`` does, for one set of resolved settings (:func:`gaussad.detector.params.resolved`): images or plain
    feature arrays in, a :class:`DetectorState` out.

    ``batches(images, desc, on_error, skipped)`` yields (indices, pooled features per level, raw feature maps per
    map level) batch by batch (the feature extractor, with its progress bar); ``layout`` is what it extracts.
    Images left out by ``on_error="skip"`` are added to ``skipped`` as (name, message).
    """

    def __init__(self, settings: dict[str, Any], batches: Callable | None = None, layout: Layout | None = None):
        self.settings, self.batches, self.layout = settings, batches, layout
        self.skipped: list[tuple[str, str]] = []

    # ----- images ----------------------------------------------------------------------------------------------
    def fit_images(self, images: list, on_error: str = "fail") -> DetectorState:
        """A state from normal images; with ``calibration`` a fraction is held out and scored by a model fitted on
        the rest (the calibration scores), and the state is then fitted on all images."""
        if len(images) < 2:
            raise DataError(f"need at least 2 training images, got {len(images)}")
        calibration = self.calibration(len(images))
        acc = self._accumulator(self.layout, keep_locations=self.fused and calibration == "cv")
        if calibration == "cv":
            folds = CrossFolds(cv_folds(len(images), self.settings["calibration_folds"], self.settings["random_state"]))
            self._stream(images, acc, self.layout, collect=folds.add, on_error=on_error)
            scores = folds.scores(acc.stats, lambda stats: self._from_stats(self.layout, stats))
            state = self._checked(self._finish(acc, self.layout)).with_calibration(scores, "cv")
            return state.with_map_calibration(acc.peaks) if self.fused else state
        split = calibration_split(len(images), calibration, self.settings["random_state"])
        if split is None:
            self._stream(images, acc, self.layout, on_error=on_error)
            return self._checked(self._finish(acc, self.layout))
        keep, held = split
        self._stream([images[i] for i in keep], acc, self.layout, keep, on_error=on_error)
        partial = self._from_stats(self.layout, acc.stats)
        batches: list = []
        self._stream([images[i] for i in held], acc, self.layout, held, lambda _, b: batches.append(b),
                     on_error=on_error)
        if not batches:
            raise DataError("none of the calibration images could be read")
        scores = partial.level_distances([np.concatenate(level) for level in zip(*batches)]).mean(axis=1)
        return self._checked(self._finish(acc, self.layout)).with_calibration(scores, "split")

    @property
    def fused(self) -> bool:
        """Whether the image score is fused, so that a fit with maps also calibrates the map evidence."""
        return self.settings.get("image_score") == "fused"

    def calibration(self, n: int) -> str | float | None:
        """The calibration used on ``n`` images (:func:`gaussad.detector.params.calibration_for`)."""
        return calibration_for(self.settings, n)

    def partial_fit_images(self, images: list, prev: DetectorState | None, on_error: str = "fail") -> DetectorState:
        """``prev`` (None: nothing yet) plus the statistics of ``images``; calibration scores are dropped."""
        layout = self.layout
        if prev is not None:  # a backbone, levels or input size set anew since the fit: refused, never ignored
            from ..intake.features import refitting_differences

            refuse_differences(prev.layout.differences(replace(prev.layout, settings=layout.settings))
                               + refitting_differences(self.settings, prev.layout))
            layout = prev.layout
        acc = self._accumulator(layout, prev)
        first_id = max((int(b.ids.max()) + 1 for b in prev.map_banks if b.ids.size), default=0) if prev else 0
        self._stream(images, acc, layout, first_id=first_id, on_error=on_error)
        return self._finish(acc, layout, prev, allow_few=True)

    # ----- plain feature arrays --------------------------------------------------------------------------------
    def fit_arrays(self, feats: list[np.ndarray], layout: Layout) -> DetectorState:
        """A state from checked per-level arrays (n, d_l), with calibration as :meth:`fit_images`."""
        n = feats[0].shape[0]
        if n < 2:
            raise DataError(f"need at least 2 training samples, got {n}")
        calibration = self.calibration(n)
        if calibration == "cv":
            folds = CrossFolds(cv_folds(n, self.settings["calibration_folds"], self.settings["random_state"]))
            folds.add(np.arange(n), feats)
            stats = [MomentStats.from_array(f) for f in feats]
            scores = folds.scores(stats, lambda fold_stats: self._from_stats(layout, fold_stats))
            return self._checked(self._from_stats(layout, stats)).with_calibration(scores, "cv")
        split = calibration_split(n, calibration, self.settings["random_state"])
        if split is None:
            return self._checked(self._from_stats(layout, [MomentStats.from_array(f) for f in feats]))
        keep, held = split
        stats = [MomentStats.from_array(f[keep]) for f in feats]
        held_features = [f[held] for f in feats]
        scores = self._from_stats(layout, stats).level_distances(held_features).mean(axis=1)
        state = self._from_stats(layout, [s.update(f) for s, f in zip(stats, held_features)])
        return self._checked(state).with_calibration(scores, "split")

    def partial_fit_arrays(self, feats: list[np.ndarray], prev: DetectorState | None) -> DetectorState:
        """``prev`` plus the statistics of checked per-level arrays; calibration scores are dropped."""
        stats = [MomentStats.from_array(f) if prev is None else s.update(f)
                 for s, f in zip(prev.stats if prev else feats, feats)]
        return self._from_stats(prev.layout if prev is not None else Layout.plain(len(feats)), stats, allow_few=True)

    def fit_maps(self, state: DetectorState, per_image: Sequence[Sequence[np.ndarray]]) -> DetectorState:
        """``state`` with its anomaly-map part replaced by one fitted on raw feature maps (per image, one (C, H, W)
        array per map level: the state's, else those of the settings, numbered map0, map1, ... without a
        backbone)."""
        if len(per_image) < 2:
            raise DataError(f"need feature maps of at least 2 training images, got {len(per_image)}")
        layout = state.layout if state.layout.map_levels else self._map_layout(state.layout, len(per_image[0]))
        if len(layout.map_levels) != len(per_image[0]):
            raise DataError(f"feature maps of {len(per_image[0])} levels given, the model has {len(layout.map_levels)} "
                            "map levels")
        acc = self._accumulator(layout)
        channels = {tuple(np.shape(f)[0] for f in image) for image in per_image}
        if len(channels) != 1 or any(np.ndim(f) != 3 for image in per_image for f in image):
            raise DataError("feature maps must be (C, H, W) arrays with the same channels C for every image")
        for idx, fm in maps.shape_groups(per_image):
            acc.add_maps(fm, idx)
        banks = acc.banks()
        map_stats = acc.map_stats or []
        state = replace(state, layout=layout, map_method=self.settings["map_method"], map_grid=self.settings["map_grid"],
                        map_pool=int(self.settings["map_pool"]), map_stats=map_stats, map_banks=banks,
                        map_gaussians=[LevelGaussian.fit(s, "ledoit-wolf") for s in map_stats], map_calibration=None)
        if not self.fused:
            return state
        return state.with_map_calibration(state.map_peaks_of(per_image, np.arange(len(per_image))))

    def _map_layout(self, layout: Layout, n_maps: int) -> Layout:
        if self.settings["backbone"] is None:
            return replace(layout, map_levels=list(range(n_maps)), map_level_names=[f"map{i}" for i in range(n_maps)])
        from ..intake.backbones import get_spec, resolve_levels

        names = get_spec(self.settings["backbone"]).level_names
        levels = resolve_levels(names, self.settings["map_levels"])
        return replace(layout, map_levels=levels, map_level_names=[names[i] for i in levels])

    # ----- steps -----------------------------------------------------------------------------------------------
    def _seed(self) -> int:
        return 0 if self.settings["random_state"] is None else int(self.settings["random_state"])

    def coresets(self, n: int, base: Sequence[NearestBank] = (), oversample: float = 1.0) -> list[StreamingCoreset]:
        """One streaming coreset per map bank: ``n`` of them, extending the ``base`` banks when given, keeping
        ``oversample`` times the settings' ``map_coreset`` fraction (at most all)."""
        fraction = min(1.0, oversample * float(self.settings["map_coreset"]))
        return [StreamingCoreset(fraction, self._seed(), base=base[i] if base else None) for i in range(n)]

    def _accumulator(self, layout: Layout, prev: DetectorState | None = None, oversample: float = 1.0,
                     keep_locations: bool = False) -> Accumulator:
        method, pool, grid = self.settings["map_method"], int(self.settings["map_pool"]), self.settings["map_grid"]
        n_maps = min(len(layout.map_levels), 1) if grid == "finest" else len(layout.map_levels)
        coresets = self.coresets(n_maps, prev.map_banks if prev else (), oversample) if method == "nearest" else None
        return Accumulator(lambda f: prepare_maps(f, method, pool, grid), prev.stats if prev else None,
                           prev.map_stats if prev else None, coresets, self._bank_names(layout), keep_locations)

    def _stream(self, images: list, acc: Accumulator, layout: Layout, positions: Sequence[int] | None = None,
                collect: Callable | None = None, first_id: int = 0, on_error: str = "fail", whole: bool = True) -> None:
        """Fold images into ``acc``; ``positions`` are their indices in the caller's list (to name them, and as
        image ids after ``first_id``); ``collect(positions, pooled)`` receives each batch of pooled features."""
        from ..intake.images import describe

        pos = list(range(len(images))) if positions is None else [int(p) for p in positions]
        skipped: list = []
        for idx, batch, fmaps in self.batches(images, "fit", on_error, skipped):
            check_finite(batch, idx, lambda i: describe(images[i], pos[i]))
            where = np.asarray([pos[i] for i in idx], dtype=np.int64)
            if collect is not None:
                collect(where, batch)
            acc.add(batch, fmaps, first_id + where)
        self.skipped += [(describe(images[i], pos[i]), msg) for i, msg in skipped]
        if whole:
            self._check_stats(acc.stats, layout)

    def _check_stats(self, stats: list[MomentStats] | None, layout: Layout) -> None:
        if stats is None:
            raise DataError("no readable training images given")
        if not (self.settings["estimator"] == "l2" and self.settings["reduction"] is None):
            check_spread(stats, layout.level_names)

    # ----- partitions (gaussad.tools.distributed) ----------------------------------------------------------------------
    def distributed_calibration(self, n_total: int) -> str | None:
        """The calibration of a distributed fit of ``n_total`` images ('cv' or None); the settings it cannot fit raise
        :class:`InvalidParameterError` (checked before any work is sent to a cluster, and on each worker)."""
        calibration = self.calibration(n_total)
        if self.settings["calibration"] is None and calibration is not None:
            calibration = "cv"
        if calibration not in (None, "cv"):
            raise InvalidParameterError("a distributed fit supports calibration 'cv' or none, not a held-out "
                                        f"fraction ({calibration}): use --calibration cv")
        return calibration

    def fit_part(self, images: list, positions: Sequence[int], n_total: int, on_error: str = "fail") -> "Part":
        """The mergeable statistics of one partition of a fit's image list: ``positions`` are the images' indices in
        the whole list of ``n_total`` (their names, bank image ids and calibration folds); bank candidates are the
        partition's own coreset. Without a calibration given, the conformal threshold is calibrated cross-conformally
        at any number of images (one process holds out a fraction from :data:`gaussad.detector.params.CV_BELOW` images on,
        which here would need a second pass; the fold models come free from the merged statistics)."""
        calibration = self.distributed_calibration(n_total)
        acc = self._accumulator(self.layout, oversample=PART_OVERSAMPLE)
        folds = None
        if calibration == "cv":
            folds = CrossFolds(cv_folds(n_total, self.settings["calibration_folds"], self.settings["random_state"]))
        self._stream(images, acc, self.layout, positions, folds.add if folds else None, on_error=on_error, whole=False)
        banks = [BankCandidates(b.vectors, b.ids, b.seen) for b in acc.banks()]
        return Part(acc.stats, acc.map_stats, banks, folds, list(self.skipped))

    def fit_parts(self, part: "Part", coresets: list[StreamingCoreset] | None = None) -> DetectorState:
        """The state of a fit from its partitions' merged :class:`Part`: the Gaussians as one fit's, each bank a
        streaming greedy selection over the partitions' coresets, ``coresets`` (:meth:`coresets`) when the caller
        fed them the candidates as they came, else the candidates merged into ``part``."""
        self.skipped = list(part.skipped)
        self._check_stats(part.stats, self.layout)
        if coresets is None:
            coresets = self.coresets(len(part.banks))
            for coreset, candidates in zip(coresets, part.banks):
                coreset.add(candidates.vectors, candidates.ids, candidates.seen)
        acc = Accumulator(None, coresets=coresets, names=self._bank_names(self.layout))
        state = self._checked(self._state(self.layout, part.stats, part.map_stats, acc.banks()))
        if part.folds is None:
            return state
        scores = part.folds.scores(part.stats, lambda stats: self._from_stats(self.layout, stats))
        return state.with_calibration(scores, "cv")

    def _from_stats(self, layout: Layout, stats: list[MomentStats], allow_few: bool = False) -> DetectorState:
        s = self.settings
        return DetectorState.fit(layout, stats, s["estimator"], s["reduction"], float(s["variance"]), allow_few=allow_few)

    def _finish(self, acc: Accumulator, layout: Layout, prev: DetectorState | None = None,
                allow_few: bool = False) -> DetectorState:
        state = self._state(layout, acc.stats, acc.map_stats, acc.banks(), allow_few)
        # images added to a fitted model went through its network: an adapted one stays, with its record
        return state if prev is None else replace(state, adapted=prev.adapted, adaptation=prev.adaptation)

    def _state(self, layout: Layout, stats: list[MomentStats], map_stats: list[MomentStats] | None,
               banks: list[NearestBank], allow_few: bool = False) -> DetectorState:
        """The state of these statistics and banks under the settings' estimator and map method, pool and grid."""
        s = self.settings
        return DetectorState.fit(layout, stats, s["estimator"], s["reduction"], float(s["variance"]), s["map_method"],
                                 int(s["map_pool"]), map_stats, banks, allow_few, s["map_grid"])

    def _bank_names(self, layout: Layout) -> list[str]:
        """Names of the maps scored: the map levels, or their concatenation on the finest grid."""
        if self.settings["map_grid"] == "finest":
            return ["+".join(layout.map_level_names)]
        return list(layout.map_level_names)

    def _checked(self, state: DetectorState) -> DetectorState:
        """Refuse a state on which the model's own threshold cannot be computed (Hotelling with n <= dof)."""
        if self.settings["threshold"] == "hotelling":
            DecisionRule("hotelling", self.settings["fpr"]).check(state)
        return state


class BankCandidates:
    """Bank candidates of some partitions of a fit: their coresets' members (``vectors``, ``ids``) and the number of
    locations they summarise (``seen``)."""

    def __init__(self, vectors: np.ndarray, ids: np.ndarray, seen: int):
        self.vectors, self.ids, self.seen = vectors, ids, int(seen)

    def merge(self, other: "BankCandidates") -> "BankCandidates":
        return BankCandidates(np.concatenate([self.vectors, other.vectors]), np.concatenate([self.ids, other.ids]),
                              self.seen + other.seen)


def _merge_optional(a: list[MomentStats] | None, b: list[MomentStats] | None) -> list[MomentStats] | None:
    if a is None or b is None:
        return a if b is None else b
    return [x.merge(y) for x, y in zip(a, b)]


class Part:
    """What one partition of a distributed fit returns, and what a tree reduction merges: the moment statistics
    (exact), the bank candidates, the cross-conformal folds and the skipped images."""

    def __init__(self, stats: list[MomentStats] | None, map_stats: list[MomentStats] | None,
                 banks: list[BankCandidates], folds: "CrossFolds | None", skipped: list[tuple[str, str]]):
        self.stats, self.map_stats, self.banks, self.folds, self.skipped = stats, map_stats, banks, folds, skipped

    def merge(self, other: "Part") -> "Part":
        banks = [a.merge(b) for a, b in zip(self.banks, other.banks)] if self.banks and other.banks else \
            (self.banks or other.banks)
        return Part(_merge_optional(self.stats, other.stats), _merge_optional(self.map_stats, other.map_stats), banks,
                    None if self.folds is None else self.folds.merge(other.folds), self.skipped + other.skipped)

    def without_banks(self) -> "Part":
        return Part(self.stats, self.map_stats, [], self.folds, self.skipped)


def layout_of(extractor: Any, settings: dict[str, Any]) -> Layout:
    """The layout of the features a :class:`~gaussad.intake.features.FeatureExtractor` gives, made with ``settings`` (the
    map tiles it runs: ``map_tiles='auto'`` decided)."""
    return Layout(list(extractor.levels), list(extractor.level_names), extractor.input_size,
                  list(extractor.map_levels), list(extractor.map_level_names),
                  feature_settings({**settings, "map_tiles": extractor.map_tiles}))


def refuse_differences(differences: list[str]) -> None:
    """Refuse to combine statistics of features that differ (merge, partial_fit), naming the differences."""
    if differences:
        raise InvalidParameterError(f"cannot combine statistics of different features: they differ in "
                                    f"{'; '.join(differences)}")
