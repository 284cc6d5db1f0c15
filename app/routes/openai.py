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
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

from fastapi import APIRouter, Depends, Request
from fastapi.responses import StreamingResponse
from pydantic import BaseModel

from app.disconnect import submit_all
from app.engine import Job, JobResult, TokenEvent
from app.routes import ERRORS
from app.routes.sse import sse_content, stream_job
from app.schemas import (
    ChatChoice,
    ChatChunkChoice,
    ChatCompletionChunk,
    ChatCompletionMessage,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatDelta,
    ChatLogprobs,
    ChatTokenLogprob,
    CompletionChoice,
    CompletionChunk,
    CompletionLogprobs,
    CompletionRequest,
    CompletionResponse,
    ModelCard,
    ModelList,
    Refinement,
    Usage,
)
from app.service import ReadyService, get_service
from app.tokenization import PromptTokenizer

router = APIRouter(prefix="/v1", tags=["openai"])
T = TypeVar("T")


def _post(path: str, response: type[BaseModel], chunk: type[BaseModel], summary: str) -> Callable[[T], T]:
    """Declare a route that answers ``response``, or with ``stream`` a stream of ``chunk`` events."""
    responses = {200: {"content": sse_content(chunk)}, **ERRORS}
    return router.post(path, response_model=response, responses=responses, summary=summary)


@_post("/completions", CompletionResponse, CompletionChunk, "Completions (OpenAI)")
async def completions(
    req: CompletionRequest, request: Request, service: ReadyService = Depends(get_service)
) -> CompletionResponse | StreamingResponse:
    """OpenAI text completions; each choice is generated, then refined (`refinement` per choice)."""
    prompt_ids = [await asyncio.to_thread(service.tokens.encode, p, None, "prompt") for p in req.prompts]
    jobs = [
        job
        for ids, text in zip(prompt_ids, req.prompts, strict=True)
        for job in _jobs(service, req, ids, text)
    ]
    head = _head("cmpl", service)
    if req.stream:
        events = _CompletionEvents(head, req, len(prompt_ids[0]))
        return await stream_job(request, service.jobs, jobs[0], events)
    results = await submit_all(request, service.jobs, jobs)
    return _completion(service.tokens, req, head, prompt_ids, results)


@_post("/chat/completions", ChatCompletionResponse, ChatCompletionChunk, "Chat completions (OpenAI)")
async def chat_completions(
    req: ChatCompletionRequest, request: Request, service: ReadyService = Depends(get_service)
) -> ChatCompletionResponse | StreamingResponse:
    """OpenAI chat completions over the model's chat template; each choice carries `refinement`."""
    prompt_ids = await asyncio.to_thread(service.tokens.encode_chat, req.conversation)
    # Another engine gets the rendered conversation as text (it tokenises it itself).
    text = await asyncio.to_thread(service.tokens.chat_text, req.conversation) if service.upstream else None
    jobs = _jobs(service, req, prompt_ids, text)
    head = _head("chatcmpl", service) | {"system_fingerprint": f"refiner-{service.version}"}
    if req.stream:
        return await stream_job(request, service.jobs, jobs[0], _ChatEvents(head, req, len(prompt_ids)))
    results = await submit_all(request, service.jobs, jobs)
    return _chat_completion(service.tokens, req, head, len(prompt_ids), results)


@router.get("/models", response_model=ModelList, summary="The served model (OpenAI)")
async def models(service: ReadyService = Depends(get_service)) -> ModelList:
    card = ModelCard(
        id=service.model_name, created=int(time.time()), max_model_len=service.tokens.max_total_tokens
    )
    return ModelList(data=[card])


def _head(kind: str, service: ReadyService) -> dict[str, Any]:
    """The fields every answer and chunk of one request shares: its id, time and model."""
    return {"id": f"{kind}-{uuid.uuid4().hex}", "created": int(time.time()), "model": service.model_name}


def _jobs(
    service: ReadyService,
    req: CompletionRequest | ChatCompletionRequest,
    prompt_ids: list[int],
    prompt_text: str | None,
) -> list[Job]:
    """The jobs of one prompt (``prompt_text``: its text, when known): one per choice (``n``)."""
    requested, field = req.requested_tokens
    max_new_tokens = service.tokens.resolve_max_new_tokens(requested, len(prompt_ids), field)
    refine, best_of = req.to_refine_config(service.limits), req.to_best_of(service.limits)
    return [
        Job(
            prompt_ids=prompt_ids,
            params=req.to_sampling_params(max_new_tokens, service.limits, choice=i),
            refine=refine,
            best_of=best_of,
            prompt_text=prompt_text,
        )
        for i in range(req.n)
    ]


def _finish_reason(result: JobResult) -> str:
    gen = result.generation
    return "length" if gen is not None and gen.finish_reason == "length" else "stop"


def _completion_tokens(result: JobResult) -> int:
    if result.refinement is not None:
        return len(result.refinement.refined_ids)
    return len(result.generation.token_ids) if result.generation is not None else 0


def _completion(
    tokens: PromptTokenizer,
    req: CompletionRequest,
    head: dict[str, Any],
    prompt_ids: list[list[int]],
    results: list[JobResult],
) -> CompletionResponse:
    """The answer: ``n`` choices per prompt, in the prompts' order."""
    choices = []
    for k, result in enumerate(results):
        echo = req.prompts[k // req.n] if req.echo else ""
        logprobs = None if req.logprobs is None else _completion_logprobs(tokens, result, len(echo))
        choices.append(
            CompletionChoice(
                index=k,
                text=echo + result.text,
                finish_reason=_finish_reason(result),
                logprobs=logprobs,
                refinement=Refinement.of(result),
            )
        )
    usage = Usage.of(sum(map(len, prompt_ids)), sum(map(_completion_tokens, results)))
    return CompletionResponse(**head, choices=choices, usage=usage)


def _chat_completion(
    tokens: PromptTokenizer,
    req: ChatCompletionRequest,
    head: dict[str, Any],
    prompt_tokens: int,
    results: list[JobResult],
) -> ChatCompletionResponse:
    choices = [
        ChatChoice(
            index=k,
            message=ChatCompletionMessage(content=result.text),
            finish_reason=_finish_reason(result),
            logprobs=_chat_logprobs(tokens, result) if req.logprobs else None,
            refinement=Refinement.of(result),
        )
        for k, result in enumerate(results)
    ]
    usage = Usage.of(prompt_tokens, sum(map(_completion_tokens, results)))
    return ChatCompletionResponse(**head, choices=choices, usage=usage)


def _completion_logprobs(
    tokens: PromptTokenizer, result: JobResult, offset: int
) -> CompletionLogprobs | None:
    """The initial generation's tokens, their log-probabilities and where each starts in the text."""
    gen = result.generation
    if gen is None:
        return None
    texts = tokens.token_texts(gen.token_ids)
    offsets = []
    for text in texts:
        offsets.append(offset)
        offset += len(text)
    return CompletionLogprobs(tokens=texts, token_logprobs=list(gen.logprobs), text_offset=offsets)


def _chat_logprobs(tokens: PromptTokenizer, result: JobResult) -> ChatLogprobs | None:
    gen = result.generation
    if gen is None or None in gen.logprobs:  # another engine generated it: log-probabilities unknown
        return None
    texts = tokens.token_texts(gen.token_ids)
    return ChatLogprobs(
        content=[
            ChatTokenLogprob(token=t, logprob=lp, bytes=list(t.encode()))
            for t, lp in zip(texts, gen.logprobs, strict=True)
        ]
    )


class _OpenAIEvents:
    """OpenAI streaming: one chunk per token, a last chunk with the finish reason and the refinement,
    a usage chunk (no choices) when ``stream_options.include_usage`` asks for it, then ``[DONE]``.

    Subclasses say how a choice and a chunk of their protocol look.
    """

    def __init__(self, head: dict[str, Any], include_usage: bool, prompt_tokens: int) -> None:
        self.head, self.include_usage, self.prompt_tokens = head, include_usage, prompt_tokens

    def choice(self, text: str, finish_reason: str | None, refinement: Refinement | None) -> BaseModel:
        raise NotImplementedError

    def chunk(self, choices: list[Any], usage: Usage | None = None) -> BaseModel:
        raise NotImplementedError

    def token(self, event: TokenEvent) -> Iterator[BaseModel]:
        yield self.chunk([self.choice(event.text, None, None)])

    def result(self, result: JobResult) -> Iterator[BaseModel | str]:
        yield self.chunk([self.choice("", _finish_reason(result), Refinement.of(result))])
        if self.include_usage:
            yield self.chunk([], Usage.of(self.prompt_tokens, _completion_tokens(result)))
        yield "[DONE]"


class _CompletionEvents(_OpenAIEvents):
    def __init__(self, head: dict[str, Any], req: CompletionRequest, prompt_tokens: int) -> None:
        super().__init__(head, req.include_usage, prompt_tokens)
        self.echo = req.prompts[0] if req.echo else ""  # sent with the first token's text

    def choice(self, text: str, finish_reason: str | None, refinement: Refinement | None) -> BaseModel:
        text, self.echo = self.echo + text, ""
        return CompletionChoice(index=0, text=text, finish_reason=finish_reason, refinement=refinement)

    def chunk(self, choices: list[Any], usage: Usage | None = None) -> BaseModel:
        return CompletionChunk(**self.head, choices=choices, usage=usage)


class _ChatEvents(_OpenAIEvents):
    def __init__(self, head: dict[str, Any], req: ChatCompletionRequest, prompt_tokens: int) -> None:
        super().__init__(head, req.include_usage, prompt_tokens)
        self.role_sent = False  # the first chunk's delta carries the role

    def choice(self, text: str, finish_reason: str | None, refinement: Refinement | None) -> BaseModel:
        delta = ChatDelta(role=None if self.role_sent else "assistant", content=text or None)
        self.role_sent = True
        return ChatChunkChoice(index=0, delta=delta, finish_reason=finish_reason, refinement=refinement)

    def chunk(self, choices: list[Any], usage: Usage | None = None) -> BaseModel:
        return ChatCompletionChunk(**self.head, choices=choices, usage=usage)
