"""Result rows: one per scored image, with the same keys in ``gaussad score --json`` and the HTTP service."""

from __future__ import annotations

from typing import Sequence, TypedDict

import numpy as np


FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")


def spreadsheet_safe(text: str) -> str:
    """A CSV text cell that a spreadsheet shows as text and never evaluates (OWASP, "CSV injection"): one starting
    with ``= + - @``, a tab or a carriage return gets a leading apostrophe. For text from outside (file names of
    uploads and inputs, error messages); numbers are written as they are."""
    return "'" + text if text.startswith(FORMULA_STARTS) else text


class ResultRow(TypedDict, total=False):
    """``path``: the image's name as given (a path, or an upload's filename); ``score``: the model's image score
    (higher = more anomalous: the mean of the level distances, or for a fused image score ``-log10`` of its combined
    p-value); ``levels``: distance per level; ``pvalue`` and ``anomalous``: the
    decision rule's; ``evidence``: what the rule decided on, in numbers and one plain sentence
    (:meth:`gaussad.detector.decision.DecisionRule.evidence`); with anomaly maps also ``map_max`` and a ``map`` file or
    ``overlay`` data URL."""

    path: str
    score: float
    levels: dict[str, float]
    pvalue: float
    anomalous: bool
    evidence: dict
    map: str
    map_max: float
    overlay: str


def result_rows(names: Sequence[str], level_names: Sequence[str], levels: np.ndarray, decisions: Sequence[int],
                pvalues: Sequence[float], scores: Sequence[float] | None = None,
                evidence: Sequence[dict] | None = None) -> list[ResultRow]:
    """One row per image from per-level distances (n, L), the rule's decisions and p-values, the image scores
    (default: the mean of the level distances) and, when given, the evidence of each decision."""
    scores = [float(np.mean(lv)) for lv in levels] if scores is None else scores
    rows = [ResultRow(path=str(name), score=float(sc), levels=dict(zip(level_names, map(float, lv))),
                      pvalue=float(p), anomalous=bool(d))
            for name, lv, d, p, sc in zip(names, levels, decisions, pvalues, scores)]
    for row, why in zip(rows, evidence or ()):
        row["evidence"] = why
    return rows
