"""The one thread that runs the server's torch work.

libgomp (PyTorch's OpenMP on Linux) gives every thread that runs a parallel op its own team of worker
threads, and once it manages more threads than there are CPUs it stops spinning between parallel regions
and puts them to sleep instead. A model loaded on one thread and run on another therefore ran every op
about 30% slower on the 2-core machine (the README's "Speed" section has the measurement). Loading,
warm-up and the engine's work loop all run here, so the process has a single OpenMP team.
"""

from __future__ import annotations

import asyncio
import queue
import threading
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any, TypeVar

T = TypeVar("T")


class TorchThread:
    """A daemon thread that runs the callables given to it, one at a time, in order."""

    def __init__(self, name: str = "refiner-torch") -> None:
        self._calls: queue.SimpleQueue[tuple[Future[Any], Callable[[], Any]] | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._serve, name=name, daemon=True)
        self._thread.start()

    def submit(self, fn: Callable[..., T], *args: Any) -> Future[T]:
        """Run ``fn(*args)`` on the thread after the calls before it; its future holds the result."""
        future: Future[T] = Future()
        self._calls.put((future, lambda: fn(*args)))
        return future

    async def run(self, fn: Callable[..., T], *args: Any) -> T:
        """Await ``fn(*args)`` run on the thread."""
        return await asyncio.wrap_future(self.submit(fn, *args))

    def close(self) -> None:
        """End the thread once the calls already given have run."""
        self._calls.put(None)

    def _serve(self) -> None:
        while (call := self._calls.get()) is not None:
            future, fn = call
            if future.set_running_or_notify_cancel():
                try:
                    future.set_result(fn())
                except BaseException as exc:  # the caller gets it from the future
                    future.set_exception(exc)
