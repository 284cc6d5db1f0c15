"""text-generation-inference routes: ``POST /generate``, ``/generate_stream``, ``/`` and ``/refine``.

Each route validates (schemas, then token limits), builds one engine ``Job`` and awaits it while
watching for the client to leave:

- ``/generate``: ``Job(prompt_ids, params, refine, best_of)`` -> ``engine.submit``.
- ``/generate_stream``: the same job through ``engine.stream``; every token of the initial generation
  is sent as it comes, the last event carries the refined text and ``details.refinement``.
- ``/``: what TGI clients post to; ``stream`` in the body picks one of the two above (non-streaming
  answers are a one-element list, as TGI's).
- ``/refine``: ``Job(prompt_ids, output_ids=<given output>, refine)`` -> ``engine.submit`` (no generation).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, StreamingResponse

from app.disconnect import unless_disconnected
from app.engine import Job, JobResult, TokenEvent
from app.errors import classify, error_body
from app.routes.common import SSE_HEADERS, refinement_of, sse
from app.schemas import (
    ErrorResponse,
    GenerateRequest,
    GenerateResponse,
    RefineOnlyRequest,
    RefineOnlyResponse,
    RefineParameters,
    StreamResponse,
)
from app.service import Service, get_service

log = logging.getLogger(__name__)

router = APIRouter(tags=["text-generation-inference"])

ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorResponse} for code in (401, 413, 422, 424, 429, 503, 504)
}
STREAM_RESPONSE: dict[int | str, dict[str, Any]] = {
    200: {
        "description": "server-sent events, one per token: `data: <StreamResponse JSON>`",
        "content": {"text/event-stream": {"schema": StreamResponse.model_json_schema()}},
    }
}


async def _prepare(service: Service, req: GenerateRequest) -> Job:
    """Tokenise, check the limits and build the engine job of a TGI request."""
    p = req.parameters
    assert service.tokens is not None and service.jobs is not None
    prompt_ids = await asyncio.to_thread(service.tokens.encode, req.inputs, p.truncate)
    max_new_tokens = service.tokens.resolve_max_new_tokens(
        p.max_new_tokens, len(prompt_ids), "parameters.max_new_tokens"
    )
    return Job(
        prompt_ids=prompt_ids,
        params=service.jobs.tgi_sampling(p, max_new_tokens),
        refine=service.jobs.refine_config(p.refine),
        best_of=service.jobs.check_best_of(p.best_of),
    )


def _tokens(service: Service, ids: list[int], logprobs: list[float | None]) -> list[dict[str, Any]]:
    assert service.tokens is not None
    texts = service.tokens.token_texts(ids)
    return [
        {"id": i, "text": t, "logprob": lp, "special": service.tokens.is_special(i)}
        for i, t, lp in zip(ids, texts, logprobs, strict=True)
    ]


def _generate_body(service: Service, req: GenerateRequest, job: Job, result: JobResult) -> dict[str, Any]:
    """The TGI answer: ``generated_text`` (refined) and ``details``; ``tokens``/``prefill`` when asked."""
    p = req.parameters
    gen = result.generation
    assert gen is not None
    text = req.inputs + result.text if p.return_full_text else result.text
    details: dict[str, Any] = {
        "finish_reason": gen.finish_reason,
        "generated_tokens": len(gen.token_ids),
        "seed": gen.seed if job.params.do_sample else None,
    }
    if p.details or p.decoder_input_details:
        # Prompt log-probabilities are not computed by the engine: ids and texts only.
        details["prefill"] = (
            _tokens(service, job.prompt_ids, [None] * len(job.prompt_ids)) if p.decoder_input_details else []
        )
    if p.details:
        details["tokens"] = _tokens(service, gen.token_ids, list(gen.logprobs))
        others = getattr(result, "best_of_sequences", None)
        if job.best_of > 1 and others:
            details["best_of_sequences"] = [
                {
                    "generated_text": o.text,
                    "finish_reason": o.finish_reason,
                    "generated_tokens": len(o.token_ids),
                    "seed": o.seed,
                    "prefill": [],
                    "tokens": _tokens(service, o.token_ids, list(o.logprobs)),
                }
                for o in others
            ]
    refinement = refinement_of(result)
    details["refinement"] = refinement.model_dump() if refinement is not None else None
    return {"generated_text": text, "details": details}


async def _generate(request: Request, service: Service, req: GenerateRequest) -> dict[str, Any]:
    job = await _prepare(service, req)
    assert service.engine is not None
    result = await unless_disconnected(request, service.engine.submit(job))
    return _generate_body(service, req, job, result)


async def _stream(request: Request, service: Service, req: GenerateRequest) -> StreamingResponse:
    """Start the job and wait for its first event before answering, so that a full queue or a bad
    request still gets a proper status code (429, 422) instead of an error event inside a 200."""
    job = await _prepare(service, req)
    assert service.engine is not None
    events = service.engine.stream(job).__aiter__()
    try:
        first = await unless_disconnected(request, events.__anext__())
    except BaseException:
        await events.aclose()
        raise
    return StreamingResponse(
        _tgi_events(service, req, job, first, events), media_type="text/event-stream", headers=SSE_HEADERS
    )


async def _tgi_events(
    service: Service, req: GenerateRequest, job: Job, first: TokenEvent | JobResult, events: AsyncIterator
) -> AsyncIterator[bytes]:
    """TGI server-sent events. The last token is held back so that it can travel with the final text,
    as TGI sends it; if the client leaves, Starlette cancels this generator and the engine drops the job."""
    assert service.tokens is not None
    pending: dict[str, Any] | None = None
    index = 0
    item: TokenEvent | JobResult = first
    try:
        while True:
            if isinstance(item, TokenEvent):
                if pending is not None:
                    yield sse({"index": index, "token": pending, "generated_text": None, "details": None})
                    index += 1
                pending = {
                    "id": item.token_id,
                    "text": item.text,
                    "logprob": item.logprob,
                    "special": service.tokens.is_special(item.token_id),
                }
            else:
                body = _generate_body(service, req, job, item)
                gen = item.generation
                assert gen is not None
                if pending is None:  # no token event came (cannot happen with max_new_tokens >= 1)
                    last = gen.token_ids[-1] if gen.token_ids else 0
                    pending = {
                        "id": last,
                        "text": "",
                        "logprob": None,
                        "special": service.tokens.is_special(last),
                    }
                d = body["details"]
                details = {k: d[k] for k in ("finish_reason", "generated_tokens", "seed", "refinement")}
                yield sse(
                    {
                        "index": index,
                        "token": pending,
                        "generated_text": body["generated_text"],
                        "details": details,
                    }
                )
                return
            item = await events.__anext__()
    except StopAsyncIteration:
        yield sse(error_body("the engine ended the stream without a result", "internal"))
    except Exception as exc:  # after the first byte the status is sent: report the error as an event
        _, message, error_type, _ = classify(exc)
        yield sse(error_body(message, error_type))
    finally:
        await events.aclose()


@router.post(
    "/generate",
    response_model=GenerateResponse,
    responses=ERRORS,
    summary="Generate, then refine (TGI)",
)
async def generate(
    req: GenerateRequest, request: Request, service: Service = Depends(get_service)
) -> JSONResponse:
    """Generate text for `inputs`, refine it, and return the refined text with TGI `details` and
    `details.refinement`. `parameters.refine` = `{"enabled": false}` gives plain generation."""
    return JSONResponse(await _generate(request, service, req))


@router.post(
    "/generate_stream",
    responses={**STREAM_RESPONSE, **ERRORS},
    response_class=StreamingResponse,
    summary="Generate with streamed tokens, then refine (TGI)",
)
async def generate_stream(
    req: GenerateRequest, request: Request, service: Service = Depends(get_service)
) -> StreamingResponse:
    """TGI server-sent events: each token of the initial generation as it comes; the last event's
    `generated_text` is the refined text and its `details.refinement` says what changed."""
    return await _stream(request, service, req)


@router.post(
    "/",
    responses={200: {"model": list[GenerateResponse]}, **ERRORS},
    summary="TGI compatibility route (what TGI clients post to)",
)
async def compat_generate(
    req: GenerateRequest, request: Request, service: Service = Depends(get_service)
) -> Any:
    """`stream: true` answers like `/generate_stream`; otherwise like `/generate`, as a one-element list."""
    if req.stream:
        return await _stream(request, service, req)
    return JSONResponse([await _generate(request, service, req)])


@router.post("/refine", response_model=RefineOnlyResponse, responses=ERRORS, summary="Refine a given output")
async def refine(
    req: RefineOnlyRequest, request: Request, service: Service = Depends(get_service)
) -> JSONResponse:
    """Refine `output` (from any model) as an answer to `inputs`, without generating."""
    assert service.tokens is not None and service.jobs is not None and service.engine is not None
    p = req.parameters
    prompt_ids = await asyncio.to_thread(service.tokens.encode, req.inputs, p.truncate)
    output_ids = await asyncio.to_thread(service.tokens.encode_output, req.output)
    service.tokens.resolve_max_new_tokens(len(output_ids), len(prompt_ids), "output")
    # Refining is the point of this route: a server default of off does not apply (and the schema
    # refuses "enabled": false).
    params = (p.refine or RefineParameters()).model_copy(update={"enabled": True})
    refine_config = service.jobs.refine_config(params)
    assert refine_config is not None
    job = Job(
        prompt_ids=prompt_ids,
        params=service.jobs.greedy(len(output_ids)),
        refine=refine_config,
        output_ids=output_ids,
    )
    result = await unless_disconnected(request, service.engine.submit(job))
    refinement = refinement_of(result)
    assert refinement is not None
    return JSONResponse({"generated_text": result.text, "refinement": refinement.model_dump()})
