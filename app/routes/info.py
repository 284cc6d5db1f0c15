"""Service routes: ``GET /health``, ``GET /info``, ``GET /metrics``."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, generate_latest

from app.admission import resident_bytes
from app.routes.tgi import ERRORS
from app.schemas import Health, Info, RefineDefaults
from app.service import Service, get_service

router = APIRouter(tags=["service"])


def _unavailable(service: Service, status: str, error: str | None) -> JSONResponse:
    headers = {"Retry-After": str(service.settings.retry_after_s)}
    return JSONResponse({"status": status, "error": error}, status_code=503, headers=headers)


@router.get("/health", response_model=Health, responses={503: {"model": Health}}, summary="Liveness")
async def health(request: Request) -> JSONResponse:
    """200 once the model is loaded and while the engine makes progress; 503 while loading, if
    loading failed, or when work waits and the engine has made no progress for `stall_timeout_s`
    (a wedged server: restart it)."""
    service: Service = request.app.state.service
    if not service.ready:
        return _unavailable(service, "failed" if service.load_error else "loading", service.load_error)
    assert service.engine is not None
    if service.engine.stalled():
        seconds = service.settings.stall_timeout_s
        return _unavailable(
            service, "stalled", f"the engine made no progress for {seconds:g} s with work waiting"
        )
    return JSONResponse({"status": "ok", "error": None})


@router.get("/ready", response_model=Health, responses={503: {"model": Health}}, summary="Readiness")
async def ready(request: Request) -> JSONResponse:
    """200 when this replica should get new requests: loaded, not stalled, its queue not full and its
    memory below the ceiling; 503 otherwise (Kubernetes then sends traffic to other replicas)."""
    service: Service = request.app.state.service
    if not service.ready:
        return _unavailable(service, "failed" if service.load_error else "loading", service.load_error)
    engine, s = service.engine, service.settings
    assert engine is not None
    if engine.stalled():
        return _unavailable(service, "stalled", "the engine is making no progress")
    if engine.queue_size >= s.max_queue:
        return _unavailable(service, "busy", f"the queue is full ({s.max_queue} requests waiting)")
    if resident_bytes() >= s.memory_limit_bytes:
        return _unavailable(service, "busy", "the server is at its memory ceiling")
    return JSONResponse({"status": "ok", "error": None})


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
