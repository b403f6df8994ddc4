"""Memory banks for nearest-neighbour maps, checked against brute-force references (scipy, torch)."""

import numpy as np
import pytest
import torch
from scipy.spatial.distance import cdist

from gaussad.bank import NearestBank, greedy_coreset, nearest_distances
from gaussad.maps import local_mean


def _naive_k_centre(x: np.ndarray, size: int, first: int) -> list[int]:
    """Textbook greedy k-centre on exact Euclidean distances."""
    chosen = [first]
    while len(chosen) < size:
        d = cdist(x, x[chosen]).min(axis=1)
        chosen.append(int(np.argmax(d)))
    return sorted(chosen)


def test_nearest_distances_match_cdist_with_and_without_exclusion():
    rng = np.random.default_rng(0)
    bank, queries = rng.normal(size=(300, 12)), rng.normal(size=(50, 12))
    np.testing.assert_allclose(nearest_distances(queries, bank), cdist(queries, bank).min(axis=1), rtol=1e-4)
    bank_ids, query_ids = rng.integers(0, 5, 300), rng.integers(0, 5, 50)
    full = cdist(queries, bank)
    full[query_ids[:, None] == bank_ids[None]] = np.inf
    np.testing.assert_allclose(nearest_distances(queries, bank, (query_ids, bank_ids)), full.min(axis=1), rtol=1e-4)


def test_greedy_coreset_is_the_textbook_k_centre_selection():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(400, 16)).astype(np.float32)
    got = greedy_coreset(x, 40, seed=3)
    first = int(np.random.default_rng(3).integers(400))
    assert list(got) == _naive_k_centre(x.astype(np.float64), 40, first)
    kept = greedy_coreset(x, 60, start=got)
    assert set(got) <= set(kept) and len(kept) == 60


def test_coreset_covers_clusters_that_a_random_subset_misses():
    """Greedy k-centre is a 2-approximation: its covering radius is at most twice that of any subset of its size."""
    rng = np.random.default_rng(2)
    big = rng.normal(size=(2000, 8))
    rare = rng.normal(size=(10, 8)) * 0.1 + 20.0
    x = np.concatenate([big, rare]).astype(np.float32)
    keep = greedy_coreset(x, 50)
    assert (keep >= 2000).any()
    radius = cdist(x, x[keep]).min(axis=1).max()
    for _ in range(20):
        other = rng.choice(len(x), 50, replace=False)
        assert radius <= 2 * cdist(x, x[other]).min(axis=1).max()


def test_bank_scale_is_the_mean_distance_to_other_images():
    rng = np.random.default_rng(3)
    vectors = rng.normal(size=(120, 6))
    ids = np.repeat(np.arange(12), 10)
    bank = NearestBank.build(vectors, ids, fraction=1.0)
    d = cdist(vectors, vectors)
    d[ids[:, None] == ids[None]] = np.inf
    assert bank.scale == pytest.approx(d.min(axis=1).mean(), rel=1e-5)
    q = rng.normal(size=(7, 6))
    np.testing.assert_allclose(bank.distances(q), cdist(q, vectors).min(axis=1) / bank.scale, rtol=1e-4)
    with pytest.raises(ValueError, match="dimensions"):
        bank.distances(rng.normal(size=(2, 5)))


def test_bank_sizes_incremental_build_and_merge():
    rng = np.random.default_rng(4)
    a, b = rng.normal(size=(200, 5)), rng.normal(size=(100, 5))
    bank = NearestBank.build(a, np.repeat(np.arange(20), 10), fraction=0.1)
    assert len(bank.vectors) == 20 and bank.seen == 200
    grown = NearestBank.build(b, np.repeat(np.arange(20, 30), 10), fraction=0.1, base=bank)
    assert grown.seen == 300 and len(grown.vectors) == 30
    assert {tuple(v) for v in bank.vectors} <= {tuple(v) for v in grown.vectors}
    merged = bank.merge(bank)
    assert len(merged.vectors) == 40 and merged.seen == 400 and len(np.unique(merged.ids)) == 2 * len(np.unique(bank.ids))
    single = NearestBank.build(a[:10], np.zeros(10, dtype=np.int64), fraction=1.0)
    with pytest.raises(ValueError, match="at least 2 images"):
        single.distances(a[:1])
    assert np.isfinite(NearestBank.build(a[10:20], np.ones(10, dtype=np.int64), 1.0, base=single).scale)
    with pytest.raises(ValueError, match="identical"):
        NearestBank.build(np.ones((20, 3)), np.repeat(np.arange(2), 10), fraction=1.0)


@pytest.mark.parametrize("size", [1, 3, 5])
def test_local_mean_is_average_pooling_without_padding(size):
    f = np.random.default_rng(5).normal(size=(2, 4, 6, 5)).astype(np.float32)
    ref = torch.nn.functional.avg_pool2d(torch.from_numpy(f), size, 1, size // 2, count_include_pad=False).numpy()
    np.testing.assert_allclose(local_mean(f, size), ref, rtol=1e-5, atol=1e-6)


def test_large_sets_are_subsampled_chunk_by_chunk(monkeypatch):
    """Past CHUNK rows the bank is the union of the chunks' own coresets, each at the bank's fraction."""
    import gaussad.bank as bank_mod

    monkeypatch.setattr(bank_mod, "CHUNK", 100)
    rng = np.random.default_rng(6)
    x = rng.normal(size=(250, 4)).astype(np.float32)
    ids = np.repeat(np.arange(25), 10)
    bank = NearestBank.build(x, ids, fraction=0.2)
    parts = [(0, 83), (83, 167), (167, 250)]
    expected = np.concatenate([x[lo:hi][greedy_coreset(x[lo:hi], int(np.ceil(0.2 * (hi - lo))))] for lo, hi in parts])
    np.testing.assert_array_equal(bank.vectors, expected)
    assert bank.seen == 250
