"""Decision thresholds for Mahalanobis distances.

If features follow the fitted Gaussian in k dimensions, the squared Mahalanobis
distance follows a chi-square law with k degrees of freedom.  A threshold on the
distance for a target false-positive rate, and p-values of observed distances,
follow from that law.  It ignores the estimation error of the mean and
covariance, so it is accurate only when the training set is much larger than k.
"""

from __future__ import annotations

import numbers

import numpy as np
from scipy import stats


def _check_dof(dof: int) -> int:
    if isinstance(dof, bool) or not isinstance(dof, numbers.Integral) or dof < 1:
        raise ValueError(f"dof must be an integer >= 1, got {dof!r}")
    return int(dof)


def chi2_threshold(dof: int, fpr: float) -> float:
    """Distance (not squared) exceeded with probability ``fpr`` under the chi-square law with ``dof`` degrees."""
    dof = _check_dof(dof)
    fpr = float(fpr)
    if not 0.0 < fpr < 1.0:
        raise ValueError(f"fpr must be in (0, 1), got {fpr}")
    return float(np.sqrt(stats.chi2.isf(fpr, dof)))


def chi2_pvalue(distances: np.ndarray, dof: int) -> np.ndarray:
    """Probability of a distance at least this large under the chi-square law: ``chi2.sf(d**2, dof)``."""
    dof = _check_dof(dof)
    d = np.asarray(distances, dtype=np.float64)
    if np.any(d < 0.0):
        raise ValueError("distances must be non-negative")
    return stats.chi2.sf(np.square(d), dof)
