"""Service routes: ``GET /health``, ``GET /ready``, ``GET /info``, ``GET /metrics``."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, generate_latest

from app.admission import resident_bytes
from app.routes import ERRORS
from app.schemas import Health, Info, RefineDefaults, UpstreamHealth
from app.service import ReadyService, Service, get_service

router = APIRouter(tags=["service"])


@router.get("/health", response_model=Health, responses={503: {"model": Health}}, summary="Liveness")
async def health(request: Request) -> Health | JSONResponse:
    """200 once the model is loaded and while the engine makes progress; 503 while loading, if
    loading failed, or when work waits and the engine has made no progress for `stall_timeout_s`
    (a wedged server: restart it). With an upstream generator, `upstream` says whether it answers;
    an upstream that does not answer does not fail liveness (restarting this server would not help)."""
    service: Service = request.app.state.service
    upstream = await _upstream_health(service)
    return _answer(service, _problem(service, readiness=False), upstream)


@router.get("/ready", response_model=Health, responses={503: {"model": Health}}, summary="Readiness")
async def ready(request: Request) -> Health | JSONResponse:
    """200 when this replica should get new requests: loaded, not stalled, its queue not full, its
    memory below the ceiling and its upstream generator (if any) answering; 503 otherwise (Kubernetes
    then sends traffic to other replicas)."""
    service: Service = request.app.state.service
    upstream = await _upstream_health(service)
    problem = _problem(service, readiness=True)
    if problem is None and upstream is not None and not upstream.answers:
        problem = Health(
            status="upstream_unavailable", error=f"the upstream generator does not answer: {upstream.error}"
        )
    return _answer(service, problem, upstream)


@router.get("/info", response_model=Info, responses=ERRORS, summary="Model, limits and refinement defaults")
async def info(service: ReadyService = Depends(get_service)) -> Info:
    s, loaded, tokens, refiner = service.settings, service.loaded, service.tokens, service.engine.refiner
    defaults = {
        name: getattr(s, f"refine_default_{name}") for name in ("enabled", "method", "steps", "candidates")
    }
    return Info(
        model_id=loaded.model_id,
        model_dtype=str(loaded.dtype).removeprefix("torch."),
        model_device_type=loaded.device.type,
        max_input_tokens=tokens.max_input_tokens,
        max_total_tokens=tokens.max_total_tokens,
        max_new_tokens=tokens.max_new_tokens,
        **s.model_dump(include={"max_best_of", "max_stop_sequences", "max_batch_size", "max_queue"}),
        version=service.version,
        refine_defaults=RefineDefaults(
            **defaults,
            max_candidates=s.max_candidates,
            max_keywords=s.max_keywords,
            terms={t.name: t.default_weight for t in refiner.objective.terms} if refiner else {},
            reward_model=s.reward_model,
        ),
        generator=service.upstream.name if service.upstream is not None else None,
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


def _answer(
    service: Service, problem: Health | None, upstream: UpstreamHealth | None
) -> Health | JSONResponse:
    """200 ``{"status": "ok"}``, or 503 with the problem and Retry-After; ``upstream`` when there is one."""
    if problem is None:
        return Health(status="ok", upstream=upstream)
    headers = {"Retry-After": str(service.settings.retry_after_s)}
    problem.upstream = upstream
    return JSONResponse(problem.model_dump(), status_code=503, headers=headers)


async def _upstream_health(service: Service) -> UpstreamHealth | None:
    """Whether the upstream generator answers now; None when there is none (or no service yet)."""
    upstream = service.ready.upstream if service.ready is not None else None
    if upstream is None:
        return None
    error = await upstream.probe()
    return UpstreamHealth(generator=upstream.name, answers=error is None, error=error)


def _problem(service: Service, readiness: bool) -> Health | None:
    """Why the service cannot answer (loading, failed, stalled) or, for ``readiness``, should get no
    new requests now (busy); None when it can."""
    ready = service.ready
    if ready is None:
        return Health(status="failed" if service.load_error else "loading", error=service.load_error)
    s = ready.settings
    if ready.engine.stalled():
        return Health(
            status="stalled",
            error=f"the engine made no progress for {s.stall_timeout_s:g} s with work waiting",
        )
    if readiness and ready.engine.queue_size >= s.max_queue:
        return Health(status="busy", error=f"the queue is full ({s.max_queue} requests waiting)")
    if readiness and resident_bytes() >= s.memory_limit_bytes:
        return Health(status="busy", error="the server is at its memory ceiling")
    return None
