"""HTTP service: score uploaded images with every model of a folder, plus an inspection page (FastAPI).

Access keys, the results log, feedback updates, drift and metrics live in :mod:`gaussad.service.operations` and the modules
it uses (:mod:`gaussad.service.keys`, :mod:`gaussad.service.results_log`, :mod:`gaussad.service.feedback`, :mod:`gaussad.core.drift`).

Models are loaded once at start; the backbone work of a request runs in a thread pool so the event loop keeps
answering other requests. Uploads are bounded in bytes per request and per file, in files per request and in
pixels per image; bad input gets one 4xx answer whose ``detail`` names the file and the problem.
"""

from __future__ import annotations

import asyncio
import base64
import ctypes
import logging
import os
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import asdict, dataclass
from functools import partial
from importlib import resources
from io import BytesIO
from pathlib import Path
from typing import Mapping

import numpy as np
from fastapi import FastAPI, File, HTTPException, Query, Request, UploadFile
from fastapi.responses import HTMLResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from PIL import Image
from pydantic import BaseModel, ConfigDict, Field
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ..detector import inference, params
from ..version import __version__
from ..errors import DataError, GaussadError, ImageError, ImageTooLargeError, UnknownImageFormatError
from ..intake.engine import cpu_count, int8_summary
from ..intake.images import NamedBytes, load_image, probe
from ..detector.heatmap import heat_scale, render
from ..detector.decision import calibration_summary, fpr_note
from .feedback import ModelRegistry, UpdateError
from .keys import KeyStore, bearer, is_loopback
from ..detector.model import GaussianAD, load
from .operations import CrossSiteGuard, KeyCheck, Metrics, MetricsMiddleware, check_exposure, router
from .results_log import Backlogged, ResultsLog

log = logging.getLogger(__name__)

MODEL_SUFFIX = ".gaussad"
STATIC = resources.files("gaussad.service") / "static"


@dataclass(frozen=True)
class Limits:
    """Upload bounds of the service; anything beyond them is refused with 413."""

    max_file_bytes: int = 20 * 2**20
    max_files: int = 16
    max_pixels: int = 25_000_000
    # Decoded pixels in flight across the service (see ``request_cost``); a request that does not fit within
    # ``busy_seconds`` is answered 503 with Retry-After. 100 Mpx is about 300 MB of decoded RGB.
    max_pixels_in_flight: int = 100_000_000
    busy_seconds: int = 2

    def __post_init__(self) -> None:
        for name, value in asdict(self).items():
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise GaussadError(f"{name} must be a positive integer, got {value!r}")

    @property
    def max_request_bytes(self) -> int:
        """Whole request body: every file at its limit plus room for the multipart framing."""
        return self.max_files * self.max_file_bytes + 2**20


class UploadError(GaussadError):
    """An upload the service refuses, with the HTTP status to answer."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


# ----- model folder ------------------------------------------------------------------------------------------
def load_models(folder: str | os.PathLike) -> dict[str, GaussianAD]:
    """Every ``*.gaussad`` file of ``folder`` by file stem; a file that fails to load is logged and skipped."""
    path = Path(folder)
    if not path.is_dir():
        raise DataError(f"{path}: not a folder")
    files = sorted(p for p in path.iterdir() if p.suffix == MODEL_SUFFIX and not p.is_dir())
    if not files:
        raise DataError(f"{path}: no model files (*{MODEL_SUFFIX}) found")
    models: dict[str, GaussianAD] = {}
    for file in files:
        try:
            model = load(file)
            # Scoring one blank image builds the backbone now: it is shared by the worker threads from the first
            # request on, and a model whose backbone cannot be built (e.g. a missing weights file) is found here.
            model.level_scores([np.zeros((8, 8, 3), np.uint8)])
        except Exception as exc:  # noqa: BLE001 - any failure skips this one file, as documented
            message = str(exc)
            log.warning("skipping a model file: %s", message if str(file) in message else f"{file}: {message}")
            continue
        models[file.stem] = model
    if not models:
        raise DataError(f"{path}: none of the {len(files)} model files could be loaded (see the warnings above)")
    return models


# ----- results -----------------------------------------------------------------------------------------------
def effective_fpr(model: GaussianAD, fpr: float | None) -> float:
    """The target false-positive rate a decision uses: the request's or service's, else the model's own, raised for
    a conformal rule to the smallest rate its calibration supports (:meth:`DecisionRule.target_fpr`)."""
    return model.rule(fpr).target_fpr(model.state_)


def decision_rule(model: GaussianAD, fpr: float | None) -> dict:
    """How ``model.decide`` flags an image: the model's threshold method, the FPR, the score threshold
    (None when infinite) and, for chi2/hotelling, each level's distance threshold (Bonferroni over levels); for a
    fused image score, the p-value threshold (the FPR) instead of a score threshold. ``fpr`` is the target rate it
    decides at; where the calibration cannot support the rate asked for, ``fpr_requested`` and ``note`` say so."""
    rule = model.rule(fpr)
    note = fpr_note(rule, model.state_)
    fpr = effective_fpr(model, fpr)
    out: dict = {"method": rule.method, "fpr": fpr, "image_score": rule.image_score,
                 **({"fpr_requested": rule.fpr, "note": note} if note else {})}
    try:
        if rule.fused:
            rule.check(model.state_)
            out["pvalue_threshold"] = fpr
            return out
        limit = model.score_threshold(fpr)
        out["score_threshold"] = float(limit) if np.isfinite(limit) else None
        if rule.method != "conformal":
            thresholds = model.level_thresholds(fpr / len(model.level_names_), rule.method)
            out["level_thresholds"] = dict(zip(model.level_names_, map(float, thresholds)))
    except GaussadError as exc:
        out["error"] = str(exc)
    return out


def model_info(name: str, model: GaussianAD, fpr: float) -> dict:
    """What ``GET /models`` says about one model."""
    return {"name": name, "backbone": model.backbone, "preset": model.setting("preset"),
            "input_size": model.input_size_, "levels": list(model.level_names_), "n_samples": int(model.n_samples_),
            "maps": model.has_maps, "map_levels": list(model.map_level_names_), "map_tiles": model.map_tiles_,
            "pool": model.state_.layout.setting("pool"), "precision": model.precision,
            "int8": None if model.state_.network is None else int8_summary(model.state_.int8_format, model.state_.int8_isa),
            "threshold": decision_rule(model, fpr),
            "heat_scale": asdict(heat_scale(model.state_.map_calibration)) if model.has_maps else None,
            "calibration": calibration_summary(model.state_, effective_fpr(model, fpr))}


# ----- uploads -----------------------------------------------------------------------------------------------
OVERLAY_SIDE = 1600  # overlays of larger images are drawn at this longest side: plenty to look at, bounded memory


def _upload_error(exc: ImageError) -> UploadError:
    status = 415 if isinstance(exc, UnknownImageFormatError) else 413 if isinstance(exc, ImageTooLargeError) else 422
    return UploadError(status, str(exc))


def probe_upload(data: bytes, filename: str, limits: Limits) -> int:
    """Pixels of an upload from its header, refusing oversized files and images (413), non-images (415) and
    damaged headers (422) before anything is decoded."""
    if len(data) > limits.max_file_bytes:
        raise UploadError(413, f"{filename}: {len(data)} bytes exceeds the limit of {limits.max_file_bytes} bytes per file")
    try:
        width, height = probe(data, filename, limits.max_pixels)
    except ImageError as exc:
        raise _upload_error(exc) from None
    return width * height


def decode_upload(data: bytes, filename: str, limits: Limits, side: int | None = None) -> Image.Image:
    """Uploaded bytes -> 8-bit RGB image, EXIF-oriented (:func:`gaussad.intake.images.load_image`, as for files); with
    ``side``, shrunk to at most that longest side. The upload's size was checked at admission
    (:func:`probe_upload`); ``load_image`` checks its header again as it reads it."""
    try:
        img = load_image(bytes(data), max_pixels=limits.max_pixels, name=filename)
    except ImageError as exc:
        raise _upload_error(exc) from None
    if side is not None and max(img.size) > side:
        img.thumbnail((side, side), Image.BILINEAR)
    return img


def request_cost(pixels: list[int]) -> int:
    """Decoded pixels a request holds at once: images are decoded by the extractor's threads (one per core) and
    then one at a time for overlays, each freed once resized; never more than all of them."""
    return min(sum(pixels), (cpu_count() + 1) * max(pixels, default=0))


def _return_memory() -> None:
    """Hand freed heap memory back to the system after a request (glibc keeps it otherwise)."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


class PixelBudget:
    """Admission control: requests hold their :func:`request_cost` of a service-wide pixel budget while they run.
    A request waits at most ``wait`` seconds for room, else it is refused (503); one request alone is always
    admitted, however large, so that the per-request limits alone decide what is too large."""

    def __init__(self, capacity: int, wait: float):
        self.capacity, self.wait, self.used = capacity, wait, 0
        self._changed = asyncio.Condition()

    async def acquire(self, cost: int) -> bool:
        async with self._changed:
            try:
                await asyncio.wait_for(self._changed.wait_for(
                    lambda: self.used == 0 or self.used + cost <= self.capacity), self.wait)
            except asyncio.TimeoutError:
                return False
            self.used += cost
            return True

    async def release(self, cost: int) -> None:
        async with self._changed:
            self.used -= cost
            self._changed.notify_all()


def _png(img: Image.Image) -> bytes:
    buf = BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def score_uploads(model: GaussianAD, uploads: list[tuple[str, bytes]], fpr: float, limits: Limits,
                  with_maps: bool) -> list[dict]:
    """Score checked uploads (blocking: run it in a worker thread); with maps each result has a PNG overlay
    (:func:`gaussad.detector.heatmap.render`: heat on the model's good-image scale, colour bar, score and decision).

    The model's extractor decodes the uploads a few at a time, each freed once resized; overlays are drawn one
    image at a time, at most ``OVERLAY_SIDE`` pixels on the longest side.
    """
    sources = [NamedBytes(data, name) for name, data in uploads]
    try:
        scored = inference.score(model, sources, [name for name, _ in uploads], fpr=fpr, with_maps=with_maps)
        results = scored.rows
        if not with_maps:
            return results
        scale = heat_scale(model.state_.map_calibration)
        for row, (name, data), amap in zip(results, uploads, scored.maps):
            img = decode_upload(data, name, limits, OVERLAY_SIDE)
            drawn = render(img, amap, scale, row["score"], row["anomalous"])
            row["overlay"] = "data:image/png;base64," + base64.b64encode(_png(drawn)).decode("ascii")
            del drawn
            del img
        return results
    except ImageError as exc:
        raise _upload_error(exc) from None
    finally:
        del sources
        _return_memory()


def map_upload(model: GaussianAD, name: str, data: bytes, fpr: float, limits: Limits) -> tuple[bytes, dict]:
    """The heat-map overlay PNG of one upload and its result row (blocking)."""
    row = score_uploads(model, [(name, data)], fpr, limits, with_maps=True)[0]
    png = base64.b64decode(row.pop("overlay").split(",", 1)[1])
    return png, row


class _BodyLimit:
    """ASGI middleware: refuse request bodies over ``max_bytes`` with 413, whether declared or streamed."""

    def __init__(self, app: ASGIApp, max_bytes: int):
        self.app = app
        self.max_bytes = max_bytes

    def _message(self) -> str:
        return f"request body exceeds the limit of {self.max_bytes} bytes"

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope["headers"]).get(b"content-length", b"")
        if declared.isdigit() and int(declared) > self.max_bytes:
            return await JSONResponse({"detail": self._message()}, status_code=413)(scope, receive, send)
        received = 0

        async def limited() -> Message:
            nonlocal received
            message = await receive()
            received += len(message.get("body", b""))
            if received > self.max_bytes:
                # An HTTPException passes through FastAPI's body parsing and becomes the 413 answer.
                raise HTTPException(413, self._message())
            return message

        await self.app(scope, limited, send)


# ----- API schema --------------------------------------------------------------------------------------------
class ImageResult(BaseModel):
    model_config = ConfigDict(extra="allow")
    path: str = Field(description="the upload's filename (the key `gaussad score --json` uses for the image's path)")
    score: float = Field(description="the model's image score, higher = more anomalous: the mean over levels of the "
                         "Mahalanobis distances, or for a fused image score -log10 of its combined p-value")
    anomalous: bool = Field(description="decision at the request's (else the service's, else the model's) target false-positive rate")
    pvalue: float | None = Field(None, description="the decision rule's p-value (chi2/hotelling: Bonferroni over "
                                 "levels; conformal; fused: full-conformal Fisher combination of the global score "
                                 "and the map peak); flagged when it is at most the FPR")
    levels: dict[str, float] = Field(description="Mahalanobis distance at each level")
    evidence: dict | None = Field(None, description="what the rule decided on: chi2/hotelling each level's threshold "
                                  "and the levels above it; conformal the score, threshold and p-value; fused the "
                                  "p-values of the global score and of the map peak and the combined one; and `text`, "
                                  "one plain sentence")
    map_max: float | None = Field(None, description="largest anomaly-map value (with maps=true)")
    overlay: str | None = Field(None, description="heat-map overlay as a PNG data URL (with maps=true): the image "
                                "with the heat blended over it and a panel under it (decision, score, colour bar)")
    id: str | None = Field(None, description="the result's id in the results log (to mark it good or defect)")


class ScoreResponse(BaseModel):
    model: str
    version: int | None = Field(None, description="version number of the model that scored the images")
    fpr: float
    results: list[ImageResult]


class ModelInfo(BaseModel):
    model_config = ConfigDict(extra="allow")
    name: str
    backbone: str | None
    preset: str
    input_size: int | None
    levels: list[str]
    n_samples: int = Field(description="number of training images")
    maps: bool = Field(description="whether the model computes anomaly maps")
    map_levels: list[str]
    map_tiles: int = Field(description="tiles a side of the anomaly maps (1 = untiled)")
    pool: str = Field(description="how each level's feature map was pooled into the global features")
    precision: str = Field(description="the network's arithmetic: fp32 or int8")
    int8: dict | None = Field(None, description="an int8 network's weight format, the instruction set it was "
                              "calibrated on, this CPU's, and whether the format saturates here")
    threshold: dict
    heat_scale: dict | None = Field(None, description="heat-map colours (models with maps): none up to `low`, full "
                                    "from `high`; `source`: what `low` is (the training images' largest map peak)")


class Health(BaseModel):
    """With API keys and no valid key, only ``status``, ``auth`` and ``limits`` (what the page needs before a key)."""
    status: str = Field(description="ok, or degraded while the results log's database refuses rows")
    version: str | None = None
    models: list[str] | None = None
    limits: dict[str, int]
    auth: bool = Field(False, description="whether requests need an API key")
    drift: dict[str, dict] | None = Field(None, description="per model: the drift tests over its recent results")
    feedback: bool | None = Field(None, description="whether feedback updates can work: the service keeps the scored "
                                  "images (--keep-images) of the models' folder")
    results_log: str | None = Field(None, description="while the results log's database refuses rows (status "
                                    "degraded): how many wait, since when, and why")


def _check_settings(fpr: float | None, workers: int | None) -> int:
    """Validate the service's FPR (None: each model's own) and thread count; returns the thread count."""
    if fpr is not None:
        params.check_value("fpr", fpr)
    workers = min(4, os.cpu_count() or 1) if workers is None else workers
    if workers < 1:
        raise GaussadError(f"workers must be >= 1, got {workers}")
    return workers


# ----- the app -----------------------------------------------------------------------------------------------
def create_app(models: Mapping[str, GaussianAD] | ModelRegistry, fpr: float | None = None, limits: Limits | None = None,
               workers: int | None = None, *, keys: KeyStore | None = None, results_log: ResultsLog | None = None,
               folder: str | os.PathLike | None = None, loopback_only: bool = False) -> FastAPI:
    """The FastAPI app serving ``models`` (name -> fitted model, or a :class:`ModelRegistry`); ``workers`` threads
    run the models. ``keys``: requests need an API key; ``results_log``: every scored image is logged (closed with
    the app); ``folder``: where the models' files are, for feedback updates. State-changing requests from another
    site's page are refused, and with ``loopback_only`` (bound to loopback) requests for another host name
    (:class:`~gaussad.service.operations.CrossSiteGuard`)."""
    workers = _check_settings(fpr, workers)
    limits = limits or Limits()
    registry = models if isinstance(models, ModelRegistry) else ModelRegistry(models, folder)
    service_fpr = fpr
    pool = ThreadPoolExecutor(workers, thread_name_prefix="gaussad-model")
    metrics = Metrics()

    @asynccontextmanager
    async def lifespan(_: FastAPI):
        yield
        pool.shutdown(wait=True, cancel_futures=True)
        if results_log is not None:
            await asyncio.to_thread(results_log.close)

    app = FastAPI(title="gaussad", version=__version__, lifespan=lifespan,
                  description="Visual anomaly detection with Gaussians on pretrained deep features: score images "
                              "with the models of a folder. The inspection page is at `/`.")
    app.add_middleware(_BodyLimit, max_bytes=limits.max_request_bytes)
    if keys is not None:
        app.add_middleware(KeyCheck, keys=keys)
    app.add_middleware(CrossSiteGuard, loopback_only=loopback_only)
    app.add_middleware(MetricsMiddleware, metrics=metrics)  # outermost: counts 401s, 403s and 413s too
    app.mount("/static", StaticFiles(directory=str(STATIC)), name="static")

    async def in_pool(fn, *args):
        try:
            return await asyncio.get_running_loop().run_in_executor(pool, partial(fn, *args))
        except UploadError as exc:
            raise HTTPException(exc.status, str(exc)) from None
        except UpdateError as exc:
            raise HTTPException(409, str(exc)) from None
        except GaussadError as exc:
            raise HTTPException(422, str(exc)) from None

    def get_model(name: str) -> tuple[GaussianAD, int, str]:
        """The served model, its version and its file's SHA-256 (read together: an update may swap it any time)."""
        if name not in registry.served:
            raise HTTPException(404, f"no model named {name!r}; models: {', '.join(sorted(registry.served))}")
        return registry.current(name)

    def refuse_when_backlogged() -> None:
        """503 before any work while the results log cannot take more rows (its database refuses them): a result
        is answered only when it can be logged."""
        if results_log is not None and results_log.backlogged:
            raise HTTPException(503, results_log.status_line(), headers={"Retry-After": "5"})

    def record(name: str, version: int, sha: str, rows: list[dict], uploads: list[tuple[str, bytes]]) -> None:
        """Count the scored images and queue them for the results log (never waits); each row gets its log id."""
        metrics.scored.labels(name).inc(len(rows))
        metrics.flagged.labels(name).inc(sum(bool(r["anomalous"]) for r in rows))
        if results_log is not None:
            try:
                for row, (filename, data) in zip(rows, uploads):
                    row["id"] = results_log.record(name, version, sha, row, data, Path(filename).suffix)
            except Backlogged as exc:  # filled up while this request was scored
                raise HTTPException(503, str(exc), headers={"Retry-After": "5"}) from None

    async def read_uploads(files: list[UploadFile]) -> list[tuple[str, bytes]]:
        if len(files) > limits.max_files:
            raise HTTPException(413, f"{len(files)} files exceeds the limit of {limits.max_files} files per request")
        out = []
        for i, f in enumerate(files):
            name = f.filename or f"file #{i}"
            if f.size is not None and f.size > limits.max_file_bytes:
                raise HTTPException(413, f"{name}: {f.size} bytes exceeds the limit of {limits.max_file_bytes} bytes per file")
            out.append((name, await f.read()))
        return out

    budget = PixelBudget(limits.max_pixels_in_flight, limits.busy_seconds)
    # Feedback updates add the kept images of good-marked results: without kept images "apply feedback" cannot work.
    feedback = results_log is not None and results_log.keep_dir is not None and registry.folder is not None

    async def run_admitted(uploads: list[tuple[str, bytes]], fn, *args):
        """Check the uploads' headers, wait for room in the pixel budget (503 when none comes), run ``fn``."""
        try:
            cost = request_cost([probe_upload(data, name, limits) for name, data in uploads])
        except UploadError as exc:
            raise HTTPException(exc.status, str(exc)) from None
        if not await budget.acquire(cost):
            raise HTTPException(503, f"busy: {budget.used} of {budget.capacity} decoded pixels in flight; retry shortly",
                                headers={"Retry-After": str(max(1, limits.busy_seconds))})
        try:
            return await in_pool(fn, *args)
        finally:
            await budget.release(cost)

    @app.get("/", include_in_schema=False)
    async def page() -> HTMLResponse:
        return HTMLResponse((STATIC / "index.html").read_text(encoding="utf-8"))

    @app.get("/favicon.ico", include_in_schema=False)
    async def favicon() -> Response:
        """The page's icon (an SVG) where a browser asks for it by the old name."""
        return Response((STATIC / "favicon.svg").read_bytes(), media_type="image/svg+xml")

    @app.get("/health", response_model=Health, response_model_exclude_none=True,
             summary="service status, model names and upload limits (with keys: names and drift need a key)")
    async def health(request: Request) -> dict:
        failing = results_log is not None and results_log.failing_since is not None
        out = {"status": "degraded" if failing else "ok", "auth": keys is not None,
               "limits": {**asdict(limits), "max_request_bytes": limits.max_request_bytes}}
        if keys is not None and keys.check(bearer(request.headers.get("authorization"))) is None:
            return out  # no model names, flag rates or database errors for whoever can reach the port
        return {**out, "version": __version__, "models": sorted(registry.served), "feedback": feedback,
                **({"results_log": results_log.status_line()} if failing else {}), "drift": await ops.all_drift()}

    @app.get("/models", response_model=list[ModelInfo], summary="the loaded models")
    async def list_models() -> list[dict]:
        out = []
        for name in sorted(registry.served):
            model, version, sha = registry.current(name)
            out.append({**model_info(name, model, service_fpr), "version": version, "sha256": sha})
        return out

    @app.post("/models/{name}/score", response_model=ScoreResponse, response_model_exclude_none=True,
              summary="score one or more images",
              responses={404: {"description": "unknown model"}, 413: {"description": "upload too large"},
                         415: {"description": "not an image"}, 422: {"description": "undecodable image or bad parameter"}})
    async def score(
        name: str,
        files: list[UploadFile] = File(..., description="images (PNG, JPEG, BMP, TIFF, WebP)"),
        fpr: float | None = Query(None, ge=params.MIN_FPR, lt=1, description="target false-positive rate (default: the service's --fpr, else the model's own)"),
        maps: bool = Query(False, description="add a heat-map overlay per image (models fitted with anomaly maps)"),
    ) -> dict:
        model, version, sha = get_model(name)
        refuse_when_backlogged()
        if maps and not model.has_maps:
            raise HTTPException(422, f"model {name!r} has no anomaly maps (fit it with --preset recommended)")
        uploads = await read_uploads(files)
        fpr = service_fpr if fpr is None else fpr
        results = await run_admitted(uploads, score_uploads, model, uploads, fpr, limits, maps)
        record(name, version, sha, results, uploads)
        return {"model": name, "version": version, "fpr": effective_fpr(model, fpr), "results": results}

    @app.post("/models/{name}/map", response_class=Response, summary="heat-map overlay of one image (PNG)",
              responses={200: {"content": {"image/png": {}}, "description": "the image with its anomaly map blended over it"},
                         404: {"description": "unknown model"}, 413: {"description": "upload too large"},
                         415: {"description": "not an image"}, 422: {"description": "model without maps, or undecodable image"}})
    async def heat_map(name: str, file: UploadFile = File(..., description="one image")) -> Response:
        model, version, sha = get_model(name)
        refuse_when_backlogged()
        if not model.has_maps:
            raise HTTPException(422, f"model {name!r} has no anomaly maps (fit it with --preset recommended)")
        (upload,) = await read_uploads([file])
        png, row = await run_admitted([upload], map_upload, model, *upload, service_fpr, limits)
        record(name, version, sha, [row], [upload])
        return Response(png, media_type="image/png", headers={
            "X-Gaussad-Score": repr(row["score"]), "X-Gaussad-Anomalous": str(row["anomalous"]).lower(),
            "X-Gaussad-Map-Max": repr(row["map_max"])})

    def threshold_of(name: str) -> float | None:
        limit = decision_rule(registry.current(name)[0], service_fpr).get("score_threshold")
        return limit

    ops = router(registry, results_log, metrics, lambda name: effective_fpr(registry.current(name)[0], service_fpr),
                 threshold_of, in_pool)
    app.include_router(ops)
    return app


def run(folder: str | os.PathLike, host: str = "127.0.0.1", port: int = 8000, fpr: float | None = None,
        limits: Limits | None = None, workers: int | None = None, log_level: str = "info",
        keys_file: str | os.PathLike | None = None, insecure: bool = False, db: str | None = None,
        keep_images: str | os.PathLike | None = None) -> None:
    """Load the models of ``folder`` and serve them with uvicorn until interrupted. ``keys_file``: require API keys;
    ``db``: the results log (a SQLite path or SQLAlchemy URL; None: off); ``keep_images``: keep scored images there."""
    import uvicorn

    if not logging.getLogger().handlers:
        logging.basicConfig(level=log_level.upper(), format="%(levelname)s:  %(message)s")
    _check_settings(fpr, workers)
    keys = KeyStore.load(keys_file) if keys_file is not None else None
    if keys is not None and not keys.entries:
        raise DataError(f"{keys_file}: no keys in the file (add one with `gaussad keys add NAME --keys {keys_file}`)")
    check_exposure(host, keys, insecure)
    if keep_images is not None and db is None:
        raise GaussadError("--keep-images needs the results log (--db)")
    results_log = ResultsLog(db, keep_images) if db is not None else None  # a bad --db is found before loading
    models = load_models(folder)
    app = create_app(models, fpr=fpr, limits=limits, workers=workers, keys=keys, results_log=results_log,
                     folder=folder, loopback_only=is_loopback(host))
    log.info("gaussad %s serving %d model(s) from %s: %s", __version__, len(models), folder, ", ".join(sorted(models)))
    log.info("results log: %s", "off (--db none)" if results_log is None else results_log.where())
    uvicorn.run(app, host=host, port=port, log_level=log_level)
