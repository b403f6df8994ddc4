"""Realised false-positive rate of the conformal rule with few training images, over many synthetic Gaussian draws.

Each draw: n training samples of two feature levels (8 and 32 dimensions, a random covariance with decaying spectrum,
so that the 32-dimensional level has about as many dimensions as training samples, as with backbone features), a
model fitted with ``calibration="cv"`` (cross-conformal, 5 folds) or ``calibration=0.2`` (split conformal), and the
fraction of ``n_test`` fresh samples of the same law flagged at target FPR alpha. The mean over draws is the FPR that
the guarantee speaks of (over draws of the training set and of the test image).

    python -m bench.experiments.conformal_fpr [--draws 1000] [--json OUT]
"""

from __future__ import annotations

import argparse
import json

import numpy as np

from gaussad import GaussianAD

DIMS = (8, 32)


def _law(rng: np.random.Generator, d: int) -> np.ndarray:
    """A random covariance factor with eigenvalues 1/k (k = 1..d) in a random basis."""
    basis, _ = np.linalg.qr(rng.normal(size=(d, d)))
    return basis * np.sqrt(1.0 / np.arange(1, d + 1))


def realised_fpr(n: int, alpha: float, draws: int, calibration: str | float = "cv", n_test: int = 200,
                 seed: int = 0, dims: tuple[int, ...] = DIMS) -> dict:
    """Per draw the fraction of fresh normal samples flagged at ``alpha``; returns mean, spread and the share of
    draws with an infinite threshold."""
    rng = np.random.default_rng(seed)
    laws = [_law(rng, d) for d in dims]
    rates, infinite = [], 0
    for _ in range(draws):
        train = [rng.normal(size=(n, f.shape[0])) @ f.T for f in laws]
        test = [rng.normal(size=(n_test, f.shape[0])) @ f.T for f in laws]
        model = GaussianAD(backbone=None, threshold="conformal", fpr=alpha, calibration=calibration,
                           random_state=int(rng.integers(2**31))).fit_features(train)
        infinite += not np.isfinite(model.score_threshold())
        rates.append(float(model.decide(model.level_scores_features(test))[0].mean()))
    rates_arr = np.asarray(rates)
    return {"n": n, "alpha": alpha, "calibration": calibration, "draws": draws, "n_test": n_test,
            "mean_fpr": float(rates_arr.mean()), "sem": float(rates_arr.std(ddof=1) / np.sqrt(draws)),
            "p90_fpr": float(np.quantile(rates_arr, 0.9)), "infinite_share": infinite / draws}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.experiments.conformal_fpr", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--draws", type=int, default=1000)
    parser.add_argument("--json", help="write the figures as JSON here")
    args = parser.parse_args(argv)
    rows = []
    print("calibration  n    alpha  mean FPR (SEM)     90th pct  infinite thresholds")
    for calibration in ("cv", 0.2):
        for n in (30, 50, 100):
            for alpha in (0.05, 0.1):
                r = realised_fpr(n, alpha, args.draws, calibration)
                rows.append(r)
                print(f"{str(calibration):11s}  {n:3d}  {alpha:5.2f}  {r['mean_fpr']:.4f} ({r['sem']:.4f})  "
                      f"{r['p90_fpr']:.3f}     {r['infinite_share']:.3f}", flush=True)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(rows, fh, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
