"""The production-line side of the HTTP service: access keys, the results log's routes, feedback (labels, model
updates and rollbacks), drift alarms and Prometheus metrics. :mod:`gaussad.service.app` builds the app and mounts these.
"""

from __future__ import annotations

import asyncio
import time
from datetime import datetime, timezone
from typing import Awaitable, Callable

from fastapi import APIRouter, Body, HTTPException, Query
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.types import ASGIApp, Receive, Scope, Send

from ..core.drift import WINDOW, drift
from ..errors import GaussadError
from .feedback import ModelRegistry
from .keys import KeyStore, bearer, is_loopback
from .results_log import LABELS, ResultsLog

# Paths anyone may reach: the page asks for a key itself; /health serves load balancers.
OPEN_PATHS = ("/", "/health", "/docs", "/docs/oauth2-redirect", "/redoc", "/openapi.json")
ADMIN_SUFFIXES = ("/update", "/rollback")


def required_role(method: str, path: str) -> str | None:
    """The role a request needs: None for the open paths, admin for model updates and rollbacks, else score."""
    if path in OPEN_PATHS or path.startswith("/static/"):
        return None
    if method == "POST" and path.startswith("/models/") and path.endswith(ADMIN_SUFFIXES):
        return "admin"
    return "score"


MAX_CURSOR = 2**63 - 1  # the largest row number a database's 64-bit integer holds: larger cursors are 422, not 500


class KeyCheck:
    """ASGI middleware: 401 without a valid ``Authorization: Bearer KEY``, 403 when the key's role is too low."""

    def __init__(self, app: ASGIApp, keys: KeyStore):
        self.app, self.keys = app, keys

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        role = required_role(scope["method"], scope["path"])
        if role is not None:
            header = dict(scope["headers"]).get(b"authorization", b"").decode("latin-1")
            entry = self.keys.check(bearer(header))
            if entry is None:
                answer = JSONResponse({"detail": "a valid API key is required: send 'Authorization: Bearer KEY'"},
                                      status_code=401, headers={"WWW-Authenticate": "Bearer"})
                return await answer(scope, receive, send)
            if not entry.allows(role):
                answer = JSONResponse({"detail": f"key {entry.name!r} has role {entry.role!r}; this needs {role!r}"},
                                      status_code=403)
                return await answer(scope, receive, send)
            scope.setdefault("state", {})["key_name"] = entry.name
        await self.app(scope, receive, send)


SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})


def _host_name(host: str) -> str:
    """The name of a ``Host`` header or an origin's authority, without the port (``[::1]:8000`` -> ``::1``)."""
    if host.startswith("["):
        return host[1:host.find("]")] if "]" in host else host
    return host.rsplit(":", 1)[0] if host.count(":") == 1 else host


class CrossSiteGuard:
    """ASGI middleware against requests a web page of another site makes in the user's browser (issue 32, N8).

    A request that changes state (any method but GET, HEAD, OPTIONS) is refused (403) when the browser says it is
    cross-site or same-site (``Sec-Fetch-Site``), or its ``Origin`` is not the service's own (``null`` included);
    clients that are not browsers send neither header and are unaffected. With ``loopback_only`` (a service bound to
    a loopback address), a request whose ``Host`` is not ``localhost`` or a loopback address is refused (421): a name
    of another site that an attacker re-points at 127.0.0.1 (DNS rebinding) reads nothing."""

    def __init__(self, app: ASGIApp, loopback_only: bool = False):
        self.app, self.loopback_only = app, loopback_only

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in scope["headers"]}
            host = headers.get("host", "")
            if self.loopback_only and not is_loopback(_host_name(host), resolve=False):
                return await JSONResponse({"detail": f"Host {host[:100]!r} is not this loopback service's"},
                                          status_code=421)(scope, receive, send)
            if scope["method"] not in SAFE_METHODS:
                site, origin = headers.get("sec-fetch-site"), headers.get("origin")
                foreign = site in ("cross-site", "same-site") or (
                    origin is not None and origin.partition("://")[2].rstrip("/") != host)
                if foreign:
                    return await JSONResponse({"detail": "a request from another site's page is refused (Origin "
                                               f"{(origin or '?')[:100]!r}, Sec-Fetch-Site {site!r})"},
                                              status_code=403)(scope, receive, send)
        await self.app(scope, receive, send)


class Metrics:
    """Prometheus metrics of one app (its own registry): requests, latencies, images scored and flagged, versions."""

    def __init__(self):
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.registry = CollectorRegistry()
        self.requests = Counter("gaussad_requests", "HTTP requests answered", ["method", "route", "status"],
                                registry=self.registry)
        self.latency = Histogram("gaussad_request_seconds", "HTTP request latency", ["method", "route"],
                                 registry=self.registry,
                                 buckets=(.005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10, 30, 60))
        self.scored = Counter("gaussad_images_scored", "images scored", ["model"], registry=self.registry)
        self.flagged = Counter("gaussad_images_flagged", "images judged anomalous", ["model"], registry=self.registry)
        self.version = Gauge("gaussad_model_version", "version number of the served model file", ["model"],
                             registry=self.registry)
        self.log_queue = Gauge("gaussad_results_log_pending", "scored images queued for the results log",
                               registry=self.registry)
        self.log_failures = Gauge("gaussad_results_log_failures", "attempts at writing rows that the results log's "
                                  "database refused since the start (each batch is retried until written)",
                                  registry=self.registry)
        self.log_image_failures = Gauge("gaussad_results_log_image_failures", "kept images that could not be "
                                        "written since the start (their rows are logged without them)",
                                        registry=self.registry)

    def render(self) -> bytes:
        from prometheus_client import generate_latest

        return generate_latest(self.registry)


class MetricsMiddleware:
    """ASGI middleware counting requests and timing them by route template (``/models/{name}/score``)."""

    def __init__(self, app: ASGIApp, metrics: Metrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        start, status = time.perf_counter(), [500]

        async def sending(message) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, sending)
        finally:
            route = scope.get("route")
            template = getattr(route, "path", None) or ("/static" if scope["path"].startswith("/static/") else "other")
            self.metrics.requests.labels(scope["method"], template, str(status[0])).inc()
            self.metrics.latency.labels(scope["method"], template).observe(time.perf_counter() - start)


def _since(text: str | None) -> float | None:
    """Unix seconds or an ISO 8601 time (UTC unless it says otherwise)."""
    if text is None or text == "":
        return None
    try:
        return float(text)
    except ValueError:
        pass
    try:
        t = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise HTTPException(422, f"since: expected unix seconds or an ISO 8601 time, got {text!r}") from None
    return (t if t.tzinfo else t.replace(tzinfo=timezone.utc)).timestamp()


def _iso(t: float) -> str:
    return datetime.fromtimestamp(t, timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def router(registry: ModelRegistry, log: ResultsLog | None, metrics: Metrics, fpr_of: Callable[[str], float],
           threshold_of: Callable[[str], float | None], run_blocking: Callable) -> APIRouter:
    """Routes of the results log, feedback, drift and metrics. ``fpr_of(name)``: the FPR the service decides at;
    ``threshold_of(name)``: the current score threshold (None when not a finite number); ``run_blocking(fn, *args)``
    awaits ``fn`` in the model threads. The router's ``all_drift()`` gives each model's drift tests (for /health)."""
    api = APIRouter()
    _results_routes(api, log)
    _feedback_routes(api, registry, log, metrics, run_blocking)
    api.all_drift = _drift_routes(api, registry, log, metrics, fpr_of, threshold_of)
    return api


def _need_log(log: ResultsLog | None) -> ResultsLog:
    if log is None:
        raise HTTPException(409, "the results log is off (start the service with --db)")
    return log


def _need_model(registry: ModelRegistry, name: str) -> None:
    if name not in registry.served:
        raise HTTPException(404, f"no model named {name!r}; models: {', '.join(sorted(registry.served))}")


def _rows_out(rows: list[dict]) -> list[dict]:
    for r in rows:
        r["time_iso"] = _iso(r["time"])
    return rows


def _results_routes(api: APIRouter, log: ResultsLog | None) -> None:
    """``GET /results``, ``GET /results.csv``, ``POST /results/ID/label`` and ``GET /feedback/rates``."""

    async def query(model, since, anomalous, limit, cursor) -> list[dict]:
        lg = _need_log(log)
        return await asyncio.to_thread(lg.query, model, _since(since), anomalous, limit, cursor)

    @api.get("/results", summary="logged results, oldest first after the cursor")
    async def results(model: str | None = None, since: str | None = Query(None, description="unix seconds or ISO 8601"),
                      anomalous: bool | None = None, limit: int = Query(100, ge=1, le=10_000),
                      cursor: int | None = Query(None, ge=0, le=MAX_CURSOR,
                                                 description="the next_cursor of the previous page")) -> dict:
        rows = _rows_out(await query(model, since, anomalous, limit, cursor))
        return {"results": rows, "next_cursor": rows[-1]["seq"] if len(rows) == limit else None}

    @api.get("/results.csv", response_class=PlainTextResponse, summary="logged results as CSV")
    async def results_csv(model: str | None = None, since: str | None = None, anomalous: bool | None = None,
                          limit: int = Query(100_000, ge=1, le=1_000_000),
                          cursor: int | None = Query(None, ge=0, le=MAX_CURSOR)) -> Response:
        lg, since = _need_log(log), _since(since)  # bad parameters answer 422 before the first byte
        # a sync iterator: Starlette reads it in its worker threads, a page at a time (never on the event loop)
        return StreamingResponse(lg.csv_stream(model, since, anomalous, limit, cursor), media_type="text/csv",
                                 headers={"Content-Disposition": 'attachment; filename="results.csv"'})

    @api.post("/results/{rid}/label", summary="mark a logged result good (a false alarm) or defect")
    async def label(rid: str, label: str | None = Body(..., embed=True, description="good, defect or null")) -> dict:
        lg = _need_log(log)
        if label is not None and label not in LABELS:
            raise HTTPException(422, f"label must be one of {', '.join(LABELS)} or null, got {label!r}")
        try:
            row = await asyncio.to_thread(lg.label, rid, label)
        except KeyError:
            raise HTTPException(404, f"no logged result with id {rid!r}") from None
        return _rows_out([row])[0]

    @api.get("/feedback/rates", summary="realised FPR and TPR per model and version, from the labels")
    async def rates() -> list[dict]:
        return await asyncio.to_thread(_need_log(log).rates)


def _feedback_routes(api: APIRouter, registry: ModelRegistry, log: ResultsLog | None, metrics: Metrics,
                     run_blocking: Callable) -> None:
    """``POST /models/NAME/update``, ``POST /models/NAME/rollback`` and ``GET /models/NAME/versions``."""
    changing: dict[str, asyncio.Lock] = {}  # per model: one update or rollback at a time

    @api.post("/models/{name}/update", summary="add the good-marked images to the model as a new version (admin)")
    async def update(name: str) -> dict:
        _need_model(registry, name)
        lg = _need_log(log)
        if lg.keep_dir is None:
            raise HTTPException(409, "feedback needs the images: start the service with --keep-images DIR")
        async with changing.setdefault(name, asyncio.Lock()):  # two updates never add the same images twice
            rows = await asyncio.to_thread(lg.to_apply, name)
            usable = [r for r in rows if r["image_file"] and (lg.keep_dir / r["image_file"]).is_file()]
            if not usable:
                raise HTTPException(409, f"model {name!r}: no good-marked results with kept images to apply "
                                         f"({len(rows)} good-marked, none with its image kept)")
            out = await run_blocking(registry.update, name, [str(lg.keep_dir / r["image_file"]) for r in usable])
            await asyncio.to_thread(lg.mark_applied, [r["seq"] for r in usable], out["version"])
        metrics.version.labels(name).set(out["version"])
        return {**out, "results": [r["id"] for r in usable]}

    @api.post("/models/{name}/rollback", summary="serve the previous version of the model again (admin)")
    async def rollback(name: str) -> dict:
        _need_model(registry, name)
        async with changing.setdefault(name, asyncio.Lock()):
            out = await run_blocking(registry.rollback, name)  # answers 409 for an UpdateError
            if log is not None:
                await asyncio.to_thread(log.unapply, name, out["dropped"])
        metrics.version.labels(name).set(out["version"])
        return out

    @api.get("/models/{name}/versions", summary="the model's version history")
    async def versions(name: str) -> dict:
        _need_model(registry, name)
        return registry.info(name)


def _drift_routes(api: APIRouter, registry: ModelRegistry, log: ResultsLog | None, metrics: Metrics,
                  fpr_of: Callable[[str], float], threshold_of: Callable[[str], float | None]
                  ) -> Callable[[], Awaitable[dict]]:
    """``GET /models/NAME/history`` and ``GET /metrics``; returns ``all_drift()``, each model's drift tests."""

    def model_drift(name: str, window: int) -> tuple[dict, list[dict]]:
        _, version, _ = registry.current(name)
        # what is written so far: /health must not wait for the writer under load
        rows = log.query(model=name, version=version, limit=window, newest_first=True, wait=False)[::-1]
        return drift([r["anomalous"] for r in rows], [r["pvalue"] for r in rows], fpr_of(name)), rows

    @api.get("/models/{name}/history", summary="recent scores with the threshold, and the drift tests")
    async def history(name: str, limit: int = Query(WINDOW, ge=1, le=10_000)) -> dict:
        _need_model(registry, name)
        lg = _need_log(log)
        rows = await asyncio.to_thread(lg.query, name, None, None, limit, None, None, None, True)
        d, _ = await asyncio.to_thread(model_drift, name, WINDOW)
        return {"model": name, "version": registry.current(name)[1], "threshold": threshold_of(name),
                "fpr": fpr_of(name), "drift": d,
                "points": [{"id": r["id"], "time": r["time"], "score": r["score"], "anomalous": r["anomalous"],
                            "version": r["version"], "filename": r["filename"], "label": r["label"]}
                           for r in rows[::-1]]}

    async def all_drift() -> dict:
        if log is None:
            return {}
        return {name: (await asyncio.to_thread(model_drift, name, WINDOW))[0] for name in sorted(registry.served)}

    @api.get("/metrics", response_class=PlainTextResponse, summary="Prometheus metrics")
    async def prometheus() -> Response:
        from prometheus_client import CONTENT_TYPE_LATEST

        for name in registry.served:
            metrics.version.labels(name).set(registry.current(name)[1])
        if log is not None:
            metrics.log_queue.set(log.pending)
            metrics.log_failures.set(log.failures)
            metrics.log_image_failures.set(log.image_failures)
        return Response(metrics.render(), media_type=CONTENT_TYPE_LATEST)

    return all_drift


def check_exposure(host: str, keys: KeyStore | None, insecure: bool) -> None:
    """Refuse to listen beyond loopback without keys unless ``insecure`` is set."""
    if keys is None and not insecure and not is_loopback(host):
        raise GaussadError(f"refusing to listen on {host} without access keys: anyone reaching the port could use "
                           f"the service. Pass --keys FILE (create keys with `gaussad keys add NAME --keys FILE`), "
                           f"or --insecure to serve without keys anyway")
