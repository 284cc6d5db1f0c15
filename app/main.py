"""The FastAPI application: ``create_app(settings)`` wires settings, routes, middleware and errors.

The model loads in the background after start-up (``Service.start``), so the server accepts
connections at once and ``GET /health`` answers 503 until the engine is ready, then 200.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

from fastapi import FastAPI

from app.auth import APIKeyMiddleware
from app.errors import install_error_handlers
from app.middleware import BodySizeLimitMiddleware, MetricsMiddleware
from app.routes import info, openai, tgi
from app.routes.playground import install_playground
from app.service import Service, package_version
from app.settings import Settings
from refiners.models import LoadedModel

DESCRIPTION = """\
Generates with a causal LM, then refines each output with one gradient-guided step over its token
embeddings, keeping a change only when it raises the objective. Text-generation-inference compatible
(`/generate`, `/generate_stream`, `/`), OpenAI compatible (`/v1/...`), plus `/refine` for any output.
Errors have the TGI shape `{"error": "...", "error_type": "..."}`.
"""


def create_app(settings: Settings | None = None, loaded: LoadedModel | None = None) -> FastAPI:
    """Build the app.

    Args:
        settings: service settings; default ``Settings()`` (read from ``REFINER_*`` variables).
        loaded: an already loaded model to serve instead of loading ``settings.model`` (tests).
    """
    settings = settings or Settings()
    service = Service(settings, loaded)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        loading = asyncio.create_task(service.start())
        try:
            yield
        finally:
            loading.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await loading
            await service.stop()

    app = FastAPI(title="Refiner", version=package_version(), description=DESCRIPTION, lifespan=lifespan)
    app.state.settings = settings
    app.state.service = service
    for module in (tgi, openai, info):
        app.include_router(module.router)
    install_playground(app)
    install_error_handlers(app)
    # Added last = outermost: metrics see every answer (401 and 413 included).
    app.add_middleware(BodySizeLimitMiddleware, max_bytes=settings.max_body_bytes)
    app.add_middleware(APIKeyMiddleware, api_key=settings.api_key)
    app.add_middleware(MetricsMiddleware, routes=app.router.routes)
    return app
