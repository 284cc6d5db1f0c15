"""Server-sent events: the one driver behind the TGI stream (``/generate_stream``) and the OpenAI ones.

A protocol says what to send for each token and for the result (an ``EventWriter``); the driver runs
the job, sends those events and turns a failure into the stream's last event. The stream starts only
once the engine has produced its first event, so that a full queue or a bad request still gets its
status code (429, 422) instead of an error inside a 200.

After that the status is sent, so a failure becomes one last event with the service's error body,
the same in both protocols: ``data: {"error": "<message>", "error_type": "<type>"}`` (``ErrorResponse``).
TGI clients (``huggingface_hub``, ``text-generation``) raise their typed errors from it (``error_type``
"generation", "overloaded", ...); the ``openai`` client raises ``openai.APIError`` with the message as
the error's ``body``. If the client leaves, Starlette cancels the generator and the engine drops the job.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterable
from typing import Any, Protocol

from fastapi import Request
from fastapi.responses import StreamingResponse
from pydantic import BaseModel

from app.disconnect import unless_disconnected
from app.engine import Job, JobResult, JobRunner, TokenEvent
from app.errors import classify
from app.schemas import ErrorResponse

SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


class EventWriter(Protocol):
    """What one protocol sends: events for a token of the initial generation, then for the result."""

    def token(self, event: TokenEvent) -> Iterable[BaseModel]: ...

    def result(self, result: JobResult) -> Iterable[BaseModel | str]: ...


def sse(payload: BaseModel | str) -> bytes:
    """One server-sent event: ``data: <json>`` (or a bare string such as ``[DONE]``) and a blank line."""
    data = payload if isinstance(payload, str) else payload.model_dump_json()
    return f"data: {data}\n\n".encode()


def sse_content(model: type[BaseModel]) -> dict[str, Any]:
    """The OpenAPI ``content`` of a stream whose events are ``model``s.

    The schema is inline, so it carries its own ``$defs``; its ``$id`` makes ``#/$defs/...`` resolve
    inside it rather than at the document's root.
    """
    schema = {"$id": f"urn:refiner:sse:{model.__name__}", **model.model_json_schema(mode="serialization")}
    return {"text/event-stream": {"schema": schema}}


async def stream_job(request: Request, jobs: JobRunner, job: Job, writer: EventWriter) -> StreamingResponse:
    """Start ``job`` (in the engine, or upstream first); answer with its events as ``writer`` writes them."""
    events = jobs.stream(job).__aiter__()
    try:
        first = await unless_disconnected(request, anext(events))
    except BaseException:
        await events.aclose()
        raise
    return StreamingResponse(
        _drive(first, events, writer), media_type="text/event-stream", headers=SSE_HEADERS
    )


async def _drive(
    first: TokenEvent | JobResult, events: AsyncIterator[TokenEvent | JobResult], writer: EventWriter
) -> AsyncIterator[bytes]:
    item = first
    try:
        while isinstance(item, TokenEvent):
            for payload in writer.token(item):
                yield sse(payload)
            item = await anext(events)
        for payload in writer.result(item):
            yield sse(payload)
    except StopAsyncIteration:
        yield sse(ErrorResponse(error="the engine ended the stream without a result", error_type="internal"))
    except Exception as exc:
        _, message, error_type, _ = classify(exc)
        yield sse(ErrorResponse(error=message, error_type=error_type))
    finally:
        await events.aclose()
