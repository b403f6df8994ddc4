"""Load test of `gaussad serve` on loopback: many concurrent score requests, every answer checked.

    python -m bench.speed.serve_load [--requests 200] [--concurrency 200] [--workers N] [--model FILE --images DIR]
                               [--compare-log] [--keep-images]

Starts `gaussad serve` as a child process on a free 127.0.0.1 port, sends ``--requests`` POST
/models/NAME/score requests of one image each with at most ``--concurrency`` in flight, and checks that every
one is answered 200 with the score the model gives that image in this process (relative difference < 1e-4).
While the load runs, GET /health is polled to show that the event loop keeps answering. Prints the latency
percentiles of the score requests and of the health probes, and the throughput.

The results log is off (``--db none``) unless ``--compare-log``: then the same load runs twice, without and with
the log (a SQLite file in a temporary folder, plus ``--keep-images`` when given), and the log is checked to hold
exactly one row per answered image (the ids the answers carry).

Without ``--model`` a tiny model (64 px, 4 levels) is fitted on a synthetic texture set; with ``--model`` the
images of ``--images`` (a folder, files cycled) are sent to that model.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np

from bench.common import serving

REL_TOLERANCE = 1e-4


@dataclass
class Outcome:
    """One request: the image sent, the HTTP status (None when no answer came), the body, the latency."""

    filename: str
    status: int | None
    body: dict | str
    seconds: float


@dataclass
class Probe:
    """One /health probe made while the load ran: its latency, HTTP status and the body's "status" (None when the
    probe got no answer or no JSON)."""

    seconds: float
    status: int | None
    health: str | None


async def _post(client: httpx.AsyncClient, path: str, name: str, data: bytes) -> Outcome:
    start = time.perf_counter()
    try:
        resp = await client.post(path, files=[("files", (name, data, "application/octet-stream"))])
    except httpx.HTTPError as exc:
        return Outcome(name, None, f"{type(exc).__name__}: {exc}", time.perf_counter() - start)
    try:
        body = resp.json()
    except ValueError:
        body = resp.text
    return Outcome(name, resp.status_code, body, time.perf_counter() - start)


async def _load(url: str, model: str, images: list[tuple[str, bytes]], n: int, concurrency: int,
                probe_every: float) -> tuple[list[Outcome], list[Probe], float]:
    limits = httpx.Limits(max_connections=concurrency + 1, max_keepalive_connections=concurrency + 1)
    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=600) as client:
        gate = asyncio.Semaphore(concurrency)

        async def one(i: int) -> Outcome:
            name, data = images[i % len(images)]
            async with gate:
                return await _post(client, f"/models/{model}/score", name, data)

        async def probe(stop: asyncio.Event) -> list[Probe]:
            probes = []
            async with httpx.AsyncClient(base_url=url, timeout=600) as side:
                while not stop.is_set():
                    start = time.perf_counter()
                    status = health = None
                    try:
                        resp = await side.get("/health")
                        status = resp.status_code
                        health = resp.json().get("status")
                    except (httpx.HTTPError, ValueError, AttributeError):
                        pass
                    probes.append(Probe(time.perf_counter() - start, status, health))
                    await asyncio.sleep(probe_every)
            return probes

        stop = asyncio.Event()
        prober = asyncio.create_task(probe(stop))
        start = time.perf_counter()
        outcomes = await asyncio.gather(*(one(i) for i in range(n)))
        wall = time.perf_counter() - start
        stop.set()
        return list(outcomes), await prober, wall


def run_load(url: str, model: str, images: list[tuple[str, bytes]], n: int, concurrency: int,
             probe_every: float = 0.05) -> tuple[list[Outcome], list[Probe], float]:
    """Send ``n`` one-image score requests (at most ``concurrency`` at once) while probing /health.

    Returns the outcomes in request order, the health probes and the wall time of the load.
    """
    return asyncio.run(_load(url, model, images, n, concurrency, probe_every))


def check(outcomes: list[Outcome], expected: dict[str, float]) -> dict:
    """Count answers: 200 with the expected score, other statuses, 5xx, no answer, and wrong content."""
    correct, wrong, statuses = 0, [], {}
    for o in outcomes:
        statuses[str(o.status)] = statuses.get(str(o.status), 0) + 1
        if o.status != 200:
            continue
        try:
            (row,) = o.body["results"]
            ok = row["path"] == o.filename and abs(row["score"] - expected[o.filename]) <= REL_TOLERANCE * abs(
                expected[o.filename])
        except (KeyError, TypeError, ValueError):
            ok = False
        if ok:
            correct += 1
        else:
            wrong.append(o)
    return {"requests": len(outcomes), "correct": correct, "statuses": statuses,
            "server_errors": sum(1 for o in outcomes if o.status is not None and o.status >= 500),
            "no_answer": sum(1 for o in outcomes if o.status is None),
            "wrong_content": len(wrong), "examples": [f"{o.filename}: {o.status} {str(o.body)[:200]}" for o in
                                                      [x for x in outcomes if x.status != 200][:3] + wrong[:3]]}


def percentiles(seconds: list[float]) -> dict[str, float]:
    """p50/p95/p99 and max in milliseconds."""
    a = np.asarray(seconds) * 1000.0
    if a.size == 0:
        return {}
    return {"p50_ms": float(np.percentile(a, 50)), "p95_ms": float(np.percentile(a, 95)),
            "p99_ms": float(np.percentile(a, 99)), "max_ms": float(a.max())}


def tiny_model(folder: Path) -> tuple[Path, list[Path]]:
    """Fit the test suite's tiny model (64 px, 4 levels) on a synthetic texture set; (model file, test images)."""
    from gaussad import GaussianAD
    from gaussad.intake.images import list_images
    from gaussad.tools.synthetic import build_texture_dataset

    root = build_texture_dataset(folder / "data", size=64, n_train=10, n_test_good=4, n_test_bad=4, categories=["brick"])
    model = GaussianAD(backbone="efficientnet-lite0", input_size=64, levels=["stem", "stage1", "stage2", "stage3"])
    model.fit(list_images(root / "brick" / "train" / "good"))
    path = folder / "models" / "tiny.gaussad"
    model.save(path)
    images = list_images(root / "brick" / "test" / "good") + list_images(root / "brick" / "test" / "patch")
    return path, images


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--requests", type=int, default=200, help="number of score requests (default %(default)s)")
    p.add_argument("--concurrency", type=int, default=200, help="requests in flight at once (default %(default)s)")
    p.add_argument("--workers", type=int, help="model threads of the server (gaussad serve --workers)")
    p.add_argument("--model", help="a model file to serve (default: a tiny model fitted on synthetic data)")
    p.add_argument("--images", help="folder of images to send with --model")
    p.add_argument("--json", metavar="OUT", help="also write the results as JSON to OUT")
    p.add_argument("--compare-log", action="store_true", help="run without and with the results log (SQLite)")
    p.add_argument("--keep-images", action="store_true", help="with --compare-log: the log keeps the images too")
    args = p.parse_args(argv)
    if bool(args.model) != bool(args.images):
        p.error("--model and --images go together")

    import gaussad
    from gaussad.intake.images import list_images

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        if args.model:
            (tmp / "models").mkdir()
            model_path = tmp / "models" / Path(args.model).name
            model_path.symlink_to(Path(args.model).resolve())
            images = list_images(args.images)
        else:
            model_path, images = tiny_model(tmp)
        model = gaussad.load(model_path)
        names = [f"{f.parent.name}-{f.name}" for f in images]  # test/good/000.png and test/patch/000.png differ
        expected = dict(zip(names, map(float, model.score_samples(images))))
        payloads = [(name, f.read_bytes()) for name, f in zip(names, images)]
        extra = ["--log-level", "warning"] + (["--workers", str(args.workers)] if args.workers else [])
        runs = {}
        for mode in (["off", "sqlite"] if args.compare_log else ["off"]):
            db = tmp / f"results-{mode}.sqlite"
            log_args = ["--db", str(db)] + (["--keep-images", str(tmp / "kept")] if args.keep_images else []) \
                if mode != "off" else ["--db", "none"]
            with serving(model_path.parent, *extra, *log_args) as url:
                outcomes, probes, wall = run_load(url, model_path.stem, payloads, args.requests, args.concurrency)
            runs[mode] = (outcomes, probes, wall, log_rows(db) if mode != "off" else None)
    reports = {mode: _report(args, model, expected, *run) for mode, run in runs.items()}
    report = reports["off"] if not args.compare_log else {"without_log": reports["off"], "with_log": reports["sqlite"]}
    print(json.dumps(report, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
    for mode, r in reports.items():
        lat = r["latency"]
        print(f"log {mode}: {r['correct']}/{args.requests} correct, {r['server_errors']} 5xx, {r['no_answer']} "
              f"unanswered; latency p50 {lat['p50_ms']:.0f} ms, p95 {lat['p95_ms']:.0f} ms, p99 {lat['p99_ms']:.0f} ms; "
              f"{r['requests_per_s']:.1f} req/s" + (f"; log rows {r['log']}" if r.get("log") else ""), file=sys.stderr)
    return 0 if all(r["correct"] == args.requests and r.get("log", {}).get("exact", True) for r in reports.values()) else 1


def log_rows(db: Path) -> list[str]:
    """The ids of the rows of a results log (after the server stopped: everything queued is written)."""
    from gaussad.service.results_log import ResultsLog

    log = ResultsLog(str(db))
    try:
        return [r["id"] for r in log.query(limit=10**7)]
    finally:
        log.close()


def log_check(outcomes: list[Outcome], ids: list[str]) -> dict:
    """Whether the log holds exactly one row per answered image: the answers' ids, each once, and no other."""
    answered = [row["id"] for o in outcomes if o.status == 200 for row in o.body["results"]]
    return {"rows": len(ids), "answered_images": len(answered), "distinct_rows": len(set(ids)),
            "exact": sorted(ids) == sorted(answered) and len(set(ids)) == len(ids)}


def _report(args, model, expected, outcomes, probes, wall, ids) -> dict:
    summary = check(outcomes, expected)
    report = {
        "model": args.model or "tiny synthetic (efficientnet-lite0, 64 px, 4 levels)",
        "input_size": model.input_size_, "levels": len(model.level_names_),
        "requests": args.requests, "concurrency": args.concurrency, "workers": args.workers, "cpus": os.cpu_count(),
        **summary,
        "latency": percentiles([o.seconds for o in outcomes]),
        "health_latency_under_load": percentiles([p.seconds for p in probes]), "health_probes": len(probes),
        "health_not_ok": sum(p.status != 200 or p.health != "ok" for p in probes),
        "wall_s": wall, "requests_per_s": args.requests / wall,
    }
    if ids is not None:
        report["log"] = log_check(outcomes, ids)
    return report


if __name__ == "__main__":
    sys.exit(main())
