"""Optional API key: with REFINER_API_KEY set, every route but /health and the playground page needs
the bearer token."""

from __future__ import annotations

import httpx
import pytest

from tests.conftest import LiveServer

KEY = "s3cret-key"
BODY = {"inputs": "Hi", "parameters": {"max_new_tokens": 2, "refine": {"enabled": False}}}


@pytest.fixture(scope="module")
def server(server_factory, tiny_model) -> LiveServer:
    live = server_factory(tiny_model, api_key=KEY)
    yield live
    live.stop()


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("GET", "/info"),
        ("GET", "/metrics"),
        ("GET", "/v1/models"),
        ("POST", "/generate"),
        ("POST", "/"),  # the TGI route; GET / is the (open) playground page
        ("GET", "/openapi.json"),
        ("GET", "/no-such-route"),
    ],
)
def test_routes_need_the_key(server: LiveServer, method: str, path: str):
    with server.client() as client:
        missing = client.request(method, path, json=BODY if method == "POST" else None)
        wrong = client.request(
            method, path, json=BODY if method == "POST" else None, headers={"Authorization": "Bearer nope"}
        )
    for r in (missing, wrong):
        assert r.status_code == 401, r.text
        assert r.json()["error_type"] == "authentication"
        assert r.headers["WWW-Authenticate"] == "Bearer"


def test_health_is_open(server: LiveServer):
    assert httpx.get(f"{server.url}/health").status_code == 200


def test_playground_page_is_open(server: LiveServer):
    """The page asks for the key itself, so it and its files load without one."""
    assert httpx.get(f"{server.url}/").status_code == 200
    assert httpx.get(f"{server.url}/playground/app.js").status_code == 200


def test_right_key_is_accepted(server: LiveServer):
    headers = {"Authorization": f"Bearer {KEY}"}
    with server.client(headers=headers) as client:
        assert client.get("/info").status_code == 200
        assert client.post("/generate", json=BODY).status_code == 200


def test_openai_client_sends_the_key(server: LiveServer):
    import openai

    good = openai.OpenAI(base_url=f"{server.url}/v1", api_key=KEY, max_retries=0)
    assert good.models.list().data[0].id == "tiny-random-llama"
    bad = openai.OpenAI(base_url=f"{server.url}/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.models.list()


def test_no_key_configured_means_open_routes(server_factory, tiny_model):
    live = server_factory(tiny_model)
    try:
        assert httpx.get(f"{live.url}/info").status_code == 200
        assert httpx.post(f"{live.url}/generate", json=BODY, timeout=60).status_code == 200
    finally:
        live.stop()
