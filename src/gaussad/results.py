"""Result rows: one per scored image, with the same keys in ``gaussad score --json`` and the HTTP service."""

from __future__ import annotations

from typing import Sequence, TypedDict

import numpy as np


class ResultRow(TypedDict, total=False):
    """``path``: the image's name as given (a path, or an upload's filename); ``score``: mean of the level
    distances (higher = more anomalous); ``levels``: distance per level; ``pvalue`` and ``anomalous``: the
    decision rule's; with anomaly maps also ``map_max`` and a ``map`` file or ``overlay`` data URL."""

    path: str
    score: float
    levels: dict[str, float]
    pvalue: float
    anomalous: bool
    map: str
    map_max: float
    overlay: str


def result_rows(names: Sequence[str], level_names: Sequence[str], levels: np.ndarray, decisions: Sequence[int],
                pvalues: Sequence[float]) -> list[ResultRow]:
    """One row per image from per-level distances (n, L) and the rule's decisions and p-values."""
    return [ResultRow(path=str(name), score=float(np.mean(lv)), levels=dict(zip(level_names, map(float, lv))),
                      pvalue=float(p), anomalous=bool(d))
            for name, lv, d, p in zip(names, levels, decisions, pvalues)]
