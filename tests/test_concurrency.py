"""64 concurrent requests with distinct prompts each get their own answer: the one the same prompt
(and seed) gets when sent alone."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from tests.conftest import LiveServer

pytestmark = pytest.mark.integration

N = 64
SUBJECTS = ["cats", "rivers", "mountains", "bread", "music", "winter", "trains", "stars"]


def request(i: int) -> dict:
    # Distinct prompts; odd ones sample with their own seed, even ones decode greedily.
    parameters = {"max_new_tokens": 4, "details": True, "refine": {"enabled": False}}
    if i % 2:
        parameters.update(do_sample=True, seed=1000 + i, temperature=0.9)
    return {"inputs": f"Fact {i} about {SUBJECTS[i % len(SUBJECTS)]}:", "parameters": parameters}


def answer(r: httpx.Response) -> tuple[str, list[int], int | None]:
    assert r.status_code == 200, r.text
    details = r.json()["details"]
    return r.json()["generated_text"], [t["id"] for t in details["tokens"]], details["seed"]


@pytest.fixture(scope="module")
def server(server_factory, embedded_model) -> LiveServer:
    live = server_factory(embedded_model, max_batch_size=8, max_queue=N, batch_window_ms=20)
    yield live
    live.stop()


def test_concurrent_answers_are_never_mixed(server: LiveServer):
    with httpx.Client(base_url=server.url, timeout=300) as client:
        alone = [answer(client.post("/generate", json=request(i))) for i in range(N)]

    before = batches(server)

    def post(i: int) -> tuple[str, list[int], int | None]:
        return answer(httpx.post(f"{server.url}/generate", json=request(i), timeout=300))

    with ThreadPoolExecutor(N) as pool:
        together = list(pool.map(post, range(N)))

    for i in range(N):
        assert together[i] == alone[i], f"request {i}: {together[i]} != {alone[i]} (alone)"
    seeds = [seed for _, _, seed in together]
    assert seeds[1::2] == [1000 + i for i in range(1, N, 2)]
    # They did share batches: fewer engine batches than requests.
    assert batches(server) - before < N


def batches(server: LiveServer) -> float:
    metrics = httpx.get(f"{server.url}/metrics").text
    return float(
        next(line.split()[-1] for line in metrics.splitlines() if line.startswith("refiner_batch_size_count"))
    )
