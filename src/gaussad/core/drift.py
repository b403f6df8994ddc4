"""Drift alarms on a model's recent decisions: a flag rate significantly above the target false-positive rate
(one-sided exact binomial test) or p-values smaller than uniform (one-sided Kolmogorov-Smirnov test). numpy/scipy
only; it sees plain flags and p-values, not images or the service."""

from __future__ import annotations

from typing import Sequence

import numpy as np

WINDOW = 200     # the last N scored images of a model's current version
ALPHA = 0.001    # significance of each test
MIN_IMAGES = 20  # fewer images than this: no alarm, status "too few images"
# A batch looks unlike the training images when most of its images score more than OOD_FACTOR times the largest
# out-of-fold score of a training image. Bottle's model (issue 35): its own test images' median ratio 1.6 (a third of
# them, defects, above 2), magnetic tiles' 20 (every one above 19).
OOD_FACTOR = 3.0
OOD_MIN_IMAGES = 5


def drift(flags: Sequence[bool], pvalues: Sequence[float | None], fpr: float, alpha: float = ALPHA,
          min_images: int = MIN_IMAGES) -> dict:
    """Both tests on the most recent ``flags`` (decisions) and ``pvalues`` of one model at target ``fpr``.

    Under a model that holds, each image is flagged with probability at most ``fpr`` and its p-value is uniform or
    larger (the Bonferroni-adjusted chi-square/Hotelling p-values are conservative, so the one-sided test stays
    valid for them). The alarm is raised when either test's p-value is below ``alpha``.
    """
    from scipy import stats

    flags = np.asarray(flags, dtype=bool)
    p = np.asarray([x for x in pvalues if x is not None], dtype=float)
    n, k = int(flags.size), int(flags.sum())
    out = {"n": n, "flagged": k, "flag_rate": k / n if n else None, "fpr": float(fpr), "alpha": alpha,
           "binomial_p": None, "ks_p": None, "alarm": False, "reasons": []}
    if n < min_images:
        out["status"] = f"too few images ({n} < {min_images})"
        return out
    out["binomial_p"] = float(stats.binomtest(k, n, fpr, alternative="greater").pvalue)
    if p.size >= min_images:
        out["ks_p"] = float(stats.kstest(p, "uniform", alternative="greater").pvalue)
    if out["binomial_p"] < alpha:
        out["reasons"].append(f"flag rate {k}/{n} = {k / n:.3f} is above the target FPR {fpr:g} "
                              f"(binomial p = {out['binomial_p']:.2e})")
    if out["ks_p"] is not None and out["ks_p"] < alpha:
        out["reasons"].append(f"p-values are smaller than uniform (Kolmogorov-Smirnov p = {out['ks_p']:.2e})")
    out["alarm"] = bool(out["reasons"])
    out["status"] = "drift" if out["alarm"] else "ok"
    return out


def shift_warning(result: dict) -> str:
    """One line for a batch whose decisions raised :func:`drift`'s alarm: its reasons and what they can mean."""
    return (f"{'; '.join(result['reasons'])}: either many of these parts are defective, or the images are unlike the "
            "training images (another camera, light or product: the target FPR holds only for images like them)")


def unlike_training(scores: Sequence[float], calibration: Sequence[float] | None, factor: float = OOD_FACTOR,
                    min_images: int = OOD_MIN_IMAGES) -> str | None:
    """One line when most of a batch (more than half of at least ``min_images`` images) has image scores above
    ``factor`` times the largest calibration score (out-of-fold scores of the training images): not a few defects
    but images of another kind (camera, light, product), on which no decision of the model means anything. None
    otherwise, and without calibration scores."""
    s = np.asarray(scores, dtype=float)
    if calibration is None or s.size < min_images:
        return None
    limit = factor * float(np.max(calibration))
    far = int((s > limit).sum())
    if far * 2 <= s.size:
        return None
    return (f"{far} of {s.size} images score more than {factor:g} times the highest training image's score "
            f"({limit:.3g}): they look unlike the training images (another product, camera or light?); the model's "
            "decisions mean nothing for them")
