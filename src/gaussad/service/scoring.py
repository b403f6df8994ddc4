"""Routes of the page, the service's status, the models and scoring: ``/``, ``GET /health``, ``GET /models``,
``POST /models/NAME/score`` and ``POST /models/NAME/map``."""

from __future__ import annotations

from dataclasses import asdict
from importlib import resources
from typing import Awaitable, Callable

from fastapi import APIRouter, File, HTTPException, Query, Request, UploadFile
from fastapi.responses import HTMLResponse, Response

from ..detector import inference, params
from ..version import __version__
from .catalog import model_info
from .keys import bearer
from .runtime import Service
from .schemas import Health, ModelInfo, ScoreResponse
from .uploads import map_upload, score_uploads

STATIC = resources.files("gaussad.service") / "static"
UPLOAD_ERRORS = {404: {"description": "unknown model"}, 413: {"description": "upload too large"},
                 415: {"description": "not an image"}}


def routes(service: Service, all_drift: Callable[[], Awaitable[dict]]) -> APIRouter:
    """The page, status, model and scoring routes of ``service``; ``all_drift()``: each model's drift tests."""
    api = APIRouter()

    @api.get("/", include_in_schema=False)
    async def page() -> HTMLResponse:
        return HTMLResponse((STATIC / "index.html").read_text(encoding="utf-8"))

    @api.get("/favicon.ico", include_in_schema=False)
    async def favicon() -> Response:
        """The page's icon (an SVG) where a browser asks for it by the old name."""
        return Response((STATIC / "favicon.svg").read_bytes(), media_type="image/svg+xml")

    @api.get("/health", response_model=Health, response_model_exclude_none=True,
             summary="service status, model names and upload limits (with keys: names and drift need a key)")
    async def health(request: Request) -> dict:
        log, keys, limits = service.results_log, service.keys, service.limits
        failing = log is not None and log.failing_since is not None
        out = {"status": "degraded" if failing else "ok", "auth": keys is not None,
               "limits": {**asdict(limits), "max_request_bytes": limits.max_request_bytes}}
        if keys is not None and keys.check(bearer(request.headers.get("authorization"))) is None:
            return out  # no model names, flag rates or database errors for whoever can reach the port
        return {**out, "version": __version__, "models": sorted(service.registry.served),
                "feedback": service.feedback, **({"results_log": log.status_line()} if failing else {}),
                "drift": await all_drift()}

    @api.get("/models", response_model=list[ModelInfo], summary="the loaded models")
    async def list_models() -> list[dict]:
        out = []
        for name in sorted(service.registry.served):
            model, version, sha = service.registry.current(name)
            out.append({**model_info(name, model, service.fpr), "version": version, "sha256": sha})
        return out

    _scoring_routes(api, service)
    return api


def _scoring_routes(api: APIRouter, service: Service) -> None:
    @api.post("/models/{name}/score", response_model=ScoreResponse, response_model_exclude_none=True,
              summary="score one or more images",
              responses={**UPLOAD_ERRORS, 422: {"description": "undecodable image or bad parameter"}})
    async def score(
        name: str,
        files: list[UploadFile] = File(..., description="images (PNG, JPEG, BMP, TIFF, WebP)"),
        fpr: float | None = Query(None, ge=params.MIN_FPR, lt=1, description="target false-positive rate (default: the service's --fpr, else the model's own)"),
        maps: bool = Query(False, description="add a heat-map overlay per image (models fitted with anomaly maps)"),
    ) -> dict:
        model, version, sha = service.get_model(name)
        service.refuse_when_backlogged()
        if maps and not model.has_maps:
            raise HTTPException(422, f"model {name!r} has no anomaly maps (fit it with --preset recommended)")
        uploads = await service.read_uploads(files)
        fpr = service.fpr if fpr is None else fpr
        results = await service.run_admitted(uploads, score_uploads, model, uploads, fpr, service.limits, maps)
        service.record(name, version, sha, results, uploads)
        return {"model": name, "version": version, "fpr": inference.target_fpr(model, fpr), "results": results}

    @api.post("/models/{name}/map", response_class=Response, summary="heat-map overlay of one image (PNG)",
              responses={200: {"content": {"image/png": {}}, "description": "the image with its anomaly map blended over it"},
                         **UPLOAD_ERRORS, 422: {"description": "model without maps, or undecodable image"}})
    async def heat_map(name: str, file: UploadFile = File(..., description="one image")) -> Response:
        model, version, sha = service.get_model(name)
        service.refuse_when_backlogged()
        if not model.has_maps:
            raise HTTPException(422, f"model {name!r} has no anomaly maps (fit it with --preset recommended)")
        (upload,) = await service.read_uploads([file])
        png, row = await service.run_admitted([upload], map_upload, model, *upload, service.fpr, service.limits)
        service.record(name, version, sha, [row], [upload])
        return Response(png, media_type="image/png", headers={
            "X-Gaussad-Score": repr(row["score"]), "X-Gaussad-Anomalous": str(row["anomalous"]).lower(),
            "X-Gaussad-Map-Max": repr(row["map_max"])})
