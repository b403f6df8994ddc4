"""Lines the commands print about a model's calibration and decision (from the dicts the detector answers with)."""

from __future__ import annotations

CALIBRATIONS = {"cv": "out-of-fold scores (cross-conformal, {folds} folds)", "split": "held-out images (split conformal)",
                "calibrate": "images given to calibrate()", None: "calibration scores"}


def fused_line(c: dict, fpr: float) -> str:
    """One line on a fused image score's calibration (:func:`gaussad.detector.decision.calibration_summary`) and
    the target FPR it decides at."""
    return (f"fused image score: {' and '.join(c['evidence'])} against {min(c['n_scores'])} out-of-fold scores of "
            f"the training images; flags p-value <= target FPR {fpr:g} (the smallest these images support: "
            f"{c['min_fpr']:.3g})")


def calibration_line(c: dict, folds: int | None = None) -> str:
    """One line on a model's calibration scores (:func:`gaussad.detector.decision.calibration_summary`)."""
    limit = "infinite (nothing flagged)" if c["score_threshold"] is None else f"{c['score_threshold']:.3f}"
    return (f"calibration: {c['n_scores']} {CALIBRATIONS[c['method']].format(folds=folds or 'K')}; finite conformal "
            f"threshold for FPR >= {c['min_fpr']:.3g}; conformal score threshold at FPR {c['fpr']}: {limit}")
