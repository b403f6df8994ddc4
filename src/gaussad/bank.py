"""Memory banks of normal location vectors for nearest-neighbour anomaly maps.

A bank keeps a greedy k-centre coreset of the location vectors of every training image (PatchCore's
subsampling: each new member is the vector farthest from those already kept), with the index of the image each
member came from. A location is scored by its Euclidean distance to the nearest member, divided by the bank's
``scale``: the mean distance from members to their nearest member of *another* image, so a normal location
scores about 1 on every level whatever the level's units.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import numpy as np

PROJECTION_DIM = 128  # coreset selection runs on a random projection of this size (Johnson-Lindenstrauss)
SCALE_SAMPLE = 2048  # members sampled to estimate the scale
CHUNK = 65536  # larger sets of new vectors are subsampled in consecutive chunks of about this many rows
_BLOCK = 1024  # rows per distance block: bounds the temporary to _BLOCK x bank size floats


def greedy_coreset(x: np.ndarray, size: int, start: np.ndarray | None = None, seed: int = 0) -> np.ndarray:
    """Indices of ``size`` rows of ``x`` chosen by greedy k-centre selection, beginning with the rows ``start``
    (or one seeded random row); the search runs on a seeded random projection when ``x`` is wide."""
    n, d = x.shape
    size = min(int(size), n)
    rng = np.random.default_rng(seed)
    if d > PROJECTION_DIM:
        proj = rng.standard_normal((d, PROJECTION_DIM)).astype(np.float32) / np.sqrt(PROJECTION_DIM)
        x = x @ proj
    x = np.ascontiguousarray(x, dtype=np.float32)
    norms = np.einsum("ij,ij->i", x, x)
    chosen = list(np.asarray(start, dtype=np.int64)) if start is not None and len(start) else [int(rng.integers(n))]
    mind = _nearest_squared(x, _prepare(x[chosen]))
    mind[chosen] = -1.0
    d = np.empty(n, dtype=np.float32)
    while len(chosen) < size:
        i = int(np.argmax(mind))
        chosen.append(i)
        np.dot(x, x[i] * np.float32(-2.0), out=d)
        d += norms
        d += norms[i]
        np.minimum(mind, d, out=mind)
        mind[i] = -1.0
    return np.sort(np.asarray(chosen, dtype=np.int64))


def _chunks(n: int, size: int) -> list[tuple[int, int]]:
    """(start, stop) of ceil(n / size) consecutive, near-equal parts of range(n)."""
    bounds = np.linspace(0, n, -(-n // size) + 1).round().astype(int)
    return list(zip(bounds[:-1], bounds[1:]))


def _coreset_indices(x: np.ndarray, size: int, start: np.ndarray | None, seed: int) -> np.ndarray:
    """Rows of ``x`` kept: ``size`` of them (at least the ``start`` rows, at least one), all when that is every row."""
    size = max(size, 1 if start is None else len(start))
    return np.arange(len(x)) if size >= len(x) else greedy_coreset(x, size, start, seed)


def _prepare(bank: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(-2 * bank^T, |bank rows|^2) in float32: what :func:`_nearest_squared` multiplies queries with."""
    b = np.ascontiguousarray(bank, dtype=np.float32)
    return np.ascontiguousarray(b.T * np.float32(-2.0)), np.einsum("ij,ij->i", b, b)


def _nearest_squared(queries: np.ndarray, prepared: tuple[np.ndarray, np.ndarray],
                     exclude: tuple[np.ndarray, np.ndarray] | None = None) -> np.ndarray:
    """Squared Euclidean distance from each query row to its nearest bank row, the bank given as :func:`_prepare`
    makes it (float32, may dip below 0 by rounding), block by block: min over the bank of |b|^2 - 2 q.b, + |q|^2."""
    q = np.ascontiguousarray(queries, dtype=np.float32)
    minus_2bt, bn = prepared
    out = np.empty(len(q), dtype=np.float32)
    for lo in range(0, len(q), _BLOCK):
        qb = q[lo:lo + _BLOCK]
        g = qb @ minus_2bt
        g += bn
        if exclude is not None:
            g[exclude[0][lo:lo + _BLOCK, None] == exclude[1][None]] = np.inf
        out[lo:lo + len(qb)] = g.min(axis=1) + np.einsum("ij,ij->i", qb, qb)
    return out


def nearest_distances(queries: np.ndarray, bank: np.ndarray, exclude: tuple[np.ndarray, np.ndarray] | None = None
                      ) -> np.ndarray:
    """Euclidean distance from each query row to its nearest bank row (float32); ``exclude=(query_ids, bank_ids)``
    skips bank rows with the query's own id."""
    return np.sqrt(np.maximum(_nearest_squared(queries, _prepare(bank), exclude), 0.0))


@dataclass(frozen=True)
class NearestBank:
    """A coreset of normal location vectors (``vectors``, float32) with the source image of each (``ids``), the
    number of locations it summarises (``seen``), the fraction kept, and the distance ``scale``."""

    vectors: np.ndarray
    ids: np.ndarray
    seen: int
    fraction: float
    scale: float

    @classmethod
    def build(cls, vectors: np.ndarray, ids: np.ndarray, fraction: float, seed: int = 0,
              base: "NearestBank | None" = None) -> "NearestBank":
        """A bank of ``ceil(fraction * seen)`` vectors from ``vectors`` (n, d) with image ids ``ids`` (n,); with
        ``base``, its members are kept and new ones are chosen from ``vectors`` (incremental fitting). Without a
        base, more than ``CHUNK`` vectors are subsampled chunk by chunk (consecutive rows), which keeps the
        selection's working set small enough for the CPU caches, at the price of no deduplication across
        chunks."""
        vectors = np.asarray(vectors, dtype=np.float32)
        ids = np.asarray(ids, dtype=np.int64)
        if vectors.ndim != 2 or len(ids) != len(vectors):
            raise ValueError("bank vectors must be (n, d) with one image id per row")
        seen = len(vectors) + (base.seen if base is not None else 0)
        if base is not None:
            if base.vectors.shape[1] != vectors.shape[1]:
                raise ValueError(f"bank vectors have {vectors.shape[1]} dimensions, the bank {base.vectors.shape[1]}")
            pool = np.concatenate([base.vectors, vectors])
            pool_ids = np.concatenate([base.ids, ids])
            start = np.arange(len(base.vectors))
        else:
            pool, pool_ids, start = vectors, ids, None
        if start is None and len(pool) > CHUNK:
            keep = np.concatenate([lo + _coreset_indices(pool[lo:hi], int(np.ceil(fraction * (hi - lo))), None, seed)
                                   for lo, hi in _chunks(len(pool), CHUNK)])
        else:
            keep = _coreset_indices(pool, int(np.ceil(fraction * seen)), start, seed)
        return cls.from_members(pool[keep], pool_ids[keep], seen, fraction, seed)

    @classmethod
    def select(cls, vectors: np.ndarray, ids: np.ndarray, seen: int, fraction: float, seed: int = 0) -> "NearestBank":
        """A bank of ``ceil(fraction * seen)`` of the candidate rows ``vectors`` (all when there are no more), chosen
        by one greedy pass over them (more than ``CHUNK`` candidates: consecutive chunks, each keeping its share);
        the candidates are themselves coresets of parts of ``seen`` locations (a distributed fit's partitions)."""
        vectors = np.asarray(vectors, dtype=np.float32)
        ids = np.asarray(ids, dtype=np.int64)
        size = int(np.ceil(fraction * seen))
        if size >= len(vectors):
            keep = np.arange(len(vectors))
        elif len(vectors) <= CHUNK:
            keep = _coreset_indices(vectors, size, None, seed)
        else:
            keep = np.concatenate([lo + _coreset_indices(vectors[lo:hi], int(np.ceil(size * (hi - lo) / len(vectors))),
                                                         None, seed) for lo, hi in _chunks(len(vectors), CHUNK)])
        return cls.from_members(vectors[keep], ids[keep], seen, fraction, seed)

    @classmethod
    def from_members(cls, vectors: np.ndarray, ids: np.ndarray, seen: int, fraction: float,
                     seed: int = 0) -> "NearestBank":
        """A bank of exactly these members; the scale is estimated from them (NaN while they come from one image:
        such a bank only waits for more images, as in incremental fitting)."""
        vectors = np.ascontiguousarray(vectors, dtype=np.float32)
        ids = np.asarray(ids, dtype=np.int64)
        if len(np.unique(ids)) < 2:
            return cls(vectors, ids, int(seen), float(fraction), float("nan"))
        rng = np.random.default_rng(seed)
        sample = rng.choice(len(vectors), min(SCALE_SAMPLE, len(vectors)), replace=False)
        d = nearest_distances(vectors[sample], vectors, (ids[sample], ids))
        scale = float(d.mean())
        if not np.isfinite(scale) or scale <= 0.0:
            raise ValueError("the training images give identical location vectors: no variation to model")
        return cls(vectors, ids, int(seen), float(fraction), scale)

    def merge(self, other: "NearestBank") -> "NearestBank":
        """The union of two banks (image ids of ``other`` shifted past this bank's)."""
        if other.vectors.shape[1] != self.vectors.shape[1]:
            raise ValueError("cannot merge banks of different dimensions")
        shift = int(self.ids.max()) + 1
        return NearestBank.from_members(np.concatenate([self.vectors, other.vectors]),
                                        np.concatenate([self.ids, other.ids + shift]), self.seen + other.seen,
                                        self.fraction)

    @cached_property
    def _prepared(self) -> tuple[np.ndarray, np.ndarray]:
        """The members as :func:`_nearest_squared` takes them, computed once per bank."""
        return _prepare(self.vectors)

    def distances(self, vectors: np.ndarray, ids: np.ndarray | None = None) -> np.ndarray:
        """Nearest-member distance of each row of ``vectors`` divided by ``scale`` (about 1 for normal ones); with
        ``ids`` (one image id per row) members of the row's own image are skipped (leave-one-image-out scores of
        training images)."""
        if not np.isfinite(self.scale):
            raise ValueError("a nearest-neighbour bank needs location vectors of at least 2 images")
        if vectors.shape[-1] != self.vectors.shape[1]:
            raise ValueError(f"vectors have {vectors.shape[-1]} dimensions, the bank {self.vectors.shape[1]}")
        exclude = None if ids is None else (np.asarray(ids, dtype=np.int64), self.ids)
        return np.sqrt(np.maximum(_nearest_squared(vectors, self._prepared, exclude), 0.0)) / np.float32(self.scale)
