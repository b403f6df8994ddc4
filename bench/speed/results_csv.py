"""Memory and responsiveness of `GET /results.csv` with a large results log (RELIABILITY.md, issue 32, N14).

    python -m bench.speed.results_csv [--rows 300000] [--before-src DIR] [--json OUT]

Fills a SQLite results log with ``--rows`` rows (9 levels each, like a recommended-preset model), serves a tiny
model with that log (``gaussad serve --db``) and downloads ``/results.csv?limit=ROWS`` while ``/health`` is polled
every 50 ms. Prints, per gaussad served, the server's resident memory before the download and its peak (VmHWM),
the download's time and size, and the slowest ``/health`` answer during it. ``--before-src`` serves another
gaussad's ``src`` folder first, on a copy of the same log (e.g. the release before the fix:
``git archive 1d01f12 src | tar -x -C /tmp/before`` and ``--before-src /tmp/before/src``).
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import threading
import time
from pathlib import Path

import httpx

from bench.common import serving, status_kb, tiny_maps_model

LEVELS = [f"stage{i}" for i in range(9)]


def fill(db: Path, rows: int) -> None:
    """``rows`` result rows written straight into a results log's table, in batches."""
    from gaussad.service.results_log import ResultsLog

    log = ResultsLog(str(db))
    try:
        for start in range(0, rows, 10_000):
            batch = [{"id": f"{i:032x}", "time": 1.7e9 + i, "model": "tiny", "version": 1, "model_sha256": "0" * 64,
                      "image_sha256": f"{i:064x}", "filename": f"line1/camera2/part_{i:08d}.png",
                      "score": 10.0 + i % 97 / 7, "levels": json.dumps({n: 10.0 + (i * k) % 89 / 9
                                                                         for k, n in enumerate(LEVELS)}),
                      "pvalue": (i % 1000) / 1000, "anomalous": i % 50 == 0, "map_max": 3.5, "image_file": None}
                     for i in range(start, min(rows, start + 10_000))]
            with log.engine.begin() as conn:
                conn.execute(log.table.insert(), batch)
    finally:
        log.close()


def download(model_dir: Path, db: Path, rows: int, src: str | None) -> dict:
    procs: list = []
    with serving(model_dir, "--db", str(db), "--log-level", "warning", procs=procs, src=src) as url:
        pid = procs[0].pid
        before = status_kb(pid, "VmRSS")
        slowest, done = [0.0], threading.Event()

        def poll() -> None:
            while not done.is_set():
                start = time.perf_counter()
                httpx.get(url + "/health", timeout=120)
                slowest[0] = max(slowest[0], time.perf_counter() - start)
                time.sleep(0.05)

        poller = threading.Thread(target=poll)
        poller.start()
        start, size, lines = time.perf_counter(), 0, 0
        with httpx.stream("GET", f"{url}/results.csv?limit={rows}", timeout=600) as answer:
            for chunk in answer.iter_bytes():
                size += len(chunk)
                lines += chunk.count(b"\n")
        seconds = time.perf_counter() - start
        done.set()
        poller.join()
        return {"rows": lines - 1, "megabytes": round(size / 2**20, 1), "seconds": round(seconds, 1),
                "rss_before_mb": round(before / 1024), "peak_rss_mb": round(status_kb(pid, "VmHWM") / 1024),
                "health_max_ms": round(slowest[0] * 1000)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, default=300_000)
    p.add_argument("--before-src", help="the src folder of another gaussad, served first on the same rows")
    p.add_argument("--json", help="write the figures to this file")
    args = p.parse_args(argv)
    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        model_dir = tiny_maps_model(tmp).parent
        fill(tmp / "filled.sqlite", args.rows)
        for label, src in ([("before", args.before_src)] if args.before_src else []) + [("after", None)]:
            db = tmp / f"{label}.sqlite"
            shutil.copyfile(tmp / "filled.sqlite", db)
            out[label] = download(model_dir, db, args.rows, src)
            print(label, json.dumps(out[label]), flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
