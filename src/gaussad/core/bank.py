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
CHUNK = 65536  # a streaming coreset selects whenever this many rows wait (one greedy pass over smaller sets)
_BLOCK = 1024  # query rows per distance block, fewer against a large bank: the temporary stays under _TEMP floats
_TEMP = 1 << 23  # floats (32 MB) of one distance block


def _selection_space(x: np.ndarray, seed: int) -> tuple[np.ndarray, np.random.Generator]:
    """``x`` where greedy selection measures distances (float32; a seeded random projection to
    ``PROJECTION_DIM`` columns when wider: the same projection for every call with this seed and width), and the
    generator after drawing it (greedy selection draws its first row from it)."""
    rng = np.random.default_rng(seed)
    if x.shape[1] > PROJECTION_DIM:
        proj = rng.standard_normal((x.shape[1], PROJECTION_DIM)).astype(np.float32) / np.sqrt(PROJECTION_DIM)
        x = x @ proj
    return np.ascontiguousarray(x, dtype=np.float32), rng


def _greedy(x: np.ndarray, size: int, chosen: list[int], mind: np.ndarray) -> list[int]:
    """Greedy k-centre selection on ``x`` (the selection space) until ``chosen`` holds ``size`` rows; ``mind``
    (squared distance of each row to its nearest centre so far, -1 at chosen rows) is updated in place."""
    n = len(x)
    norms = np.einsum("ij,ij->i", x, x)
    d = np.empty(n, dtype=np.float32)
    while len(chosen) < size:
        i = int(np.argmax(mind))
        chosen.append(i)
        np.dot(x, x[i] * np.float32(-2.0), out=d)
        d += norms
        d += norms[i]
        np.minimum(mind, d, out=mind)
        mind[i] = -1.0
    return chosen


def greedy_coreset(x: np.ndarray, size: int, start: np.ndarray | None = None, seed: int = 0) -> np.ndarray:
    """Indices of ``size`` rows of ``x`` chosen by greedy k-centre selection, beginning with the rows ``start``
    (or one seeded random row); the search runs on a seeded random projection when ``x`` is wide."""
    n = len(x)
    size = min(int(size), n)
    x, rng = _selection_space(x, seed)
    chosen = list(np.asarray(start, dtype=np.int64)) if start is not None and len(start) else [int(rng.integers(n))]
    mind = _nearest_squared(x, _prepare(x[chosen]))
    mind[chosen] = -1.0
    return np.sort(np.asarray(_greedy(x, size, chosen, mind), dtype=np.int64))


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
    rows = max(1, min(_BLOCK, _TEMP // max(len(bn), 1)))
    for lo in range(0, len(q), rows):
        qb = q[lo:lo + rows]
        g = qb @ minus_2bt
        g += bn
        if exclude is not None:
            g[exclude[0][lo:lo + rows, None] == exclude[1][None]] = np.inf
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
        ``base``, its members are kept and new ones are chosen from ``vectors`` (incremental fitting). The
        selection is a :class:`StreamingCoreset`'s: one greedy pass over up to ``CHUNK`` rows, chunk by chunk
        against the members so far past that."""
        coreset = StreamingCoreset(fraction, seed, base=base)
        coreset.add(vectors, ids)
        bank = coreset.result()
        if bank is None:
            raise ValueError("no bank vectors given")
        return bank

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


class StreamingCoreset:
    """Greedy k-centre selection over location vectors that arrive in chunks, in memory bounded by the bank.

    Rows wait in a pending buffer of at most ``pending_rows`` rows; when it is full, and at :meth:`result`, its
    rows are selected against the running bank: each starts at its distance to the nearest member so far, and
    greedy selection adds members until the bank holds ``ceil(fraction * seen)`` (``seen``: the locations added
    so far, which candidate rows may summarise, as a distributed fit's partition coresets do). Up to
    ``pending_rows`` rows in all, this is one :func:`greedy_coreset` pass; past that, each flush adds the members
    its locations earn, each chosen against every member kept before (EXPERIMENTS.md, "Streaming coreset").
    Memory: the bank, a copy of its wide levels in the selection space (``PROJECTION_DIM`` columns) and the
    buffer; ``max_pending`` is the buffer's high-water mark, ``radius`` the covering radius in the selection space
    (every row added lies within it of a member; the members of a ``base`` bank are kept, not checked).
    """

    def __init__(self, fraction: float, seed: int = 0, pending_rows: int = 0, base: NearestBank | None = None):
        self.fraction, self.seed = float(fraction), int(seed)
        self.pending_rows = int(pending_rows) or CHUNK
        if self.pending_rows < 1:
            raise ValueError(f"pending_rows must be at least 1, got {pending_rows}")
        self.base = base
        self.radius = 0.0
        self.max_pending = 0
        self.added = 0  # rows added (not counting the base's members)
        self._dim = None if base is None else base.vectors.shape[1]
        self._selected_seen = 0 if base is None else int(base.seen)  # locations behind the flushed rows
        self._pending: list[tuple[np.ndarray, np.ndarray]] = []
        self._pending_rows = 0
        self._pending_seen = 0
        # (vectors, ids, the same rows in the selection space) of the members, flush by flush
        self._members: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
        if base is not None and len(base.vectors):
            self._members.append((base.vectors, base.ids, self._space(base.vectors)))

    @property
    def seen(self) -> int:
        """Locations summarised by the rows added so far (with the base bank's)."""
        return self._selected_seen + self._pending_seen

    @property
    def size(self) -> int:
        """Members kept so far (pending rows not counted)."""
        return sum(len(m[0]) for m in self._members)

    def project(self, vectors: np.ndarray) -> np.ndarray:
        """``vectors`` in the space where selection measures distances (and ``radius`` is given)."""
        return _selection_space(np.asarray(vectors, dtype=np.float32), self.seed)[0]

    def _space(self, x: np.ndarray) -> np.ndarray:
        return x if x.shape[1] <= PROJECTION_DIM and x.dtype == np.float32 and x.flags.c_contiguous else self.project(x)

    def add(self, vectors: np.ndarray, ids: np.ndarray, seen: int | None = None) -> None:
        """Add rows ``vectors`` (n, d) of images ``ids`` (n,), standing for ``seen`` locations (default n)."""
        vectors = np.asarray(vectors, dtype=np.float32)
        ids = np.asarray(ids, dtype=np.int64)
        if vectors.ndim != 2 or ids.shape != (len(vectors),):
            raise ValueError("bank vectors must be (n, d) with one image id per row")
        if self._dim is None:
            self._dim = vectors.shape[1]
        elif vectors.shape[1] != self._dim:
            raise ValueError(f"bank vectors have {vectors.shape[1]} dimensions, the bank {self._dim}")
        n = len(vectors)
        seen = n if seen is None else int(seen)
        if seen < n:
            raise ValueError(f"{n} bank rows cannot stand for fewer locations ({seen})")
        self.added += n
        if n == 0:
            self._pending_seen += seen
            return
        lo = 0
        while lo < n:  # the buffer takes what fits; each full buffer is selected at once
            hi = lo + min(n - lo, self.pending_rows - self._pending_rows)
            self._pending.append((vectors[lo:hi], ids[lo:hi]))
            self._pending_rows += hi - lo
            self._pending_seen += seen * hi // n - seen * lo // n
            self.max_pending = max(self.max_pending, self._pending_rows)
            lo = hi
            if self._pending_rows >= self.pending_rows:
                self._flush()

    def _flush(self) -> None:
        """Select the pending rows against the members so far, up to ``ceil(fraction * seen)`` members."""
        if not self._pending:
            self._selected_seen += self._pending_seen
            self._pending_seen = 0
            return
        x = np.concatenate([v for v, _ in self._pending]) if len(self._pending) > 1 else self._pending[0][0]
        ids = np.concatenate([k for _, k in self._pending]) if len(self._pending) > 1 else self._pending[0][1]
        self._pending, self._pending_rows = [], 0
        self._selected_seen += self._pending_seen
        self._pending_seen = 0
        have = self.size
        n = len(x)
        new = min(n, max(int(np.ceil(self.fraction * self._selected_seen)) - have, 0 if have else 1))
        if new >= n:
            keep = np.arange(n)
        else:
            xs, rng = _selection_space(x, self.seed)
            if have:
                chosen: list[int] = []
                mind = self._nearest_member(xs)
            else:  # the first selection is greedy_coreset's, row for row
                chosen = [int(rng.integers(n))]
                mind = _nearest_squared(xs, _prepare(xs[chosen]))
                mind[chosen] = -1.0
            keep = np.sort(np.asarray(_greedy(xs, new, chosen, mind), dtype=np.int64))
            self.radius = max(self.radius, float(np.sqrt(max(float(mind.max()), 0.0))))
        members = np.ascontiguousarray(x[keep])
        self._members.append((members, ids[keep], self._space(members)))

    def _nearest_member(self, xs: np.ndarray) -> np.ndarray:
        """Squared selection-space distance of each row of ``xs`` to its nearest member, member block by block."""
        mind = np.full(len(xs), np.inf, dtype=np.float32)
        for _, _, space in self._members:
            for lo in range(0, len(space), CHUNK // 4):
                np.minimum(mind, _nearest_squared(xs, _prepare(space[lo:lo + CHUNK // 4])), out=mind)
        return mind

    def result(self) -> NearestBank | None:
        """The bank of every row added (the base bank itself when none was; None when neither), after selecting
        the pending rows; the coreset's own copies are released."""
        self._flush()
        if not self.added:
            return self.base
        vectors = np.concatenate([m[0] for m in self._members])
        ids = np.concatenate([m[1] for m in self._members])
        self._members = []
        return NearestBank.from_members(vectors, ids, self.seen, self.fraction, self.seed)
