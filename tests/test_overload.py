"""Overload: a full queue answers 429 with Retry-After, nothing is dropped silently, and the server
recovers; a request past its time limit gets a clear 504."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from app.engine import QueueFullError
from app.errors import classify
from tests.conftest import LiveServer

# Long enough that the single worker is busy while the burst arrives.
SLOW = {"inputs": "Tell me a story", "parameters": {"max_new_tokens": 48, "refine": {"candidates": 16}}}
QUICK = {"inputs": "Hi", "parameters": {"max_new_tokens": 2, "refine": {"enabled": False}}}
BURST = 12


@pytest.fixture(scope="module")
def server(server_factory, tiny_model) -> LiveServer:
    # A roomy work budget: these tests want long requests admitted, whatever the machine's speed.
    live = server_factory(
        tiny_model, max_batch_size=1, max_queue=1, batch_window_ms=0, retry_after_s=2, max_request_work_s=3600
    )
    yield live
    live.stop()


def test_full_queue_answers_429_then_recovers(server: LiveServer):
    def post(_: int) -> httpx.Response:
        return httpx.post(f"{server.url}/generate", json=SLOW, timeout=120)

    with ThreadPoolExecutor(BURST) as pool:
        responses = list(pool.map(post, range(BURST)))
    statuses = [r.status_code for r in responses]
    assert set(statuses) <= {200, 429}, statuses  # every request is answered, none dropped
    assert 200 in statuses
    rejected = [r for r in responses if r.status_code == 429]
    assert rejected, f"a burst of {BURST} on a queue of 1 should be refused in part: {statuses}"
    for r in rejected:
        assert r.headers["Retry-After"] == "2"
        assert r.json()["error_type"] == "overloaded"
        assert r.json()["error"].count("retry later") == 1, r.json()["error"]
    # Recovery: once the burst is over, requests are served again.
    after = httpx.post(f"{server.url}/generate", json=QUICK, timeout=120)
    assert after.status_code == 200, after.text
    metrics = httpx.get(f"{server.url}/metrics").text
    assert 'refiner_rejected_requests_total{reason="queue_full"}' in metrics
    assert 'refiner_requests_total{route="/generate",status="429"}' in metrics


def test_queue_full_message_says_retry_later_once():
    for exc in (QueueFullError("the server is busy (1 requests waiting): retry later"), QueueFullError()):
        status, message, error_type, headers = classify(exc, retry_after_s=2)
        assert (status, error_type, headers) == (429, "overloaded", {"Retry-After": "2"})
        assert message.count("retry later") == 1, message


def test_full_queue_also_refuses_streams_with_429(server: LiveServer):
    def post(i: int) -> int:
        path = "/generate_stream" if i % 2 else "/generate"
        with httpx.stream("POST", f"{server.url}{path}", json=SLOW, timeout=120) as r:
            r.read()
            return r.status_code

    with ThreadPoolExecutor(BURST) as pool:
        statuses = list(pool.map(post, range(BURST)))
    assert set(statuses) <= {200, 429}, statuses
    assert 429 in statuses and 200 in statuses


def test_request_past_its_time_limit_gets_504(server_factory, tiny_model):
    # The work budget stays roomy: the request is admitted, then runs out of time.
    live = server_factory(tiny_model, request_timeout_s=0.001, max_request_work_s=600)
    try:
        r = httpx.post(f"{live.url}/generate", json=SLOW, timeout=120)
        assert r.status_code == 504, r.text
        assert r.json()["error_type"] == "timeout"
    finally:
        live.stop()


def test_client_that_disconnects_frees_its_work(server: LiveServer):
    long = {
        "inputs": "Tell me a long story",
        "parameters": {"max_new_tokens": 400, "refine": {"candidates": 64}},
    }
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{server.url}/generate", json=long, timeout=httpx.Timeout(10.0, read=0.3))
    # The route sees the disconnect, cancels the engine job and records the request as 499.
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        metrics = httpx.get(f"{server.url}/metrics").text
        if 'refiner_requests_total{route="/generate",status="499"}' in metrics:
            break
        time.sleep(0.1)
    else:
        pytest.fail("the server never noticed the client had gone")
    # The worker is free again: a quick request is served.
    r = httpx.post(f"{server.url}/generate", json=QUICK, timeout=120)
    assert r.status_code == 200, r.text
