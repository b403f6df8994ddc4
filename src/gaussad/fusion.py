"""One image score from several pieces of evidence (the global Mahalanobis score, the anomaly map's peak): each
becomes a p-value against out-of-fold scores of the training images, and the p-values are combined (plain numpy).

Decision: an image is flagged when ``min(1, m * min_j p_j) <= alpha`` with exact conformal p-values
``(1 + #{calibration >= s}) / (n + 1)``. Each conformal p-value is valid (P(p_j <= a) <= a for a normal image
exchangeable with the calibration images), so the Bonferroni minimum is valid whatever the dependence between the
pieces of evidence: the realised false-positive rate stays at most alpha. Fisher's method (``-2 sum log p`` against
chi-square with ``2m`` degrees of freedom) needs independent evidence, which the global score and the map's peak are
not, so it ranks but does not decide.

Ranking: conformal p-values are steps of ``1 / (n + 1)`` and every image beyond the largest calibration score gets the
same smallest one, which would tie all clear defects. :func:`smooth_pvalues` interpolates the empirical survival
function between calibration scores and continues it beyond the largest with an exponential tail fitted to the top
tenth, so the ranking score ``-log10(fused p)`` keeps ordering images that all lie beyond the calibration scores.
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np

from .threshold import conformal_pvalue

FUSIONS = ("bonferroni", "fisher")
TAIL = 0.1  # share of the largest calibration scores the exponential tail is fitted to


def sorted_calibration(calibration: np.ndarray) -> np.ndarray:
    c = np.sort(np.asarray(calibration, dtype=np.float64).ravel())
    if c.size == 0 or not np.all(np.isfinite(c)):
        raise ValueError("calibration scores must be a non-empty array of finite numbers")
    return c


def tail_scale(sorted_calibration: np.ndarray) -> float:
    """The scale ``beta`` of :func:`smooth_pvalues`' exponential tail: the mean excess of the top tenth of the
    (sorted) calibration scores over the smallest of them (their spread, or 1e-12, when that is 0)."""
    c = sorted_calibration
    top = c[-max(2, math.ceil(TAIL * c.size)):]
    beta = float(np.mean(top - top[0])) if top.size > 1 else 0.0
    return beta if beta > 0 else max(float(np.std(c)), 1e-12)


def smooth_pvalues(calibration: np.ndarray, scores: np.ndarray) -> np.ndarray:
    """A continuous, non-increasing stand-in for the conformal p-values (:func:`gaussad.threshold.conformal_pvalue`),
    for ranking: the survival function
    interpolated linearly between calibration scores (1 at and below the smallest, ``1 / (n + 1)`` at the largest)
    and, beyond the largest, ``exp(-(s - max) / beta) / (n + 1)`` with ``beta`` the mean excess of the top tenth."""
    c = sorted_calibration(calibration)
    n = c.size
    s = np.asarray(scores, dtype=np.float64)
    rank = np.interp(s, c, np.arange(1, n + 1, dtype=np.float64))  # 1 .. n
    p = np.where(s <= c[0], 1.0, (n + 1.0 - rank) / (n + 1.0))
    beta = tail_scale(c)
    beyond = s > c[-1]
    p[beyond] = np.exp(-(s[beyond] - c[-1]) / beta) / (n + 1.0)
    return p


def combine(pvalues: Sequence[np.ndarray], method: str = "bonferroni") -> np.ndarray:
    """Combined p-value of m pieces of evidence per image: ``min(1, m * min_j p_j)`` (Bonferroni) or Fisher's
    ``chi2.sf(-2 sum log p_j, 2m)``."""
    p = np.stack([np.asarray(v, dtype=np.float64) for v in pvalues])
    if method == "bonferroni":
        return np.minimum(1.0, len(p) * p.min(axis=0))
    if method == "fisher":
        from scipy.special import chdtrc

        return chdtrc(2 * len(p), -2.0 * np.log(np.clip(p, 1e-300, 1.0)).sum(axis=0))
    raise ValueError(f"unknown fusion {method!r}; choose one of: {', '.join(FUSIONS)}")


def fused(calibrations: Sequence[np.ndarray], evidence: Sequence[np.ndarray],
          method: str = "bonferroni") -> tuple[np.ndarray, np.ndarray]:
    """(ranking score, decision p-value) per image from m pieces of ``evidence`` and their out-of-fold
    ``calibrations``: the score is ``-log10`` of the combined smooth p-values, the p-value the Bonferroni minimum of
    exact conformal p-values (flag when it is at most alpha)."""
    smooth = combine([smooth_pvalues(c, e) for c, e in zip(calibrations, evidence)], method)
    exact = combine([conformal_pvalue(e, c) for c, e in zip(calibrations, evidence)], "bonferroni")
    return -np.log10(np.clip(smooth, 1e-300, 1.0)), exact
