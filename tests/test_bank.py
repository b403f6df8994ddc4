"""Memory banks for nearest-neighbour maps, checked against brute-force references (scipy, torch)."""

import numpy as np
import pytest
import torch
from scipy.spatial.distance import cdist

from gaussad.core.bank import NearestBank, StreamingCoreset, greedy_coreset, nearest_distances
from gaussad.core.maps import local_mean
from tests.conftest import record_coresets


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


def _naive_streaming(x: np.ndarray, fraction: float, pending: int, first: int) -> list[int]:
    """Streaming k-centre on exact distances: each chunk of ``pending`` rows adds members, farthest first from every
    member so far, until there are ceil(fraction * rows so far); the first chunk starts from row ``first``."""
    chosen: list[int] = []
    for lo in range(0, len(x), pending):
        rows = list(range(lo, min(lo + pending, len(x))))
        target = min(int(np.ceil(fraction * (rows[-1] + 1))), len(chosen) + len(rows))
        if not chosen:
            chosen.append(first)
        while len(chosen) < target:
            d = cdist(x[rows], x[chosen]).min(axis=1)
            chosen.append(rows[int(np.argmax(d))])
    return sorted(chosen)


def test_streaming_coreset_is_greedy_selection_of_each_chunk_against_the_bank_so_far():
    """Each full buffer adds the members its rows earn, farthest first from every member kept before (a brute-force
    re-implementation on exact distances), and every row added lies within the reported covering radius."""
    rng = np.random.default_rng(6)
    x = np.concatenate([rng.normal(size=(500, 6)), rng.normal(size=(230, 6)) * 0.2 + 4.0]).astype(np.float32)
    ids = np.repeat(np.arange(73), 10)
    coreset = StreamingCoreset(0.1, seed=2, pending_rows=128)
    for lo in range(0, len(x), 50):
        coreset.add(x[lo:lo + 50], ids[lo:lo + 50])
    bank = coreset.result()
    first = int(np.random.default_rng(2).integers(128))
    expected = _naive_streaming(x.astype(np.float64), 0.1, 128, first)
    np.testing.assert_array_equal(bank.vectors, x[expected])
    np.testing.assert_array_equal(bank.ids, ids[expected])
    assert len(bank.vectors) == int(np.ceil(0.1 * len(x))) and bank.seen == len(x)
    radius = cdist(x, bank.vectors).min(axis=1).max()
    assert radius <= coreset.radius * (1 + 1e-5) + 1e-6
    assert radius >= 0.5 * coreset.radius  # the reported radius is a chunk's own, not a loose bound


def test_streaming_coreset_of_one_buffer_is_one_greedy_pass_whatever_the_batches():
    rng = np.random.default_rng(7)
    x = rng.normal(size=(900, 200)).astype(np.float32)  # wider than PROJECTION_DIM: selection on the projection
    ids = np.repeat(np.arange(90), 10)
    expected = x[greedy_coreset(x, 90, seed=5)]
    for cuts in ([900], [1, 899], [300, 300, 300], [17] * 52 + [16]):
        coreset = StreamingCoreset(0.1, seed=5)
        bounds = np.cumsum([0] + cuts)
        for lo, hi in zip(bounds[:-1], bounds[1:]):
            coreset.add(x[lo:hi], ids[lo:hi])
        bank = coreset.result()
        np.testing.assert_array_equal(bank.vectors, expected)
    # the radius holds in the selection space (the projection), for every row
    covered = cdist(coreset.project(x), coreset.project(bank.vectors)).min(axis=1).max()
    assert covered <= coreset.radius * (1 + 1e-4)


def test_streaming_coreset_bounds_its_buffer_and_tracks_the_budget():
    """Structural memory bound: whatever the sizes added, at most ``pending_rows`` rows wait, and after each full
    buffer the bank holds ceil(fraction * seen) members; the result does not depend on how rows were batched."""
    rng = np.random.default_rng(8)
    x = rng.normal(size=(1000, 5)).astype(np.float32)
    ids = np.repeat(np.arange(100), 10)
    banks = []
    for sizes in ([1000], [7] * 142 + [6], [333, 1, 666]):
        coreset = StreamingCoreset(0.05, pending_rows=97)
        lo = 0
        for size in sizes:
            coreset.add(x[lo:lo + size], ids[lo:lo + size])
            lo += size
            assert coreset.max_pending <= 97
            flushed = lo - lo % 97
            assert coreset.size == int(np.ceil(0.05 * flushed))
        banks.append(coreset.result())
    for bank in banks[1:]:
        np.testing.assert_array_equal(bank.vectors, banks[0].vectors)
    assert len(banks[0].vectors) == 50 and banks[0].seen == 1000


def test_streaming_coreset_of_candidates_keeps_the_share_of_the_locations_they_stand_for():
    """Candidates (a partition's own coreset) count as the locations they summarise: the bank keeps
    ceil(fraction * locations), and a base bank's members are kept, first."""
    rng = np.random.default_rng(9)
    parts = [rng.normal(size=(40, 4)).astype(np.float32) for _ in range(5)]
    coreset = StreamingCoreset(0.1, pending_rows=64)
    for i, part in enumerate(parts):
        coreset.add(part, np.full(40, i), seen=160)
    bank = coreset.result()
    assert bank.seen == 800 and len(bank.vectors) == 80
    grown = StreamingCoreset(0.1, base=bank)
    grown.add(rng.normal(size=(200, 4)), np.full(200, 9))
    bigger = grown.result()
    assert bigger.seen == 1000 and len(bigger.vectors) == 100
    np.testing.assert_array_equal(bigger.vectors[:80], bank.vectors)
    assert StreamingCoreset(0.1, base=bank).result() is bank
    assert StreamingCoreset(0.1).result() is None
    with pytest.raises(ValueError, match="dimensions"):
        grown.add(np.zeros((2, 3)), np.zeros(2))
    with pytest.raises(ValueError, match="fewer locations"):
        StreamingCoreset(0.1).add(np.zeros((4, 3)), np.zeros(4), seen=2)


def test_large_sets_are_selected_chunk_by_chunk_against_the_bank(monkeypatch):
    """Past CHUNK rows a built bank is a streaming coreset's with a CHUNK-row buffer."""
    import gaussad.core.bank as bank_mod

    monkeypatch.setattr(bank_mod, "CHUNK", 100)
    rng = np.random.default_rng(6)
    x = rng.normal(size=(250, 4)).astype(np.float32)
    ids = np.repeat(np.arange(25), 10)
    bank = NearestBank.build(x, ids, fraction=0.2)
    first = int(np.random.default_rng(0).integers(100))
    np.testing.assert_array_equal(bank.vectors, x[_naive_streaming(x.astype(np.float64), 0.2, 100, first)])
    assert bank.seen == 250


def test_fits_stream_locations_through_a_bounded_buffer(monkeypatch):
    """A fit's banks come from streaming coresets whose buffers never exceed CHUNK rows (a structural memory bound,
    not a timing), and each bank keeps ceil(map_coreset * locations) members of every image's locations."""
    from gaussad import GaussianAD
    made = record_coresets(monkeypatch, 40)
    rng = np.random.default_rng(10)
    per_image = [[m, m[:3] * 2.0] for m in rng.normal(size=(12, 6, 4, 4)).astype(np.float32)]
    model = GaussianAD(backbone=None, map_method="nearest", map_pool=1, map_coreset=0.25).fit_map_features(per_image)
    assert len(made) == 2 and all(c.max_pending == 40 for c in made)  # 192 locations per level: 4 full buffers
    for bank in model.state_.map_banks:
        assert bank.seen == 12 * 16 and len(bank.vectors) == 48 and set(bank.ids) == set(range(12))
