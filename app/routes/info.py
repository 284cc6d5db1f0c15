"""Service routes: ``GET /health``, ``GET /info``, ``GET /metrics``."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, generate_latest

from app.routes.tgi import ERRORS
from app.schemas import Health, Info, RefineDefaults
from app.service import Service, get_service

router = APIRouter(tags=["service"])


@router.get("/health", response_model=Health, responses={503: {"model": Health}}, summary="Readiness")
async def health(request: Request) -> JSONResponse:
    """200 once the model is loaded and the engine runs; 503 while loading (or if loading failed)."""
    service: Service = request.app.state.service
    if service.ready:
        return JSONResponse({"status": "ok", "error": None})
    status = "failed" if service.load_error else "loading"
    headers = {"Retry-After": str(service.settings.retry_after_s)}
    return JSONResponse({"status": status, "error": service.load_error}, status_code=503, headers=headers)


@router.get("/info", response_model=Info, responses=ERRORS, summary="Model, limits and refinement defaults")
async def info(service: Service = Depends(get_service)) -> Info:
    s, loaded, tokens = service.settings, service.loaded, service.tokens
    assert loaded is not None and tokens is not None
    return Info(
        model_id=loaded.model_id,
        model_dtype=str(loaded.dtype).removeprefix("torch."),
        model_device_type=loaded.device.type,
        max_input_tokens=tokens.max_input_tokens,
        max_total_tokens=tokens.max_total_tokens,
        max_new_tokens=tokens.max_new_tokens,
        max_best_of=s.max_best_of,
        max_stop_sequences=s.max_stop_sequences,
        max_batch_size=s.max_batch_size,
        max_queue=s.max_queue,
        version=service.version,
        refine_defaults=RefineDefaults(
            enabled=s.refine_default_enabled,
            method=s.refine_default_method,
            steps=s.refine_default_steps,
            candidates=s.refine_default_candidates,
            max_candidates=s.max_candidates,
            max_keywords=s.max_keywords,
        ),
    )


@router.get(
    "/metrics",
    response_class=Response,
    responses={200: {"content": {CONTENT_TYPE_LATEST: {"schema": {"type": "string"}}}}},
    summary="Prometheus metrics",
)
async def metrics() -> Response:
    """Prometheus text exposition of the `refiner_*` metrics (served even while the model loads)."""
    return Response(generate_latest(REGISTRY), media_type=CONTENT_TYPE_LATEST)
