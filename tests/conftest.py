"""Shared fixtures: real uvicorn servers on loopback ports, the embedded model and a tiny random model.

``live_server(**settings)`` starts ``create_app`` under a real ``uvicorn.Server`` in a background thread,
listening on a socket bound to a free 127.0.0.1 port, and waits until ``GET /health`` answers 200.
Modules start one server each (module-scoped fixtures) to keep the 2-core test machine responsive.
"""

from __future__ import annotations

import os
import socket
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import httpx
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from app.main import create_app  # noqa: E402
from app.settings import Settings  # noqa: E402
from refiners.models import LoadedModel, load_model  # noqa: E402
from tests.tiny_models import tiny_llama  # noqa: E402

START_TIMEOUT_S = 240.0


@dataclass
class LiveServer:
    """A running server: ``url`` (no trailing slash), the app, and the uvicorn server to stop."""

    url: str
    app: Any
    server: Any
    thread: threading.Thread

    def client(self, **kwargs: Any) -> httpx.Client:
        kwargs.setdefault("timeout", 120.0)
        return httpx.Client(base_url=self.url, **kwargs)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=60)


def loopback_socket() -> socket.socket:
    """A TCP socket bound to a free 127.0.0.1 port (not listening yet)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    return sock


def serve_app(app: Any, sock: socket.socket) -> LiveServer:
    """Serve the ASGI ``app`` on ``sock`` under a real uvicorn server in a background thread."""
    import uvicorn

    port = sock.getsockname()[1]
    config = uvicorn.Config(app, log_level="warning", lifespan="on", timeout_graceful_shutdown=5)
    server = uvicorn.Server(config)
    thread = threading.Thread(
        target=server.run, kwargs={"sockets": [sock]}, daemon=True, name=f"uvicorn-{port}"
    )
    thread.start()
    return LiveServer(f"http://127.0.0.1:{port}", app, server, thread)


def start_server(loaded: LoadedModel | None = None, **settings: Any) -> LiveServer:
    """Start a server with ``Settings(**settings)`` (serving ``loaded`` when given) and wait for /health."""
    sock = loopback_socket()
    app = create_app(Settings(host="127.0.0.1", port=sock.getsockname()[1], **settings), loaded)
    live = serve_app(app, sock)
    thread = live.thread
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if not thread.is_alive():
            raise RuntimeError("the test server exited during start-up")
        try:
            r = httpx.get(f"{live.url}/health", timeout=5)
            if r.status_code == 200:
                return live
            if r.json().get("status") == "failed":
                live.stop()
                raise RuntimeError(f"the test server could not load its model: {r.json()['error']}")
        except httpx.TransportError:
            pass
        time.sleep(0.1)
    live.stop()
    raise RuntimeError(f"the test server did not become healthy within {START_TIMEOUT_S} s")


@pytest.fixture(scope="session")
def embedded_model() -> LoadedModel:
    """The embedded SmolLM2-135M-Instruct (converted once into the cache, then ~1 s per load)."""
    return load_model()


@pytest.fixture(scope="session")
def tiny_model(embedded_model: LoadedModel) -> LoadedModel:
    """A 2-layer random-weight Llama with the embedded model's tokenizer (and its chat template):
    every route works, fast, with meaningless text. A 4096-token context, as the server's limits expect."""
    return tiny_llama(embedded_model.tokenizer, seed=0, max_positions=4096)


@pytest.fixture(scope="session")
def server_factory() -> Iterator[Callable[..., LiveServer]]:
    """``server_factory(loaded, **settings)`` starts a server that is stopped at the end of the session
    (modules that want it gone earlier call ``.stop()``)."""
    started: list[LiveServer] = []

    def factory(loaded: LoadedModel | None = None, **settings: Any) -> LiveServer:
        live = start_server(loaded, **settings)
        started.append(live)
        return live

    yield factory
    for live in started:
        if live.thread.is_alive():
            live.stop()


@pytest.fixture
def make_engine(loaded: LoadedModel, refiner: Any) -> Iterator[Callable[..., Any]]:
    """``make_engine(admission=None, **limits)``: a started ``Engine`` over the requesting module's
    ``loaded`` model and ``refiner`` fixtures (``limits``: ``EngineLimits`` fields), stopped after the
    test."""
    from app.engine import Engine, EngineLimits

    engines: list[Engine] = []

    def make(admission: Any = None, **limits: Any) -> Engine:
        limits.setdefault("batch_window_s", 0.05)
        engine = Engine(loaded, refiner, EngineLimits(**limits), admission)
        engine.start()
        engines.append(engine)
        return engine

    yield make
    for engine in engines:
        engine.stop()


def sse_events(lines: Iterator[str]) -> list[dict[str, Any] | str]:
    """Parse ``data: ...`` server-sent events into JSON objects (``[DONE]`` stays a string)."""
    import json

    events: list[dict[str, Any] | str] = []
    for line in lines:
        if not line.startswith("data:"):
            continue
        data = line[len("data:") :].strip()
        events.append(data if data == "[DONE]" else json.loads(data))
    return events
