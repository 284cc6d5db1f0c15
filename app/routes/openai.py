"""OpenAI-compatible routes: ``POST /v1/completions``, ``POST /v1/chat/completions``, ``GET /v1/models``.

Each choice is one engine ``Job`` (``n`` choices and a list of prompts give several jobs, submitted
together so that the engine can batch them). ``refine`` is accepted as an extra body field (the
``openai`` client's ``extra_body={"refine": {...}}``) and every choice carries a ``refinement`` object.
Streaming sends the tokens of the initial generation as OpenAI chunks; the last chunk carries the
finish reason and the ``refinement`` (whose ``refined_text`` is the final answer), then ``data: [DONE]``.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, StreamingResponse

from app.disconnect import unless_disconnected
from app.engine import Job, JobResult, TokenEvent
from app.errors import ValidationFailed, classify, error_body
from app.routes.common import SSE_HEADERS, refinement_of, sse
from app.routes.tgi import ERRORS
from app.schemas import (
    ChatCompletionRequest,
    ChatCompletionResponse,
    CompletionRequest,
    CompletionResponse,
    ModelCard,
    ModelList,
)
from app.service import Service, get_service

router = APIRouter(prefix="/v1", tags=["openai"])

OPENAI_DEFAULT_MAX_TOKENS = 16  # OpenAI's default for /v1/completions


def _finish_reason(result: JobResult) -> str:
    gen = result.generation
    return "length" if gen is not None and gen.finish_reason == "length" else "stop"


def _completion_tokens(result: JobResult) -> int:
    if result.refinement is not None:
        return len(result.refinement.refined_ids)
    return len(result.generation.token_ids) if result.generation is not None else 0


def _jobs(
    service: Service,
    req: CompletionRequest | ChatCompletionRequest,
    prompt_ids: list[int],
    requested_max: int | None,
    max_field: str,
) -> list[Job]:
    """One job per choice; with a seed, choice i uses seed + i so that the choices differ."""
    assert service.tokens is not None and service.jobs is not None
    max_new = service.tokens.resolve_max_new_tokens(requested_max, len(prompt_ids), max_field)
    refine = service.jobs.refine_config(req.refine, "refine")
    best_of = service.jobs.check_best_of(getattr(req, "best_of", None), "best_of")
    jobs = []
    for i in range(req.n):
        params = service.jobs.openai_sampling(
            max_new_tokens=max_new,
            temperature=req.temperature,
            top_p=req.top_p,
            top_k=req.top_k,
            repetition_penalty=req.repetition_penalty,
            seed=None if req.seed is None else req.seed + i,
            stop=req.stop_list,
        )
        if best_of > 1 and not params.do_sample:
            best_of = 1  # greedy: every sample would be the same sequence
        jobs.append(Job(prompt_ids=prompt_ids, params=params, refine=refine, best_of=best_of))
    return jobs


async def _submit_all(request: Request, service: Service, jobs: list[Job]) -> list[JobResult]:
    assert service.engine is not None
    engine = service.engine

    async def run_all() -> list[JobResult]:
        tasks = [asyncio.ensure_future(engine.submit(j)) for j in jobs]
        try:
            return list(await asyncio.gather(*tasks))
        finally:  # one failed (or the client left): drop the others' queued work too
            for t in tasks:
                t.cancel()

    return await unless_disconnected(request, run_all())


def _completion_logprobs(service: Service, result: JobResult, offset: int) -> dict[str, Any] | None:
    gen = result.generation
    if gen is None or service.tokens is None:
        return None
    texts = service.tokens.token_texts(gen.token_ids)
    offsets = []
    for t in texts:
        offsets.append(offset)
        offset += len(t)
    return {
        "tokens": texts,
        "token_logprobs": list(gen.logprobs),
        "top_logprobs": None,
        "text_offset": offsets,
    }


def _usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


async def _stream_events(service: Service, job: Job, request: Request) -> tuple[Any, AsyncIterator]:
    """Start ``job`` in the engine and return its first event and the rest (errors before any byte is
    sent still become proper status codes)."""
    assert service.engine is not None
    events = service.engine.stream(job).__aiter__()
    try:
        first = await unless_disconnected(request, events.__anext__())
    except BaseException:
        await events.aclose()
        raise
    return first, events


async def _openai_chunks(
    first: TokenEvent | JobResult,
    events: AsyncIterator,
    make_chunk: Any,
    include_usage: bool,
    prompt_tokens: int,
) -> AsyncIterator[bytes]:
    """OpenAI streaming: one chunk per token, a final chunk with finish_reason and refinement, [DONE]."""
    item = first
    try:
        while True:
            if isinstance(item, TokenEvent):
                yield sse(make_chunk(item.text, None, None))
            else:
                refinement = refinement_of(item)
                yield sse(
                    make_chunk("", _finish_reason(item), refinement.model_dump() if refinement else None)
                )
                if include_usage:
                    yield sse(
                        make_chunk(None, None, None, usage=_usage(prompt_tokens, _completion_tokens(item)))
                    )
                yield sse("[DONE]")
                return
            item = await events.__anext__()
    except StopAsyncIteration:
        yield sse({"error": error_body("the engine ended the stream without a result", "internal")})
    except Exception as exc:
        _, message, error_type, _ = classify(exc)
        yield sse({"error": {"message": message, "type": error_type, **error_body(message, error_type)}})
    finally:
        await events.aclose()


@router.post(
    "/completions", response_model=CompletionResponse, responses=ERRORS, summary="Completions (OpenAI)"
)
async def completions(
    req: CompletionRequest, request: Request, service: Service = Depends(get_service)
) -> Any:
    """OpenAI text completions; each choice is generated, then refined (`refinement` per choice)."""
    assert service.tokens is not None
    created, rid, model = int(time.time()), f"cmpl-{uuid.uuid4().hex}", service.model_name
    prompts = req.prompts
    prompt_ids = [await asyncio.to_thread(service.tokens.encode, p, None, "prompt") for p in prompts]
    jobs_per_prompt = [
        _jobs(service, req, ids, req.max_tokens or OPENAI_DEFAULT_MAX_TOKENS, "max_tokens")
        for ids in prompt_ids
    ]
    if req.stream:
        if len(prompts) > 1:
            raise ValidationFailed("prompt: streaming takes one prompt: send one request per prompt")
        job = jobs_per_prompt[0][0]
        first, events = await _stream_events(service, job, request)
        echo_sent = not req.echo

        def chunk(text: str | None, finish: str | None, refinement: Any, usage: Any = None) -> dict[str, Any]:
            nonlocal echo_sent
            if not echo_sent and text is not None:
                text, echo_sent = prompts[0] + text, True
            choices = (
                []
                if text is None
                else [
                    {
                        "index": 0,
                        "text": text,
                        "finish_reason": finish,
                        "logprobs": None,
                        "refinement": refinement,
                    }
                ]
            )
            body = {
                "id": rid,
                "object": "text_completion",
                "created": created,
                "model": model,
                "choices": choices,
            }
            if usage is not None:
                body["usage"] = usage
            return body

        include_usage = bool((getattr(req, "stream_options", None) or {}).get("include_usage"))
        return StreamingResponse(
            _openai_chunks(first, events, chunk, include_usage, len(prompt_ids[0])),
            media_type="text/event-stream",
            headers=SSE_HEADERS,
        )

    flat = [job for jobs in jobs_per_prompt for job in jobs]
    results = await _submit_all(request, service, flat)
    choices = []
    prompt_total = completion_total = 0
    for k, result in enumerate(results):
        prompt = prompts[k // req.n]
        text = prompt + result.text if req.echo else result.text
        refinement = refinement_of(result)
        choices.append(
            {
                "index": k,
                "text": text,
                "finish_reason": _finish_reason(result),
                "logprobs": _completion_logprobs(service, result, len(prompt) if req.echo else 0)
                if req.logprobs is not None
                else None,
                "refinement": refinement.model_dump() if refinement else None,
            }
        )
        completion_total += _completion_tokens(result)
    prompt_total = sum(len(ids) for ids in prompt_ids)
    return JSONResponse(
        {
            "id": rid,
            "object": "text_completion",
            "created": created,
            "model": model,
            "choices": choices,
            "usage": _usage(prompt_total, completion_total),
        }
    )


@router.post(
    "/chat/completions",
    response_model=ChatCompletionResponse,
    responses=ERRORS,
    summary="Chat completions (OpenAI)",
)
async def chat_completions(
    req: ChatCompletionRequest, request: Request, service: Service = Depends(get_service)
) -> Any:
    """OpenAI chat completions over the model's chat template; each choice carries `refinement`."""
    assert service.tokens is not None
    created, rid, model = int(time.time()), f"chatcmpl-{uuid.uuid4().hex}", service.model_name
    messages = [
        {"role": "system" if m.role == "developer" else m.role, "content": m.text} for m in req.messages
    ]
    prompt_ids = await asyncio.to_thread(service.tokens.encode_chat, messages)
    requested = req.max_completion_tokens or req.max_tokens
    field = "max_completion_tokens" if req.max_completion_tokens else "max_tokens"
    jobs = _jobs(service, req, prompt_ids, requested, field)
    if req.stream:
        first, events = await _stream_events(service, jobs[0], request)
        role_sent = False

        def chunk(text: str | None, finish: str | None, refinement: Any, usage: Any = None) -> dict[str, Any]:
            nonlocal role_sent
            delta: dict[str, Any] = {}
            if not role_sent:
                delta["role"], role_sent = "assistant", True
            if text:
                delta["content"] = text
            choices = (
                []
                if text is None
                else [
                    {
                        "index": 0,
                        "delta": delta,
                        "finish_reason": finish,
                        "logprobs": None,
                        "refinement": refinement,
                    }
                ]
            )
            body = {
                "id": rid,
                "object": "chat.completion.chunk",
                "created": created,
                "model": model,
                "system_fingerprint": f"refiner-{service.version}",
                "choices": choices,
            }
            if usage is not None:
                body["usage"] = usage
            return body

        include_usage = bool((req.stream_options or {}).get("include_usage"))
        return StreamingResponse(
            _openai_chunks(first, events, chunk, include_usage, len(prompt_ids)),
            media_type="text/event-stream",
            headers=SSE_HEADERS,
        )

    results = await _submit_all(request, service, jobs)
    choices = []
    for k, result in enumerate(results):
        refinement = refinement_of(result)
        logprobs = None
        if req.logprobs and result.generation is not None and service.tokens is not None:
            texts = service.tokens.token_texts(result.generation.token_ids)
            logprobs = {
                "content": [
                    {"token": t, "logprob": lp, "bytes": list(t.encode()), "top_logprobs": []}
                    for t, lp in zip(texts, result.generation.logprobs, strict=True)
                ]
            }
        choices.append(
            {
                "index": k,
                "message": {"role": "assistant", "content": result.text},
                "finish_reason": _finish_reason(result),
                "logprobs": logprobs,
                "refinement": refinement.model_dump() if refinement else None,
            }
        )
    completion_total = sum(_completion_tokens(r) for r in results)
    return JSONResponse(
        {
            "id": rid,
            "object": "chat.completion",
            "created": created,
            "model": model,
            "system_fingerprint": f"refiner-{service.version}",
            "choices": choices,
            "usage": _usage(len(prompt_ids), completion_total),
        }
    )


@router.get("/models", response_model=ModelList, summary="The served model (OpenAI)")
async def models(service: Service = Depends(get_service)) -> ModelList:
    assert service.tokens is not None
    return ModelList(
        data=[
            ModelCard(
                id=service.model_name, created=int(time.time()), max_model_len=service.tokens.max_total_tokens
            )
        ]
    )
