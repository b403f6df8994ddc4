"""HTTP service: score uploaded images with every model of a folder, plus an inspection page (FastAPI).

The app is put together here (:func:`create_app`) and served with uvicorn (:func:`run`); its parts are in their own
modules: the uploads and their limits (:mod:`~gaussad.service.uploads`), the served models
(:mod:`~gaussad.service.catalog`), what the routes share (:mod:`~gaussad.service.runtime`), the schema
(:mod:`~gaussad.service.schemas`), the page and scoring routes (:mod:`~gaussad.service.scoring`) and access keys,
the results log, feedback updates, drift and metrics (:mod:`~gaussad.service.operations` and the modules it uses).

Models are loaded once at start; the backbone work of a request runs in a thread pool so the event loop keeps
answering other requests. Uploads are bounded in bytes per request and per file, in files per request and in
pixels per image; bad input gets one 4xx answer whose ``detail`` names the file and the problem.
"""

from __future__ import annotations

import asyncio
import logging
import os
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from typing import Mapping

from fastapi import FastAPI
from fastapi.staticfiles import StaticFiles

from ..detector import params
from ..detector.model import GaussianAD
from ..errors import DataError, GaussadError
from ..version import __version__
from .catalog import load_models
from .feedback import ModelRegistry
from .keys import KeyStore, is_loopback
from .operations import CrossSiteGuard, KeyCheck, MetricsMiddleware, check_exposure, router
from .results_log import ResultsLog
from .runtime import Service
from .scoring import STATIC, routes
from .uploads import BodyLimit, Limits

log = logging.getLogger(__name__)


def _check_settings(fpr: float | None, workers: int | None) -> int:
    """Validate the service's FPR (None: each model's own) and thread count; returns the thread count."""
    if fpr is not None:
        params.check_value("fpr", fpr)
    workers = min(4, os.cpu_count() or 1) if workers is None else workers
    if workers < 1:
        raise GaussadError(f"workers must be >= 1, got {workers}")
    return workers


def create_app(models: Mapping[str, GaussianAD] | ModelRegistry, fpr: float | None = None, limits: Limits | None = None,
               workers: int | None = None, *, keys: KeyStore | None = None, results_log: ResultsLog | None = None,
               folder: str | os.PathLike | None = None, loopback_only: bool = False) -> FastAPI:
    """The FastAPI app serving ``models`` (name -> fitted model, or a :class:`ModelRegistry`); ``workers`` threads
    run the models. ``keys``: requests need an API key; ``results_log``: every scored image is logged (closed with
    the app); ``folder``: where the models' files are, for feedback updates. State-changing requests from another
    site's page are refused, and with ``loopback_only`` (bound to loopback) requests for another host name
    (:class:`~gaussad.service.operations.CrossSiteGuard`)."""
    workers = _check_settings(fpr, workers)
    service = Service(models if isinstance(models, ModelRegistry) else ModelRegistry(models, folder),
                      limits or Limits(), ThreadPoolExecutor(workers, thread_name_prefix="gaussad-model"), fpr, keys,
                      results_log)

    @asynccontextmanager
    async def lifespan(_: FastAPI):
        yield
        service.pool.shutdown(wait=True, cancel_futures=True)
        if results_log is not None:
            await asyncio.to_thread(results_log.close)

    app = FastAPI(title="gaussad", version=__version__, lifespan=lifespan,
                  description="Visual anomaly detection with Gaussians on pretrained deep features: score images "
                              "with the models of a folder. The inspection page is at `/`.")
    app.add_middleware(BodyLimit, max_bytes=service.limits.max_request_bytes)
    if keys is not None:
        app.add_middleware(KeyCheck, keys=keys)
    app.add_middleware(CrossSiteGuard, loopback_only=loopback_only)
    app.add_middleware(MetricsMiddleware, metrics=service.metrics)  # outermost: counts 401s, 403s and 413s too
    app.mount("/static", StaticFiles(directory=str(STATIC)), name="static")
    ops = router(service.registry, results_log, service.metrics, service.fpr_of, service.threshold_of,
                 service.in_pool)
    app.include_router(routes(service, ops.all_drift))
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
