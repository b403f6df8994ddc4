"""Decision thresholds and p-values: chi-square, Hotelling (finite-sample F) and split conformal.

* ``chi2``: if features follow the fitted Gaussian in k dimensions, the squared
  Mahalanobis distance follows a chi-square law with k degrees of freedom.  It
  ignores the estimation error of the mean and covariance, so it is accurate only
  when the training set is much larger than k.
* ``hotelling``: the exact law of a *new* point's squared distance to a Gaussian
  whose mean and covariance were estimated from n samples.  With the biased
  sample covariance ``S`` (divided by n), ``d^2 (n - k) / ((n + 1) k)`` follows
  ``F(k, n - k)``; it needs n > k and is exact only for the unshrunk covariance.
* ``conformal``: split conformal from the scores of held-out normal samples.
  For any score, if the test score and the n calibration scores are
  exchangeable, flagging ``s > t`` with t the ``ceil((n + 1)(1 - alpha))``-th
  smallest calibration score has false-positive rate at most alpha.

Functions here take and return plain numbers and arrays; distances are not squared.
"""

from __future__ import annotations

import math
import numbers

import numpy as np
# The laws' functions straight from scipy.special (what scipy.stats.chi2 and .f call, same values): importing
# scipy.stats takes about a second, which every `gaussad score` would wait for.
from scipy.special import chdtrc, chdtri, fdtrc, fdtri

from . import THRESHOLDS as METHODS  # noqa: E402  (declared once, for the parameter table too)


def _check_dof(dof: int) -> int:
    if isinstance(dof, bool) or not isinstance(dof, numbers.Integral) or dof < 1:
        raise ValueError(f"dof must be an integer >= 1, got {dof!r}")
    return int(dof)


def _check_fpr(fpr: float) -> float:
    fpr = float(fpr)
    if not 0.0 < fpr < 1.0:
        raise ValueError(f"fpr must be in (0, 1), got {fpr}")
    return fpr


def _check_distances(distances: np.ndarray) -> np.ndarray:
    d = np.asarray(distances, dtype=np.float64)
    if np.any(d < 0.0):
        raise ValueError("distances must be non-negative")
    return d


def _check_hotelling_n(dof: int, n: int) -> tuple[int, int]:
    dof = _check_dof(dof)
    if isinstance(n, bool) or not isinstance(n, numbers.Integral):
        raise ValueError(f"n must be an integer, got {n!r}")
    if n <= dof:
        raise ValueError(
            f"the Hotelling F law needs more training samples than dimensions (n={int(n)}, dof={dof})"
        )
    return dof, int(n)


def chi2_threshold(dof: int, fpr: float) -> float:
    """Distance (not squared) exceeded with probability ``fpr`` under the chi-square law with ``dof`` degrees."""
    dof = _check_dof(dof)
    return float(np.sqrt(chdtri(dof, _check_fpr(fpr))))


def chi2_pvalue(distances: np.ndarray, dof: int) -> np.ndarray:
    """Probability of a distance at least this large under the chi-square law: ``chi2.sf(d**2, dof)``."""
    dof = _check_dof(dof)
    return chdtrc(dof, np.square(_check_distances(distances)))


def hotelling_threshold(dof: int, n: int, fpr: float) -> float:
    """Distance exceeded with probability ``fpr`` by a new point, mean and covariance estimated from ``n`` samples.

    ``sqrt(F.isf(fpr, k, n - k) * k (n + 1) / (n - k))``; tends to :func:`chi2_threshold` as n grows.
    """
    dof, n = _check_hotelling_n(dof, n)
    fpr = _check_fpr(fpr)
    return float(np.sqrt(fdtri(dof, n - dof, 1.0 - fpr) * dof * (n + 1) / (n - dof)))


def hotelling_pvalue(distances: np.ndarray, dof: int, n: int) -> np.ndarray:
    """P-values of distances under the finite-sample law: ``F.sf(d**2 (n - k) / ((n + 1) k), k, n - k)``."""
    dof, n = _check_hotelling_n(dof, n)
    d2 = np.square(_check_distances(distances))
    return fdtrc(dof, n - dof, d2 * (n - dof) / ((n + 1) * dof))


def _check_calibration(calibration_scores: np.ndarray) -> np.ndarray:
    cal = np.asarray(calibration_scores, dtype=np.float64).reshape(-1)
    if cal.size == 0:
        raise ValueError("no calibration scores")
    if not np.all(np.isfinite(cal)):
        raise ValueError("calibration scores must be finite")
    return cal


def conformal_rank(n_calibration: int, fpr: float) -> int:
    """The rank ``ceil((n + 1)(1 - fpr))`` of the conformal threshold among n sorted scores (may exceed n)."""
    fpr = _check_fpr(fpr)
    # n + 1 - floor((n + 1) fpr) == ceil((n + 1)(1 - fpr)); the epsilon absorbs rounding of (n + 1) * fpr.
    return int(n_calibration) + 1 - math.floor((n_calibration + 1) * fpr + 1e-9)


def conformal_threshold(calibration_scores: np.ndarray, fpr: float) -> float:
    """Split-conformal threshold: the ``ceil((n + 1)(1 - fpr))``-th smallest calibration score.

    Flag a score ``s > threshold``.  When that rank exceeds n (``fpr < 1 / (n + 1)``) no finite
    threshold keeps the guarantee and ``inf`` is returned: nothing is flagged.
    """
    cal = np.sort(_check_calibration(calibration_scores))
    k = conformal_rank(cal.size, fpr)
    return float("inf") if k > cal.size else float(cal[k - 1])


def conformal_pvalue(scores: np.ndarray, calibration_scores: np.ndarray) -> np.ndarray:
    """Conformal p-values ``(1 + #{cal >= s}) / (n + 1)``; ``p <= fpr`` exactly when ``s > conformal_threshold``."""
    cal = np.sort(_check_calibration(calibration_scores))
    s = np.asarray(scores, dtype=np.float64)
    at_least = cal.size - np.searchsorted(cal, s, side="left")
    return (1.0 + at_least) / (cal.size + 1.0)
