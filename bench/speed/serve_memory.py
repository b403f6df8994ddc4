"""Memory and queueing of `gaussad serve` under large uploads (RELIABILITY.md, issue 18).

    python -m bench.speed.serve_memory [--side 5000] [--files 16] [--json OUT]

Serves a tiny model with anomaly maps (64 px; maps change nothing in the decoding cost that matters here) with the
service's default limits, sends two concurrent ``maps=true`` requests of ``--files`` PNGs of ``--side`` x ``--side``
pixels each (one smooth image of about 1 MB, repeated), and one second later a request of one 8 x 8 image. Prints
the server's peak RSS (VmHWM), its RSS afterwards, the statuses and latencies. The small request must be answered
within 5 s, or refused with 503 quickly; the peak must stay under 3 GB.
"""

from __future__ import annotations

import argparse
import io
import json
import tempfile
import threading
import time
from pathlib import Path

import httpx
import numpy as np
from PIL import Image

from bench.common import serving, status_kb, tiny_maps_model


def big_png(side: int) -> bytes:
    """A smooth RGB image (gradients and a few discs) that compresses to about a megabyte at 5000 px."""
    y, x = np.mgrid[0:side, 0:side].astype(np.float32) / side
    img = np.stack([x * 255, y * 255, (x + y) * 127], axis=-1)
    rng = np.random.default_rng(0)
    for cx, cy, r in rng.random((12, 3)):
        img[(x - cx) ** 2 + (y - cy) ** 2 < (r * 0.1) ** 2] = rng.integers(0, 255, 3)
    buf = io.BytesIO()
    Image.fromarray(img.astype(np.uint8)).save(buf, format="PNG", optimize=False)
    return buf.getvalue()


def small_png() -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.full((8, 8, 3), 128, np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def measure(side: int = 5000, files: int = 16, small_after: float = 1.0) -> dict:
    data = big_png(side)
    with tempfile.TemporaryDirectory() as tmp:
        model = tiny_maps_model(Path(tmp))
        procs: list = []
        with serving(model.parent, "--log-level", "warning", procs=procs) as url:
            pid = procs[0].pid
            base_rss = status_kb(pid, "VmRSS")
            results: dict = {}

            def heavy(i: int) -> None:
                start = time.perf_counter()
                r = httpx.post(f"{url}/models/tiny/score?maps=true", timeout=600,
                               files=[("files", (f"big{j}.png", data, "image/png")) for j in range(files)])
                results[f"heavy{i}"] = {"status": r.status_code, "seconds": round(time.perf_counter() - start, 2),
                                        "retry_after": r.headers.get("retry-after")}

            threads = [threading.Thread(target=heavy, args=(i,)) for i in range(2)]
            for t in threads:
                t.start()
            time.sleep(small_after)
            start = time.perf_counter()
            r = httpx.post(f"{url}/models/tiny/score", timeout=600, files=[("files", ("small.png", small_png(), "image/png"))])
            results["small"] = {"status": r.status_code, "seconds": round(time.perf_counter() - start, 2)}
            for t in threads:
                t.join()
            time.sleep(1.0)
            return {"side": side, "files_per_request": files, "png_bytes": len(data),
                    "rss_before_mb": round(base_rss / 1024), "peak_rss_mb": round(status_kb(pid, "VmHWM") / 1024),
                    "rss_after_mb": round(status_kb(pid, "VmRSS") / 1024), **results}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--side", type=int, default=5000)
    p.add_argument("--files", type=int, default=16)
    p.add_argument("--json", help="write the figures to this file")
    args = p.parse_args(argv)
    out = measure(args.side, args.files)
    print(json.dumps(out, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
