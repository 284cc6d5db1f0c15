"""Exceptions of the HTTP layer and the mapping of every exception to a status code and a TGI error body.

Every error answer has the text-generation-inference shape ``{"error": "...", "error_type": "..."}``:

=============================================  ======  ==================  =============
cause                                          status  error_type          Retry-After
=============================================  ======  ==================  =============
invalid request (schema, limits, refiners)     422     validation
body over ``max_body_bytes``                   413     validation
missing or wrong API key                       401     authentication
unknown route / method                         404/405 not_found / method_not_allowed
engine queue full                              429     overloaded          yes
request over its cost budget (memory or work)  422     validation
memory near the process's ceiling              503     overloaded          yes
model loading / failed to load, engine stopped 503     unavailable         yes
out of memory in one request                   503     out_of_memory       yes
request past its time limit                    504     timeout
NaN/inf inside one request                     424     generation
upstream generator refused it (4xx)            same    upstream's / ...    when 429/503
upstream generator unreachable                 503     upstream_unavail.   yes
upstream generator failed (5xx)                502/503 upstream_error      yes
upstream generator's answer unreadable         502     upstream_malformed
upstream generator did not answer in time      504     upstream_timeout
anything else (a bug)                          500     internal
=============================================  ======  ==================  =============

(The upstream generator is the engine named by ``REFINER_GENERATOR``, see ``app.upstream``.)
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import torch
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from app.admission import MemoryPressureError
from app.engine import EngineStoppedError, QueueFullError, RequestTimeoutError
from refiners.errors import InvalidRequestError, ModelLoadError, NumericalError

log = logging.getLogger(__name__)


class APIError(Exception):
    """An error answer: status code, TGI ``error_type`` and a message saying what to do."""

    status_code = 500
    error_type = "internal"

    def __init__(self, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.headers = headers or {}


class ValidationFailed(APIError):
    """The request is well-formed JSON but breaks a limit that depends on the model or the settings."""

    status_code = 422
    error_type = "validation"


class Unauthorized(APIError):
    status_code = 401
    error_type = "authentication"


class ServiceUnavailable(APIError):
    status_code = 503
    error_type = "unavailable"


class UpstreamError(APIError):
    """The upstream generator (``REFINER_GENERATOR``) could not give the initial output. ``kind`` labels
    ``refiner_upstream_errors_total``; ``retry_after_s`` adds a Retry-After header."""

    status_code = 502
    error_type = "upstream_error"
    kind = "status_5xx"

    def __init__(
        self, message: str, status_code: int | None = None, retry_after_s: int | None = None
    ) -> None:
        super().__init__(message, {"Retry-After": str(retry_after_s)} if retry_after_s is not None else None)
        if status_code is not None:
            self.status_code = status_code


class UpstreamUnreachable(UpstreamError):
    """No connection to the upstream (refused, reset, DNS): 503, retry later."""

    status_code = 503
    error_type = "upstream_unavailable"
    kind = "unreachable"


class UpstreamRejected(UpstreamError):
    """The upstream answered 4xx: the client gets the same status and the upstream's message."""

    error_type = "upstream_rejected"
    kind = "status_4xx"


class UpstreamMalformed(UpstreamError):
    """The upstream answered 200 with something that is not the protocol's answer: 502."""

    error_type = "upstream_malformed"
    kind = "malformed"


class UpstreamTimeout(UpstreamError):
    """The upstream did not connect or answer within ``generator_timeout_s``: 504."""

    status_code = 504
    error_type = "upstream_timeout"
    kind = "timeout"


def error_body(message: str, error_type: str) -> dict[str, str]:
    return {"error": message, "error_type": error_type}


def error_response(
    status: int, message: str, error_type: str, headers: dict[str, str] | None = None
) -> JSONResponse:
    return JSONResponse(error_body(message, error_type), status_code=status, headers=headers)


def _location(loc: Sequence[Any]) -> str:
    # ("body", "parameters", "max_new_tokens") -> "parameters.max_new_tokens"; list indices as [i].
    parts: list[str] = []
    for item in loc:
        if item == "body" and not parts:
            continue
        if isinstance(item, int):
            parts.append(f"[{item}]")
        else:
            parts.append(("." if parts else "") + str(item))
    return "".join(parts) or "body"


def describe_validation_errors(errors: Sequence[dict[str, Any]]) -> str:
    """One readable sentence per pydantic error: where, what is wrong (pydantic says what is wanted)."""
    messages = []
    for err in errors:
        if err.get("type") == "json_invalid":
            messages.append(
                "the request body is not valid JSON: send a JSON object with Content-Type application/json"
            )
            continue
        msg = str(err.get("msg", "invalid value"))
        msg = msg.removeprefix("Value error, ")
        # Union members repeat the same location with a type tag appended; keep the user's path only.
        loc = [
            p
            for p in err.get("loc", ())
            if not (isinstance(p, str) and ("[" in p or p.startswith("function-")))
        ]
        messages.append(f"{_location(loc)}: {msg}")
    # Unions produce one error per member; keep the first few distinct ones.
    unique = list(dict.fromkeys(messages))
    return "; ".join(unique[:5])


def retry_after(settings_retry_s: int) -> dict[str, str]:
    return {"Retry-After": str(settings_retry_s)}


def classify(exc: Exception, retry_after_s: int = 1) -> tuple[int, str, str, dict[str, str]]:
    """Map an exception raised while serving a request to (status, message, error_type, headers).

    Used by the exception handlers and by streaming routes, whose errors after the first byte can
    only be sent as a final ``data: {"error", "error_type"}`` event.
    """
    retry = retry_after(retry_after_s)
    if isinstance(exc, APIError):
        headers = dict(exc.headers)
        if exc.status_code in (429, 503):
            headers.setdefault("Retry-After", retry["Retry-After"])
        return exc.status_code, exc.message, exc.error_type, headers
    if isinstance(exc, InvalidRequestError):
        return 422, str(exc), "validation", {}
    if isinstance(exc, QueueFullError):
        # The engine's message already says to retry later (and when): do not say it twice.
        return 429, str(exc) or "the request queue is full: retry later", "overloaded", retry
    if isinstance(exc, MemoryPressureError):
        return 503, str(exc), "overloaded", retry
    if isinstance(exc, RequestTimeoutError):
        message = str(exc) or "the request took longer than the server's time limit"
        return 504, f"{message}: ask for fewer tokens or candidates", "timeout", {}
    if isinstance(exc, NumericalError):
        return 424, f"generation failed: {exc}", "generation", {}
    if isinstance(exc, torch.OutOfMemoryError):
        log.warning("out of memory in one request: %s", exc)
        message = "the server ran out of memory for this request: retry, or ask for fewer tokens"
        return 503, message, "out_of_memory", retry
    if isinstance(exc, (ModelLoadError, EngineStoppedError)):
        return 503, str(exc), "unavailable", retry
    log.error("unhandled error while serving a request", exc_info=exc)
    return 500, f"internal error ({type(exc).__name__}); the server keeps serving", "internal", {}


def install_error_handlers(app: FastAPI) -> None:
    """Register the exception -> TGI error body mapping on ``app``."""

    def _retry_s(request: Request) -> int:
        settings = getattr(request.app.state, "settings", None)
        return settings.retry_after_s if settings is not None else 1

    async def _classified(request: Request, exc: Exception) -> JSONResponse:
        status, message, error_type, headers = classify(exc, _retry_s(request))
        return error_response(status, message, error_type, headers)

    for exc_class in (
        APIError,
        InvalidRequestError,
        QueueFullError,
        MemoryPressureError,
        RequestTimeoutError,
        NumericalError,
        torch.OutOfMemoryError,
        ModelLoadError,
        EngineStoppedError,
        Exception,
    ):
        app.add_exception_handler(exc_class, _classified)

    @app.exception_handler(RequestValidationError)
    async def _request_validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = exc.errors()
        if errors and all(e.get("loc", ())[:1] == ("body",) and e.get("type") == "missing" for e in errors):
            body = getattr(exc, "body", None)
            if body is None or body == b"":
                return error_response(422, "the request body is empty: send a JSON object", "validation")
        return error_response(422, describe_validation_errors(errors), "validation")

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        kinds = {404: "not_found", 405: "method_not_allowed", 401: "authentication", 413: "validation"}
        messages = {
            404: f"no route {request.url.path}: see /docs",
            405: f"method {request.method} is not allowed on {request.url.path}",
        }
        message = messages.get(exc.status_code, str(exc.detail))
        return error_response(exc.status_code, message, kinds.get(exc.status_code, "http"), exc.headers)
