"""The running service: settings, the loaded model, the engine, and whether they are ready.

Routes reach it through ``get_service`` (a FastAPI dependency), which answers 503 with Retry-After
while the model is still loading, so no route ever runs against a half-built service.
"""

from __future__ import annotations

import asyncio
import importlib.metadata
import logging

from fastapi import Request

from app import metrics
from app.admission import MB, Admission
from app.engine import Engine
from app.errors import ServiceUnavailable
from app.jobs import JobBuilder
from app.settings import Settings
from app.tokenization import PromptTokenizer
from refiners import Refiner
from refiners.models import LoadedModel, load_model

log = logging.getLogger(__name__)


def package_version() -> str:
    try:
        return importlib.metadata.version("refiner")
    except importlib.metadata.PackageNotFoundError:
        return "0.0.0+unknown"


class Service:
    """Owns the model, the refiner and the engine for the lifetime of the app.

    Args:
        settings: the service settings.
        loaded: an already loaded model (tests inject small ones); None loads ``settings.model``.
    """

    def __init__(self, settings: Settings, loaded: LoadedModel | None = None) -> None:
        self.settings = settings
        self.loaded = loaded
        self.engine: Engine | None = None
        self.tokens: PromptTokenizer | None = None
        self.jobs: JobBuilder | None = None
        self.load_error: str | None = None
        self.version = package_version()

    @property
    def ready(self) -> bool:
        return self.engine is not None

    @property
    def model_name(self) -> str:
        return self.loaded.model_id if self.loaded is not None else self.settings.model

    async def start(self) -> None:
        """Load the model off the event loop (so /health answers 503 meanwhile), then start the engine."""
        s = self.settings
        try:
            if self.loaded is None:
                log.info("loading model %s on %s (%s)", s.model, s.device, s.dtype)
                self.loaded = await asyncio.to_thread(load_model, s.model, s.device, s.dtype, s.cache_dir)
            refiner = await asyncio.to_thread(
                Refiner, self.loaded, s.scoring_chunk_size, scoring_pass_bytes=s.scoring_pass_mb * MB
            )
            self.tokens = PromptTokenizer(self.loaded.tokenizer, s, self.loaded.max_position_embeddings)
            tokenizer = self.loaded.tokenizer
            self.jobs = JobBuilder(
                s, refiner.objective.names, lambda text: len(tokenizer.encode(text, add_special_tokens=False))
            )
            engine = Engine(
                self.loaded,
                refiner,
                max_batch_size=s.max_batch_size,
                batch_window_s=s.batch_window_ms / 1000.0,
                max_queue=s.max_queue,
                request_timeout_s=s.request_timeout_s,
                admission=Admission(
                    refiner.cost,
                    memory_limit_bytes=s.memory_limit_bytes,
                    request_memory_bytes=s.request_memory_bytes,
                    request_seconds=s.request_work_s,
                    small_seconds=s.small_request_s,
                ),
                stall_timeout_s=s.stall_timeout_s,
            )
            await asyncio.to_thread(engine.warm_up)
            engine.start()
            self.engine = engine
            device, dtype = self.loaded.device.type, str(self.loaded.dtype).removeprefix("torch.")
            metrics.MODEL_INFO.labels(model_id=self.loaded.model_id, device=device, dtype=dtype).set(1)
            metrics.MEMORY_LIMIT.set(s.memory_limit_bytes)
            log.info("model %s ready on %s (%s)", self.loaded.model_id, self.loaded.device, self.loaded.dtype)
        except Exception as exc:  # keep serving /health with the reason rather than dying silently
            self.load_error = f"{type(exc).__name__}: {exc}"
            log.exception("the model could not be loaded")

    async def stop(self) -> None:
        if self.engine is not None:
            engine, self.engine = self.engine, None
            await asyncio.to_thread(engine.stop)


def get_service(request: Request) -> Service:
    """FastAPI dependency: the ready service, or 503 (with Retry-After) while it is not."""
    service: Service = request.app.state.service
    if not service.ready:
        if service.load_error is not None:
            raise ServiceUnavailable(f"the model failed to load ({service.load_error}): see the server log")
        raise ServiceUnavailable("the model is still loading: retry shortly")
    return service
