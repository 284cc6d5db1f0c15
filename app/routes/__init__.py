"""HTTP routes, one module per protocol: TGI (``tgi``), OpenAI (``openai``), service info (``info``);
``sse`` streams the events of both protocols."""

from __future__ import annotations

from typing import Any

from app.schemas import ErrorResponse

# The error answers a route that queues work may give, for the OpenAPI schema (see ``app.errors``).
ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorResponse} for code in (401, 413, 422, 424, 429, 503, 504)
}
