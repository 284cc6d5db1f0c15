"""The running service: settings, the loaded model, the engine, and whether they are ready.

Routes reach it through ``get_service`` (a FastAPI dependency), which hands out the ``ReadyService``
(every part loaded and running) or answers 503 with Retry-After while the model is still loading, so
no route ever runs against a half-built service.
"""

from __future__ import annotations

import asyncio
import gc
import importlib.metadata
import logging
from dataclasses import dataclass
from functools import partial

from fastapi import Request

from app import metrics
from app.admission import MB, Admission
from app.engine import Engine, EngineLimits, JobRunner
from app.errors import ServiceUnavailable
from app.limits import RequestLimits
from app.settings import Settings
from app.tokenization import PromptTokenizer
from app.torch_thread import TorchThread
from app.upstream import UpstreamClient, upstream_client
from app.upstream_jobs import UpstreamJobs
from refiners import Refiner
from refiners.models import LoadedModel, load_model
from refiners.reward import load_reward_model

log = logging.getLogger(__name__)


def package_version() -> str:
    try:
        return importlib.metadata.version("refiner")
    except importlib.metadata.PackageNotFoundError:
        return "0.0.0+unknown"


@dataclass(frozen=True)
class ReadyService:
    """Everything a route uses, loaded and running: ``get_service`` hands out only this.

    Args:
        settings: the service settings.
        loaded: the served model and its tokenizer.
        engine: the engine that queues, batches and runs the jobs.
        tokens: prompt tokenisation and the token limits.
        limits: the rules of a request that depend on the settings or the model.
        version: the package version.
        jobs: where routes submit generation jobs: the engine, or ``UpstreamJobs`` in front of it when
            another engine generates (``settings.generator``).
        upstream: that engine's client; None when the local model generates.
    """

    settings: Settings
    loaded: LoadedModel
    engine: Engine
    tokens: PromptTokenizer
    limits: RequestLimits
    version: str
    jobs: JobRunner
    upstream: UpstreamClient | None = None

    @property
    def model_name(self) -> str:
        return self.loaded.model_id


class Service:
    """Owns the model, the refiner and the engine for the lifetime of the app.

    Args:
        settings: the service settings.
        loaded: an already loaded model (tests inject small ones); None loads ``settings.model``.

    ``ready`` is None until the model is loaded and the engine started (and after ``stop``);
    ``load_error`` says why loading failed.
    """

    def __init__(self, settings: Settings, loaded: LoadedModel | None = None) -> None:
        self.settings = settings
        self.loaded = loaded
        self.ready: ReadyService | None = None
        self.load_error: str | None = None
        self.version = package_version()

    async def start(self) -> None:
        """Load the model off the event loop (so /health answers 503 meanwhile), then start the engine."""
        s = self.settings
        # Every torch call of the server, the engine's included, runs on this one thread.
        torch_thread = TorchThread()
        try:
            if self.loaded is None:
                log.info("loading model %s on %s (%s)", s.model, s.device, s.dtype)
                load = partial(load_model, pack_weights=s.pack_weights)
                self.loaded = await torch_thread.run(load, s.model, s.device, s.dtype, s.cache_dir)
            loaded = self.loaded
            extra = []
            if s.reward_model:
                log.info("loading reward model %s", s.reward_model)
                dtype = str(loaded.dtype).removeprefix("torch.")
                extra.append(
                    await torch_thread.run(load_reward_model, s.reward_model, str(loaded.device), dtype)
                )
            pass_bytes = None if s.scoring_pass_mb is None else s.scoring_pass_mb * MB
            refiner = await torch_thread.run(
                partial(Refiner, scoring_pass_bytes=pass_bytes),
                loaded,
                s.scoring_chunk_size,
                extra,
            )
            tokens = PromptTokenizer(loaded.tokenizer, s, loaded.max_position_embeddings)
            limits = RequestLimits(
                s,
                tuple(refiner.objective.names),
                lambda text: len(loaded.tokenizer.encode(text, add_special_tokens=False)),
            )
            engine = _engine(s, loaded, refiner, torch_thread)
            await torch_thread.run(engine.warm_up)
            # Start-up leaves some 340,000 long-lived objects (torch, transformers, the vocabulary's
            # tables); a full garbage collection walks them all (0.2 s on the 2-core CPU) in whichever
            # request's step triggers it. Frozen, they are never walked again. On a GPU a 0.33-0.38 s
            # stall of one request's gradient pass went away with this (README, fifth GPU session).
            gc.collect()
            gc.freeze()
            engine.start()
            upstream = upstream_client(s)
            jobs = _job_runner(s, engine, upstream)
            self.ready = ReadyService(s, loaded, engine, tokens, limits, self.version, jobs, upstream)
            device, dtype = loaded.device.type, str(loaded.dtype).removeprefix("torch.")
            metrics.MODEL_INFO.labels(model_id=loaded.model_id, device=device, dtype=dtype).set(1)
            metrics.MEMORY_LIMIT.set(s.memory_limit_bytes)
            log.info("model %s ready on %s (%s)", loaded.model_id, loaded.device, loaded.dtype)
            if upstream is not None:
                log.info("initial outputs come from %s; the local model refines them", upstream.name)
        except Exception as exc:  # keep serving /health with the reason rather than dying silently
            torch_thread.close()
            self.load_error = f"{type(exc).__name__}: {exc}"
            log.exception("the model could not be loaded")

    async def stop(self) -> None:
        if self.ready is not None:
            gc.unfreeze()  # what start-up froze can be collected again once unused (a process that goes on)
            ready, self.ready = self.ready, None
            if ready.upstream is not None:
                await ready.upstream.aclose()
            await asyncio.to_thread(ready.engine.stop)


def _engine(s: Settings, loaded: LoadedModel, refiner: Refiner, torch_thread: TorchThread) -> Engine:
    """The engine over ``refiner`` with the settings' batching, queue, time and cost limits."""
    limits = EngineLimits(
        max_batch_size=s.max_batch_size,
        batch_window_s=s.batch_window_ms / 1000.0,
        max_queue=s.max_queue,
        request_timeout_s=s.request_timeout_s,
        stall_timeout_s=s.stall_timeout_s,
    )
    return Engine(
        loaded,
        refiner,
        limits,
        admission=Admission(
            refiner.cost,
            memory_limit_bytes=s.memory_limit_bytes,
            request_memory_bytes=s.request_memory_bytes,
            request_seconds=s.request_work_s,
            small_seconds=s.small_request_s,
        ),
        torch_thread=torch_thread,
    )


def _job_runner(s: Settings, engine: Engine, upstream: UpstreamClient | None) -> JobRunner:
    """Where routes submit jobs: the engine, or the upstream generator in front of it."""
    if upstream is None:
        return engine
    return UpstreamJobs(upstream, engine, engine.loaded.tokenizer, s.request_timeout_s)


def get_service(request: Request) -> ReadyService:
    """FastAPI dependency: the ready service, or 503 (with Retry-After) while there is none."""
    service: Service = request.app.state.service
    if service.ready is None:
        if service.load_error is not None:
            raise ServiceUnavailable(f"the model failed to load ({service.load_error}): see the server log")
        raise ServiceUnavailable("the model is still loading: retry shortly")
    return service.ready
