"""Nearest-neighbour bank search: gaussad's blocked float32 matrix products against faiss-cpu (issue 14).

For memory banks of the sizes the product builds, times the query of every map location of a batch of images
against one bank with ``gaussad.core.bank.nearest_distances`` (exact), faiss ``IndexFlatL2`` (exact) and faiss
``IndexHNSWFlat`` (approximate: M = 32, efSearch 64; its build time, recall of the exact nearest member and largest
relative distance error are reported). Both libraries run on one thread, as scoring with maps does (it holds BLAS
to one thread beside ONNX Runtime); ``--threads 2`` for both cores. Random Gaussian vectors with a decaying
spectrum stand in for the features (the search cost depends on sizes, not on values; recall does depend on them,
so the recall figure is indicative only).

    python -m bench.speed.bank_search [--threads 1] [--repeats 3] [--json OUT]

Needs ``pip install faiss-cpu`` (not a gaussad dependency).
"""

from __future__ import annotations

import argparse
import json
import os
import time

import numpy as np
from threadpoolctl import threadpool_limits

from gaussad.core.bank import nearest_distances

# (name, bank members, dimensions, query locations): banks as the recommended preset builds them
CASES = (
    ("bottle, one stage7-grid bank (stage7 level)", 1_024, 320, 49 * 16),
    ("tile 761 images, stage7-grid bank (stage7 level)", 3_730, 320, 49 * 16),
    ("tile 761 images, stage7-grid bank (stage2 level)", 3_730, 24, 49 * 16),
    ("finest grid stage4-5 (stride 16), tile", 12_000, 192, 196 * 16),
    ("5,000 images, stage7 level", 24_500, 320, 49 * 16),
    ("20,000 images, stage7 level", 98_000, 320, 49 * 16),
)


def vectors(n: int, d: int, rng: np.random.Generator) -> np.ndarray:
    scale = 1.0 / np.sqrt(np.arange(1, d + 1))  # a decaying spectrum, like pooled CNN features
    return (rng.standard_normal((n, d)) * scale).astype(np.float32)


def best(fn, repeats: int) -> tuple[float, object]:
    out, times = None, []
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return min(times), out


def run(threads: int, repeats: int) -> list[dict]:
    import faiss

    faiss.omp_set_num_threads(threads)
    rng = np.random.default_rng(0)
    rows = []
    for name, n, d, q in CASES:
        bank, queries = vectors(n, d, rng), vectors(q, d, rng) * 1.1
        with threadpool_limits(threads):
            ours_s, ours = best(lambda: nearest_distances(queries, bank), repeats)
        flat = faiss.IndexFlatL2(d)
        flat.add(bank)
        flat_s, (dist, _) = best(lambda: flat.search(queries, 1), repeats)
        flat_d = np.sqrt(np.maximum(dist[:, 0], 0))
        t0 = time.perf_counter()
        hnsw = faiss.IndexHNSWFlat(d, 32)
        hnsw.add(bank)
        build = time.perf_counter() - t0
        hnsw.hnsw.efSearch = 64
        hnsw_s, (hd, _) = best(lambda: hnsw.search(queries, 1), repeats)
        hnsw_d = np.sqrt(np.maximum(hd[:, 0], 0))
        rows.append({"case": name, "bank": n, "dim": d, "queries": q, "threads": threads,
                     "ours_ms": round(1e3 * ours_s, 2), "faiss_flat_ms": round(1e3 * flat_s, 2),
                     "faiss_hnsw_ms": round(1e3 * hnsw_s, 2), "hnsw_build_s": round(build, 2),
                     "flat_vs_ours_max_rel_diff": float(np.max(np.abs(flat_d - ours) / np.maximum(ours, 1e-12))),
                     "hnsw_recall": float(np.mean(np.isclose(hnsw_d, ours, rtol=1e-4))),
                     "hnsw_max_rel_error": float(np.max((hnsw_d - ours) / np.maximum(ours, 1e-12))),
                     "speedup_flat": round(ours_s / flat_s, 2), "speedup_hnsw": round(ours_s / hnsw_s, 2),
                     "load_avg": [round(x, 2) for x in os.getloadavg()]})
        print(json.dumps(rows[-1]), flush=True)
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--json", help="write the rows to this file")
    args = p.parse_args(argv)
    rows = run(args.threads, args.repeats)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(rows, fh, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
