"""What the routes share while the service runs: the models (a :class:`~gaussad.service.feedback.ModelRegistry`),
the upload limits and pixel budget, the threads that run the models, the results log and the metrics, with the
steps every scoring route takes (find the model, refuse while the log is backlogged, read and admit the uploads, run
the model in a thread, record the results)."""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

from fastapi import HTTPException, UploadFile

from ..detector import inference
from ..detector.model import GaussianAD
from ..errors import GaussadError
from .feedback import ModelRegistry, UpdateError
from .keys import KeyStore
from .operations import Metrics
from .results_log import Backlogged, ResultsLog
from .uploads import Limits, PixelBudget, UploadError, probe_upload, request_cost


@dataclass
class Service:
    """The running service's parts. ``fpr``: the service's target FPR (None: each model's own)."""

    registry: ModelRegistry
    limits: Limits
    pool: ThreadPoolExecutor
    fpr: float | None = None
    keys: KeyStore | None = None
    results_log: ResultsLog | None = None
    metrics: Metrics = field(default_factory=Metrics)

    def __post_init__(self) -> None:
        self.budget = PixelBudget(self.limits.max_pixels_in_flight, self.limits.busy_seconds)

    @property
    def feedback(self) -> bool:
        """Whether feedback updates can work: they add the kept images of good-marked results to the model file."""
        log = self.results_log
        return log is not None and log.keep_dir is not None and self.registry.folder is not None

    async def in_pool(self, fn, *args):
        """Await ``fn(*args)`` in the model threads; the service's errors become HTTP answers."""
        try:
            return await asyncio.get_running_loop().run_in_executor(self.pool, partial(fn, *args))
        except UploadError as exc:
            raise HTTPException(exc.status, str(exc)) from None
        except UpdateError as exc:
            raise HTTPException(409, str(exc)) from None
        except GaussadError as exc:
            raise HTTPException(422, str(exc)) from None

    def get_model(self, name: str) -> tuple[GaussianAD, int, str]:
        """The served model, its version and its file's SHA-256 (read together: an update may swap it any time)."""
        if name not in self.registry.served:
            raise HTTPException(404, f"no model named {name!r}; models: {', '.join(sorted(self.registry.served))}")
        return self.registry.current(name)

    def fpr_of(self, name: str) -> float:
        """The target FPR model ``name`` decides at in this service."""
        return inference.target_fpr(self.registry.current(name)[0], self.fpr)

    def threshold_of(self, name: str) -> float | None:
        """The current score threshold of model ``name`` (None when not a finite number)."""
        return inference.decision(self.registry.current(name)[0], self.fpr).get("score_threshold")

    def refuse_when_backlogged(self) -> None:
        """503 before any work while the results log cannot take more rows (its database refuses them): a result
        is answered only when it can be logged."""
        if self.results_log is not None and self.results_log.backlogged:
            raise HTTPException(503, self.results_log.status_line(), headers={"Retry-After": "5"})

    def record(self, name: str, version: int, sha: str, rows: list[dict], uploads: list[tuple[str, bytes]]) -> None:
        """Count the scored images and queue them for the results log (never waits); each row gets its log id."""
        self.metrics.scored.labels(name).inc(len(rows))
        self.metrics.flagged.labels(name).inc(sum(bool(r["anomalous"]) for r in rows))
        if self.results_log is not None:
            try:
                for row, (filename, data) in zip(rows, uploads):
                    row["id"] = self.results_log.record(name, version, sha, row, data, Path(filename).suffix)
            except Backlogged as exc:  # filled up while this request was scored
                raise HTTPException(503, str(exc), headers={"Retry-After": "5"}) from None

    async def read_uploads(self, files: list[UploadFile]) -> list[tuple[str, bytes]]:
        """The uploads' names and bytes, refusing too many files and files declared too large (413)."""
        limits = self.limits
        if len(files) > limits.max_files:
            raise HTTPException(413, f"{len(files)} files exceeds the limit of {limits.max_files} files per request")
        out = []
        for i, f in enumerate(files):
            name = f.filename or f"file #{i}"
            if f.size is not None and f.size > limits.max_file_bytes:
                raise HTTPException(413, f"{name}: {f.size} bytes exceeds the limit of {limits.max_file_bytes} bytes per file")
            out.append((name, await f.read()))
        return out

    async def run_admitted(self, uploads: list[tuple[str, bytes]], fn, *args):
        """Check the uploads' headers, wait for room in the pixel budget (503 when none comes), run ``fn``."""
        try:
            cost = request_cost([probe_upload(data, name, self.limits) for name, data in uploads])
        except UploadError as exc:
            raise HTTPException(exc.status, str(exc)) from None
        if not await self.budget.acquire(cost):
            raise HTTPException(503, f"busy: {self.budget.used} of {self.budget.capacity} decoded pixels in flight; "
                                     "retry shortly", headers={"Retry-After": str(max(1, self.limits.busy_seconds))})
        try:
            return await self.in_pool(fn, *args)
        finally:
            await self.budget.release(cost)
