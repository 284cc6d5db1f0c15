"""Optional API key: when ``REFINER_API_KEY`` is set, every route but the probes (``/health``,
``/ready``) and the playground page (``GET /`` and its files under ``/playground/``) needs
``Authorization: Bearer <key>``. The page is open because it is what asks for the key; every API call it
makes sends the key.

Done as ASGI middleware rather than a route dependency so that it also covers the built-in routes
(``/openapi.json``, ``/docs``) and unknown paths, which answer 401 instead of revealing a 404.
"""

from __future__ import annotations

import hmac

from starlette.types import ASGIApp, Receive, Scope, Send

from app.errors import error_response

OPEN_PATHS = frozenset({"/health", "/ready"})
PAGE_PREFIX = "/playground/"  # the playground's static files (app.routes.playground)


def is_open(scope: Scope) -> bool:
    """Probes, and reads of the playground page (``GET /``, not the TGI ``POST /``) and its files."""
    path = scope["path"]
    if path in OPEN_PATHS:
        return True
    return scope.get("method") in ("GET", "HEAD") and (path == "/" or path.startswith(PAGE_PREFIX))


def bearer_token(headers: list[tuple[bytes, bytes]]) -> str | None:
    """The token of an ``Authorization: Bearer <token>`` header, or None."""
    for name, value in headers:
        if name.lower() == b"authorization":
            scheme, _, token = value.decode("latin-1").partition(" ")
            if scheme.lower() == "bearer" and token.strip():
                return token.strip()
    return None


class APIKeyMiddleware:
    """Answer 401 (TGI error body, ``WWW-Authenticate: Bearer``) unless the bearer token matches."""

    def __init__(self, app: ASGIApp, api_key: str | None) -> None:
        self.app = app
        self.api_key = api_key

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not self.api_key or is_open(scope):
            await self.app(scope, receive, send)
            return
        token = bearer_token(scope.get("headers", []))
        # Constant-time comparison: the time taken must not reveal how much of the key matched.
        if token is not None and hmac.compare_digest(token.encode(), self.api_key.encode()):
            await self.app(scope, receive, send)
            return
        message = "missing API key: send Authorization: Bearer <key>" if token is None else "invalid API key"
        response = error_response(401, message, "authentication", {"WWW-Authenticate": "Bearer"})
        await response(scope, receive, send)
