"""ASGI middleware of the service: request body size limit and per-request metrics.

Both are plain ASGI (not ``BaseHTTPMiddleware``) so that streaming responses pass through untouched
and client disconnects reach the route.
"""

from __future__ import annotations

import time

from starlette.exceptions import HTTPException
from starlette.routing import BaseRoute, Match
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app import metrics
from app.errors import error_response


def _too_large(limit: int) -> str:
    return f"the request body is larger than {limit} bytes: send a smaller request"


class BodySizeLimitMiddleware:
    """Answer 413 for bodies over ``max_bytes`` before anything parses them.

    A ``Content-Length`` over the limit is refused at once; a chunked body is counted as it arrives
    and refused as soon as it passes the limit (FastAPI re-raises an ``HTTPException`` from the body
    reader, and the error handlers turn it into a 413 TGI body).
    """

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        for name, value in scope.get("headers", []):
            if name == b"content-length":
                try:
                    declared = int(value)
                except ValueError:
                    declared = 0
                if declared > self.max_bytes:
                    response = error_response(413, _too_large(self.max_bytes), "validation")
                    await response(scope, receive, send)
                    return
        received = 0

        async def limited_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    raise HTTPException(status_code=413, detail=_too_large(self.max_bytes))
            return message

        await self.app(scope, limited_receive, send)


def route_label(scope: Scope, routes: list[BaseRoute]) -> str:
    """The route template (``/v1/completions``), never the raw path: keeps label cardinality bounded.

    The router leaves the matched route in the scope; requests answered before routing (401, 413)
    are matched here against the same routes.
    """
    path = getattr(scope.get("route"), "path", None)
    if isinstance(path, str):
        return path
    for route in routes:
        match, _ = route.matches(scope)
        if match == Match.FULL:
            return getattr(route, "path", "unmatched")
    return "unmatched"


class MetricsMiddleware:
    """Record ``refiner_requests_total{route,status}``, ``refiner_request_duration_seconds{route}``
    and ``refiner_requests_in_flight`` for every HTTP request.

    The duration of a streaming response runs until its last byte is sent.
    """

    def __init__(self, app: ASGIApp, routes: list[BaseRoute]) -> None:
        self.app = app
        self.routes = routes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status = 500  # what the client sees if the app raises before sending a response
        metrics.REQUESTS_IN_FLIGHT.inc()

        async def recording_send(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, recording_send)
        finally:
            metrics.REQUESTS_IN_FLIGHT.dec()
            route = route_label(scope, self.routes)
            metrics.REQUESTS_TOTAL.labels(route=route, status=str(status)).inc()
            metrics.REQUEST_DURATION.labels(route=route).observe(time.perf_counter() - start)
