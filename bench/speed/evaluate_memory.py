"""Peak memory and wall time of ``gaussad evaluate``, this checkout against another revision, in one run.

Each evaluation runs in a child process (``python -m gaussad evaluate DATA --protocol P --quiet --json``) whose peak
resident memory comes from ``wait4``; with ``--baseline REV`` the same evaluations also run from a temporary
``git worktree`` of REV (its ``src`` first on ``PYTHONPATH``), interleaved with this checkout's, and the JSON reports
of the two are compared value by value (the largest difference is printed: a memory change must not move a figure).

    python -m bench.speed.evaluate_memory --data ../shared/data/mvtec_ad/bottle ../shared/data/magnetic_tile \\
        --protocol full --baseline 3d1b036
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def measure(data: str, protocol: str, src: Path, out: Path) -> dict:
    """Peak RSS (MB) and wall seconds of one evaluation run with gaussad from ``src``; its report goes to ``out``."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(src), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)}
    cmd = [sys.executable, "-m", "gaussad", "evaluate", data, "--protocol", protocol, "--quiet", "--json", str(out)]
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    err = proc.stderr.read().decode(errors="replace")
    proc.stderr.close()
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{err}")
    return {"peak_rss_mb": usage.ru_maxrss / 1024, "wall_s": wall}


def _values(report, prefix: str = "") -> dict:
    if isinstance(report, dict):
        return {k: v for key, item in report.items() for k, v in _values(item, f"{prefix}/{key}").items()}
    if isinstance(report, list):
        return {k: v for i, item in enumerate(report) for k, v in _values(item, f"{prefix}/{i}").items()}
    return {prefix: report}


def largest_difference(a: Path, b: Path) -> float:
    """The largest absolute difference between the numbers of two JSON reports (inf when their keys differ)."""
    va, vb = _values(json.loads(a.read_text())), _values(json.loads(b.read_text()))
    if va.keys() != vb.keys():
        return float("inf")
    diffs = [abs(x - vb[k]) if isinstance(x, float) and isinstance(vb[k], float) else float(x != vb[k])
             for k, x in va.items()]
    return max(diffs, default=0.0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", nargs="+", required=True, help="category folders in MVTec layout")
    ap.add_argument("--protocol", nargs="+", default=["full"], choices=("paper", "full"))
    ap.add_argument("--baseline", metavar="REV", help="also measure this git revision, for the ratio")
    ap.add_argument("--json", help="write the figures here")
    args = ap.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        sources = {"this checkout": ROOT / "src"}
        if args.baseline:
            subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", "-q", str(tmp / "base"),
                            args.baseline], check=True)
            sources = {args.baseline: tmp / "base" / "src", **sources}
        try:
            for data in args.data:
                for protocol in args.protocol:
                    row = {"data": Path(data).name, "protocol": protocol}
                    for i, (name, src) in enumerate(sources.items()):
                        row[name] = measure(data, protocol, src, tmp / f"report{i}.json")
                    if args.baseline:
                        row["peak_ratio"] = row["this checkout"]["peak_rss_mb"] / row[args.baseline]["peak_rss_mb"]
                        row["largest_difference"] = largest_difference(tmp / "report0.json", tmp / "report1.json")
                    rows.append(row)
                    print(f"{row['data']} ({protocol}): " + "; ".join(
                        f"{name} {row[name]['peak_rss_mb']:.0f} MB peak, {row[name]['wall_s']:.1f} s" for name in sources)
                        + (f"; peak ratio {row['peak_ratio']:.2f}, largest difference of the reports "
                           f"{row['largest_difference']:.2g}" if args.baseline else ""), flush=True)
        finally:
            if args.baseline:
                subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(tmp / "base")], check=False)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
