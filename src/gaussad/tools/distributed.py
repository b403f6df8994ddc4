"""Fitting and scoring on a Dask cluster (:mod:`dask.distributed`): partitions of the image list go to the workers;
a fit's partitions return mergeable moment statistics (and their own bank coresets), merged by a tree reduction, so
the Gaussians are exactly one machine's; a scoring run writes one result part per partition, atomically, and a
rerun skips the parts already written. Each worker keeps one feature extractor (one inference session) for its
lifetime, with as many threads as the worker has, and runs one task on it at a time."""

from __future__ import annotations

import contextlib
import hashlib
import json
import operator
import os
import threading
from collections import deque
from dataclasses import replace
from itertools import islice
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence, TypeVar

from ..errors import DataError, GaussadError, InvalidParameterError

DEFAULT_PARTITION = 64  # images per task: bounds a worker's memory (bank candidates of one partition at a time)
TREE_LEVELS = 3  # TreeReduction: partitions' statistics merged in pairs up to blocks of 8, then into a running total
# A fit keeps at most this many partitions per worker thread submitted and not yet taken by the client: the client's
# bank selection can be slower than the workers, whose finished partitions (bank candidates, moment statistics)
# would otherwise wait in their memory, which then grew with the number of images (BENCHMARKS.md, "Distributed").
WINDOW_PER_THREAD = 4
T = TypeVar("T")
FORMATS = (".parquet", ".jsonl", ".csv")
MANIFEST = "_gaussad_run.json"
PART_COLUMNS = 2  # the parts' columns: 2 since the rows carry their evidence (a rerun rescoring older parts)

# Per worker process: one extractor cache for its lifetime, used by one task at a time.
_WORKER: dict[str, Any] = {"cache": None, "lock": threading.Lock()}


# ----- the cluster ------------------------------------------------------------------------------------------------
def _dask():
    try:
        import dask.distributed as dd
    except ImportError:
        raise GaussadError("--dask needs Dask: pip install 'gaussad[dask]'") from None
    return dd


def parse_address(address: str) -> tuple[str, int | None]:
    """("local", number of workers or None) for ``local`` / ``local:N``, else ("remote", None)."""
    if address == "local":
        return "local", None
    if address.startswith("local:"):
        text = address[len("local:"):]
        if not text.isdigit() or not 1 <= int(text) <= 1024:
            raise GaussadError(f"--dask {address}: expected local:N with N workers, 1..1024")
        return "local", int(text)
    if not address or any(c.isspace() for c in address):
        raise GaussadError(f"--dask {address!r}: expected a scheduler address (tcp://host:8786), local or local:N")
    return "remote", None


@contextlib.contextmanager
def connect(address: str, timeout: float = 60.0) -> Iterator[Any]:
    """A :class:`dask.distributed.Client` for ``address``: ``local[:N]`` starts a LocalCluster of N worker processes
    (default: one per core), each with its share of the cores, and stops it on exit; anything else is a scheduler
    address (an SSH, Slurm or Kubernetes cluster started beforehand)."""
    import logging

    from ..intake.engine import cpu_count

    kind, n = parse_address(address)
    dd = _dask()
    if kind == "local":
        cores = cpu_count()
        n = n or cores
        cluster = dd.LocalCluster(n_workers=n, threads_per_worker=max(1, cores // n), processes=True,
                                  dashboard_address=":0", silence_logs=logging.ERROR)
        client = dd.Client(cluster)
        try:
            yield client
        finally:
            with _quiet_logs():  # connections closed while the cluster stops are expected, not news
                client.close()
                cluster.close()
        return
    try:
        client = dd.Client(address, timeout=timeout)
    except (OSError, TimeoutError, ValueError) as exc:
        raise GaussadError(f"--dask {address}: cannot reach the scheduler ({exc})") from None
    with client:
        yield client


@contextlib.contextmanager
def _quiet_logs() -> Iterator[None]:
    import logging

    loggers = [logging.getLogger(name) for name in ("distributed", "tornado", "asyncio")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def partitions(n: int, size: int) -> list[tuple[int, int]]:
    """(start, stop) of consecutive partitions of ``size`` items (the last may be shorter)."""
    if size < 1:
        raise GaussadError(f"partition size must be at least 1, got {size}")
    return [(lo, min(lo + size, n)) for lo in range(0, n, size)]


def _progress(futures: list, enabled: bool) -> None:
    if enabled and futures:
        _dask().progress(futures, notebook=False)


# ----- on the workers ---------------------------------------------------------------------------------------------
def _worker_threads() -> int | None:
    try:
        worker = _dask().get_worker()
    except ValueError:  # not on a worker (a client-side call in tests)
        return None
    return getattr(worker, "nthreads", None) or getattr(getattr(worker, "state", None), "nthreads", None)


def _extractor(settings: dict, layout=None, adapted=None):
    """This worker's feature extractor for ``settings`` and ``adapted`` tensors (None: the pretrained network; built
    once per worker, sized to the worker's threads)."""
    from ..intake.engine import set_threads
    from ..intake.features import ExtractorCache

    if _WORKER["cache"] is None:
        set_threads(_worker_threads())
        _WORKER["cache"] = ExtractorCache()
    return _WORKER["cache"].get(settings, layout, None, adapted)


def _batches(extractor):
    return lambda images, desc, on_error, skipped: extractor.iter_features_and_maps(images, None, on_error, skipped)


def _layout_task(settings: dict):
    from ..detector.fitting import layout_of

    with _WORKER["lock"]:
        return layout_of(_extractor(settings), settings)


def _adapt_task(settings: dict, images: list, on_error: str):
    """The network adapted once, on one worker (which reads the images): (adapted tensors or None, the record)."""
    with _WORKER["lock"]:
        extractor = _extractor(settings)
        extractor.adapt(images, int(settings["adapt"]), settings["adapt_stop"], settings["random_state"], on_error)
        return extractor.adapted, extractor.adaptation


def _fit_task(settings: dict, images: list, lo: int, n_total: int, on_error: str, adapted=None):
    from ..detector.fitting import Trainer, layout_of

    with _WORKER["lock"]:
        extractor = _extractor(settings, None, adapted)
        trainer = Trainer(settings, _batches(extractor), layout_of(extractor, settings))
        return trainer.fit_part(images, range(lo, lo + len(images)), n_total, on_error)


def _peaks_task(settings: dict, state, images: list, lo: int, on_error: str):
    """(positions, leave-one-image-out map peaks) of one partition against the fit's final banks (the fused
    score's calibration: :meth:`~gaussad.detector.state.DetectorState.map_peaks` with each image's own members skipped)."""
    import numpy as np

    with _WORKER["lock"]:
        extractor = _extractor(settings, state.layout, state.adapted)
        positions, peaks = [np.zeros(0, np.int64)], [np.zeros(0)]
        for idx, _, fmaps in extractor.iter_features_and_maps(images, None, on_error, []):
            positions.append(lo + np.asarray(idx, dtype=np.int64))
            peaks.append(state.map_peaks(fmaps, positions[-1]))
    return np.concatenate(positions), np.concatenate(peaks)


def _stats_of(part):
    return part.without_banks()


def _banks_of(part):
    return part.banks


def _merge(a, b):
    return a.merge(b)


# ----- fit --------------------------------------------------------------------------------------------------------
def bounded(items: Iterable[Any], window: int, submit: Callable[[Any], T]) -> Iterator[T]:
    """``submit(item)`` for each item, yielded in order, with at most ``window`` of them submitted and not yet
    taken: the next item is submitted when the caller comes back for the next result (so after it has used the
    previous one)."""
    if window < 1:
        raise ValueError(f"window must be at least 1, got {window}")
    items = iter(items)
    pending: deque = deque(submit(item) for item in islice(items, window))
    while pending:
        yield pending.popleft()
        for item in islice(items, 1):
            pending.append(submit(item))


class TreeReduction:
    """Merges of futures in the order they are added: in pairs as soon as both sides exist (a binary counter: the
    first two, the next two, then those two pairs, ...) up to blocks of ``2**levels`` values, each block then merged
    into a running total. At most ``levels`` values wait for a partner, plus the total, whatever the number of values:
    a full binary tree keeps log2(n) of them, and each is a whole set of moment statistics on some worker (about 15 MB
    for Lite0's 9 levels), which made the workers' peak grow with the number of partitions. The order of the merges
    depends on the order of the values only, not on which worker finishes first."""

    def __init__(self, client, merge: Callable, levels: int = TREE_LEVELS) -> None:
        if levels < 1:
            raise ValueError(f"levels must be at least 1, got {levels}")
        self.client, self.merge, self.levels = client, merge, levels
        self._stack: list[tuple[int, Any]] = []  # (level, future), levels strictly decreasing from the bottom
        self._total: Any = None  # the merge of every full block so far

    @property
    def pending(self) -> int:
        """Values held for later merges: those waiting for a partner, and the running total."""
        return len(self._stack) + (self._total is not None)

    def add(self, future) -> None:
        level = 0
        while self._stack and self._stack[-1][0] == level:
            _, left = self._stack.pop()
            future = self.client.submit(self.merge, left, future, pure=False)
            level += 1
        if level < self.levels:
            self._stack.append((level, future))
        else:
            self._total = future if self._total is None else self.client.submit(self.merge, self._total, future,
                                                                                pure=False)

    def result(self):
        """The future of the merge of every value added (left to right)."""
        if not self.pending:
            raise ValueError("nothing to reduce")
        future = self._stack.pop()[1] if self._stack else None
        while self._stack:
            _, left = self._stack.pop()
            future = self.client.submit(self.merge, left, future, pure=False)
        if self._total is not None:
            future = self._total if future is None else self.client.submit(self.merge, self._total, future, pure=False)
        self._total = None
        return future


def check_fit(model, n_images: int) -> None:
    """Refuse, before a cluster is started or sent any work, a distributed fit that cannot be done: fewer than 2
    images, invalid settings, int8 or a held-out calibration fraction (one line each)."""
    from ..detector import params
    from ..detector.fitting import Trainer

    if n_images < 2:
        raise DataError(f"need at least 2 training images, got {n_images}")
    params.validate(model.get_params())
    if model.precision == "int8":
        raise InvalidParameterError("a distributed fit with precision='int8' is not supported: fit on one machine")
    Trainer(params.resolved(model.get_params())).distributed_calibration(n_images)


def fit(model, images: Sequence, client, partition_size: int = DEFAULT_PARTITION, on_error: str = "fail",
        progress: bool | None = None):
    """Fit ``model`` (a :class:`~gaussad.GaussianAD`) on ``images`` (paths the workers can read, or arrays) with
    the workers of ``client``; returns the model. The Gaussians are those of ``model.fit(images)`` up to float
    rounding (merged moment statistics); each map bank is a streaming greedy selection over the partitions'
    coresets as they arrive, so the client holds the banks and one buffer of candidates (docs/guide/dask.md).
    Partitions are submitted :data:`WINDOW_PER_THREAD` per worker thread ahead of the client, so neither the
    workers nor the client hold more than a window of them whatever the number of images."""
    from ..detector import params
    from ..detector.resolve import resolve
    from ..intake.features import progress_bar, tiles_sample
    from ..detector.fitting import Trainer
    from ..intake.images import image_list

    images = [os.fspath(i) if isinstance(i, os.PathLike) else i for i in image_list(images)]
    check_fit(model, len(images))
    settings = params.resolved(model.get_params())
    if "auto" in (settings["input_size"], settings["map_tiles"]):  # decided on a worker, which sees the files
        settings = _result(client.submit(resolve, settings, tiles_sample(images), pure=False))
    progress = model.verbose if progress is None else progress
    # adapt: the network fine-tuned once, then every partition's statistics taken with it (the tensors go to each
    # worker once, as one future)
    adapted = client.submit(_adapt_task, settings, images, on_error, pure=False) if settings["adapt"] else None
    network = client.submit(operator.itemgetter(0), adapted, pure=False) if adapted is not None else None
    layout_future = client.submit(_layout_task, settings, pure=False)
    stats = TreeReduction(client, _merge)

    def submit(span: tuple[int, int]) -> tuple[int, Any]:
        lo, hi = span
        part = client.submit(_fit_task, settings, images[lo:hi], lo, len(images), on_error, network, pure=False)
        stats.add(client.submit(_stats_of, part, pure=False))
        return hi - lo, client.submit(_banks_of, part, pure=False)

    window = WINDOW_PER_THREAD * max(1, sum(client.nthreads().values()))
    trainer = Trainer(settings)
    coresets: list = []
    bar = progress_bar(len(images), "fit (dask)", progress)
    for size, future in bounded(partitions(len(images), partition_size), window, submit):  # in partition order
        part_banks = _result(future)
        future.release()  # so that the worker does not keep it
        if part_banks and not coresets:
            coresets = trainer.coresets(len(part_banks))
        for coreset, candidates in zip(coresets, part_banks):  # the client holds the banks and one buffer
            coreset.add(candidates.vectors, candidates.ids, candidates.seen)
        if bar is not None:
            bar.update(size)
    merged = _result(stats.result())
    if bar is not None:
        bar.close()
    trainer.layout = _result(layout_future)
    state = trainer.fit_parts(merged, coresets)
    if adapted is not None:
        state = replace(state, **dict(zip(("adapted", "adaptation"), _result(adapted))))
    if trainer.fused:
        state = state.with_map_calibration(_map_calibration(client, settings, state, images, partition_size,
                                                            on_error, progress))
    model.state_, model.skipped_ = state, trainer.skipped
    return model


def _map_calibration(client, settings: dict, state, images: list, partition_size: int, on_error: str,
                     progress: bool):
    """The fused score's calibration peaks of a distributed fit, in the order of the images (as its out-of-fold
    global scores): a second pass over the images, each partition's locations scored by a worker against the final
    banks with the image's own members skipped (one process keeps every location from its one pass instead)."""
    import numpy as np

    from ..intake.features import progress_bar

    shared = client.scatter(state, broadcast=True)
    window = WINDOW_PER_THREAD * max(1, sum(client.nthreads().values()))
    positions, peaks = [], []
    bar = progress_bar(len(images), "calibrate (dask)", progress)

    def submit(span: tuple[int, int]) -> tuple[int, Any]:
        lo, hi = span
        return hi - lo, client.submit(_peaks_task, settings, shared, images[lo:hi], lo, on_error, pure=False)

    for size, future in bounded(partitions(len(images), partition_size), window, submit):
        pos, peak = _result(future)
        future.release()
        positions.append(pos)
        peaks.append(peak)
        if bar is not None:
            bar.update(size)
    if bar is not None:
        bar.close()
    out = np.concatenate(peaks)[np.argsort(np.concatenate(positions), kind="stable")]
    if out.size != state.calibration_scores.size:
        raise DataError(f"{out.size} images were read for the fused score's map calibration, {state.n_samples} for "
                        "its statistics: were images changed or removed during the fit?")
    return out


def _result(future):
    """A future's result; a gaussad error raised on a worker comes back as itself."""
    try:
        return future.result()
    except GaussadError:
        raise
    except (OSError, TimeoutError) as exc:
        raise GaussadError(f"the Dask cluster failed: {exc}") from None


# ----- score ------------------------------------------------------------------------------------------------------
def output_format(out: str | os.PathLike) -> str:
    suffix = Path(out).suffix.lower()
    if suffix not in FORMATS:
        raise GaussadError(f"{out}: results go to a .parquet folder, a .jsonl or a .csv file")
    return suffix


def parts_folder(out: str | os.PathLike) -> Path:
    """Where the parts go: the .parquet folder itself (a Parquet data set), else OUT.parts beside the file."""
    out = Path(out)
    return out if out.suffix.lower() == ".parquet" else out.with_name(out.name + ".parts")


def _worker_model(path: str, key: str):
    """This worker's copy of the model file of run ``key`` (loaded once per worker)."""
    from ..detector.model import load

    models = _WORKER.setdefault("models", {})
    if key not in models:
        models.clear()
        models[key] = load(path)
    return models[key]


def _score_task(model_path: str, key: str, names: list[str], paths: list[str], index: int, folder: str, fmt: str, fpr: float,
                threshold: str, on_error: str) -> tuple[int, int]:
    """Score one partition and write its part atomically: (rows scored, inputs skipped)."""
    import numpy as np

    from ..detector import inference, params
    from ..detector.results import unread_row

    with _WORKER["lock"]:
        model = _worker_model(model_path, key)
        rule = model.rule(fpr, threshold)
        extractor = _extractor(params.resolved(model.get_params()), model.state_.layout)
        skipped: list = []
        batches = extractor.iter_features_and_maps(paths, None, on_error, skipped, maps=rule.fused)
        if rule.fused:  # the map peaks too, batch by batch
            feats, peaks, _ = model.state_.score_batches(batches, with_maps=False)
        else:
            pooled, peaks = [b for _, b, _ in batches], None
            feats = [np.concatenate(level) for level in zip(*pooled)]
    bad = dict(skipped)
    kept = [n for i, n in enumerate(names) if i not in bad]
    levels = model.level_scores_features(feats) if kept else np.zeros((0, len(model.level_names_)))
    rows: list[dict] = [{**r, "error": None} for r in inference.result_rows(model, rule, kept, levels, peaks)]
    rows += [unread_row(names[i], msg) for i, msg in sorted(bad.items())]
    write_part(Path(folder) / part_name(index, fmt), rows, model.level_names_, fmt)
    return len(kept), len(bad)


def part_name(index: int, fmt: str) -> str:
    return f"part-{index:05d}{fmt}"


def write_part(path: Path, rows: list[dict], level_names: Sequence[str], fmt: str) -> None:
    """One part, atomically: rows as ``score --json`` writes them, plus ``error`` (null unless the input was
    skipped); CSV flattens ``levels`` into ``levels.NAME`` columns; CSV and Parquet hold ``evidence`` as JSON text."""
    from ..intake.files import write_atomic
    from ..detector.results import spreadsheet_safe

    if fmt == ".jsonl":
        data = "".join(json.dumps(r) + "\n" for r in rows).encode()
    elif fmt == ".csv":
        import csv
        import io

        buf = io.StringIO()
        writer = csv.writer(buf, lineterminator="\n")
        writer.writerow(csv_header(level_names))
        for r in rows:
            lv = r["levels"] or {}
            writer.writerow([spreadsheet_safe(r["path"]), _cell(r["score"])] + [_cell(lv.get(n)) for n in level_names]
                            + [_cell(r["pvalue"]), _cell(r["anomalous"]), spreadsheet_safe(r["error"] or ""),
                               _evidence_text(r["evidence"]) or ""])
        data = buf.getvalue().encode()
    else:
        data = _parquet_bytes(rows, level_names)
    write_atomic(path, data, "results part")


def csv_header(level_names: Sequence[str]) -> list[str]:
    return ["path", "score"] + [f"levels.{n}" for n in level_names] + ["pvalue", "anomalous", "error", "evidence"]


def _evidence_text(evidence: dict | None) -> str | None:
    return None if evidence is None else json.dumps(evidence)


def _cell(value) -> str:
    if value is None:
        return ""
    return str(value).lower() if isinstance(value, bool) else repr(value)


def _parquet_bytes(rows: list[dict], level_names: Sequence[str]) -> bytes:
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        raise GaussadError("Parquet output needs pyarrow: pip install 'gaussad[dask]'") from None
    schema = pa.schema([("path", pa.string()), ("score", pa.float64()),
                        ("levels", pa.struct([(n, pa.float64()) for n in level_names])), ("pvalue", pa.float64()),
                        ("anomalous", pa.bool_()), ("error", pa.string()), ("evidence", pa.string())])
    table = pa.Table.from_pylist([{**r, "evidence": _evidence_text(r["evidence"])} for r in rows], schema=schema)
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink)
    return sink.getvalue().to_pybytes()


def _run_key(model_path: str | os.PathLike, names: list[str], size: int, fpr: float, threshold: str) -> str:
    """What the parts of a run depend on: the model file's bytes, the inputs, the partitioning, the rule and the
    parts' columns (:data:`PART_COLUMNS`: parts of an older gaussad without ``evidence`` are not reused)."""
    h = hashlib.sha256(f"columns {PART_COLUMNS}".encode())
    with open(model_path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    h.update(json.dumps([names, size, fpr, threshold]).encode())
    return h.hexdigest()


def _part_stamps(paths: list[str], bounds: list[tuple[int, int]]) -> list[str]:
    """Per part, what its rows depend on beyond the run key: each input's size and modification time (ns). A file
    replaced under the same name after its part was written makes that part stale, and a rerun scores it again."""
    def stamp(path: str) -> list[int] | None:
        try:
            st = os.stat(path)
        except OSError:  # unreadable now: the worker says why in the row; a later, readable file differs
            return None
        return [st.st_size, st.st_mtime_ns]

    return [hashlib.sha256(json.dumps([stamp(p) for p in paths[lo:hi]]).encode()).hexdigest()[:32] for lo, hi in bounds]


def _previous_stamps(folder: Path, key: str) -> list[str]:
    """The part stamps of the earlier run in ``folder`` (none: nothing to reuse); refuses a folder of another run."""
    manifest = folder / MANIFEST
    if not manifest.exists():
        if folder.exists() and any(folder.iterdir()):
            raise GaussadError(f"{folder}: exists and is not a gaussad results folder; choose another output")
        return []
    try:
        doc = json.loads(manifest.read_text())
        previous, stamps = doc.get("run"), doc.get("stamps")
    except (OSError, ValueError, AttributeError):
        previous, stamps = None, None
    if previous != key:
        raise GaussadError(f"{folder}: holds the parts of another run (another model, inputs, partitioning or "
                           "rule); remove it or choose another output")
    return stamps if isinstance(stamps, list) else []  # a manifest without stamps: every part is scored again


def score(model_path: str | os.PathLike, paths: Sequence[str | os.PathLike], names: Sequence[str],
          out: str | os.PathLike, client, fpr: float | None = None, threshold: str | None = None,
          partition_size: int = DEFAULT_PARTITION, on_error: str = "skip", progress: bool = False) -> dict:
    """Score images on the workers of ``client`` into ``out`` (.parquet folder of parts, or .jsonl/.csv): one part
    per partition, written atomically; a rerun of the same run (same model file, inputs, partitioning and rule)
    skips the parts already written whose inputs are unchanged (size and modification time). Returns a summary (parts written and skipped, rows, skipped inputs)."""
    from ..intake.files import write_atomic
    from ..detector.model import load

    fmt = output_format(out)
    model = load(model_path)
    if model.precision == "int8":
        raise InvalidParameterError(f"{model_path}: distributed scoring of an int8 model is not supported: score it on "
                                    "one machine")
    method = threshold or model.setting("threshold")
    fpr = model.fpr if fpr is None else fpr
    model.rule(fpr, method).check(model.state_, f"{model_path}: ")  # fails early when the rule cannot apply
    paths, names = [os.fspath(p) for p in paths], [str(n) for n in names]
    if fmt != ".parquet" and os.path.lexists(out):  # as a .parquet folder of another run is: never replaced unasked
        raise GaussadError(f"{out}: exists (the results of an earlier run); remove it or choose another output")
    folder = parts_folder(out)
    key = _run_key(model_path, names, partition_size, fpr, method)
    bounds = partitions(len(paths), partition_size)
    stamps = _part_stamps(paths, bounds)
    previous = _previous_stamps(folder, key)
    for i, stamp in enumerate(stamps):  # removed before the new manifest: a crash in between cannot revive them
        if i >= len(previous) or previous[i] != stamp:
            (folder / part_name(i, fmt)).unlink(missing_ok=True)
    write_atomic(folder / MANIFEST, json.dumps({"run": key, "parts": len(bounds), "stamps": stamps}).encode(),
                 "run manifest")
    todo = [i for i in range(len(bounds)) if not (folder / part_name(i, fmt)).exists()]
    futures = [client.submit(_score_task, os.path.abspath(model_path), key, names[bounds[i][0]:bounds[i][1]],
                             paths[bounds[i][0]:bounds[i][1]], i, str(folder), fmt, fpr, method, on_error, pure=False)
               for i in todo]
    _progress(futures, progress)
    counts = [_result(f) for f in futures]
    if fmt != ".parquet":
        _join_parts(Path(out), folder, len(bounds), fmt)
    return {"output": str(out), "parts": len(bounds), "parts_written": len(todo),
            "parts_reused": len(bounds) - len(todo), "rows": len(paths), "scored_now": sum(c[0] for c in counts),
            "skipped_now": sum(c[1] for c in counts), "fpr": model.rule(fpr, method).target_fpr(model.state_),
            "threshold": method}


def _join_parts(out: Path, folder: Path, n_parts: int, fmt: str) -> None:
    """The .jsonl/.csv file from its parts (atomically; one CSV header), then the parts folder is removed."""
    import shutil

    from ..intake.files import write_atomic

    def write(fh) -> None:
        for i in range(n_parts):
            data = (folder / part_name(i, fmt)).read_bytes()
            if fmt == ".csv" and i > 0:
                data = data.split(b"\n", 1)[1] if b"\n" in data else b""
            fh.write(data)

    write_atomic(out, write, "results")
    shutil.rmtree(folder, ignore_errors=True)


def read_results(out: str | os.PathLike) -> list[dict]:
    """The rows of a finished scoring run's output (any of the three formats), for tests and scripts."""
    fmt = output_format(out)
    if fmt == ".jsonl":
        return [json.loads(line) for line in Path(out).read_text().splitlines() if line]
    if fmt == ".csv":
        import csv

        with open(out, newline="") as fh:
            return list(csv.DictReader(fh))
    import pyarrow.parquet as pq

    return pq.read_table(str(out)).to_pylist()
