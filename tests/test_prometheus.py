"""A real Prometheus scrapes /metrics and a PromQL query sees refiner_requests_total grow.

Needs the ``prometheus`` binary (Debian package ``prometheus``; ``make prometheus`` installs it):
the test is skipped, saying so, when it is missing.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from pathlib import Path

import httpx
import pytest

from tests.conftest import LiveServer

PROMETHEUS = shutil.which("prometheus")
pytestmark = pytest.mark.skipif(
    PROMETHEUS is None, reason="the prometheus binary is not on PATH: run `make prometheus` (apt package)"
)
QUERY = 'sum(refiner_requests_total{route="/generate",status="200"})'


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(server_factory, tiny_model) -> LiveServer:
    live = server_factory(tiny_model)
    yield live
    live.stop()


@pytest.fixture(scope="module")
def prometheus(server: LiveServer, tmp_path_factory) -> str:
    """A Prometheus scraping the server every second; yields its base URL."""
    work: Path = tmp_path_factory.mktemp("prometheus")
    target = server.url.removeprefix("http://")
    (work / "prometheus.yml").write_text(
        "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n"
        "scrape_configs:\n  - job_name: refiner\n    metrics_path: /metrics\n"
        f"    static_configs:\n      - targets: ['{target}']\n"
    )
    port = free_port()
    log = (work / "prometheus.log").open("w")
    proc = subprocess.Popen(
        [
            PROMETHEUS,
            f"--config.file={work / 'prometheus.yml'}",
            f"--storage.tsdb.path={work / 'data'}",
            f"--web.listen-address=127.0.0.1:{port}",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            assert proc.poll() is None, (work / "prometheus.log").read_text()[-2000:]
            try:
                if httpx.get(f"{url}/-/ready", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        else:
            pytest.fail("prometheus did not become ready within 60 s")
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


def query(prometheus: str) -> float | None:
    r = httpx.get(f"{prometheus}/api/v1/query", params={"query": QUERY}, timeout=5)
    result = r.json()["data"]["result"]
    return float(result[0]["value"][1]) if result else None


def wait_for(prometheus: str, predicate, timeout_s: float = 60.0) -> float | None:
    deadline = time.monotonic() + timeout_s
    value = None
    while time.monotonic() < deadline:
        value = query(prometheus)
        if predicate(value):
            return value
        time.sleep(0.5)
    return value


def test_prometheus_sees_the_request_counter_grow(server: LiveServer, prometheus: str):
    body = {"inputs": "Hello", "parameters": {"max_new_tokens": 2, "refine": {"enabled": False}}}
    with server.client() as client:
        assert client.post("/generate", json=body).status_code == 200
        first = wait_for(prometheus, lambda v: v is not None and v >= 1)
        assert first is not None, "Prometheus never scraped a refiner_requests_total sample"
        for _ in range(3):
            assert client.post("/generate", json=body).status_code == 200
    grown = wait_for(prometheus, lambda v: v is not None and v >= first + 3)
    assert grown is not None and grown >= first + 3, f"the counter did not grow: {first} -> {grown}"
    up = httpx.get(f"{prometheus}/api/v1/query", params={"query": 'up{job="refiner"}'}).json()
    assert up["data"]["result"][0]["value"][1] == "1"
