"""One inference pipeline: images -> evidence (per-level distances, map peaks, maps) -> decision -> result rows.

``gaussad score``, the service and the Dask workers all answer with the rows of :func:`result_rows`: the same
scores, decisions, p-values and evidence whichever way an image came in. :func:`score` runs the whole chain on image
sources; :func:`result_rows` is its second half, for callers that computed the evidence themselves (a Dask worker
reads its partition batch by batch with its own cached extractor). The callers only format what comes back.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np

from .decision import DecisionRule, fpr_note
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


def score(model: GaussianAD, images: Sequence[ImageSource], names: Sequence[Any] | None = None, *,
          fpr: float | None = None, method: str | None = None, with_maps: bool = False, on_error: str = "fail",
          where: str = "") -> Scored:
    """Score ``images`` (named ``names``, default their own string) with ``model`` at ``fpr`` / ``method`` (default
    the model's own rule): :func:`evidence`, then :func:`result_rows`."""
    names = [str(n) for n in (images if names is None else names)]
    rule = rule_for(model, fpr, method, where)
    skipped: list = []
    levels, peaks, maps = evidence(model, images, rule, with_maps, on_error, skipped)
    bad = {i for i, _ in skipped}
    rows = result_rows(model, rule, [n for i, n in enumerate(names) if i not in bad], levels, peaks, maps)
    return Scored(rows, sorted(skipped), levels, maps, rule, rule.target_fpr(model.state_), fpr_note(rule, model.state_))
