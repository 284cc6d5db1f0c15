"""text-generation-inference routes: ``POST /generate``, ``/generate_stream``, ``/`` and ``/refine``.

Each route tokenises the prompt (``PromptTokenizer``, which checks the token limits), lets the request
convert itself into one engine ``Job`` and awaits it while watching for the client to leave:

- ``/generate``: ``Job(prompt_ids, params, refine, best_of)`` -> ``service.jobs.submit`` (the engine,
  or ``UpstreamJobs`` when another engine generates: ``app.upstream_jobs``).
- ``/generate_stream``: the same job through ``service.jobs.stream``; every token of the initial generation
  is sent as it comes, the last event carries the refined text and ``details.refinement``.
- ``/``: what TGI clients post to; ``stream`` in the body picks one of the two above (non-streaming
  answers are a one-element list, as TGI's).
- ``/refine``: ``Job(prompt_ids, output_ids=<given output>, refine)`` -> ``engine.submit`` (no generation).
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator, Sequence

from fastapi import APIRouter, Depends, Request
from fastapi.responses import StreamingResponse

from app.disconnect import submit_all
from app.engine import Job, JobResult, TokenEvent
from app.routes import ERRORS
from app.routes.sse import sse_content, stream_job
from app.schemas import (
    BestOfSequence,
    Details,
    GenerateParameters,
    GenerateRequest,
    GenerateResponse,
    Refinement,
    RefineOnlyRequest,
    RefineOnlyResponse,
    StreamDetails,
    StreamResponse,
    Token,
)
from app.service import ReadyService, get_service
from app.tokenization import PromptTokenizer
from refiners.generation import GenerationOutput

router = APIRouter(tags=["text-generation-inference"])

EVENTS = sse_content(StreamResponse)  # the OpenAPI declaration of the streamed answers


@router.post(
    "/generate",
    response_model=GenerateResponse,
    responses=ERRORS,
    summary="Generate, then refine (TGI)",
)
async def generate(
    req: GenerateRequest, request: Request, service: ReadyService = Depends(get_service)
) -> GenerateResponse:
    """Generate text for `inputs`, refine it, and return the refined text with TGI `details` and
    `details.refinement`. `parameters.refine` = `{"enabled": false}` gives plain generation."""
    return await _generate(request, service, req)


@router.post(
    "/generate_stream",
    response_class=StreamingResponse,
    responses={200: {"description": "one event per token", "content": EVENTS}, **ERRORS},
    summary="Generate with streamed tokens, then refine (TGI)",
)
async def generate_stream(
    req: GenerateRequest, request: Request, service: ReadyService = Depends(get_service)
) -> StreamingResponse:
    """TGI server-sent events: each token of the initial generation as it comes; the last event's
    `generated_text` is the refined text and its `details.refinement` says what changed."""
    return await _stream(request, service, req)


@router.post(
    "/",
    response_model=list[GenerateResponse],
    responses={200: {"content": EVENTS}, **ERRORS},
    summary="TGI compatibility route (what TGI clients post to)",
)
async def compat_generate(
    req: GenerateRequest, request: Request, service: ReadyService = Depends(get_service)
) -> list[GenerateResponse] | StreamingResponse:
    """`stream: true` answers like `/generate_stream`; otherwise like `/generate`, as a one-element list."""
    if req.stream:
        return await _stream(request, service, req)
    return [await _generate(request, service, req)]


@router.post("/refine", response_model=RefineOnlyResponse, responses=ERRORS, summary="Refine a given output")
async def refine(
    req: RefineOnlyRequest, request: Request, service: ReadyService = Depends(get_service)
) -> RefineOnlyResponse:
    """Refine `output` (from any model) as an answer to `inputs`, without generating."""
    job = await _refine_job(service, req)
    (result,) = await submit_all(request, service.engine, [job])
    return RefineOnlyResponse(generated_text=result.text, refinement=Refinement.of(result))


async def _job(service: ReadyService, p: GenerateParameters, inputs: str) -> Job:
    """Tokenise the prompt (within the token limits) and build the request's engine job."""
    prompt_ids = await asyncio.to_thread(service.tokens.encode, inputs, p.truncate)
    max_new_tokens = service.tokens.resolve_max_new_tokens(
        p.max_new_tokens, len(prompt_ids), "parameters.max_new_tokens"
    )
    return Job(
        prompt_ids=prompt_ids,
        params=p.to_sampling_params(max_new_tokens, service.limits),
        refine=p.to_refine_config(service.limits),
        best_of=p.to_best_of(service.limits),
        prompt_text=inputs if p.truncate is None else None,  # truncated: the ids are a part of it
    )


async def _refine_job(service: ReadyService, req: RefineOnlyRequest) -> Job:
    """The job that refines the given output: it carries ``output_ids``, so nothing is generated."""
    prompt_ids = await asyncio.to_thread(service.tokens.encode, req.inputs, req.parameters.truncate)
    output_ids = await asyncio.to_thread(service.tokens.encode_output, req.output)
    service.tokens.resolve_max_new_tokens(len(output_ids), len(prompt_ids), "output")
    return Job(
        prompt_ids=prompt_ids,
        params=req.to_sampling_params(len(output_ids)),
        refine=req.to_refine_config(service.limits),
        output_ids=output_ids,
    )


async def _generate(request: Request, service: ReadyService, req: GenerateRequest) -> GenerateResponse:
    job = await _job(service, req.parameters, req.inputs)
    (result,) = await submit_all(request, service.jobs, [job])
    return GenerateResponse(
        generated_text=_generated_text(req, result), details=_details(service.tokens, req, job, result)
    )


async def _stream(request: Request, service: ReadyService, req: GenerateRequest) -> StreamingResponse:
    job = await _job(service, req.parameters, req.inputs)
    return await stream_job(request, service.jobs, job, _TGIEvents(service.tokens, req, job))


def _generated_text(req: GenerateRequest, result: JobResult) -> str:
    """The refined text (or the generated one), after the prompt when ``return_full_text``."""
    return req.inputs + result.text if req.parameters.return_full_text else result.text


def _generation(result: JobResult) -> GenerationOutput:
    if result.generation is None:  # only jobs that refine a given output generate nothing
        raise RuntimeError("a generation job came back without its generation")
    return result.generation


def _stream_details(job: Job, result: JobResult) -> StreamDetails:
    gen = _generation(result)
    return StreamDetails(
        finish_reason=gen.finish_reason,
        generated_tokens=len(gen.token_ids),
        seed=gen.seed if job.params.do_sample else None,
        refinement=Refinement.of(result),
    )


def _details(tokens: PromptTokenizer, req: GenerateRequest, job: Job, result: JobResult) -> Details:
    """TGI ``details``; ``tokens`` (and ``best_of_sequences``) and ``prefill`` only when asked for."""
    p, gen = req.parameters, _generation(result)
    details = Details(**dict(_stream_details(job, result)))
    if p.decoder_input_details:
        # Prompt log-probabilities are not computed by the engine: ids and texts only.
        details.prefill = _tokens(tokens, job.prompt_ids, [None] * len(job.prompt_ids))
    elif p.details:
        details.prefill = []
    if p.details:
        details.tokens = _tokens(tokens, gen.token_ids, gen.logprobs)
        if job.best_of > 1:
            details.best_of_sequences = [_best_of_sequence(tokens, o) for o in result.best_of_sequences]
    return details


def _best_of_sequence(tokens: PromptTokenizer, out: GenerationOutput) -> BestOfSequence:
    return BestOfSequence(
        generated_text=out.text,
        finish_reason=out.finish_reason,
        generated_tokens=len(out.token_ids),
        seed=out.seed,
        tokens=_tokens(tokens, out.token_ids, out.logprobs),
    )


def _tokens(tokens: PromptTokenizer, ids: Sequence[int], logprobs: Sequence[float | None]) -> list[Token]:
    texts = tokens.token_texts(ids)
    return [
        Token(id=i, text=t, logprob=lp, special=tokens.is_special(i))
        for i, t, lp in zip(ids, texts, logprobs, strict=True)
    ]


class _TGIEvents:
    """TGI server-sent events: one ``StreamResponse`` per token. The last token is held back so that
    it travels with the final text and details, as TGI sends it."""

    def __init__(self, tokens: PromptTokenizer, req: GenerateRequest, job: Job) -> None:
        self.tokens, self.req, self.job = tokens, req, job
        self.pending: Token | None = None
        self.index = 0

    def token(self, event: TokenEvent) -> Iterator[StreamResponse]:
        if self.pending is not None:
            yield StreamResponse(index=self.index, token=self.pending)
            self.index += 1
        special = self.tokens.is_special(event.token_id)
        self.pending = Token(id=event.token_id, text=event.text, logprob=event.logprob, special=special)

    def result(self, result: JobResult) -> Iterator[StreamResponse]:
        last = self.pending
        if last is None:  # no token event came (cannot happen with max_new_tokens >= 1)
            last_id = (_generation(result).token_ids or [0])[-1]
            last = Token(id=last_id, text="", logprob=None, special=self.tokens.is_special(last_id))
        yield StreamResponse(
            index=self.index,
            token=last,
            generated_text=_generated_text(self.req, result),
            details=_stream_details(self.job, result),
        )
