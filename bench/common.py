"""Helpers that more than one bench script uses (a helper used by one script stays in that script).

- machine and timing: :func:`cpu_model`, :class:`LoadMeter`, :func:`best_times`, :func:`network_ms`,
  :func:`split_images`, :func:`time_backbone`, :func:`variants_throughput`;
- serving: :func:`serving` (a `gaussad serve` child process), :func:`status_kb`, :func:`tiny_maps_model`;
- the shared synthetic split of the accuracy experiments: :func:`synthetic_split`, :func:`split_masks`,
  :func:`run_seeds`.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
from PIL import Image


def cpu_model() -> str:
    """The CPU model name from /proc/cpuinfo (or the platform's description elsewhere)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _busy_jiffies() -> int | None:
    """CPU time (all cores, in clock ticks) the whole machine has spent busy since boot."""
    try:
        fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    except (OSError, ValueError):
        return None
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)
    return sum(fields[:8]) - idle


class LoadMeter:
    """Share of the machine's CPU time taken by other processes between start and stop."""

    def __enter__(self) -> "LoadMeter":
        self.wall, self.own, self.busy = time.perf_counter(), sum(os.times()[:4]), _busy_jiffies()
        self.loadavg_before = os.getloadavg()
        return self

    def __exit__(self, *exc) -> None:
        wall = time.perf_counter() - self.wall
        own = sum(os.times()[:4]) - self.own
        busy = _busy_jiffies()
        self.loadavg_after = os.getloadavg()
        self.others = None
        if busy is not None and self.busy is not None:
            others = (busy - self.busy) / os.sysconf("SC_CLK_TCK") - own
            self.others = max(0.0, others / (wall * (os.cpu_count() or 1)))


def best_times(calls: dict, repeats: int) -> dict[str, float]:
    """The shortest of ``repeats`` wall times of each call (name -> no-argument callable), the calls taking turns, so
    that a change in the machine's load touches every variant alike."""
    best = dict.fromkeys(calls, float("inf"))
    for _ in range(repeats):
        for name, call in calls.items():
            t = time.perf_counter()
            call()
            best[name] = min(best[name], time.perf_counter() - t)
    return best


def variants_throughput(data: str | os.PathLike, variants: dict[str, dict], rounds: int = 3, n_fit: int = 40
                        ) -> tuple[dict, list, dict[str, float]]:
    """Scoring throughput of the default preset with each variant's settings (name -> GaussianAD parameters), in one
    process: every model fitted on the first ``n_fit`` training images of the category ``data``, warmed up, then
    ``score_samples`` of the whole test set, the variants taking turns, best of ``rounds``. Returns the models, the
    test files and each variant's images per second."""
    from gaussad import GaussianAD
    from gaussad.tools.datasets import load_category

    cat = load_category(data)
    test = list(cat.test_files)
    models = {name: GaussianAD(**settings).fit(list(cat.train_files)[:n_fit]) for name, settings in variants.items()}
    for model in models.values():  # warm up: graph load, first batches
        model.score_samples(test[:8])
    best = best_times({name: (lambda m=m: m.score_samples(test)) for name, m in models.items()}, rounds)
    return models, test, {name: len(test) / t for name, t in best.items()}


def split_images(data: Path) -> tuple[list[Path], list[Path]]:
    """Training and scoring images of a category (train/good, test/*) or of a plain folder (all, twice)."""
    from gaussad.tools.datasets import find_categories, is_category
    from gaussad.intake.images import list_images

    if is_category(data):
        cat = find_categories(data)[0]
        return list(cat.train_files), list(cat.test_files)
    files = list_images(data)
    return files, files


def time_backbone(extractor, n_images: int, batch_size: int) -> float:
    """Seconds per image of the feature network alone in ONNX Runtime on random input (after one warm-up)."""
    engine = extractor.runner
    s = extractor.input_size
    batch = np.random.default_rng(0).standard_normal((batch_size, 3, s, s), dtype=np.float32)
    engine.run(batch)
    n_batches = max(2, -(-n_images // batch_size))
    t0 = time.perf_counter()
    for _ in range(n_batches):
        engine.run(batch)
    return (time.perf_counter() - t0) / (n_batches * batch_size)


def network_ms(engines: dict, size: int, batch: int = 16, repeats: int = 5) -> dict[str, float]:
    """Milliseconds per image of each engine (name -> an object with ``run(batch)``) on one random batch of
    ``batch`` images of ``size`` x ``size``: one warm-up run each, then the best of ``repeats`` interleaved runs
    (:func:`best_times`)."""
    x = np.random.default_rng(0).standard_normal((batch, 3, size, size)).astype(np.float32)
    for engine in engines.values():
        engine.run(x)
    best = best_times({name: (lambda e=engine: e.run(x)) for name, engine in engines.items()}, repeats)
    return {name: round(1000 * s / batch, 3) for name, s in best.items()}


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def serving(model_dir: str | os.PathLike, *args: str, timeout: float = 180.0,
            procs: list | None = None, src: str | os.PathLike | None = None) -> Iterator[str]:
    """Run `gaussad serve MODEL_DIR` in a child process until the block ends; yields its base URL (the process is
    appended to ``procs`` when given). The results log is off unless ``args`` has ``--db``. ``src``: the source
    folder of the gaussad to run (default: this process's)."""
    import httpx

    import gaussad

    port = free_port()
    env = dict(os.environ)
    src = str(src or Path(gaussad.__file__).resolve().parents[1])
    env["PYTHONPATH"] = src + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    log = tempfile.TemporaryFile()
    db = [] if "--db" in args else ["--db", "none"]  # no results log unless asked for
    cmd = [sys.executable, "-m", "gaussad", "serve", str(model_dir), "--port", str(port), *db, *args]
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
    if procs is not None:
        procs.append(proc)
    url = f"http://127.0.0.1:{port}"

    def output() -> str:
        log.seek(0)
        return log.read().decode(errors="replace")[-4000:]

    try:
        deadline = time.monotonic() + timeout
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"gaussad serve exited with {proc.returncode}:\n{output()}")
            try:
                if httpx.get(url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"gaussad serve did not answer within {timeout:.0f} s:\n{output()}")
            time.sleep(0.2)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


def status_kb(pid: int, key: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    return 0


def tiny_maps_model(folder: Path) -> Path:
    from gaussad import GaussianAD
    from gaussad.intake.images import list_images
    from gaussad.tools.synthetic import build_texture_dataset

    root = build_texture_dataset(folder / "data", size=64, n_train=8, n_test_good=2, n_test_bad=2, categories=["brick"])
    model = GaussianAD(input_size=64, levels=["stem", "stage1"], map_levels=["stage1"], map_method="nearest",
                       resize="aspect")
    model.fit(list_images(root / "brick" / "train" / "good"))
    path = folder / "models" / "tiny.gaussad"
    path.parent.mkdir()
    model.save(path)
    return path


def synthetic_defect(img: Image.Image, donor: Image.Image, rng: np.random.Generator) -> tuple[Image.Image, np.ndarray]:
    """A small defect (2-6 % of the shorter side): a patch of ``donor``, a scratch or a colour spot; (image, mask)."""
    a = np.asarray(img.convert("RGB")).copy()
    h, w = a.shape[:2]
    side = max(4, int(min(h, w) * rng.uniform(0.02, 0.06)))
    y, x = int(rng.integers(h // 8, h - h // 8 - side)), int(rng.integers(w // 8, w - w // 8 - side))
    mask = np.zeros((h, w), bool)
    kind = rng.integers(3)
    if kind == 0:
        d = np.asarray(donor.convert("RGB").resize((w, h)))
        dy, dx = int(rng.integers(0, h - side)), int(rng.integers(0, w - side))
        mask[y:y + side, x:x + side] = True
        a[y:y + side, x:x + side] = d[dy:dy + side, dx:dx + side]
    elif kind == 1:
        length = side * 4
        t = np.linspace(0, 1, length * 2)
        ang = rng.uniform(0, np.pi)
        ys = np.clip((y + t * length * np.sin(ang)).astype(int), 0, h - 1)
        xs = np.clip((x + t * length * np.cos(ang)).astype(int), 0, w - 1)
        thick = max(1, side // 6)
        for oy in range(-thick, thick + 1):
            mask[np.clip(ys + oy, 0, h - 1), xs] = True
        a[mask] = rng.integers(0, 256, 3)
    else:
        yy, xx = np.mgrid[:h, :w]
        mask = (yy - y) ** 2 + (xx - x) ** 2 <= (side / 2) ** 2
        a[mask] = (0.5 * a[mask] + 0.5 * rng.integers(0, 256, 3)).astype(np.uint8)
    return Image.fromarray(a), mask


def synthetic_split(train_files: list, seed: int = 0) -> tuple[list, list, list, list[np.ndarray]]:
    """(fit files, held-out good files, synthetic defective images, their full-size masks): a seeded fifth of the
    training images held out, and one :func:`synthetic_defect` pasted into a copy of each, the donor another training
    image. The split and the defects every synthetic bench shares (map variants, backbones, coreset, fused evidence)."""
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(train_files))
    n_held = len(order) // 5
    held, fit = [train_files[i] for i in order[:n_held]], [train_files[i] for i in order[n_held:]]
    bad, bad_masks = [], []
    for i, path in enumerate(held):
        with Image.open(path) as im, Image.open(fit[i % len(fit)]) as donor:
            img, m = synthetic_defect(im, donor, rng)
        bad.append(img)
        bad_masks.append(m)
    return fit, held, bad, bad_masks


def resized_masks(masks: list[np.ndarray], size: int) -> list[np.ndarray]:
    """Masks resized (nearest) to ``size`` x ``size``, as the maps are."""
    return [np.asarray(Image.fromarray(m).resize((size, size), Image.NEAREST)) for m in masks]


def split_masks(n_good: int, bad_masks: list[np.ndarray], size: int) -> np.ndarray:
    """(n_good + len(bad_masks), size, size) boolean masks of the scored images in the order the benches score them:
    the held-out goods (empty), then the synthetic defects' masks resized as the maps are."""
    return np.concatenate([np.zeros((n_good, size, size), bool), np.asarray(resized_masks(bad_masks, size), bool)])


def run_seeds(run: Callable[[str, int], dict]) -> None:
    """The command line of a bench that measures one synthetic split per seed (``run(data, seed)`` -> its report):
    ``--data DATA [--seeds S ...] [--json OUT]``, the reports of every seed written to OUT as one list."""
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", required=True)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--json")
    args = ap.parse_args()
    reports = [run(args.data, seed) for seed in args.seeds]
    if args.json:
        with open(args.json, "w") as f:
            json.dump(reports, f, indent=1)


def extract(model, files: list, desc: str, with_maps: bool):
    """Pooled features of ``files`` and their raw feature maps per image, from a model's feature extractor
    (:func:`gaussad.detector.resolve.features`), with a progress bar when the model is verbose."""
    from gaussad.detector.resolve import features

    return features(model.feature_extractor(), files, desc, with_maps, model.verbose)
