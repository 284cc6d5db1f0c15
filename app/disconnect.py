"""Await engine work while watching the client: a client that goes away frees its queued work.

Starlette does not cancel a (non-streaming) route when its client disconnects, so the route awaits
the engine and the ASGI ``http.disconnect`` message side by side and cancels the engine call first;
``Engine.submit`` drops a job whose awaiting task is cancelled.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Sequence
from typing import TypeVar

from fastapi import Request

from app.engine import Job, JobResult, JobRunner
from app.errors import APIError

T = TypeVar("T")


class ClientDisconnected(APIError):
    """The client closed the connection before the answer was ready (nginx's 499)."""

    status_code = 499
    error_type = "client_closed_request"


async def _disconnected(request: Request) -> None:
    # The body has been read already, so the next ASGI message can only be the disconnect.
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


async def unless_disconnected(request: Request, work: Awaitable[T]) -> T:
    """Return ``await work``, or cancel it and raise ``ClientDisconnected`` if the client leaves first."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_disconnected(request))
    try:
        done, _ = await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
        if task in done:
            return task.result()
        raise ClientDisconnected("the client disconnected; its work was cancelled")
    finally:
        for t in (task, watcher):
            if not t.done():
                t.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await t


async def submit_all(request: Request, runner: JobRunner, jobs: Sequence[Job]) -> list[JobResult]:
    """The results of ``jobs``, submitted together (to the engine, or upstream first) so that the
    engine can batch them.

    If one fails, or the client leaves, the others are cancelled too: their queued work is dropped.
    """

    async def run_all() -> list[JobResult]:
        tasks = [asyncio.ensure_future(runner.submit(job)) for job in jobs]
        try:
            return list(await asyncio.gather(*tasks))
        finally:
            for task in tasks:
                task.cancel()

    return await unless_disconnected(request, run_all())
