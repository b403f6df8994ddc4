"""gaussad against the tools users would pick instead, timed on this machine in one run (issue 34): fit and scoring
throughput and peak RSS of anomalib 2.7's PaDiM and PatchCore and AnomaVision's PaDiM, beside gaussad's ``paper``,
``fast`` and default (``recommended``) presets, on the same images of each set.

    bash bench/speed/peers/setup.sh /tmp/peers-venv          # once: the peers' throwaway environment, outside the repo
    python -m bench.speed.peers.run --data ../shared/data/mvtec_ad/bottle --data ../shared/data/magnetic_tile \
        --peers-python /tmp/peers-venv/bin/python [--train 64 --test 32] [--json out/peers.json]

Never part of ``make test``. Each job (one tool, one set) runs bench/speed/peers/worker.py in its own child process: fit on
``--train`` training images and score ``--test`` test images, both spread evenly over the sorted lists
(:func:`gaussad.intake.engine.calibration_order`) and the same for every tool; the child's peak RSS is its
``ru_maxrss`` from ``wait4`` (its own and that of any child it waited for). gaussad runs in this interpreter's
environment, the peers in ``--peers-python``'s. The peers' backbones are untrained (no ImageNet weights can be
downloaded here), which changes no timing. A job that fails is reported with the last lines of its error output,
verbatim. The share of CPU time other processes took during each job and the load averages are recorded beside it.
gaussad's jobs run twice, the first untimed (kept as ``first_use``): a graph's first fit on a machine exports it to
ONNX and, where OpenVINO is installed, times both runtimes on it, once; the timed run is every later one.
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

from bench.common import LoadMeter, cpu_model

TOOLS = ("gaussad:paper", "gaussad:fast", "gaussad:recommended", "anomalib:padim", "anomalib:patchcore",
         "anomavision:padim")
WORKER = Path(__file__).with_name("worker.py")


def subset(files: list[Path], n: int) -> list[Path]:
    """``n`` files spread evenly over the sorted list (all of them when fewer)."""
    from gaussad.intake.engine import calibration_order

    return [files[i] for i in sorted(calibration_order(len(files), n)[:n])]


def prepare(data: Path, n_train: int, n_test: int, workdir: Path) -> tuple[Path, Path]:
    """The listings of a set's chosen training and test images, and ``workdir/{train,test}`` folders of symlinks to
    them (the peers' dataset classes read folders)."""
    from gaussad.intake.images import list_images

    chosen = {"train": subset(list_images(data / "train" / "good", recursive=True), n_train),
              "test": subset(list_images(data / "test", recursive=True), n_test)}
    listings = []
    for split, files in chosen.items():
        folder = workdir / split
        folder.mkdir(parents=True)
        for i, f in enumerate(files):  # numbered: test images of different defect folders share names
            (folder / f"{i:04d}{f.suffix}").symlink_to(f.resolve())
        listing = workdir / f"{split}.txt"
        listing.write_text("\n".join(str(f) for f in files))
        listings.append(listing)
    return listings[0], listings[1]


def run_job(python: str, tool: str, train: Path, test: Path, workdir: Path, timeout: int) -> dict:
    """One worker child: its result, its own peak RSS (the child is reaped with ``os.wait4``) and the load, or its
    failure with the last lines of its error output."""
    with LoadMeter() as meter:
        start = time.perf_counter()
        with tempfile.TemporaryFile("w+") as out_file, tempfile.TemporaryFile("w+") as err_file:
            proc = subprocess.Popen([python, str(WORKER), tool, str(train), str(test), str(workdir)],
                                    stdout=out_file, stderr=err_file, text=True)
            deadline = start + timeout
            while True:
                pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
                if pid:
                    break
                if time.perf_counter() > deadline:
                    proc.kill()
                    pid, status, usage = os.wait4(proc.pid, 0)
                    break
                time.sleep(0.2)
            proc.returncode = os.waitstatus_to_exitcode(status)
            wall = time.perf_counter() - start
            out_file.seek(0)
            err_file.seek(0)
            stdout, stderr = out_file.read(), err_file.read()
    out: dict = {"tool": tool, "wall_s": round(wall, 1), "exit": proc.returncode,
                 "peak_rss_mb": round(usage.ru_maxrss / 1024, 1),
                 "others_cpu_share": None if meter.others is None else round(meter.others, 3),
                 "loadavg": [round(x, 2) for x in meter.loadavg_before + meter.loadavg_after]}
    result = [line for line in stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode == 0 and result:
        out.update(json.loads(result[-1][len("RESULT "):]))
    else:
        out["error"] = "\n".join(stderr.strip().splitlines()[-12:]) or f"exit {proc.returncode}, no output"
        if wall >= timeout:
            out["error"] += f"\n(killed after {timeout} s)"
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", action="append", required=True)
    ap.add_argument("--peers-python", default="/tmp/peers-venv/bin/python")
    ap.add_argument("--train", type=int, default=64, help="training images per set (spread over the list)")
    ap.add_argument("--test", type=int, default=32, help="test images per set (spread over the list)")
    ap.add_argument("--tools", default=",".join(TOOLS))
    ap.add_argument("--timeout", type=int, default=900, help="seconds per job")
    ap.add_argument("--json")
    args = ap.parse_args(argv)
    print(f"CPU: {cpu_model()}, {os.cpu_count()} cores; peers' python: {args.peers_python}", flush=True)
    results = []
    with tempfile.TemporaryDirectory(prefix="gaussad-peers-") as tmp:
        for data in map(Path, args.data):
            for tool in args.tools.split(","):
                workdir = Path(tmp) / data.name / tool.replace(":", "-")
                train, test = prepare(data, args.train, args.test, workdir)
                python = sys.executable if tool.startswith("gaussad:") else args.peers_python
                first = None
                if tool.startswith("gaussad:"):  # once untimed: the graph's export and auto's timing, at first use only
                    first = run_job(python, tool, train, test, workdir, args.timeout)
                r = {"data": data.name, **run_job(python, tool, train, test, workdir, args.timeout)}
                if first is not None:
                    r["first_use"] = {k: first.get(k) for k in ("fit_s", "score_s", "peak_rss_mb", "error")}
                results.append(r)
                if "error" in r:
                    print(f"{data.name} {tool}: FAILED (exit {r['exit']}, {r['wall_s']} s):\n{r['error']}", flush=True)
                else:
                    print(f"{data.name} {tool}: fit {r['fit_img_s']:.2f} img/s ({r['fit_s']:.1f} s), score "
                          f"{r['score_img_s']:.2f} img/s ({r['score_s']:.1f} s), peak RSS {r['peak_rss_mb']} MB; "
                          f"others' CPU share {r['others_cpu_share']}, loadavg {r['loadavg']}", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps({"cpu": cpu_model(), "train": args.train, "test": args.test,
                                               "results": results}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
