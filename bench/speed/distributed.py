"""Distributed fit (gaussad.tools.distributed) against one process, on the magnetic tiles.

    python -m bench.speed.distributed accept [--preset paper|recommended]   # same scores / map AUROC as one process
    python -m bench.speed.distributed scaling [--n 761]                       # fit time, 1 vs 2 local workers
    python -m bench.speed.distributed memory --n 5000 [--n 20000] [--one]     # peak RSS per worker, tile train repeated

``memory`` writes the tile train images repeated with small shifts (np.roll by 1, 2, ... pixels) to a temporary
folder outside the repository and fits the recommended preset on N of them with 2 local workers, sampling each
worker process's RSS (and the client's) every 0.2 s and reading each one's high-water mark (VmHWM) at the end;
``--one`` fits the same images in one process instead (a child process, whose VmHWM is read as it ends).
JSON lines go to stdout.

    python -m bench.speed.distributed memory --n 5000 --n 20000 [--one]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

TILE = Path(__file__).resolve().parents[2] / ".." / "shared" / "data" / "magnetic_tile"


def _cluster(n: int):
    import logging

    import dask.distributed as dd

    cluster = dd.LocalCluster(n_workers=n, threads_per_worker=max(1, (os.cpu_count() or 1) // n), processes=True,
                              dashboard_address=":0", silence_logs=logging.ERROR)
    return cluster, dd.Client(cluster)


def accept(preset: str, dist_only: bool = False) -> dict:
    from gaussad import GaussianAD
    from gaussad.tools import distributed
    from gaussad.tools.datasets import load_category
    from gaussad.tools.evaluate import load_masks, roc_auc

    cat = load_category(TILE)
    t0 = time.perf_counter()
    one = None if dist_only else GaussianAD(preset=preset).fit(cat.train_files)
    t_one = time.perf_counter() - t0
    cluster, client = _cluster(2)
    try:
        t0 = time.perf_counter()
        dist = distributed.fit(GaussianAD(preset=preset), cat.train_files, client)
        t_dist = time.perf_counter() - t0
    finally:
        client.close()
        cluster.close()
    out = {"bench": "accept", "preset": preset, "n_train": len(cat.train_files), "fit_s_one": round(t_one, 1),
           "fit_s_local2": round(t_dist, 1)}
    if one is None:  # --dist-only: the distributed model stands in for one process's (compare with an earlier run)
        one = dist
    levels_one, levels_dist, maps_one, maps_dist = [], [], [], []
    with_maps = one.has_maps
    s_one = one.state_.with_maps() if with_maps and one is not dist else None
    s_dist = dist.state_.with_maps() if with_maps else None
    for _, batch, fm in one.iter_features(cat.test_files, "test"):
        levels_one.append(one.level_scores_features(batch))
        levels_dist.append(dist.level_scores_features(batch))
        if with_maps:
            maps_dist.append(s_dist.anomaly_maps(fm, 224))
            maps_one.append(s_one.anomaly_maps(fm, 224) if s_one is not None else maps_dist[-1])
    a, b = np.concatenate(levels_one).mean(axis=1), np.concatenate(levels_dist).mean(axis=1)
    out["max_rel_score_diff"] = float(np.max(np.abs(a - b) / np.abs(a)))
    out["image_auroc_one"], out["image_auroc_local2"] = roc_auc(cat.test_labels, a), roc_auc(cat.test_labels, b)
    if with_maps:
        masks = load_masks(cat, 224)
        m1, m2 = np.concatenate(maps_one), np.concatenate(maps_dist)
        out["pixel_auroc_one"] = roc_auc(masks.ravel(), m1.ravel())
        out["pixel_auroc_local2"] = roc_auc(masks.ravel(), m2.ravel())
        out["pixel_auroc_diff"] = out["pixel_auroc_local2"] - out["pixel_auroc_one"]
        out["bank_sizes_one"] = [len(bk.vectors) for bk in one.map_banks_]
        out["bank_sizes_local2"] = [len(bk.vectors) for bk in dist.map_banks_]
    return out


def scaling(n: int, preset: str) -> list[dict]:
    from gaussad import GaussianAD
    from gaussad.tools import distributed
    from gaussad.tools.datasets import load_category

    files = load_category(TILE).train_files[:n]
    rows = []
    for workers in (1, 2):
        cluster, client = _cluster(workers)
        try:
            distributed.fit(GaussianAD(preset=preset), files[:8], client, partition_size=4)  # warm: sessions built
            t0 = time.perf_counter()
            distributed.fit(GaussianAD(preset=preset), files, client)
            rows.append({"bench": "scaling", "workers": workers, "n": len(files), "preset": preset,
                         "fit_s": round(time.perf_counter() - t0, 1)})
        finally:
            client.close()
            cluster.close()
    rows.append({"bench": "scaling", "ratio_1_over_2": round(rows[0]["fit_s"] / rows[1]["fit_s"], 2)})
    return rows


def _shifted_copies(n: int, folder: Path) -> list[Path]:
    """N images: the tile train images, repeated, each copy rolled by its repetition number of pixels."""
    from PIL import Image

    from gaussad.tools.datasets import load_category

    train = load_category(TILE).train_files
    out = []
    for k in range(n):
        rep, src = divmod(k, len(train))
        path = folder / f"{k:06d}.png"
        if not path.exists():
            with Image.open(train[src]) as im:
                arr = np.asarray(im)
            part = path.with_suffix(".part")  # renamed when complete: an interrupted run leaves no broken image
            Image.fromarray(np.roll(arr, rep + 1 if rep else 0, axis=1)).save(part, format="PNG", compress_level=1)
            part.replace(path)
        out.append(path)
    return out


def memory(n: int, preset: str, partition_size: int) -> dict:
    import psutil

    from gaussad import GaussianAD
    from gaussad.tools import distributed

    folder = Path(tempfile.gettempdir()) / "gaussad-bench-shifted"
    folder.mkdir(exist_ok=True)
    files = _shifted_copies(n, folder)
    cluster, client = _cluster(2)
    peaks: dict[int, int] = {}
    me = psutil.Process()
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            for pid in list(client.run(os.getpid).values()) + [me.pid]:
                try:
                    peaks[pid] = max(peaks.get(pid, 0), psutil.Process(pid).memory_info().rss)
                except psutil.Error:
                    pass
            time.sleep(0.2)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    try:
        t0 = time.perf_counter()
        model = distributed.fit(GaussianAD(preset=preset), files, client, partition_size=partition_size)
        took = time.perf_counter() - t0
        hwm = client.run(_vmhwm_kb)
    finally:
        done.set()
        thread.join()
        client.close()
        cluster.close()
    workers = [v for pid, v in peaks.items() if pid != me.pid]
    return {"bench": "memory", "n": n, "preset": preset, "partition_size": partition_size, "fit_s": round(took, 1),
            "peak_rss_worker_mb": [round(v / 2**20) for v in sorted(workers)],
            "vmhwm_worker_mb": sorted(round(v / 2**10) for v in hwm.values()),
            "peak_rss_client_mb": round(peaks.get(me.pid, 0) / 2**20), "vmhwm_client_mb": round(_vmhwm_kb() / 2**10),
            "bank_mb": round(sum(b.vectors.nbytes for b in model.map_banks_) / 2**20, 1),
            "load_avg": os.getloadavg()}


def _vmhwm_kb() -> int:
    """This process's peak resident set (VmHWM, kB)."""
    with open("/proc/self/status") as fh:
        return next(int(line.split()[1]) for line in fh if line.startswith("VmHWM:"))


_ONE = """
import json, sys, time
from pathlib import Path
from gaussad import GaussianAD
files = sorted(Path(sys.argv[1]).glob("*.png"))[:int(sys.argv[2])]
t0 = time.perf_counter()
model = GaussianAD(preset=sys.argv[3], verbose=False).fit(files)
took = time.perf_counter() - t0
hwm = next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmHWM:"))
print(json.dumps({"fit_s": round(took, 1), "vmhwm_mb": round(hwm / 2**10),
                  "bank_mb": round(sum(b.vectors.nbytes for b in model.map_banks_) / 2**20, 1)}))
"""


def memory_one(n: int, preset: str) -> dict:
    """The same fit in one process (a child, so that its peak is the fit's alone)."""
    import subprocess

    folder = Path(tempfile.gettempdir()) / "gaussad-bench-shifted"
    folder.mkdir(exist_ok=True)
    _shifted_copies(n, folder)
    run = subprocess.run([sys.executable, "-c", _ONE, str(folder), str(n), preset], capture_output=True, text=True,
                         check=True)
    return {"bench": "memory_one", "n": n, "preset": preset, **json.loads(run.stdout.strip().splitlines()[-1]),
            "load_avg": os.getloadavg()}


def main(argv=None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("what", choices=("accept", "scaling", "memory"))
    p.add_argument("--preset", default=None)
    p.add_argument("--n", type=int, action="append")
    p.add_argument("--partition-size", type=int, default=64)
    p.add_argument("--one", action="store_true", help="memory: fit in one process instead of 2 local workers")
    p.add_argument("--dist-only", action="store_true", help="accept: skip the one-process fit (its figures are then "
                   "meaningless; compare with an earlier run's)")
    args = p.parse_args(argv)
    if args.what == "accept":
        for preset in [args.preset] if args.preset else ["paper", "recommended"]:
            print(json.dumps(accept(preset, args.dist_only)), flush=True)
    elif args.what == "scaling":
        for row in scaling((args.n or [761])[0], args.preset or "paper"):
            print(json.dumps(row), flush=True)
    else:
        for n in args.n or [5000, 20000]:
            if args.one:
                print(json.dumps(memory_one(n, args.preset or "recommended")), flush=True)
            else:
                print(json.dumps(memory(n, args.preset or "recommended", args.partition_size)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
