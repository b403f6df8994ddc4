"""One image score from several pieces of evidence (the global Mahalanobis score, the anomaly map's peak): each
becomes a p-value against out-of-fold scores of the training images, and the p-values are combined (plain numpy).

Decision: Fisher's combination by full conformal prediction (:func:`fisher_pvalue`). For a test image, every piece
of evidence becomes a rank p-value among the n calibration values plus the image's own, for the test image and for
every calibration image alike (the calibrations are paired: value j of each belongs to training image j); the
image's p-value is the share of the n + 1 Fisher statistics ``-2 sum log p`` at or above its own. A normal image
exchangeable with the training images is then flagged at most alpha of the time whatever the dependence between the
pieces of evidence, and the smallest p-value is ``1 / (n + 1)``, as for one conformal p-value. (Fisher's chi-square
law itself needs independent evidence, which the global score and the map's peak are not; the Bonferroni minimum
``min(1, m min_j p_j)`` of exact conformal p-values is valid too, but caught fewer synthetic defects and cannot flag
below ``m / (n + 1)``: EXPERIMENTS.md, "Issue 14, ninth session".)

Ranking: conformal p-values are steps of ``1 / (n + 1)`` and every image beyond the largest calibration score gets the
same smallest one, which would tie all clear defects. :func:`smooth_pvalues` interpolates the empirical survival
function between calibration scores and continues it beyond the largest with an exponential tail fitted to the top
tenth, so the ranking score ``-log10(fused p)`` keeps ordering images that all lie beyond the calibration scores.
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np

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
    """A continuous, non-increasing stand-in for the conformal p-values (:func:`gaussad.core.threshold.conformal_pvalue`),
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


def calibration_ranks(calibration: np.ndarray) -> np.ndarray:
    """Per calibration value, 1 + the other calibration values at or above it: the numerator of its rank p-value
    among the calibration values and a test image's when the test value lies below it (add 1 when at or above)."""
    c = np.asarray(calibration, dtype=np.float64).ravel()
    return c.size - np.searchsorted(np.sort(c), c, "left")


def fisher_pvalue(calibrations: Sequence[np.ndarray], evidence: Sequence[np.ndarray], rows: int = 1024
                  ) -> np.ndarray:
    """Full-conformal p-values of Fisher's combination of m pieces of ``evidence`` (each (N,)) against their paired
    ``calibrations`` (each (n,), value j of every one from training image j): see the module's docstring.

    Every rank p-value is ``a / (n + 1)`` with an integer a, so ``-2 sum log p`` orders the images as the product of
    their a's does (the larger the product, the smaller the statistic): the statistics are compared as exact integer
    products, with no logarithm whose last bit could break a tie. ``rows`` test images at a time bound the memory to
    rows x n values."""
    cals = [np.asarray(c, dtype=np.float64).ravel() for c in calibrations]
    ev = [np.asarray(e, dtype=np.float64).ravel() for e in evidence]
    n = cals[0].size
    if n == 0 or any(c.size != n for c in cals):
        raise ValueError(f"the calibrations must be paired, one value per training image each; got sizes "
                         f"{[c.size for c in cals]}")
    if any(e.shape != ev[0].shape for e in ev):
        raise ValueError(f"one value per image for every piece of evidence; got sizes {[e.size for e in ev]}")
    if (n + 1) ** len(cals) >= 2 ** 63:
        raise ValueError(f"{n} calibration values are too many for exact products of {len(cals)} ranks")
    ordered = [np.sort(c) for c in cals]
    own = [calibration_ranks(c) for c in cals]
    out = np.empty(ev[0].size)
    for lo in range(0, ev[0].size, rows):
        part = [e[lo:lo + rows] for e in ev]
        image = np.ones(part[0].size, dtype=np.int64)  # the test image's product: prod (1 + #{calibration >= e})
        others = np.ones((part[0].size, n), dtype=np.int64)  # each calibration image's, with the test image added
        for o, c, a, e in zip(ordered, cals, own, part):
            image *= n + 1 - np.searchsorted(o, e, "left")
            others *= a[None, :] + (e[:, None] >= c[None, :])
        out[lo:lo + rows] = (1.0 + (others <= image[:, None]).sum(axis=1)) / (n + 1.0)
    return out


def min_fpr(n: int) -> float:
    """The smallest target false-positive rate at which the fused decision can flag an image, with n paired
    calibration values: ``1 / (n + 1)``."""
    return 1.0 / (n + 1)


def ranking_score(calibrations: Sequence[np.ndarray], evidence: Sequence[np.ndarray],
                  method: str = "fisher") -> np.ndarray:
    """The fused image score per image: ``-log10`` of the ``method`` combination of the evidence's smooth p-values
    (:func:`smooth_pvalues`), higher = more anomalous."""
    smooth = combine([smooth_pvalues(c, e) for c, e in zip(calibrations, evidence)], method)
    return -np.log10(np.clip(smooth, 1e-300, 1.0))


def fused(calibrations: Sequence[np.ndarray], evidence: Sequence[np.ndarray],
          method: str = "fisher") -> tuple[np.ndarray, np.ndarray]:
    """(ranking score, decision p-value) per image from m pieces of ``evidence`` and their paired out-of-fold
    ``calibrations``: :func:`ranking_score` and the full-conformal Fisher p-value (:func:`fisher_pvalue`; flag when
    it is at most alpha)."""
    return ranking_score(calibrations, evidence, method), fisher_pvalue(calibrations, evidence)
