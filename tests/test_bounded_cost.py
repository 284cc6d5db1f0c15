"""Bounded cost per request: estimates before work, budgets and the memory ceiling, work that stops
when nobody waits, small jobs served while a large one runs, and a liveness signal that tells the truth."""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import replace
from typing import Any

import httpx
import pytest

from app.admission import (
    Admission,
    JobShape,
    MemoryPressureError,
    RequestTooCostlyError,
    Speed,
    resident_bytes,
)
from app.engine import Job, QueueFullError, RequestTimeoutError
from refiners import RefineConfig, Refiner, RefineRequest
from refiners.generation import SamplingParams
from refiners.models import LoadedModel
from refiners.scoring import plan_passes

MB = 2**20


@pytest.fixture(scope="module")
def loaded(tiny_model) -> LoadedModel:
    return tiny_model


@pytest.fixture(scope="module")
def refiner(tiny_model) -> Refiner:
    return Refiner(tiny_model)


def admission(refiner: Refiner, **kwargs: Any) -> Admission:
    kwargs.setdefault("memory_limit_bytes", 10**15)
    kwargs.setdefault("request_memory_bytes", 10**15)
    kwargs.setdefault("request_seconds", 10**9)
    kwargs.setdefault("small_seconds", 10**9)
    return Admission(refiner.cost, **kwargs)


# -- estimates ----------------------------------------------------------------------------------


def test_the_estimate_grows_with_every_parameter_that_adds_work(refiner):
    base = JobShape(prompt_tokens=100, output_tokens=64, refine=RefineConfig())
    cost = admission(refiner, speed=Speed(decode_step_s=0.01, token_row_s=0.001)).estimate
    bigger = [
        replace(base, prompt_tokens=400),
        replace(base, output_tokens=256),
        replace(base, refine=RefineConfig(candidates=64)),
        replace(base, refine=RefineConfig(steps=4)),
        replace(base, keyword_tokens=8),
    ]
    for shape in bigger:
        assert cost(shape).seconds > cost(base).seconds, shape
    # Attention maps dominate the gradient pass of a long prompt and output.
    long = replace(base, prompt_tokens=900, output_tokens=500)
    coverage = replace(long, refine=RefineConfig(weights={"prompt_coverage": 1.0}))
    assert cost(coverage).memory_bytes > cost(long).memory_bytes


def test_a_request_over_the_memory_budget_is_refused_naming_a_value_that_fits(refiner):
    shape = JobShape(
        prompt_tokens=900, output_tokens=500, refine=RefineConfig(weights={"prompt_coverage": 1.0})
    )
    budget = admission(refiner).estimate(shape).memory_bytes // 2
    guard = admission(refiner, request_memory_bytes=budget)
    with pytest.raises(RequestTooCostlyError) as refused:
        guard.admit(shape)
    message = str(refused.value)
    assert "MB of memory" in message and "max_new_tokens to " in message
    fitting = int(message.split("max_new_tokens to ")[1].split()[0].rstrip(","))
    assert 1 <= fitting < 500
    guard.admit(replace(shape, output_tokens=fitting))  # the advice is right: it fits
    with pytest.raises(RequestTooCostlyError):
        guard.admit(replace(shape, output_tokens=fitting + 1))  # and it is the largest that does


def test_a_request_over_the_time_budget_is_refused_naming_candidates(refiner):
    guard = admission(refiner, speed=Speed(decode_step_s=0.0, token_row_s=0.01), request_seconds=60)
    shape = JobShape(prompt_tokens=50, output_tokens=200, refine=RefineConfig(candidates=256))
    with pytest.raises(RequestTooCostlyError, match=r"s of work on this server.*refine\.candidates to \d+"):
        guard.admit(shape)
    # When no one parameter is enough, the message lists them with their values.
    many_steps = replace(shape, refine=RefineConfig(candidates=256, steps=8))
    with pytest.raises(RequestTooCostlyError, match=r"lower several of .*refine\.steps \(now 8\)"):
        guard.admit(many_steps)


def test_near_the_memory_ceiling_new_work_is_refused_with_memory_pressure(refiner):
    guard = admission(refiner, memory_limit_bytes=resident_bytes())
    with pytest.raises(MemoryPressureError, match="memory ceiling"):
        guard.admit(JobShape(prompt_tokens=10, output_tokens=8, refine=RefineConfig()))


@pytest.mark.parametrize("near_ceiling", [False, True])
def test_freed_memory_is_handed_back_only_when_holding_it_could_refuse_a_request(
    loaded, refiner, make_engine, monkeypatch, near_ceiling: bool
):
    released = []
    monkeypatch.setattr("app.engine.release_free_memory", lambda: released.append(1))
    budget = 2**30  # what one request may need; the ceiling leaves half of it, or far more
    room = budget // 2 if near_ceiling else 10**12
    guard = admission(
        refiner, memory_limit_bytes=resident_bytes() + room, request_memory_bytes=budget, small_seconds=0
    )
    assert guard.holds_too_much() is near_ceiling
    engine = make_engine(admission=guard)
    # small_seconds 0: the job counts as large, after which memory used to be handed back every time
    asyncio.run(asyncio.wait_for(engine.submit(small_job(loaded)), timeout=30))
    engine.stop()
    assert bool(released) is near_ceiling


# -- passes sized by memory ---------------------------------------------------------------------


def test_passes_never_hold_more_rows_than_fit_their_memory():
    suffixes = [40, 30, 30, 20, 10, 10, 5, 5]
    assert plan_passes(suffixes, 64, 1000.0) == [(0, 8)]  # a pass is costly: one, without a memory bound
    passes = plan_passes(suffixes, 64, 1000.0, rows_that_fit=lambda s: 200 // s)
    for first, last in passes:
        assert last - first <= 200 // suffixes[first]
    assert [i for first, last in passes for i in range(first, last)] == list(range(len(suffixes)))


def test_scores_are_the_same_whatever_the_pass_memory_budget(loaded):
    roomy, tight = Refiner(loaded), Refiner(loaded, scoring_pass_bytes=1)  # tight: one row a pass
    prompt = loaded.tokenizer.encode("A dog and a cat")
    outputs = [
        loaded.tokenizer.encode(t, add_special_tokens=False) for t in ("a b c", "the dog ran far", "x")
    ]
    config = RefineConfig(keywords=("dog",))
    roomy_totals = [s["total"] for s in roomy.score(prompt, outputs, config)]
    tight_totals = [s["total"] for s in tight.score(prompt, outputs, config)]
    assert roomy_totals == pytest.approx(tight_totals, abs=1e-4)


def test_refinement_runs_the_checkpoint_between_passes_and_stops_when_it_raises(loaded, refiner):
    prompt = loaded.tokenizer.encode("A dog and a cat")
    output = loaded.tokenizer.encode(" the cat sat on a mat today", add_special_tokens=False)
    calls = 0

    def checkpoint() -> None:
        nonlocal calls
        calls += 1

    refiner.refine([RefineRequest(prompt, output, RefineConfig(keywords=("dog",), steps=2))], checkpoint)
    assert calls >= 3  # before each step, and before each pass's chunks

    class Stop(Exception):
        pass

    def stop() -> None:
        raise Stop

    with pytest.raises(Stop):
        refiner.refine([RefineRequest(prompt, output, RefineConfig(keywords=("dog",)))], stop)


# -- the engine ---------------------------------------------------------------------------------


class SlowRefinement:
    """Stands in for a long refinement that honours the checkpoint protocol: it calls ``checkpoint``
    every 20 ms until released (or 60 s pass). Installed on the engine's refiner for one test."""

    def __init__(self, refiner: Refiner, monkeypatch: pytest.MonkeyPatch) -> None:
        self.started, self.release, self.stopped = threading.Event(), threading.Event(), threading.Event()
        original = refiner.refine

        def refine(requests, checkpoint=lambda: None):
            if requests[0].config.keywords != ("slow",):
                return original(requests, checkpoint)
            self.started.set()
            try:
                deadline = time.monotonic() + 60
                while not self.release.is_set() and time.monotonic() < deadline:
                    checkpoint()
                    time.sleep(0.02)
            except BaseException:
                self.stopped.set()
                raise
            return original(requests, checkpoint)

        monkeypatch.setattr(refiner, "refine", refine)


def slow_job(loaded: LoadedModel, max_new_tokens: int = 16, timeout_s: float | None = None) -> Job:
    prompt = loaded.tokenizer.encode("Tell a long story")
    config = RefineConfig(keywords=("slow",), candidates=2)
    return Job(prompt, SamplingParams(max_new_tokens=max_new_tokens), config, timeout_s=timeout_s)


def small_job(loaded: LoadedModel) -> Job:
    return Job(loaded.tokenizer.encode("Hi"), SamplingParams(max_new_tokens=2), RefineConfig(candidates=2))


def test_a_refinement_past_its_deadline_stops_and_frees_the_worker(loaded, refiner, make_engine, monkeypatch):
    slow = SlowRefinement(refiner, monkeypatch)
    engine = make_engine()

    async def scenario() -> None:
        with pytest.raises(RequestTimeoutError):
            await engine.submit(slow_job(loaded, timeout_s=1.0))
        assert slow.started.is_set()
        # The refinement stops at its next checkpoint, not after its 60 s, and the worker is free.
        assert await asyncio.to_thread(slow.stopped.wait, 10)
        await asyncio.wait_for(engine.submit(small_job(loaded)), timeout=30)

    asyncio.run(scenario())


def test_a_refinement_whose_caller_left_stops(loaded, refiner, make_engine, monkeypatch):
    slow = SlowRefinement(refiner, monkeypatch)
    engine = make_engine()

    async def scenario() -> None:
        task = asyncio.ensure_future(engine.submit(slow_job(loaded)))
        assert await asyncio.to_thread(slow.started.wait, 30)
        task.cancel()  # what a client disconnect does (app.disconnect)
        assert await asyncio.to_thread(slow.stopped.wait, 10)

    asyncio.run(scenario())


def test_small_jobs_are_answered_while_a_large_one_runs(loaded, refiner, make_engine, monkeypatch):
    slow = SlowRefinement(refiner, monkeypatch)
    # One second per decode step: the 16-token slow job is large, a 2-token job small.
    engine = make_engine(admission=admission(refiner, speed=Speed(decode_step_s=1.0), small_seconds=5))

    async def scenario() -> None:
        large = asyncio.ensure_future(engine.submit(slow_job(loaded)))
        assert await asyncio.to_thread(slow.started.wait, 30)
        smalls = [await asyncio.wait_for(engine.submit(small_job(loaded)), timeout=30) for _ in range(3)]
        assert all(s.text is not None for s in smalls)
        assert not large.done()  # answered while the large job was still refining
        slow.release.set()
        await asyncio.wait_for(large, timeout=60)

    asyncio.run(scenario())


def test_a_job_that_could_not_finish_behind_the_work_ahead_is_refused(
    loaded, refiner, make_engine, monkeypatch
):
    slow = SlowRefinement(refiner, monkeypatch)
    # One second per decode step: each 16-token job is estimated at about 16 s, the limit is 25 s.
    engine = make_engine(
        admission=admission(refiner, speed=Speed(decode_step_s=1.0), small_seconds=5), request_timeout_s=25
    )

    async def scenario() -> None:
        first = asyncio.ensure_future(engine.submit(slow_job(loaded)))
        assert await asyncio.to_thread(slow.started.wait, 30)
        with pytest.raises(QueueFullError, match="work ahead of this request"):
            await engine.submit(slow_job(loaded))
        await asyncio.wait_for(engine.submit(small_job(loaded)), timeout=30)  # small jobs pass
        slow.release.set()
        await asyncio.wait_for(first, timeout=60)

    asyncio.run(scenario())


def test_a_worker_that_makes_no_progress_while_work_waits_is_stalled(
    loaded, refiner, make_engine, monkeypatch
):
    engine = make_engine(stall_timeout_s=0.3)
    entered, release = threading.Event(), threading.Event()
    original = engine.generator.generate

    def wedged(*args: Any, **kwargs: Any):
        entered.set()
        release.wait(timeout=30)  # no checkpoint: no progress
        return original(*args, **kwargs)

    monkeypatch.setattr(engine.generator, "generate", wedged)

    async def scenario() -> None:
        assert not engine.stalled()
        task = asyncio.ensure_future(engine.submit(small_job(loaded)))
        assert await asyncio.to_thread(entered.wait, 30)
        await asyncio.sleep(0.6)
        assert engine.stalled()
        release.set()
        await asyncio.wait_for(task, timeout=30)
        assert not engine.stalled()

    asyncio.run(scenario())


# -- over HTTP ----------------------------------------------------------------------------------

MAXIMAL = {
    "inputs": "The dog ran. " * 200,
    "output": "The dog ran. " * 100,
    "parameters": {
        "refine": {
            "method": "hybrid",
            "steps": 8,
            "candidates": 256,
            "keywords": [f"keyword {i} " + "x" * 40 for i in range(32)],
            "weights": {"prompt_coverage": 1.0},
        }
    },
}
QUICK = {"inputs": "Hi", "parameters": {"max_new_tokens": 2}}


@pytest.fixture
def serve(server_factory, tiny_model) -> Callable[..., contextlib.AbstractContextManager[httpx.Client]]:
    """``with serve(**settings) as client``: a tiny-model server with those settings, stopped after."""

    @contextlib.contextmanager
    def serving(**settings: Any) -> Iterator[httpx.Client]:
        live = server_factory(tiny_model, **settings)
        try:
            with live.client() as client:
                yield client
        finally:
            live.stop()

    return serving


def test_a_maximal_request_is_refused_at_once_and_the_server_keeps_serving(serve):
    with serve(max_request_memory_mb=512) as client:
        r = client.post("/refine", json=MAXIMAL)
        assert r.status_code == 422, r.text
        body = r.json()
        assert body["error_type"] == "validation"
        assert "MB of memory" in body["error"] and "lower" in body["error"]
        assert client.post("/generate", json=QUICK).status_code == 200
        assert client.get("/health").json()["status"] == "ok"


def test_keywords_too_long_in_characters_or_tokens_are_refused_and_a_healthy_replica_is_ready(serve):
    with serve() as client:
        long = {**QUICK, "parameters": {"refine": {"keywords": ["x" * 65]}}}
        r = client.post("/generate", json=long)
        assert r.status_code == 422 and "keywords" in r.json()["error"], r.text
        many_tokens = {**QUICK, "parameters": {"refine": {"keywords": ["a b c d e f g h i j k l m n o p q"]}}}
        r = client.post("/generate", json=many_tokens)
        assert r.status_code == 422 and "tokens long" in r.json()["error"], r.text
        r = client.get("/ready")
        assert r.status_code == 200 and r.json()["status"] == "ok"


def test_near_the_memory_ceiling_requests_get_503_and_the_replica_is_not_ready(serve):
    # A ceiling below what the process holds already (and a request budget that would admit the work).
    with serve(memory_limit_mb=256, max_request_memory_mb=1024, retry_after_s=3) as client:
        r = client.post("/generate", json=QUICK)
        assert r.status_code == 503, r.text
        assert r.headers["Retry-After"] == "3"
        assert r.json()["error_type"] == "overloaded" and "memory ceiling" in r.json()["error"]
        ready = client.get("/ready")
        assert ready.status_code == 503 and ready.json()["status"] == "busy"
        assert client.get("/health").status_code == 200  # alive: nothing to restart


def test_passes_are_sized_for_the_device_unless_set(loaded):
    cpu = Refiner(loaded).runner
    assert (cpu.chunk_size, cpu.pass_bytes, cpu.pass_overhead) == (64, 256 * MB, 32.0)
    assert Refiner(loaded).cost.pass_bytes == 256 * MB  # the admission estimates plan the same passes
    set_ = Refiner(loaded, scoring_chunk_size=8, scoring_pass_bytes=64 * MB)
    assert (set_.runner.chunk_size, set_.runner.pass_bytes, set_.cost.pass_bytes) == (8, 64 * MB, 64 * MB)
