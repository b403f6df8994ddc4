"""One inference pipeline: images -> evidence (per-level distances, map peaks, maps) -> decision -> result rows.

``gaussad score``, the service and the Dask workers all answer with the rows of :func:`result_rows`: the same
scores, decisions, p-values and evidence whichever way an image came in. :func:`predict` runs the whole chain on
image sources and yields it batch by batch, :func:`score` collects it; :func:`result_rows` is its second half, for
callers that computed the evidence themselves (a Dask worker reads its partition batch by batch with its own cached
extractor). How a model decides, for people and reports, is :func:`decision`; what a batch of results says beyond
its rows (drift, images unlike the training images) is :func:`batch_warnings`. The command line and the service
call no decision rule themselves: they format what comes back from here.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Iterator, Sequence

import numpy as np

from ..core.drift import drift, unlike_training
from .decision import DecisionRule, calibration_summary, describe, fpr_note
from .results import ResultRow, result_rows as _rows

if TYPE_CHECKING:
    from ..intake.images import ImageSource
    from .model import GaussianAD


@dataclass
class Scored:
    """What :func:`score` found: ``rows`` (one per image read, in input order), ``skipped`` ((index, message) of the
    images that could not be read), ``levels`` (n_read, L), ``maps`` ((n_read, S, S) with ``with_maps``, else None),
    the ``rule`` that decided, the target ``fpr`` it decided at and its ``note`` where that differs from the rate
    asked for (:func:`gaussad.detector.decision.fpr_note`)."""

    rows: list[ResultRow]
    skipped: list[tuple[int, str]]
    levels: np.ndarray
    maps: np.ndarray | None
    rule: DecisionRule
    fpr: float
    note: str | None

    @property
    def read(self) -> list[int]:
        """Input indices of the rows."""
        bad = {i for i, _ in self.skipped}
        return [i for i in range(len(self.rows) + len(bad)) if i not in bad]


@dataclass
class Batch:
    """One batch of :func:`predict`: ``rows`` of the images read, ``indices`` (their input positions), ``skipped``
    ((input position, message) of the images that could not be read), ``levels`` (len(rows), L) and ``maps``
    ((len(rows), S, S) with ``with_maps``, else None)."""

    rows: list[ResultRow]
    indices: list[int]
    skipped: list[tuple[int, str]]
    levels: np.ndarray
    maps: np.ndarray | None


def rule_for(model: GaussianAD, fpr: float | None = None, method: str | None = None, where: str = "") -> DecisionRule:
    """The decision rule at ``fpr`` / ``method`` (default: the model's own), checked against the model: a rule that
    cannot apply (e.g. conformal without calibration scores) fails here, before any image is read; ``where``
    prefixes its message (the model file)."""
    rule = model.rule(fpr, method)
    rule.check(model.state_, where)
    return rule


def evidence(model: GaussianAD, images: Sequence[ImageSource], rule: DecisionRule, with_maps: bool = False,
             on_error: str = "fail", skipped: list | None = None
             ) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None]:
    """What ``rule`` decides on for ``images``, in one pass: per-level distances (n, L), the map peaks (n,) where the
    rule's image score is fused or maps are asked for (else None) and, with ``with_maps``, the anomaly maps. Images
    that cannot be read are skipped into ``skipped`` with ``on_error='skip'``."""
    if with_maps or rule.fused:
        return model.score_images(images, on_error, skipped, with_maps=with_maps)
    feats = model.extract_features(images, "score", on_error=on_error, skipped=skipped)
    if not len(feats[0]):
        return np.zeros((0, len(model.level_names_))), None, None
    return model.level_scores_features(feats), None, None


def result_rows(model: GaussianAD, rule: DecisionRule, names: Sequence[str], levels: np.ndarray,
                peaks: np.ndarray | None = None, maps: np.ndarray | None = None) -> list[ResultRow]:
    """One result row per image from its evidence: score, per-level distances, the rule's p-value and decision and
    what it decided on (:meth:`DecisionRule.evidence`), and ``map_max`` with ``maps``."""
    if not len(names):
        return []
    decisions, pvalues = rule.decide(model.state_, levels, peaks)
    rows = _rows(names, model.level_names_, levels, decisions, pvalues, rule.scores(model.state_, levels, peaks),
                 rule.evidence(model.state_, levels, peaks, decisions, pvalues))
    for row, amap in zip(rows, maps if maps is not None else ()):
        row["map_max"] = float(amap.max())
    return rows


def predict(model: GaussianAD, images: Sequence[ImageSource], names: Sequence[Any] | None = None, *,
            fpr: float | None = None, method: str | None = None, with_maps: bool = False, on_error: str = "fail",
            where: str = "", batch: int | None = None) -> Iterator[Batch]:
    """Score ``images`` (named ``names``, default their own string) with ``model`` at ``fpr`` / ``method`` (default
    the model's own rule), ``batch`` images at a time (default all in one): :func:`evidence`, then
    :func:`result_rows`, per batch. The rule is checked before any image is read."""
    names = [str(n) for n in (images if names is None else names)]
    rule = rule_for(model, fpr, method, where)
    step = max(1, batch or len(images))
    for start in range(0, max(len(images), 1), step):
        chunk = range(start, min(start + step, len(images)))
        skipped: list = []
        levels, peaks, maps = evidence(model, [images[i] for i in chunk], rule, with_maps, on_error, skipped)
        bad = {i for i, _ in skipped}
        kept = [i for i in chunk if i - start not in bad]
        rows = result_rows(model, rule, [names[i] for i in kept], levels, peaks, maps)
        yield Batch(rows, kept, sorted((start + i, m) for i, m in skipped), levels, maps)


def score(model: GaussianAD, images: Sequence[ImageSource], names: Sequence[Any] | None = None, *,
          fpr: float | None = None, method: str | None = None, with_maps: bool = False, on_error: str = "fail",
          where: str = "") -> Scored:
    """:func:`predict` collected: every row, skipped image, level and map of ``images``, with the rule that decided,
    the target FPR it decided at and the note on it."""
    batches = list(predict(model, images, names, fpr=fpr, method=method, with_maps=with_maps, on_error=on_error,
                           where=where))
    rule = model.rule(fpr, method)
    maps = [b.maps for b in batches if b.maps is not None]
    return Scored([r for b in batches for r in b.rows], [s for b in batches for s in b.skipped],
                  np.concatenate([b.levels for b in batches]), np.concatenate(maps) if maps else None, rule,
                  rule.target_fpr(model.state_), fpr_note(rule, model.state_))


def target_fpr(model: GaussianAD, fpr: float | None = None, method: str | None = None) -> float:
    """The target false-positive rate ``model`` decides at for ``fpr`` (default its own): raised for a conformal rule
    to the smallest rate its calibration supports (:meth:`DecisionRule.target_fpr`)."""
    return model.rule(fpr, method).target_fpr(model.state_)


def decision(model: GaussianAD, fpr: float | None = None, method: str | None = None, where: str | None = None
             ) -> dict:
    """How ``model`` flags an image at ``fpr`` / ``method`` (default its own rule), in brief
    (:func:`gaussad.detector.decision.describe`). With ``where`` (a prefix for the message, e.g. the model file),
    a rule that cannot apply to the model fails here; without, its reason is the answer's ``error``."""
    rule = rule_for(model, fpr, method, where) if where is not None else model.rule(fpr, method)
    return describe(rule, model.state_)


def calibration(model: GaussianAD, fpr: float | None = None) -> dict | None:
    """The model's calibration scores in brief at the target FPR it decides at for ``fpr``
    (:func:`gaussad.detector.decision.calibration_summary`); None without."""
    return calibration_summary(model.state_, target_fpr(model, fpr))


def batch_warnings(model: GaussianAD, rows: Sequence[ResultRow], levels: np.ndarray, fpr: float
                   ) -> tuple[list[str], dict]:
    """What a batch of results says beyond its rows: warnings (most images far beyond every training image: another
    kind of image) and the drift tests on its decisions at target ``fpr`` (:func:`gaussad.core.drift.drift`)."""
    shift = drift([r["anomalous"] for r in rows], [r["pvalue"] for r in rows], fpr)
    warnings = [w for w in [unlike_training(levels.mean(axis=1), model.state_.calibration_scores)] if w]
    return warnings, shift
