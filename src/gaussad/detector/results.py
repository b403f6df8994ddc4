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
    """One scored image, as ``gaussad score --json``, the service and the Dask workers answer it; :data:`FIELDS`
    says what each key holds (the service's API schema is made from both)."""

    path: str
    score: float
    levels: dict[str, float]
    pvalue: float
    anomalous: bool
    evidence: dict
    map: str
    map_max: float
    overlay: str


# What each key of a result row holds; the keys every row has first (REQUIRED).
FIELDS: dict[str, str] = {
    "path": "the image's name as given: its path, or an upload's filename",
    "score": "the model's image score, higher = more anomalous: the mean over levels of the Mahalanobis distances, "
             "or for a fused image score -log10 of its combined p-value",
    "levels": "Mahalanobis distance at each level",
    "pvalue": "the decision rule's p-value (chi2/hotelling: Bonferroni over levels; conformal; fused: full-conformal "
              "Fisher combination of the global score and the map peak); flagged when it is at most the FPR",
    "anomalous": "decision at the target false-positive rate (a request's, else the service's, else the model's)",
    "evidence": "what the rule decided on: chi2/hotelling each level's threshold and the levels above it; conformal "
                "the score, threshold and p-value; fused the p-values of the global score and of the map peak and the "
                "combined one; and `text`, one plain sentence",
    "map": "the heat-map overlay PNG written for the image (gaussad score --maps)",
    "map_max": "largest anomaly-map value (with maps)",
    "overlay": "heat-map overlay as a PNG data URL (the service, with maps=true): the image with the heat blended over "
               "it and a panel under it (decision, score, colour bar)",
}
REQUIRED = ("path", "score", "levels", "pvalue", "anomalous")


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


def unread_row(name: str, message: str) -> dict:
    """The row of an image that could not be read, where a results file keeps one per input (``score --dask``): its
    name, every result None, and ``error``, what went wrong."""
    return {"path": str(name), **{k: None for k in REQUIRED[1:]}, "evidence": None, "error": message}
