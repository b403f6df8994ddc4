"""Per-level multivariate Gaussians fitted from mergeable moments; scores are Mahalanobis distances.

Following Rippel et al. (ICPR 2020), every feature level gets its own Gaussian
N(mean, Sigma) and a sample is scored by its Mahalanobis distance to it.

The training data enter only through :class:`MomentStats`, sufficient statistics
(count and raw moments up to order four around a fixed shift) that can be
updated chunk by chunk and merged across workers.  They suffice for the sample
covariance and for the exact Ledoit-Wolf and OAS shrinkage intensities, so a
model built from chunks equals one built from all data at once.

Estimators of Sigma (``ESTIMATORS``):

* ``ledoit-wolf`` / ``oas``: the shrunk covariance ``(1 - s) S + s mu I`` with
  ``mu = trace(S) / d``, identical to scikit-learn's ``LedoitWolf`` / ``OAS``.
* ``empirical``: the biased sample covariance ``S`` (must be non-singular).
* ``diagonal``: ``diag(S)``, features treated as independent.
* ``l2``: the identity, i.e. the Euclidean distance to the mean.

Reductions (``REDUCTIONS``) follow the paper's reference code: eigenvectors of
``S`` in descending order of eigenvalue, cumulative explained-variance ratio
``c`` over the first ``min(n, d)`` components, ``last = argmax(c > variance)``;
``pca`` keeps components ``[:last + 1]`` and ``npca`` ("negated PCA") keeps
``[max(last - 1, 0):min(n, d)]``, the directions of *least* variance.

In the reduced space the Gaussian is diagonal in the kept eigenvectors.  Its
variances are the eigenvalues of the full-space estimator's covariance along
them: ``(1 - s) lambda + s mu`` for ledoit-wolf/oas (the shrunk covariance
shares the eigenvectors of ``S``), ``lambda`` for empirical and for diagonal
(the variances of the projected data), ones for l2.  This keeps the model a
function of the mergeable moments alone.  It differs from re-fitting Ledoit-Wolf/OAS on the projected
features only in the shrinkage amount ``s`` (and target ``mu``), which here are
those of the full space.  With ``n <= d`` the trailing ``min(n, d)``-th
component lies in the null space of ``S`` and its direction is arbitrary within
it, exactly as in scikit-learn's PCA; ``npca`` keeps it.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import scipy.linalg

from . import ESTIMATORS, REDUCTIONS  # noqa: E402  (declared once, for the parameter table too)

_EPS = np.finfo(np.float64).eps
# Largest accepted magnitude of a value: fourth moments of d-dim vectors must stay far below float64's 1.8e308.
MAX_ABS = 1e60
# Relative spread (see MomentStats.relative_spread) at or below which samples count as identical up to rounding.
IDENTICAL_SPREAD = (64.0 * _EPS) ** 2


def _check_samples(X: np.ndarray, dim: int | None = None) -> np.ndarray:
    """Return ``X`` as a float64 (n, d) array, or raise ``ValueError`` explaining what is wrong."""
    X = np.asarray(X)
    if X.ndim != 2:
        raise ValueError(f"expected a 2-D array of shape (n_samples, n_features), got shape {X.shape}")
    if dim is not None and X.shape[1] != dim:
        raise ValueError(f"expected {dim} features per sample, got {X.shape[1]}")
    if not (np.issubdtype(X.dtype, np.number) or X.dtype == np.bool_):
        raise ValueError(f"expected numeric data, got dtype {X.dtype}")
    X = X.astype(np.float64, copy=False)
    finite = np.isfinite(X)
    if not finite.all():
        bad = int(np.count_nonzero(~finite.all(axis=1)))
        raise ValueError(f"{bad} of {X.shape[0]} rows contain NaN or infinite values")
    big = float(np.abs(X).max()) if X.size else 0.0
    if big > MAX_ABS:
        raise ValueError(f"values up to {big:.3g} in magnitude: above {MAX_ABS:.0e} the moment statistics would "
                         "overflow; rescale the data")
    return X


def _shift_moments(
    n: int, s1: np.ndarray, s2: np.ndarray, s3: np.ndarray, s4: float, e: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray, float]:
    """Raw moments of ``y + e`` given the raw moments (n, s1..s4) of ``y``.

    Binomial expansions of sum(y+e), sum((y+e)(y+e)^T), sum(|y+e|^2 (y+e)) and
    sum(|y+e|^4), with |y+e|^2 = |y|^2 + 2 e.y + |e|^2.
    """
    ee = float(e @ e)
    es1 = float(e @ s1)
    tr2 = float(np.trace(s2))
    s2e = s2 @ e
    new_s1 = s1 + n * e
    outer = np.outer(s1, e)
    new_s2 = s2 + outer + outer.T + n * np.outer(e, e)
    new_s3 = s3 + 2.0 * s2e + ee * s1 + tr2 * e + 2.0 * es1 * e + n * ee * e
    new_s4 = s4 + 4.0 * float(e @ s2e) + n * ee * ee + 4.0 * float(e @ s3) + 2.0 * ee * tr2 + 4.0 * ee * es1
    return new_s1, new_s2, new_s3, float(new_s4)


class MomentStats:
    """Mergeable sufficient statistics of a sample of d-dim vectors (float64).

    With ``y = x - shift``: ``s1 = sum(y)``, ``s2 = sum(y y^T)``,
    ``s3 = sum(|y|^2 y)`` and ``s4 = sum(|y|^4)``.  The shift is the mean of the
    first data seen and then stays fixed, which keeps the raw moments well
    conditioned for data with a large common offset.  Instances are immutable
    in use: :meth:`update`, :meth:`merge` and :meth:`subtract` return new objects.
    """

    __slots__ = ("n", "shift", "s1", "s2", "s3", "s4")

    def __init__(
        self, n: int, shift: np.ndarray, s1: np.ndarray, s2: np.ndarray, s3: np.ndarray, s4: float
    ) -> None:
        self.n = int(n)
        self.shift = np.asarray(shift, dtype=np.float64)
        self.s1 = np.asarray(s1, dtype=np.float64)
        self.s2 = np.asarray(s2, dtype=np.float64)
        self.s3 = np.asarray(s3, dtype=np.float64)
        self.s4 = float(s4)
        d = self.shift.shape[0] if self.shift.ndim == 1 else -1
        if (
            d < 1
            or self.s1.shape != (d,)
            or self.s2.shape != (d, d)
            or self.s3.shape != (d,)
            or self.n < 0
        ):
            raise ValueError(
                "inconsistent moment statistics: "
                f"n={self.n}, shift {self.shift.shape}, s1 {self.s1.shape}, s2 {self.s2.shape}, s3 {self.s3.shape}"
            )

    @classmethod
    def empty(cls, dim: int) -> MomentStats:
        """Statistics of zero samples of dimension ``dim``; the shift is set by the first update."""
        if int(dim) < 1:
            raise ValueError(f"dimension must be >= 1, got {dim}")
        dim = int(dim)
        z = np.zeros(dim)
        return cls(0, z, z, np.zeros((dim, dim)), z, 0.0)

    @classmethod
    def from_array(cls, X: np.ndarray) -> MomentStats:
        """Statistics of the rows of ``X`` (n, d), shifted by their own mean."""
        X = _check_samples(X)
        if X.shape[1] < 1:
            raise ValueError("expected at least one feature")
        if X.shape[0] == 0:
            return cls.empty(X.shape[1])
        shift = X.mean(axis=0)
        return cls._accumulate(X, shift)

    @classmethod
    def _accumulate(cls, X: np.ndarray, shift: np.ndarray) -> MomentStats:
        """Raw moments of the validated rows of ``X`` around ``shift``."""
        Y = X - shift
        q = np.einsum("ij,ij->i", Y, Y)
        return cls(
            X.shape[0],
            shift,
            Y.sum(axis=0),
            Y.T @ Y,
            q @ Y,
            float(q @ q),
        )

    def update(self, X: np.ndarray) -> MomentStats:
        """New statistics including the rows of ``X``; ``self`` is left unchanged."""
        X = _check_samples(X, self.dim)
        if X.shape[0] == 0:
            return self._copy()
        if self.n == 0:
            return MomentStats.from_array(X)
        return self._add(MomentStats._accumulate(X, self.shift))

    def merge(self, other: MomentStats) -> MomentStats:
        """New statistics of the union of both samples, expressed around ``self.shift``."""
        if not isinstance(other, MomentStats):
            raise TypeError(f"can only merge MomentStats, got {type(other).__name__}")
        if other.dim != self.dim:
            raise ValueError(f"cannot merge statistics of dimension {self.dim} and {other.dim}")
        if other.n == 0:
            return self._copy()
        if self.n == 0:
            return other._copy()
        e = other.shift - self.shift
        s1, s2, s3, s4 = _shift_moments(other.n, other.s1, other.s2, other.s3, other.s4, e)
        return self._add(MomentStats(other.n, self.shift, s1, s2, s3, s4))

    def subtract(self, other: MomentStats) -> MomentStats:
        """The downdate: new statistics of this sample *without* the sub-sample ``other`` (which must be part of
        it), exact up to rounding: ``a.merge(b).subtract(b)`` has the moments of ``a``. Cross-validation folds
        use it, the model of all images minus one fold being the model fitted without that fold."""
        if not isinstance(other, MomentStats):
            raise TypeError(f"can only subtract MomentStats, got {type(other).__name__}")
        if other.dim != self.dim:
            raise ValueError(f"cannot subtract statistics of dimension {other.dim} from {self.dim}")
        if other.n > self.n:
            raise ValueError(f"cannot subtract {other.n} samples from statistics of {self.n}")
        if other.n == 0:
            return self._copy()
        if other.n == self.n:
            return MomentStats.empty(self.dim)
        e = other.shift - self.shift
        s1, s2, s3, s4 = _shift_moments(other.n, other.s1, other.s2, other.s3, other.s4, e)
        return MomentStats(self.n - other.n, self.shift, self.s1 - s1, self.s2 - s2, self.s3 - s3, self.s4 - s4)

    def _add(self, other: MomentStats) -> MomentStats:
        """Sum of two statistics that share the same shift."""
        return MomentStats(
            self.n + other.n,
            self.shift,
            self.s1 + other.s1,
            self.s2 + other.s2,
            self.s3 + other.s3,
            self.s4 + other.s4,
        )

    def _copy(self) -> MomentStats:
        return MomentStats(self.n, self.shift.copy(), self.s1.copy(), self.s2.copy(), self.s3.copy(), self.s4)

    @property
    def dim(self) -> int:
        """Dimension d of the vectors."""
        return int(self.shift.shape[0])

    def _require(self, minimum: int) -> None:
        if self.n < minimum:
            raise ValueError(f"need at least {minimum} sample(s), got {self.n}")

    def _centre(self) -> np.ndarray:
        """Offset ``c = mean - shift`` of the sample mean from the shift."""
        return self.s1 / self.n

    def mean(self) -> np.ndarray:
        """Sample mean (d,)."""
        self._require(1)
        return self.shift + self._centre()

    def covariance(self) -> np.ndarray:
        """Biased sample covariance (divides by n), like sklearn's ``empirical_covariance``."""
        self._require(1)
        c = self._centre()
        S = self.s2 / self.n - np.outer(c, c)
        return (S + S.T) / 2.0

    def relative_spread(self) -> float:
        """trace(covariance) / mean squared norm, in [0, 1]: 0 when all samples are identical, scale-free."""
        self._require(1)
        c = self._centre()
        total = float(np.trace(self.covariance()))
        square = float((self.shift + c) @ (self.shift + c)) + total
        return max(total, 0.0) / square if square > 0.0 else 0.0

    def _centred_fourth_moment(self) -> float:
        """sum_k |x_k - mean|^4, from the raw moments by expanding |y - c|^4."""
        _, _, _, s4 = _shift_moments(self.n, self.s1, self.s2, self.s3, self.s4, -self._centre())
        return max(s4, 0.0)

    def ledoit_wolf_shrinkage(self) -> float:
        """Ledoit-Wolf shrinkage intensity, equal to ``sklearn.covariance.ledoit_wolf_shrinkage(X)``."""
        self._require(1)
        d, n = self.dim, self.n
        if d == 1:
            return 0.0
        S = self.covariance()
        tr = float(np.trace(S))
        mu = tr / d
        frob2 = float(np.sum(S**2))
        beta = (self._centred_fourth_moment() / n - frob2) / (d * n)
        delta = (frob2 - 2.0 * mu * tr + d * mu**2) / d
        beta = min(beta, delta)
        if beta <= 0.0 or delta <= 0.0:
            return 0.0
        return float(beta / delta)

    def oas_shrinkage(self) -> float:
        """Oracle Approximating Shrinkage intensity, equal to ``sklearn.covariance.OAS().fit(X).shrinkage_``."""
        self._require(1)
        d, n = self.dim, self.n
        if d == 1:
            return 0.0
        S = self.covariance()
        alpha = float(np.mean(S**2))
        mu = float(np.trace(S)) / d
        num = alpha + mu**2
        den = (n + 1) * (alpha - mu**2 / d)
        return 1.0 if den == 0 else float(min(num / den, 1.0))

    def to_arrays(self, prefix: str) -> dict[str, np.ndarray]:
        """Arrays for persistence, keyed ``f"{prefix}n"``, ``f"{prefix}shift"``, ... ``f"{prefix}s4"``."""
        return {
            f"{prefix}n": np.asarray(self.n, dtype=np.int64),
            f"{prefix}shift": self.shift.copy(),
            f"{prefix}s1": self.s1.copy(),
            f"{prefix}s2": self.s2.copy(),
            f"{prefix}s3": self.s3.copy(),
            f"{prefix}s4": np.asarray(self.s4, dtype=np.float64),
        }

    @classmethod
    def from_arrays(cls, arrays: dict[str, np.ndarray], prefix: str) -> MomentStats:
        """Inverse of :meth:`to_arrays`."""
        try:
            return cls(
                int(np.asarray(arrays[f"{prefix}n"]).reshape(-1)[0]),
                arrays[f"{prefix}shift"],
                arrays[f"{prefix}s1"],
                arrays[f"{prefix}s2"],
                arrays[f"{prefix}s3"],
                float(np.asarray(arrays[f"{prefix}s4"]).reshape(-1)[0]),
            )
        except KeyError as exc:
            raise ValueError(f"missing moment array {exc.args[0]!r}") from None

    def __repr__(self) -> str:
        return f"MomentStats(n={self.n}, dim={self.dim})"


def _choose(value: Any, choices: tuple, what: str) -> None:
    if value not in choices:
        raise ValueError(f"unknown {what} {value!r}; valid choices: {', '.join(repr(c) for c in choices)}")


def _kept_range(eigvals: np.ndarray, n: int, reduction: str, variance: float) -> slice:
    """Indices of the kept components, by the reference-code rule on explained-variance ratios."""
    m = min(n, eigvals.shape[0])
    lam = eigvals[:m]
    total = float(lam.sum())
    if total <= 0.0:
        raise ValueError("cannot reduce dimension: the sample covariance is zero (all samples identical)")
    above = np.cumsum(lam / total) > variance
    last = int(np.argmax(above)) if above.any() else m - 1
    if reduction == "pca":
        return slice(0, last + 1)
    return slice(max(last - 1, 0), m)


class LevelGaussian:
    """A fitted Gaussian (or baseline) for one feature level; scores are Mahalanobis distances.

    The distance is computed either with ``chol``, the lower Cholesky factor of
    the covariance, or with ``scale``, per-dimension standard deviations (after
    projection onto ``components`` when a reduction is used).
    """

    def __init__(
        self,
        estimator: str,
        reduction: str | None,
        variance: float | None,
        mean: np.ndarray,
        components: np.ndarray | None = None,
        chol: np.ndarray | None = None,
        scale: np.ndarray | None = None,
        shrinkage: float = 0.0,
    ) -> None:
        _choose(estimator, ESTIMATORS, "estimator")
        _choose(reduction, REDUCTIONS, "reduction")
        if (chol is None) == (scale is None):
            raise ValueError("exactly one of chol and scale must be given")
        self.estimator = estimator
        self.reduction = reduction
        self.variance = None if variance is None else float(variance)
        self.mean = np.asarray(mean, dtype=np.float64)
        self.components = None if components is None else np.asarray(components, dtype=np.float64)
        self.chol = None if chol is None else np.asarray(chol, dtype=np.float64)
        self.scale = None if scale is None else np.asarray(scale, dtype=np.float64)
        self.shrinkage = float(shrinkage)
        d = self.mean.shape[0]
        k = d if self.components is None else self.components.shape[1]
        if self.components is not None and self.components.shape[0] != d:
            raise ValueError(f"components of shape {self.components.shape} do not match dimension {d}")
        if self.chol is not None and self.chol.shape != (k, k):
            raise ValueError(f"Cholesky factor of shape {self.chol.shape}, expected {(k, k)}")
        if self.scale is not None and self.scale.shape != (k,):
            raise ValueError(f"scale of shape {self.scale.shape}, expected {(k,)}")

    @classmethod
    def fit(
        cls,
        stats: MomentStats,
        estimator: str = "ledoit-wolf",
        reduction: str | None = None,
        variance: float = 0.99,
    ) -> LevelGaussian:
        """Fit the Gaussian of one level from its moments with the given estimator and optional reduction."""
        _choose(estimator, ESTIMATORS, "estimator")
        _choose(reduction, REDUCTIONS, "reduction")
        variance = float(variance)
        if not 0.0 < variance < 1.0:
            raise ValueError(f"variance must be in (0, 1), got {variance}")
        if stats.n < 2:
            raise ValueError(f"need at least 2 samples to fit a Gaussian, got {stats.n}")
        n, d = stats.n, stats.dim
        if (estimator != "l2" or reduction is not None) and stats.relative_spread() <= IDENTICAL_SPREAD:
            raise ValueError(
                f"all {n} training samples are identical (up to rounding), so there is no variation to model; "
                "train on samples that vary, or use the l2 estimator (plain distance to them)"
            )
        mean = stats.mean()
        S = stats.covariance()
        shrinkage = 0.0
        if estimator == "ledoit-wolf":
            shrinkage = stats.ledoit_wolf_shrinkage()
        elif estimator == "oas":
            shrinkage = stats.oas_shrinkage()
        mu = float(np.trace(S)) / d

        if reduction is None:
            if estimator == "l2":
                return cls(estimator, None, None, mean, scale=np.ones(d))
            if estimator == "diagonal":
                return cls(estimator, None, None, mean, scale=np.sqrt(_diagonal_variances(stats, S)))
            if estimator == "empirical":
                message = (
                    f"the empirical covariance is singular (n={n}, d={d}); "
                    "use the ledoit-wolf or oas estimator (or more samples than features)"
                )
                if n <= d:
                    raise ValueError(message)
                return cls(estimator, None, None, mean, chol=_cholesky(S, message))
            cov = (1.0 - shrinkage) * S
            cov.flat[:: d + 1] += shrinkage * mu
            chol = _cholesky(cov, _singular_shrunk_message(estimator, n, d, shrinkage))
            return cls(estimator, None, None, mean, chol=chol, shrinkage=shrinkage)

        eigvals, eigvecs = np.linalg.eigh(S)
        eigvals, eigvecs = eigvals[::-1], eigvecs[:, ::-1]
        kept = _kept_range(eigvals, n, reduction, variance)
        V = np.ascontiguousarray(eigvecs[:, kept])
        lam = np.clip(eigvals[kept], 0.0, None)
        if estimator in ("ledoit-wolf", "oas"):
            var = (1.0 - shrinkage) * lam + shrinkage * mu
            largest = (1.0 - shrinkage) * max(float(eigvals[0]), 0.0) + shrinkage * mu
            if np.any(var <= largest * d * _EPS):
                raise ValueError(_singular_shrunk_message(estimator, n, d, shrinkage))
            scale = np.sqrt(var)
        elif estimator == "l2":
            scale = np.ones(V.shape[1])
        else:
            tol = max(float(eigvals[0]), 0.0) * d * _EPS
            small = int(np.count_nonzero(lam <= tol))
            if small:
                raise ValueError(
                    f"{small} of the {V.shape[1]} components kept by {reduction} have zero variance "
                    f"(n={n}, d={d}), so the {estimator} covariance is singular there; "
                    "use ledoit-wolf or oas, or a different reduction/variance"
                )
            scale = np.sqrt(lam)
        return cls(estimator, reduction, variance, mean, components=V, scale=scale, shrinkage=shrinkage)

    @property
    def dof(self) -> int:
        """Dimension k of the space the distance lives in (degrees of freedom of its chi-square law)."""
        return int(self.chol.shape[0] if self.chol is not None else self.scale.shape[0])

    @property
    def dim(self) -> int:
        """Dimension d of the input feature vectors."""
        return int(self.mean.shape[0])

    def squared_distances(self, X: np.ndarray) -> np.ndarray:
        """Squared Mahalanobis distances (n,) of the rows of ``X`` (n, d) to the fitted Gaussian."""
        diff = _check_samples(X, self.dim) - self.mean
        if self.components is not None:
            diff = diff @ self.components
        if self.chol is not None:
            z = scipy.linalg.solve_triangular(self.chol, diff.T, lower=True, check_finite=False)
            return np.einsum("ij,ij->j", z, z)
        z = diff / self.scale
        return np.einsum("ij,ij->i", z, z)

    def distances(self, X: np.ndarray) -> np.ndarray:
        """Mahalanobis distances (n,) of the rows of ``X`` (n, d) to the fitted Gaussian."""
        return np.sqrt(self.squared_distances(X))

    def to_arrays(self, prefix: str) -> dict[str, np.ndarray]:
        """Arrays for persistence, keyed ``f"{prefix}mean"`` and, where present, components/chol/scale."""
        out = {f"{prefix}mean": self.mean.copy()}
        for name in ("components", "chol", "scale"):
            value = getattr(self, name)
            if value is not None:
                out[f"{prefix}{name}"] = value.copy()
        return out

    @classmethod
    def from_arrays(cls, arrays: dict[str, np.ndarray], prefix: str, meta: dict) -> LevelGaussian:
        """Inverse of :meth:`to_arrays` together with :meth:`meta`."""
        try:
            estimator, reduction = meta["estimator"], meta["reduction"]
            mean = arrays[f"{prefix}mean"]
        except KeyError as exc:
            raise ValueError(f"missing model entry {exc.args[0]!r}") from None
        model = cls(
            estimator,
            reduction,
            meta.get("variance"),
            mean,
            components=arrays.get(f"{prefix}components"),
            chol=arrays.get(f"{prefix}chol"),
            scale=arrays.get(f"{prefix}scale"),
            shrinkage=meta.get("shrinkage", 0.0),
        )
        if "dof" in meta and int(meta["dof"]) != model.dof:
            raise ValueError(f"stored dof {meta['dof']} does not match the stored arrays (dof {model.dof})")
        if model.chol is not None:
            diag = np.diag(model.chol)
            if np.any(diag <= 0.0) or np.any(np.triu(model.chol, 1)):
                raise ValueError("the stored Cholesky factor is not lower triangular with a positive diagonal")
            top = np.abs(model.chol).max(axis=1)  # rows scaled to their largest entry, so nothing overflows
            ratio = diag / top / np.linalg.norm(model.chol / top[:, None], axis=1)
            if np.any(ratio**2 <= model.dof * _EPS):  # the test that fitting applies, see _cholesky
                raise ValueError("the stored covariance is numerically singular")
        if model.scale is not None and np.any(model.scale <= 0.0):
            raise ValueError("the stored scales are not all positive")
        return model

    def meta(self) -> dict:
        """JSON-serialisable description: estimator, reduction, variance, shrinkage, dof."""
        return {
            "estimator": self.estimator,
            "reduction": self.reduction,
            "variance": self.variance,
            "shrinkage": self.shrinkage,
            "dof": self.dof,
        }

    def __repr__(self) -> str:
        return (
            f"LevelGaussian(estimator={self.estimator!r}, reduction={self.reduction!r}, "
            f"dim={self.dim}, dof={self.dof}, shrinkage={self.shrinkage:.4g})"
        )


def _diagonal_variances(stats: MomentStats, S: np.ndarray) -> np.ndarray:
    """Per-feature variances, rejecting features that are constant up to rounding."""
    var = np.diag(S).copy()
    magnitude = stats.shift**2 + np.diag(stats.s2) / stats.n
    constant = var <= (64.0 * _EPS) ** 2 * magnitude
    count = int(np.count_nonzero(constant))
    if count:
        raise ValueError(
            f"{count} of {stats.dim} features are constant in the training data, "
            "so the diagonal covariance is singular; use ledoit-wolf or oas"
        )
    return var


def _singular_shrunk_message(estimator: str, n: int, d: int, shrinkage: float) -> str:
    return (
        f"the {estimator} covariance is singular (n={n}, d={d}, shrinkage={shrinkage:.3g}); "
        "the training samples are identical or too few (Ledoit-Wolf does not shrink with 2 samples)"
    )


def _cholesky(cov: np.ndarray, message: str) -> np.ndarray:
    """Lower Cholesky factor of ``cov``, or ``ValueError(message)`` if it is (numerically) singular."""
    d = cov.shape[0]
    diag = np.diag(cov)
    if np.any(diag <= 0.0):
        raise ValueError(message)
    try:
        L = np.linalg.cholesky(cov)
    except np.linalg.LinAlgError:
        raise ValueError(message) from None
    # L_ii^2 / cov_ii is the fraction of feature i's variance not explained by the previous features.
    if np.any(np.diag(L) ** 2 <= d * _EPS * diag):
        raise ValueError(message)
    return L
