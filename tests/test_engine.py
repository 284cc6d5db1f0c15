"""Engine: batching keeps answers apart, overload/cancel/timeout are handled, a bad job fails alone."""

from __future__ import annotations

import asyncio
import threading
from typing import Any

import pytest
from prometheus_client import REGISTRY

from app.engine import (
    Engine,
    EngineStoppedError,
    Job,
    JobResult,
    QueueFullError,
    RequestTimeoutError,
    TokenEvent,
)
from app.torch_thread import TorchThread
from refiners import RefineConfig, Refiner, RefineRequest
from refiners.errors import InvalidRequestError, NumericalError
from refiners.generation import BatchGenerator, GenerationOutput, SamplingParams
from refiners.models import LoadedModel
from tests.tiny_models import embedded_tokenizer, tiny_llama

POISON = 777  # a prompt holding this token makes the model produce NaN logits (see poison_model)
REFINE = RefineConfig(candidates=4, keywords=("cat",))


@pytest.fixture(scope="module")
def loaded() -> LoadedModel:
    return tiny_llama(embedded_tokenizer())


@pytest.fixture(scope="module")
def refiner(loaded) -> Refiner:
    return Refiner(loaded)


def encode(loaded: LoadedModel, text: str) -> list[int]:
    return loaded.tokenizer.encode(text)


def alone(loaded: LoadedModel, prompt: list[int], params: SamplingParams) -> GenerationOutput:
    return BatchGenerator(loaded).generate([prompt], [params])[0]


class Gate:
    """Holds the engine's worker inside ``generate`` until ``open()``, to fill the queue on purpose."""

    def __init__(self, engine: Engine) -> None:
        self.entered = threading.Event()
        self.release = threading.Event()
        self.left = threading.Event()  # a generate call returned or raised
        self.outputs: list[list[GenerationOutput]] = []
        original = engine.generator.generate

        def gated(*args: Any, **kwargs: Any) -> list[GenerationOutput]:
            self.entered.set()
            self.release.wait(timeout=60)
            try:
                outs = original(*args, **kwargs)
            finally:
                self.left.set()
            self.outputs.append(outs)
            return outs

        engine.generator.generate = gated  # type: ignore[method-assign]

    async def wait_entered(self) -> None:
        while not self.entered.is_set():
            await asyncio.sleep(0.01)

    def open(self) -> None:
        self.release.set()


def metric(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


def test_concurrent_jobs_each_get_their_own_answer(loaded, make_engine):
    engine = make_engine(max_batch_size=8, batch_window_s=0.2)
    prompts = [
        encode(loaded, t) for t in ("Hello there", "Hi", "A much longer prompt about cats and dogs", "Why?")
    ]
    params = [
        SamplingParams(max_new_tokens=6),
        SamplingParams(max_new_tokens=3, do_sample=True, seed=7, top_k=20),
        SamplingParams(max_new_tokens=8, do_sample=True, seed=8, temperature=0.8, top_p=0.9),
        SamplingParams(max_new_tokens=5, repetition_penalty=1.2),
    ]
    tokens_before = metric("refiner_generated_tokens_total")
    batches_before = metric("refiner_batch_size_count")

    async def main() -> list[JobResult]:
        return await asyncio.gather(
            *(engine.submit(Job(p, sp, None)) for p, sp in zip(prompts, params, strict=True))
        )

    results = asyncio.run(main())
    for prompt, sp, result in zip(prompts, params, results, strict=True):
        expected = alone(loaded, prompt, sp)
        assert result.generation is not None and result.refinement is None
        assert result.generation.token_ids == expected.token_ids
        assert result.text == expected.text
        assert result.generation.seed == sp.seed
    assert max(r.batch_size for r in results) > 1  # they were batched
    assert metric("refiner_generated_tokens_total") - tokens_before == sum(
        len(r.generation.token_ids) for r in results if r.generation
    )
    assert metric("refiner_batch_size_count") > batches_before


def test_jobs_that_keep_arriving_within_the_window_share_one_batch(loaded, make_engine):
    # Five jobs 0.1 s apart span 0.4 s, more than the 0.3 s window: each arrival keeps the batch open.
    engine = make_engine(max_batch_size=8, batch_window_s=0.3)
    params = SamplingParams(max_new_tokens=2)

    async def main() -> list[JobResult]:
        async def submit_after(k: int) -> JobResult:
            await asyncio.sleep(0.1 * k)
            return await engine.submit(Job(encode(loaded, f"Prompt number {k}"), params, None))

        return await asyncio.gather(*(submit_after(k) for k in range(5)))

    assert [r.batch_size for r in asyncio.run(main())] == [5] * 5


def test_refinement_is_batched_and_matches_refining_alone(loaded, refiner, make_engine):
    engine = make_engine(batch_window_s=0.2)
    prompts = [encode(loaded, "Tell me about cats"), encode(loaded, "Hi")]
    params = SamplingParams(max_new_tokens=6)
    candidates_before = metric("refiner_candidates_scored_total")

    async def main() -> list[JobResult]:
        return await asyncio.gather(*(engine.submit(Job(p, params, REFINE)) for p in prompts))

    results = asyncio.run(main())
    for prompt, result in zip(prompts, results, strict=True):
        gen, ref = result.generation, result.refinement
        assert gen is not None and ref is not None
        assert gen.token_ids == alone(loaded, prompt, params).token_ids
        [expected] = refiner.refine([RefineRequest(prompt, gen.token_ids, REFINE)])
        assert ref.refined_ids == expected.refined_ids
        assert result.text == ref.refined_text
        assert ref.objective_after["total"] >= ref.objective_before["total"]
    assert metric("refiner_candidates_scored_total") > candidates_before
    assert metric("refiner_refinement_duration_seconds_count", method="coordinate") >= 2


def test_a_refined_answer_ends_at_the_stop_sequence_as_the_generated_one_does(loaded, make_engine):
    tok, prompt = loaded.tokenizer, encode(loaded, "Tell me about cats")
    full = alone(loaded, prompt, SamplingParams(max_new_tokens=8)).token_ids
    # A stop of one character that ends inside a longer token: generation's text is cut after it.
    k, stop = next(
        (k, new[0])
        for k in range(len(full))
        if len(new := tok.decode(full[: k + 1])[len(before := tok.decode(full[:k])) :]) > 1
        and new[0] not in before
    )
    params = SamplingParams(max_new_tokens=8, stop=(stop,))
    result = asyncio.run(make_engine().submit(Job(prompt, params, REFINE)))
    assert result.generation is not None and result.refinement is not None
    assert result.generation.token_ids == full[: k + 1]
    assert result.refinement.initial_text == result.generation.text
    # The refined text may end on another token, never go on past the stop.
    assert stop not in result.text[:-1]


def test_job_with_output_ids_skips_generation(loaded, refiner, make_engine):
    engine = make_engine()
    prompt, output = encode(loaded, "Write about a dog"), encode(loaded, " The dog runs in the park")[1:]
    result = asyncio.run(engine.submit(Job(prompt, SamplingParams(), REFINE, output_ids=output)))
    assert result.generation is None and result.refinement is not None
    assert result.generate_seconds == 0.0
    [expected] = refiner.refine([RefineRequest(prompt, output, REFINE)])
    assert result.text == expected.refined_text == result.refinement.refined_text


def test_best_of_returns_the_candidate_with_the_highest_objective(loaded, refiner, make_engine):
    engine = make_engine()
    prompt = encode(loaded, "Name an animal")
    params = SamplingParams(max_new_tokens=5, do_sample=True, seed=100)
    result = asyncio.run(engine.submit(Job(prompt, params, REFINE, best_of=3)))
    assert result.refinement is None and result.generation is not None
    candidates = [result.generation, *result.best_of_sequences]
    assert sorted(c.seed for c in candidates) == [100, 101, 102]
    for c in candidates:
        assert (
            c.token_ids
            == alone(loaded, prompt, SamplingParams(max_new_tokens=5, do_sample=True, seed=c.seed)).token_ids
        )
    scores = refiner.score(prompt, [c.token_ids for c in candidates], REFINE)
    assert scores[0]["total"] == max(s["total"] for s in scores)
    assert [o["total"] for o in result.best_of_objectives] == pytest.approx([s["total"] for s in scores])
    assert result.text == result.generation.text


def test_full_queue_raises_queue_full_then_the_engine_recovers(loaded, make_engine):
    engine = make_engine(max_queue=2, max_batch_size=1, batch_window_s=0.0)
    gate = Gate(engine)
    prompt, params = encode(loaded, "Hello"), SamplingParams(max_new_tokens=2)
    rejected_before = metric("refiner_rejected_requests_total", reason="queue_full")

    async def main() -> None:
        running = asyncio.ensure_future(engine.submit(Job(prompt, params, None)))
        await gate.wait_entered()  # the worker holds the first job; the queue is empty again
        queued = [asyncio.ensure_future(engine.submit(Job(prompt, params, None))) for _ in range(2)]
        await asyncio.sleep(0)
        assert engine.queue_size == 2
        with pytest.raises(QueueFullError, match="retry later"):
            await engine.submit(Job(prompt, params, None))
        gate.open()
        for result in await asyncio.gather(running, *queued):
            assert result.generation is not None and len(result.generation.token_ids) == 2
        assert engine.queue_size == 0
        after = await engine.submit(Job(prompt, params, None))
        assert after.generation is not None

    asyncio.run(main())
    assert metric("refiner_rejected_requests_total", reason="queue_full") == rejected_before + 1


def test_cancelling_a_queued_job_frees_its_queue_slot(loaded, make_engine):
    engine = make_engine(max_queue=1, max_batch_size=1, batch_window_s=0.0)
    gate = Gate(engine)
    prompt, params = encode(loaded, "Hello"), SamplingParams(max_new_tokens=2)

    async def main() -> None:
        running = asyncio.ensure_future(engine.submit(Job(prompt, params, None)))
        await gate.wait_entered()
        queued = asyncio.ensure_future(engine.submit(Job(encode(loaded, "Bye"), params, None)))
        await asyncio.sleep(0)
        assert engine.queue_size == 1
        queued.cancel()  # the client went away
        with pytest.raises(asyncio.CancelledError):
            await queued
        assert engine.queue_size == 0
        replacement = asyncio.ensure_future(engine.submit(Job(prompt, params, None)))  # fits again
        await asyncio.sleep(0)
        gate.open()
        await asyncio.gather(running, replacement)

    asyncio.run(main())
    # Only the two wanted jobs were generated: the cancelled one never reached the model.
    assert [len(outs) for outs in gate.outputs] == [1, 1]


def test_cancelling_a_running_job_stops_its_generation(loaded, make_engine):
    engine = make_engine()
    gate = Gate(engine)
    gate.open()

    async def main() -> None:
        events = engine.stream(Job(encode(loaded, "Hello"), SamplingParams(max_new_tokens=200), None))
        first = await events.__anext__()
        assert isinstance(first, TokenEvent)
        await events.aclose()  # the client disconnected mid-stream
        assert await asyncio.to_thread(gate.left.wait, 60)

    asyncio.run(main())
    # The generation stops either at its next token (the row ends "cancelled") or, when the engine
    # sees first that nobody waits for the batch any more, at its next checkpoint (it raises and
    # returns nothing): which one wins is a race between the two threads.
    if gate.outputs:
        [[out]] = gate.outputs
        assert out.finish_reason == "cancelled" and len(out.token_ids) < 200


def test_a_job_past_its_timeout_raises_request_timeout_error(loaded, make_engine):
    engine = make_engine(max_batch_size=1, batch_window_s=0.0)
    gate = Gate(engine)
    prompt, params = encode(loaded, "Hello"), SamplingParams(max_new_tokens=2)
    before = metric("refiner_rejected_requests_total", reason="timeout")

    async def main() -> None:
        running = asyncio.ensure_future(engine.submit(Job(prompt, params, None)))
        await gate.wait_entered()
        with pytest.raises(RequestTimeoutError, match="did not finish within"):
            await engine.submit(Job(prompt, params, None, timeout_s=0.05))
        assert engine.queue_size == 0  # the timed-out job left the queue
        gate.open()
        assert (await running).generation is not None

    asyncio.run(main())
    assert metric("refiner_rejected_requests_total", reason="timeout") == before + 1


def poison_model(loaded: LoadedModel, monkeypatch: pytest.MonkeyPatch) -> None:
    """Make the model return NaN logits for every row whose input holds POISON (as a broken request
    could in a real model), so the whole batched step is affected."""
    model = loaded.model
    forward = model.forward

    def poisoned(*args: Any, **kwargs: Any) -> Any:
        out = forward(*args, **kwargs)
        ids = kwargs.get("input_ids")  # None when the refiner passes embeddings
        if ids is not None:
            out.logits[(ids == POISON).any(dim=-1)] = float("nan")  # rows [b] holding the poison
        return out

    monkeypatch.setattr(model, "forward", poisoned)


def test_a_failing_job_fails_alone_and_its_neighbours_succeed(loaded, make_engine, monkeypatch):
    engine = make_engine(batch_window_s=0.2)
    poison_model(loaded, monkeypatch)
    good = [encode(loaded, "Hello there"), encode(loaded, "A longer prompt about dogs")]
    bad = [*encode(loaded, "Break"), POISON]
    params = SamplingParams(max_new_tokens=4)

    async def main() -> list[Any]:
        jobs = [Job(good[0], params, REFINE), Job(bad, params, None), Job(good[1], params, None)]
        return await asyncio.gather(*(engine.submit(j) for j in jobs), return_exceptions=True)

    first, failed, last = asyncio.run(main())
    assert isinstance(failed, NumericalError)
    monkeypatch.undo()
    for prompt, result in ((good[0], first), (good[1], last)):
        assert isinstance(result, JobResult) and result.generation is not None
        assert result.generation.token_ids == alone(loaded, prompt, params).token_ids
        assert result.batch_size == 1  # answered by the retry alone
    assert first.refinement is not None
    # The worker is still alive.
    assert asyncio.run(engine.submit(Job(good[0], params, None))).generation is not None


def test_streaming_yields_every_token_then_the_result(loaded, make_engine):
    engine = make_engine()
    prompt = encode(loaded, "Tell me a story")
    params = SamplingParams(max_new_tokens=8, do_sample=True, seed=3)

    async def main() -> list[TokenEvent | JobResult]:
        return [item async for item in engine.stream(Job(prompt, params, REFINE))]

    items = asyncio.run(main())
    *tokens, result = items
    assert all(isinstance(t, TokenEvent) for t in tokens) and isinstance(result, JobResult)
    gen = result.generation
    assert gen is not None and result.refinement is not None
    assert [t.token_id for t in tokens] == gen.token_ids == alone(loaded, prompt, params).token_ids
    assert [t.logprob for t in tokens] == pytest.approx(gen.logprobs)
    assert "".join(t.text for t in tokens) == gen.text
    assert result.text == result.refinement.refined_text


def test_streaming_a_failing_job_raises_after_its_tokens(loaded, make_engine, monkeypatch):
    engine = make_engine()
    poison_model(loaded, monkeypatch)

    async def main() -> None:
        events = engine.stream(
            Job([*encode(loaded, "Break"), POISON], SamplingParams(max_new_tokens=4), None)
        )
        with pytest.raises(NumericalError):
            async for _ in events:
                pass

    asyncio.run(main())


def test_invalid_jobs_are_refused_before_queueing(loaded, make_engine):
    greedy, sampled = SamplingParams(), SamplingParams(do_sample=True)
    with pytest.raises(InvalidRequestError, match="empty"):
        Job([], greedy, None)
    with pytest.raises(InvalidRequestError, match="sampling"):
        Job([1, 2], greedy, None, best_of=2)
    with pytest.raises(InvalidRequestError, match="refine config"):
        Job([1, 2], greedy, None, output_ids=[3])
    engine = make_engine()

    async def main() -> None:
        with pytest.raises(InvalidRequestError, match="streamed"):
            engine.stream(Job([1, 2], sampled, None, best_of=2))
        plain = Engine(engine.loaded, None)
        plain.start()
        try:
            with pytest.raises(InvalidRequestError, match="no refiner"):
                await plain.submit(Job([1, 2], greedy, REFINE))
        finally:
            plain.stop()
        with pytest.raises(EngineStoppedError):
            await plain.submit(Job([1, 2], greedy, None))

    asyncio.run(main())


def test_warm_up_runs_the_model_once_without_counting_as_a_request(loaded, refiner, make_engine):
    calls: list[int] = []
    original = refiner.refine

    def counted(requests, *args):
        calls.append(len(requests))
        return original(requests, *args)

    refiner.refine = counted  # type: ignore[method-assign]
    try:
        tokens = metric("refiner_generated_tokens_total")
        candidates = metric("refiner_candidates_scored_total")
        engine = make_engine()
        engine.warm_up()
        assert calls == [1]
        assert metric("refiner_generated_tokens_total") == tokens
        assert metric("refiner_candidates_scored_total") == candidates
        result = asyncio.run(
            engine.submit(Job(encode(loaded, "Hello"), SamplingParams(max_new_tokens=3), RefineConfig()))
        )
        assert result.refinement is not None
    finally:
        del refiner.refine


def test_torch_thread_runs_every_call_on_its_one_thread_in_order():
    torch_thread = TorchThread("test-torch")
    seen: list[tuple[int, str]] = []

    def note(k: int) -> None:
        seen.append((k, threading.current_thread().name))

    for f in [torch_thread.submit(note, k) for k in range(5)]:
        f.result(timeout=10)
    assert seen == [(k, "test-torch") for k in range(5)]

    def fails() -> None:
        raise ValueError("from the torch thread")

    with pytest.raises(ValueError, match="from the torch thread"):
        asyncio.run(torch_thread.run(fails))
    assert asyncio.run(torch_thread.run(lambda a, b: a + b, 2, 3)) == 5
    torch_thread.close()
