"""Decision rules: a threshold method and a target false-positive rate turned into score thresholds, p-values and
decisions for a fitted state (on top of :mod:`gaussad.core.threshold`'s laws)."""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from ..core import fusion
from ..errors import DataError, GaussadError
from .params import check_value
from ..core.threshold import (chi2_pvalue, chi2_threshold, conformal_pvalue, conformal_threshold, hotelling_pvalue,
                              hotelling_threshold)


RANKING = "fisher"  # how the fused score's smoothed p-values are combined for ranking (EXPERIMENTS.md, issue 14)


class Calibrated(Protocol):
    """What a rule needs of a fitted state."""

    dofs: list[int]
    n_samples: int
    calibration_scores: np.ndarray | None
    map_calibration: np.ndarray | None

    @property
    def layout(self): ...


def real_array(values, what: str) -> np.ndarray:
    """``values`` as a float64 array when they are real numbers; complex numbers (whose imaginary part a float
    conversion drops with only a warning), text and other objects raise DataError naming ``what``."""
    try:
        raw = np.asarray(values)
    except (TypeError, ValueError):  # ragged nested lists
        raise DataError(f"{what} must be real numbers") from None
    if raw.dtype.kind not in "biuf" and not (raw.dtype.kind == "O" and all(
            isinstance(v, numbers.Real) for v in raw.flat)):
        kind = "complex numbers" if raw.dtype.kind == "c" or any(isinstance(v, complex) for v in raw.flat) else \
            "text" if raw.dtype.kind in "US" else "other objects"
        raise DataError(f"{what} must be real numbers, got {kind}")
    return raw.astype(np.float64)


def check_distances(level_scores: np.ndarray, n_levels: int) -> np.ndarray:
    """Per-level distances as a float64 (n, n_levels) array; anything else (another shape, NaN or negative
    values, non-numbers, complex numbers) raises DataError: a decision on them would be silently wrong."""
    d = np.atleast_2d(real_array(level_scores, "level distances"))
    if d.ndim != 2 or d.shape[1] != n_levels:
        raise DataError(f"level distances must be an (n, {n_levels}) array, one column per level; got shape {d.shape}")
    if np.isnan(d).any():
        raise DataError(f"{int(np.isnan(d).any(axis=1).sum())} row(s) of level distances are NaN: no decision possible")
    if (d < 0).any():
        raise DataError("level distances must be non-negative (they are Mahalanobis distances, not squared or signed)")
    return d


@dataclass(frozen=True)
class DecisionRule:
    """``method`` (chi2, hotelling or conformal) at target false-positive rate ``fpr``.

    chi2 and hotelling flag an image when any level exceeds its threshold at ``fpr / n_levels`` (Bonferroni), so
    under that law the false-positive rate stays at most ``fpr``; the p-value is the Bonferroni-adjusted minimum
    of the per-level p-values. conformal flags an image whose score (mean over levels) exceeds the conformal
    quantile of the calibration scores (held-out or out-of-fold scores: the rank ``ceil((n + 1)(1 - fpr))`` either
    way); its p-value is the conformal p-value, ``p <= fpr`` exactly when flagged.

    With ``image_score='fused'`` (method conformal) the evidence is the global score and the map peak: an image is
    flagged when the full-conformal p-value of their Fisher combination (:func:`gaussad.core.fusion.fisher_pvalue`, against
    the paired out-of-fold scores of the training images) is at most ``fpr``; the image score is ``-log10`` of
    :data:`RANKING`'s combination of smoothed p-values.
    """

    method: str
    fpr: float
    image_score: str = "global"

    def __post_init__(self) -> None:
        check_value("threshold", self.method)
        check_value("fpr", self.fpr)
        check_value("image_score", self.image_score)
        object.__setattr__(self, "fpr", float(self.fpr))

    @property
    def fused(self) -> bool:
        return self.image_score == "fused"

    def target_fpr(self, state: Calibrated) -> float:
        """The false-positive rate the rule decides at on ``state``: ``fpr``, except that a conformal rule (and a
        fused score's) cannot flag anything below ``1 / (n + 1)`` with n calibration scores, so it decides at that
        smallest rate instead (:func:`supported_fpr`; docs/guide/thresholds.md, "Which decision rule")."""
        return supported_fpr(self.fpr, calibration_size(state)) if self.method == "conformal" else self.fpr

    def level_thresholds(self, state: Calibrated, fpr: float | None = None) -> np.ndarray:
        """Per-level distance thresholds at false-positive rate ``fpr`` per level (default: the rule's)."""
        fpr = self.fpr if fpr is None else fpr
        if self.method == "hotelling":
            self.check(state)
            return np.array([hotelling_threshold(k, state.n_samples, fpr) for k in state.dofs])
        if self.method != "chi2":
            raise GaussadError(f"per-level thresholds exist for chi2 and hotelling, not {self.method!r}")
        return np.array([chi2_threshold(k, fpr) for k in state.dofs])

    def check(self, state: Calibrated, context: str = "") -> None:
        """Refuse a rule that cannot apply to ``state``: Hotelling where n <= dof at some level, conformal
        without calibration scores (``context`` starts the message)."""
        try:
            self._check(state)
        except GaussadError as exc:
            raise GaussadError(f"{context}{exc}") from None

    def _check(self, state: Calibrated) -> None:
        if self.fused and self.method != "conformal":
            raise GaussadError(f"the model's fused image score decides by conformal p-values; threshold "
                               f"{self.method!r} cannot apply to it (use conformal)")
        if self.fused and (state.calibration_scores is None or state.map_calibration is None):
            raise GaussadError("the fused image score needs its calibration (out-of-fold global scores and "
                               "leave-one-image-out map peaks of the training images): fit the model with its maps, "
                               "or call calibrate(held-out normal images)")
        if self.fused and state.calibration_scores.size != state.map_calibration.size:
            raise GaussadError(f"the fused image score's calibrations must be paired, a global score and a map peak "
                               f"per training image; this model has {state.calibration_scores.size} and "
                               f"{state.map_calibration.size}: calibrate(held-out normal images) again")
        if self.method == "hotelling":
            n = state.n_samples
            bad = [f"{name} {k}" for name, k in zip(state.layout.level_names, state.dofs) if n <= k]
            if bad:
                raise GaussadError(
                    f"hotelling thresholds need more training images than dimensions at every level, but the model "
                    f"is fitted on {n} images and has {len(bad)} level(s) with as many dimensions or more "
                    f"({', '.join(bad)}); use the conformal threshold, fewer levels, or a pca reduction")
        if self.method == "conformal" and state.calibration_scores is None:
            raise GaussadError("the conformal threshold needs calibration scores: fit with threshold='conformal' or "
                               "calibration='cv' (CLI: --calibration cv) or call calibrate(held-out normal images)")

    def score_threshold(self, state: Calibrated) -> float:
        """A threshold on the image score (mean over levels).

        conformal: the split-conformal quantile of the calibration scores (``inf`` when ``fpr`` is below
        ``1 / (n_cal + 1)``). chi2/hotelling: the mean of the per-level thresholds at ``fpr / n_levels``; an image
        whose score exceeds it has some level above its threshold, so under the per-level laws this score
        threshold keeps the false-positive rate at most ``fpr`` (it flags a subset of what :meth:`decide` flags).
        """
        self.check(state)
        if self.fused:
            raise GaussadError("a fused image score has no score threshold: it flags an image when its p-value is "
                               f"at most the target FPR ({self.fpr:g})")
        if self.method == "conformal":
            return conformal_threshold(state.calibration_scores, self.target_fpr(state))
        return float(self.level_thresholds(state, self.fpr / len(state.dofs)).mean())

    def scores(self, state: Calibrated, level_scores: np.ndarray, map_peaks: np.ndarray | None = None,
               ranking: str = RANKING) -> np.ndarray:
        """Image scores (higher = more anomalous): the mean over levels of the distances, or with a fused image
        score ``-log10`` of the ``ranking`` combination of the evidence's smoothed p-values."""
        level_scores = check_distances(level_scores, len(state.dofs))
        if not self.fused:
            return level_scores.mean(axis=1)
        self.check(state)
        return fusion.ranking_score(*self._evidence(state, level_scores, map_peaks), ranking)

    def _evidence(self, state: Calibrated, level_scores: np.ndarray, map_peaks: np.ndarray | None
                  ) -> tuple[list[np.ndarray], list[np.ndarray]]:
        """(calibrations, evidence) of the fused score: the global score and the map peak."""
        if map_peaks is None:
            raise GaussadError("the fused image score needs the map peaks of the images (score them with maps)")
        peaks = real_array(map_peaks, "map peaks")
        if peaks.shape != (len(level_scores),) or not np.all(np.isfinite(peaks)):
            raise DataError(f"map peaks must be {len(level_scores)} finite numbers, one per image; got shape "
                            f"{peaks.shape}")
        return [state.calibration_scores, state.map_calibration], [level_scores.mean(axis=1), peaks]

    def decide(self, state: Calibrated, level_scores: np.ndarray,
               map_peaks: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Decisions (1 = anomalous) and p-values from per-level distances (n, n_levels) (and, for a fused image
        score, the images' map peaks)."""
        self.check(state)
        level_scores = check_distances(level_scores, len(state.dofs))
        if self.fused:
            pvalue = fusion.fisher_pvalue(*self._evidence(state, level_scores, map_peaks))
            return (pvalue <= self.target_fpr(state)).astype(int), pvalue
        if self.method == "conformal":
            cal = state.calibration_scores
            scores = level_scores.mean(axis=1)
            return ((scores > conformal_threshold(cal, self.target_fpr(state))).astype(int),
                    conformal_pvalue(scores, cal))
        n_levels = level_scores.shape[1]
        thresholds = self.level_thresholds(state, self.fpr / n_levels)
        if self.method == "hotelling":
            pvals = [hotelling_pvalue(level_scores[:, i], k, state.n_samples) for i, k in enumerate(state.dofs)]
        else:
            pvals = [chi2_pvalue(level_scores[:, i], k) for i, k in enumerate(state.dofs)]
        pvalue = np.minimum(np.stack(pvals, axis=1).min(axis=1) * n_levels, 1.0)
        return (level_scores > thresholds).any(axis=1).astype(int), pvalue

    def evidence(self, state: Calibrated, level_scores: np.ndarray, map_peaks: np.ndarray | None,
                 decided: np.ndarray, pvalues: np.ndarray) -> list[dict]:
        """Per image, the evidence the rule decided on, in numbers and in one plain sentence (``text``):
        chi2/hotelling: each level's threshold at ``fpr / n_levels`` and the levels above it (``tripped``);
        conformal: the image score, its threshold and p-value; fused: the conformal p-value of the global score and
        of the map peak against their calibrations and the combined (full-conformal Fisher) p-value. ``decided`` and
        ``pvalues`` are :meth:`decide`'s on the same images (taken, not computed again: the fused p-value costs
        n x calibration products)."""
        level_scores = check_distances(level_scores, len(state.dofs))
        alpha, names = self.target_fpr(state), list(state.layout.level_names)

        def verdict(flagged: int, p: float) -> str:
            return f"{'flagged' if flagged else 'ok'}: p = {p:.3g} {'<=' if flagged else '>'} target FPR {alpha:.3g}"

        if self.method in ("chi2", "hotelling"):
            limits = dict(zip(names, map(float, self.level_thresholds(state, alpha / len(names)))))
            out = []
            for row, flagged, p in zip(level_scores, decided, pvalues):
                tripped = [n for n, d in zip(names, row) if d > limits[n]]
                why = ", ".join(f"{n} {d:.2f} > {limits[n]:.2f}" for n, d in zip(names, row) if n in tripped)
                out.append({"rule": self.method, "level_thresholds": limits, "tripped": tripped,
                            "text": verdict(flagged, p) + (f" ({why})" if why else " (every level below its threshold)")})
            return out
        cal = state.calibration_scores
        scores, n = level_scores.mean(axis=1), int(cal.size)
        p_global = conformal_pvalue(scores, cal)
        if not self.fused:
            limit = conformal_threshold(cal, alpha)
            return [{"rule": "conformal", "global": {"score": float(s), "threshold": float(limit), "pvalue": float(pg)},
                     "text": f"{verdict(f, pg)}: the image score {s:.2f} is {plain_pvalue(pg, n)}"}
                    for s, pg, f in zip(scores, p_global, decided)]
        peaks = self._evidence(state, level_scores, map_peaks)[1][1]
        p_peak = conformal_pvalue(peaks, state.map_calibration)
        return [{"rule": "fused", "global": {"score": float(s), "pvalue": float(pg)},
                 "map_peak": {"value": float(m), "pvalue": float(pm)}, "pvalue": float(p),
                 "text": f"{verdict(f, p)}; the map peak {m:.2f} is {plain_pvalue(pm, n)}, the global score {s:.2f} "
                         f"{plain_pvalue(pg, n)}"}
                for s, m, pg, pm, p, f in zip(scores, peaks, p_global, p_peak, pvalues, decided)]


def plain_pvalue(p: float, n: int | None = None) -> str:
    """A conformal p-value in words: where the value lies among the ``n`` good training images' values."""
    if n and p <= 1.0 / (n + 1) + 1e-12:
        return f"beyond all {n} good training images"
    if p >= 0.5:
        return "typical of good images"
    if p < 1e-6:
        return "above all but fewer than 1 in a million good images"
    return f"reached by about 1 in {round(1 / p):,} good images"


def calibration_size(state: Calibrated) -> int | None:
    """How many calibration scores a conformal decision on ``state`` ranks against (a fused score's: its pairs);
    None without calibration."""
    cal, peaks = state.calibration_scores, getattr(state, "map_calibration", None)
    if cal is None:
        return None
    return int(cal.size) if peaks is None else int(min(cal.size, peaks.size))


def supported_fpr(fpr: float, n_calibration: int | None) -> float:
    """The target rate a conformal decision with ``n_calibration`` scores takes for ``fpr``: at least
    ``1 / (n + 1)``, the smallest p-value it can give (``fpr`` itself without calibration)."""
    return fpr if not n_calibration else max(float(fpr), fusion.min_fpr(n_calibration))


def fpr_note(rule: "DecisionRule", state: Calibrated) -> str | None:
    """One line when ``rule`` decides at another rate than asked (too few calibration scores), else None."""
    used = rule.target_fpr(state)
    if used == rule.fpr:
        return None
    n = calibration_size(state)
    need = math.ceil(1.0 / rule.fpr) - 1
    return (f"{n} calibration scores support a conformal false-positive rate of at least 1/{n + 1} = {used:.4g}: "
            f"deciding at {used:.4g} instead of {rule.fpr:g} (at least {need} calibration scores for {rule.fpr:g}; "
            "with cross-conformal calibration, the default, every training image gives one)")


def calibration_summary(state: Calibrated, fpr: float) -> dict | None:
    """:func:`global_calibration`, with the fused score's calibration (``fused``: the number of out-of-fold
    scores per piece of evidence and the smallest target FPR at which the fused decision can flag anything,
    ``1 / (n + 1)``) when the state has one."""
    out = global_calibration(state, fpr)
    peaks = getattr(state, "map_calibration", None)
    if out is not None and peaks is not None:
        n = min(int(peaks.size), out["n_scores"])
        out["fused"] = {"evidence": ["global score", "map peak"], "n_scores": [out["n_scores"], int(peaks.size)],
                        "min_fpr": fusion.min_fpr(n), "decision": "fisher, full conformal", "ranking": RANKING}
    return out


def global_calibration(state: Calibrated, fpr: float) -> dict | None:
    """The calibration scores in brief (None without): how they were made (split, cv, calibrate; None in files of
    older versions), how many, the smallest target FPR with a finite conformal threshold (``1 / (n + 1)``) and the
    conformal score threshold at ``fpr`` (None: infinite)."""
    cal = state.calibration_scores
    if cal is None:
        return None
    limit = conformal_threshold(cal, fpr)
    return {"method": getattr(state, "calibration_method", None), "n_scores": int(cal.size),
            "min_fpr": 1.0 / (cal.size + 1), "fpr": float(fpr),
            "score_threshold": float(limit) if np.isfinite(limit) else None}


RULE_TEXT = {
    "chi2": "chi-square per level, Bonferroni over levels",
    "hotelling": "Hotelling F law per level, Bonferroni over levels",
    "conformal": "split conformal on the image score",
    "fused": "full-conformal Fisher combination of the global score and the map peak",
}


def describe(rule: DecisionRule, state: Calibrated) -> dict:
    """How ``rule`` flags an image on ``state``, for people and reports: its ``method``, ``image_score`` and
    ``rule`` (in words); ``fpr``, the target rate it decides at (with ``fpr_requested`` and ``note`` where the
    calibration cannot support the rate asked for, :func:`fpr_note`); then for a fused score the p-value threshold,
    else the score threshold (None when infinite) and for chi2/hotelling each level's distance threshold (Bonferroni
    over levels); or ``error``, why the rule cannot apply to ``state``."""
    fpr = rule.target_fpr(state)
    out: dict = {"method": rule.method, "fpr": fpr, "image_score": rule.image_score,
                 "rule": RULE_TEXT["fused" if rule.fused else rule.method]}
    note = fpr_note(rule, state)
    if note:
        out.update(fpr_requested=rule.fpr, note=note)
    try:
        if rule.fused:
            rule.check(state)
            out["pvalue_threshold"] = fpr
            return out
        limit = rule.score_threshold(state)
        out["score_threshold"] = float(limit) if np.isfinite(limit) else None
        if rule.method != "conformal":
            thresholds = rule.level_thresholds(state, fpr / len(state.dofs))
            out["level_thresholds"] = dict(zip(state.layout.level_names, map(float, thresholds)))
    except GaussadError as exc:
        out["error"] = str(exc)
    return out


def summary(rule: DecisionRule, state: Calibrated) -> dict:
    """A fitted state and its decision rule in brief: levels, input size, training images, maps, the rule
    (:func:`describe`) and :func:`calibration_summary`."""
    return {"levels": list(state.layout.level_names), "input_size": state.layout.input_size,
            "n_samples": int(state.n_samples), "maps": bool(getattr(state, "has_maps", False)),
            "map_tiles": int(state.layout.setting("map_tiles")), "pool": state.layout.setting("pool"),
            "image_score": rule.image_score, "threshold": describe(rule, state),
            **({"precision": "fp32"} if getattr(state, "network", None) is None
               else {"precision": "int8", "int8": state.int8_info()}),
            **({"adaptation": state.adaptation_brief()} if getattr(state, "adaptation", None) else {}),
            "calibration": calibration_summary(state, rule.target_fpr(state))}
