"""The engine: owns the model, a bounded job queue, and the one thread that does all torch work.

The event loop only enqueues jobs and awaits futures; it never runs the model. The worker takes the
first waiting job, waits for more while they keep coming (each within ``batch_window_s`` of the last,
up to ``max_batch_size``), then for the whole batch makes one ``BatchGenerator.generate`` call (each
job keeps its own sampling parameters and seed) and one ``Refiner.refine`` call for the jobs that ask
for refinement. Each job's answer goes back to its own asyncio future through
``loop.call_soon_threadsafe``.

If anything fails inside a batch (NaN, out of memory, a bug), each job of the batch is run again
alone, so a bad request fails by itself and its neighbours still get their answers; the worker
keeps running.

Cost is bounded per request (``app.admission``): a job is estimated before it is queued, refused when
over budget or when memory is near the ceiling, and marked small or large. A large job runs alone;
between its passes and decode steps (``checkpoint``) the worker marks progress, stops the job when
every caller has left or timed out, and runs one batch of waiting small jobs, so small requests are
not stuck behind it.

Example (inside a coroutine):
    >>> engine = Engine(loaded, Refiner(loaded)); engine.start()
    >>> result = await engine.submit(Job(prompt_ids, SamplingParams(max_new_tokens=32), RefineConfig()))
    >>> result.text, result.refinement.objective_after["total"]
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import secrets
import threading
import time
from collections.abc import AsyncIterator, Callable
from concurrent import futures
from concurrent.futures import Future
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Protocol

import torch

from app import metrics
from app.admission import (
    SMALL_SHARE,
    Admission,
    JobCost,
    JobShape,
    MemoryPressureError,
    RequestTooCostlyError,
    release_free_memory,
)
from app.torch_thread import TorchThread
from refiners.config import RefineConfig
from refiners.errors import InvalidRequestError
from refiners.generation import (
    FINISH_CANCELLED,
    BatchGenerator,
    GenerationOutput,
    IncrementalDetokenizer,
    SamplingParams,
)
from refiners.models import LoadedModel
from refiners.refiner import RefineRequest
from refiners.result import RefineResult

if TYPE_CHECKING:
    from refiners.refiner import Refiner

log = logging.getLogger(__name__)


class QueueFullError(RuntimeError):
    """The queue already holds ``max_queue`` jobs: the caller should retry later (429 + Retry-After)."""


class RequestTimeoutError(TimeoutError):
    """The job did not finish within its ``timeout_s`` (queue time included); it was dropped."""


# The longest a small job waits for company, in batch windows: arrivals keep a batch open this long.
BATCH_WAIT_WINDOWS = 5


@dataclass(frozen=True)
class EngineLimits:
    """How the engine batches and queues jobs, and how long they may take.

    Args:
        max_batch_size: most jobs per batch.
        batch_window_s: how long the worker waits for another job before it starts a batch; each
            arrival restarts the wait, up to ``BATCH_WAIT_WINDOWS`` windows after the first job.
        max_queue: most jobs waiting; ``submit`` beyond that raises ``QueueFullError``.
        request_timeout_s: default time limit of a job, queue time included.
        stall_timeout_s: ``stalled`` turns true when work waits and no progress was made for this long.
    """

    max_batch_size: int = 8
    batch_window_s: float = 0.02
    max_queue: int = 64
    request_timeout_s: float = 120.0
    stall_timeout_s: float = 60.0

    def __post_init__(self) -> None:
        if self.max_batch_size < 1 or self.max_queue < 1 or self.batch_window_s < 0:
            raise ValueError("max_batch_size and max_queue must be >= 1 and batch_window_s >= 0")
        if self.request_timeout_s <= 0 or self.stall_timeout_s <= 0:
            raise ValueError("request_timeout_s and stall_timeout_s must be > 0")


class EngineStoppedError(RuntimeError):
    """The engine is not running (not started yet, or shutting down): retry on another replica."""


class _Abandoned(Exception):
    """Raised at a checkpoint when nobody waits for the batch any more (callers left or timed out)."""


@dataclass
class Job:
    """One request for the engine.

    Args:
        prompt_ids: the prompt, tokenised (chat template applied).
        params: how to generate the initial output.
        refine: how to refine it; None = plain generation.
        output_ids: an output to refine instead of generating one (``POST /refine``); needs ``refine``.
        best_of: > 1: sample that many outputs (seeds seed, seed + 1, ...) and return the one with the
            highest objective (``refine``'s, or the default ``RefineConfig()``), without refining it.
        timeout_s: time limit from submission, queue time included; None = the engine's default.
        prompt_text: the text ``prompt_ids`` encode, when the route knows it exactly; what an upstream
            generator is sent (``app.upstream_jobs``). The engine itself never reads it.
    """

    prompt_ids: list[int]
    params: SamplingParams
    refine: RefineConfig | None
    output_ids: list[int] | None = None
    best_of: int = 1
    timeout_s: float | None = None
    prompt_text: str | None = None

    def __post_init__(self) -> None:
        if not self.prompt_ids:
            raise InvalidRequestError("the prompt is empty: give at least one token")
        if self.best_of < 1:
            raise InvalidRequestError(f"best_of must be >= 1, got {self.best_of}")
        if self.best_of > 1 and not self.params.do_sample:
            raise InvalidRequestError(
                "best_of > 1 needs sampling (do_sample): greedy candidates are all the same"
            )
        if self.output_ids is not None:
            if self.refine is None:
                raise InvalidRequestError("an output to refine was given without a refine config")
            if not self.output_ids:
                raise InvalidRequestError("the output to refine is empty: give at least one token")
            if self.best_of > 1:
                raise InvalidRequestError("best_of applies to generation, not to refining a given output")
        if self.timeout_s is not None and not self.timeout_s > 0:
            raise InvalidRequestError(f"timeout_s must be > 0, got {self.timeout_s}")


@dataclass
class TokenEvent:
    """One streamed token of the initial output; ``text`` is what it adds to the decoded text.
    ``logprob`` is None when not known (an output streamed by an upstream generator)."""

    token_id: int
    logprob: float | None
    text: str


@dataclass
class JobResult:
    """The answer to one job.

    ``text`` is the refined text when the job was refined, else the generation's text. Durations are
    wall times of the batch calls the job was part of. For ``best_of`` > 1, ``generation`` is the best
    candidate and ``best_of_sequences`` the others, with ``best_of_objectives`` holding the objective of
    every candidate (best first).
    """

    generation: GenerationOutput | None
    refinement: RefineResult | None
    text: str
    generate_seconds: float
    refine_seconds: float
    queue_seconds: float
    batch_size: int
    best_of_sequences: list[GenerationOutput] = field(default_factory=list)
    best_of_objectives: list[dict[str, float]] = field(default_factory=list)


class JobRunner(Protocol):
    """What routes hand jobs to: the ``Engine``, or ``app.upstream_jobs.UpstreamJobs`` in front of it."""

    async def submit(self, job: Job) -> JobResult: ...

    def stream(self, job: Job) -> AsyncIterator[TokenEvent | JobResult]: ...


_END = object()  # ends a job's event stream; the result or error is then in its future


@dataclass(eq=False)
class _Pending:
    """A submitted job and the means to answer it. Touched by the loop thread and the worker."""

    job: Job
    params: SamplingParams  # job.params with the seed fixed, so a retry samples the same tokens
    loop: asyncio.AbstractEventLoop
    future: asyncio.Future
    submitted: float  # time.monotonic()
    deadline: float
    events: asyncio.Queue | None = None  # set for streamed jobs
    cancelled: bool = False  # the caller left; written by the loop thread, read by the worker
    streamed: int = 0  # tokens already sent; a retry after a batch failure does not send them again
    cost: JobCost | None = None  # None: no admission budgets (every job small)

    @property
    def small(self) -> bool:
        return self.cost is None or self.cost.small

    def abandoned(self, now: float) -> bool:
        return self.cancelled or now > self.deadline


class Engine:
    """Batches jobs onto one worker thread that owns all model work.

    Args:
        loaded: the model and tokenizer.
        refiner: the ``Refiner`` (refinement and best_of scoring); None serves plain generation only.
        limits: batching, queue and time limits (``EngineLimits``; its defaults when None).
        admission: the cost budgets (``app.admission``); None = no budgets, every job small.
        torch_thread: the thread the work loop runs on, the one that loaded the model (``TorchThread``);
            None = a new one. The engine closes it when it stops.
    """

    def __init__(
        self,
        loaded: LoadedModel,
        refiner: Refiner | None,
        limits: EngineLimits | None = None,
        admission: Admission | None = None,
        torch_thread: TorchThread | None = None,
    ) -> None:
        self.loaded = loaded
        self.refiner = refiner
        self.generator = BatchGenerator(loaded)
        self.limits = limits or EngineLimits()
        self.admission = admission
        self._last_progress = time.monotonic()
        self._running = False  # a batch is being processed (written by the worker only)
        self._current: list[_Pending] = []  # the top-level batch being processed, and since when
        self._current_since = 0.0
        self._queue: collections.deque[_Pending] = collections.deque()
        self._cond = threading.Condition()
        # All torch work on one thread (see app/torch_thread.py); the engine's own one unless given.
        self._torch = torch_thread
        self._worker: Future[None] | None = None  # the work loop, while it runs
        self._stopping = False
        metrics.MODEL_INFO.labels(
            model_id=loaded.model_id,
            device=str(loaded.device),
            dtype=str(loaded.dtype).removeprefix("torch."),
        ).set(1)

    # -- lifecycle ------------------------------------------------------------------------------------

    def start(self) -> None:
        """Start the work loop on the torch thread."""
        if self._worker is not None:
            return
        self._stopping = False
        if self._torch is None:
            self._torch = TorchThread("refiner-engine")
        self._worker = self._torch.submit(self._work)

    def warm_up(self) -> None:
        """One short generation and refinement, so the first request does not pay one-off costs
        (the refiner's lazily built state, first-call kernel and allocator set-up), then measure the
        speeds that turn cost estimates into seconds. Blocking; run it before serving. Records no
        metrics."""
        prompt = self.loaded.tokenizer.encode("Say hello.", add_special_tokens=False)
        [out] = self.generator.generate(
            [prompt], [SamplingParams(max_new_tokens=4)], keep_prompt_cache=self.refiner is not None
        )
        if self.refiner is not None:
            config = RefineConfig(keywords=("hello",))
            self.refiner.refine([RefineRequest(prompt, list(out.token_ids), config, out.prompt_cache)])
        if self.admission is not None:
            self._measure_speed(prompt)

    def _measure_speed(self, prompt: list[int], steps: int = 8, rows: int = 4, width: int = 64) -> None:
        """Time ``steps`` decode steps, one (rows, width) forward and the scoring of ``rows`` short
        outputs after a 4 * width-token prompt; the fastest of three tries counts (other work on the
        machine only ever slows a try down)."""
        assert self.admission is not None
        ids = torch.tensor([(prompt * width)[:width]] * rows, device=self.loaded.device)
        long = min(4 * width, self.loaded.max_position_embeddings // 2)
        context, outputs = (prompt * long)[:long], [(prompt * steps)[:steps]] * rows
        tokenizer, text_ids = self.loaded.tokenizer, (prompt * width)[:width]
        decode, long_decode, forward, scoring, text = [], [], [], [], []
        for _ in range(3):
            started = time.perf_counter()
            self.generator.generate([prompt], [SamplingParams(max_new_tokens=steps)])
            decode.append((time.perf_counter() - started) / steps)
            started = time.perf_counter()
            self.generator.generate([context], [SamplingParams(max_new_tokens=steps)])
            long_decode.append(time.perf_counter() - started)
            started = time.perf_counter()
            with torch.inference_mode():
                self.loaded.model(input_ids=ids)
            if ids.is_cuda:  # the forward only queues its kernels: wait for them before reading the clock
                torch.cuda.synchronize(ids.device)
            forward.append((time.perf_counter() - started) / ids.numel())
            started = time.perf_counter()
            tokenizer.encode(tokenizer.decode(text_ids, skip_special_tokens=True), add_special_tokens=False)
            text.append((time.perf_counter() - started) / len(text_ids))
            if self.refiner is not None:
                started = time.perf_counter()
                self.refiner.score(context, outputs, RefineConfig())
                scoring.append(time.perf_counter() - started)
        speed = self.admission.speed
        speed.decode_step_s, speed.token_row_s, speed.text_token_s = min(decode), min(forward), min(text)
        prefill = len(context) * speed.token_row_s
        per_step = (min(long_decode) - prefill) / steps
        speed.decode_context_token_s = max(0.0, (per_step - speed.decode_step_s) / len(context))
        if scoring:
            cost = self.admission.cost_model.estimate(len(context), steps, RefineConfig(), best_of=rows)
            rest = min(scoring) - (len(context) + cost.refine_token_rows) * speed.token_row_s
            speed.context_token_s = max(0.0, rest / (cost.refine_context_rows * cost.context_tokens))
        log.info(
            "measured speed: %.1f ms per decode step (+%.2f us per context token), %.3f ms per token "
            "row, %.2f us per context token of a scored row",
            1e3 * speed.decode_step_s,
            1e6 * speed.decode_context_token_s,
            1e3 * speed.token_row_s,
            1e6 * speed.context_token_s,
        )

    def stop(self) -> None:
        """Let the running batch finish, stop the worker, and fail the jobs still queued. Blocking."""
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        if self._worker is not None:
            futures.wait([self._worker])
            self._worker = None
        if self._torch is not None:
            self._torch.close()
            self._torch = None
        with self._cond:
            left, self._queue = list(self._queue), collections.deque()
            metrics.QUEUE_SIZE.set(0)
        for p in left:
            self._settle(p, error=EngineStoppedError("the server is shutting down: retry the request"))

    @property
    def queue_size(self) -> int:
        return len(self._queue)

    def stalled(self) -> bool:
        """True when work waits (queued or running) and the worker made no progress (a decode step, a
        pass, a finished batch) for ``stall_timeout_s``, or the worker thread is gone: a liveness
        probe should then restart the server."""
        if self._worker is None or self._stopping:
            return False
        if self._worker.done():
            return True
        busy = self._running or bool(self._queue)
        return busy and time.monotonic() - self._last_progress > self.limits.stall_timeout_s

    def _progress(self) -> None:
        self._last_progress = time.monotonic()

    # -- event-loop side ------------------------------------------------------------------------------

    async def submit(self, job: Job) -> JobResult:
        """Queue ``job`` and wait for its result.

        Raises:
            QueueFullError: the queue is full (raised at once; nothing was queued).
            RequestTimeoutError: the job took longer than its timeout (it is dropped).
            EngineStoppedError: the engine is not running.
            InvalidRequestError: the job asks for something this engine cannot do.
            Any error the job itself raised (``NumericalError``, ``torch.OutOfMemoryError``, ...).
        If the awaiting task is cancelled (the client left), the job is dropped: removed from the queue,
        or its generation row stopped.
        """
        p = self._enqueue(job, stream=False)
        try:
            return await asyncio.wait_for(
                asyncio.shield(p.future), timeout=max(0.0, p.deadline - time.monotonic())
            )
        except TimeoutError:
            if p.future.done() and not p.future.cancelled():
                return p.future.result()  # finished in the same instant
            self._cancel(p)
            metrics.REJECTED_REQUESTS.labels(reason="timeout").inc()
            raise RequestTimeoutError(self._timeout_message(p)) from None
        except asyncio.CancelledError:
            self._cancel(p)
            raise

    def stream(self, job: Job) -> AsyncIterator[TokenEvent | JobResult]:
        """Queue ``job`` now and return an async iterator of its ``TokenEvent``s, then its ``JobResult``.

        The job is queued when this is called, so ``QueueFullError`` (and ``InvalidRequestError``) are
        raised here, before any response starts. Errors of the job itself, and ``RequestTimeoutError``,
        are raised by the iterator. Closing the iterator early (``aclose``, or the consuming task being
        cancelled) drops the job. ``best_of`` > 1 cannot be streamed.
        """
        if job.best_of > 1:
            raise InvalidRequestError("best_of > 1 cannot be streamed: set stream to false or best_of to 1")
        return self._events(self._enqueue(job, stream=True))

    async def _events(self, p: _Pending) -> AsyncIterator[TokenEvent | JobResult]:
        assert p.events is not None
        try:
            while True:
                try:
                    item = await asyncio.wait_for(
                        p.events.get(), timeout=max(0.0, p.deadline - time.monotonic())
                    )
                except TimeoutError:
                    metrics.REJECTED_REQUESTS.labels(reason="timeout").inc()
                    raise RequestTimeoutError(self._timeout_message(p)) from None
                if item is _END:
                    yield p.future.result()  # raises the job's error if it failed
                    return
                yield item
        finally:
            if not p.future.done():
                self._cancel(p)

    def _enqueue(self, job: Job, stream: bool) -> _Pending:
        if self._worker is None or self._stopping:
            raise EngineStoppedError("the engine is not running: retry shortly")
        if self.refiner is None and (job.refine is not None or job.best_of > 1):
            raise InvalidRequestError("this engine has no refiner: refinement and best_of are unavailable")
        params = job.params
        if params.do_sample and params.seed is None:
            params = replace(params, seed=secrets.randbits(62))
        cost = self._admit(job)
        loop = asyncio.get_running_loop()
        now = time.monotonic()
        timeout = job.timeout_s if job.timeout_s is not None else self.limits.request_timeout_s
        p = _Pending(job, params, loop, loop.create_future(), now, now + timeout, cost=cost)
        if stream:
            p.events = asyncio.Queue()
        with self._cond:
            if len(self._queue) >= self.limits.max_queue:
                metrics.REJECTED_REQUESTS.labels(reason="queue_full").inc()
                raise QueueFullError(
                    f"the server is busy ({self.limits.max_queue} requests waiting): retry later"
                )
            if (
                cost is not None
                and 0 < (ahead := self._work_ahead(p))
                and ahead + cost.wall_seconds > timeout
            ):
                metrics.REJECTED_REQUESTS.labels(reason="backlog").inc()
                raise QueueFullError(
                    f"the server has about {ahead:.0f} s of work ahead of this request, which would not "
                    f"finish within its {timeout:g} s limit: retry later"
                )
            if not self._running and not self._queue:
                self._progress()  # an idle worker's silence was not a stall
            self._queue.append(p)
            metrics.QUEUE_SIZE.set(len(self._queue))
            self._cond.notify()
        return p

    def _work_ahead(self, p: _Pending) -> float:
        """Estimated seconds of work that would run before ``p``: the rest of the running batch and the
        queued jobs ahead of it. Small jobs are batched (``max_batch_size`` share the time of about
        one) and pass large ones, which only wait, so a small job counts only the small ones.
        Call with ``self._cond`` held."""
        ahead = [q for q in self._queue if q.small or not p.small]
        seconds = sum(
            q.cost.wall_seconds / (self.limits.max_batch_size if q.small else 1) for q in ahead if q.cost
        )
        if self._current and not (p.small and not all(q.small for q in self._current)):
            running = max((q.cost.wall_seconds for q in self._current if q.cost), default=0.0)
            seconds += max(0.0, running - (time.monotonic() - self._current_since))
        return seconds

    def _admit(self, job: Job) -> JobCost | None:
        """The job's estimated cost; raises when it is over budget or memory is near the ceiling."""
        if self.admission is None:
            return None
        refine = job.refine
        if job.best_of > 1 and refine is None and self.refiner is not None:
            refine = RefineConfig()  # the candidates are ranked by the default objective
        keyword_tokens = 0
        if refine is not None and refine.keywords:
            encode = self.loaded.tokenizer.encode
            # + 2: an inflection ("-es", "-ing") may take more tokens than the form given
            keyword_tokens = 2 + max(len(encode(" " + k, add_special_tokens=False)) for k in refine.keywords)
        shape = JobShape(
            prompt_tokens=len(job.prompt_ids),
            output_tokens=len(job.output_ids) if job.output_ids is not None else job.params.max_new_tokens,
            refine=refine,
            best_of=job.best_of,
            generate=job.output_ids is None,
            keyword_tokens=keyword_tokens,
        )
        try:
            return self.admission.admit(shape)
        except MemoryPressureError:
            metrics.REJECTED_REQUESTS.labels(reason="memory").inc()
            raise
        except RequestTooCostlyError:
            metrics.REJECTED_REQUESTS.labels(reason="too_costly").inc()
            raise

    def _cancel(self, p: _Pending) -> None:
        """Drop a job whose caller left or timed out: out of the queue, or its row stops at the next token."""
        p.cancelled = True
        with self._cond:
            if p in self._queue:
                self._queue.remove(p)
                metrics.QUEUE_SIZE.set(len(self._queue))
        if not p.future.done():
            p.future.cancel()

    @staticmethod
    def _timeout_message(p: _Pending) -> str:
        return f"the request did not finish within {p.deadline - p.submitted:g} s"

    # -- answers (called in the worker, run in the job's loop) ----------------------------------------

    def _settle(
        self, p: _Pending, result: JobResult | None = None, error: BaseException | None = None
    ) -> None:
        def settle() -> None:
            if not p.future.done():
                if error is not None:
                    p.future.set_exception(error)
                else:
                    p.future.set_result(result)
            if p.events is not None:
                p.events.put_nowait(_END)

        with contextlib.suppress(RuntimeError):  # the caller's loop is closed: nobody is waiting
            p.loop.call_soon_threadsafe(settle)

    def _emit(self, p: _Pending, event: TokenEvent) -> None:
        assert p.events is not None
        with contextlib.suppress(RuntimeError):
            p.loop.call_soon_threadsafe(p.events.put_nowait, event)

    # -- worker ---------------------------------------------------------------------------------------

    def _work(self) -> None:
        while (batch := self._next_batch()) is not None:
            if not batch:
                continue
            metrics.BATCH_SIZE.observe(len(batch))
            self._running = True
            self._current, self._current_since = batch, time.monotonic()
            self._progress()
            try:
                self._run(batch)
            except Exception as exc:  # a bug outside the per-job handling: answer everyone, keep running
                log.exception("the engine worker failed on a batch")
                for p in batch:
                    self._settle(p, error=exc)
            finally:
                self._running, self._current = False, []
                self._progress()
            if self.admission is not None and self.admission.holds_too_much():
                release_free_memory()

    def _next_batch(self) -> list[_Pending] | None:
        """Wait for a job; a large one runs alone, a small one waits for more small ones (passing over
        large ones, which keep their place) until none came for ``batch_window_s``. None when stopping.

        Clients that send their next request when answered come back together, but their requests
        reach the queue spread over more than one window: a window counted from the first job only
        split 16 such clients into batches of 8-9 of 16."""
        with self._cond:
            while not self._queue and not self._stopping:
                self._cond.wait()
            if self._stopping:
                return None
            batch = [self._queue.popleft()]
            window = self.limits.batch_window_s
            last_arrival = time.monotonic()
            latest = last_arrival + BATCH_WAIT_WINDOWS * window
            while batch[0].small and len(batch) < self.limits.max_batch_size and not self._stopping:
                more = self._take_small(self.limits.max_batch_size - len(batch), self._memory_left(batch))
                if more:
                    batch += more
                    last_arrival = time.monotonic()
                    continue
                remaining = min(last_arrival + window, latest) - time.monotonic()
                if remaining <= 0:
                    break
                self._cond.wait(remaining)
            metrics.QUEUE_SIZE.set(len(self._queue))
        return [p for p in batch if not p.cancelled]

    def _memory_left(self, batch: list[_Pending]) -> float:
        """What a batch may still add: one request's memory budget is shared by a batch."""
        if self.admission is None:
            return float("inf")
        used = sum(p.cost.memory_bytes for p in batch if p.cost is not None)
        return self.admission.request_memory_bytes - used

    def _take_small(self, limit: int, memory: float) -> list[_Pending]:
        """Remove and return up to ``limit`` waiting small jobs, oldest first, within ``memory``.
        Call with ``self._cond`` held."""
        taken: list[_Pending] = []
        for p in list(self._queue):
            if len(taken) == limit:
                break
            need = p.cost.memory_bytes if p.cost is not None else 0
            if p.small and need <= memory:
                self._queue.remove(p)
                taken.append(p)
                memory -= need
        return taken

    def _checkpoint(self, batch: list[_Pending], nested: bool) -> Callable[[], None]:
        """What the batch's passes run between steps: mark progress, stop when nobody waits, and (for
        a large batch, not itself nested) serve one batch of waiting small jobs."""
        serves = not nested and not all(p.small for p in batch)
        started, lent = time.monotonic(), 0.0  # lent: time spent on small jobs in this batch's pauses

        def checkpoint() -> None:
            nonlocal lent
            self._progress()
            now = time.monotonic()
            if all(p.abandoned(now) for p in batch):
                raise _Abandoned
            # Small jobs get at most SMALL_SHARE of the time, so a large job slows down at most
            # 1 / (1 - SMALL_SHARE) times however many small ones arrive.
            if serves and self._queue and lent <= SMALL_SHARE * (now - started):
                with self._cond:
                    small = self._take_small(self.limits.max_batch_size, self._memory_left([]))
                    metrics.QUEUE_SIZE.set(len(self._queue))
                small = [p for p in small if not p.cancelled]
                if small:
                    metrics.BATCH_SIZE.observe(len(small))
                    # Called from inside the large job's passes (inference mode, no grad): the
                    # small jobs run as they would at the top.
                    with torch.inference_mode(False), torch.enable_grad():
                        self._run(small, nested=True)
                    lent += time.monotonic() - now

        return checkpoint

    def _run(self, batch: list[_Pending], nested: bool = False) -> None:
        """Answer every job of the batch; on failure, retry each job alone so only the bad one fails."""
        try:
            results = self._process(batch, self._checkpoint(batch, nested))
        except _Abandoned:
            self._free_memory()
            for p in batch:  # their callers have gone or answered 504 already
                self._settle(p, error=RequestTimeoutError(self._timeout_message(p)))
            return
        except Exception as exc:
            self._free_memory()
            if len(batch) == 1:
                log.warning("a job failed: %s: %s", type(exc).__name__, exc)
                self._settle(batch[0], error=exc)
                return
            log.warning(
                "a batch of %d failed (%s: %s); retrying each job alone", len(batch), type(exc).__name__, exc
            )
            for p in batch:
                if not p.cancelled:
                    self._run([p], nested)
            return
        for p, result in results:
            self._settle(p, result=result)
            self._record(result)

    def _process(
        self, batch: list[_Pending], checkpoint: Callable[[], None]
    ) -> list[tuple[_Pending, JobResult]]:
        """Generate, pick best_of candidates and refine, for the whole batch. Answers nobody: a failure
        anywhere raises before any job is answered."""
        started = time.monotonic()
        outputs, generate_seconds = self._generate(batch, checkpoint)
        # Jobs still wanted: not cancelled, and not stopped at their deadline during generation (their
        # callers raise RequestTimeoutError by themselves).
        live = [
            i
            for i, p in enumerate(batch)
            if not p.cancelled and (p.job.output_ids is not None or len(outputs[i]) == p.job.best_of)
        ]
        best: dict[int, tuple[list[GenerationOutput], list[dict[str, float]]]] = {}
        for i in live:
            if batch[i].job.best_of > 1:
                best[i] = self._rank(batch[i], outputs[i])

        refine_started = time.monotonic()
        to_refine = [i for i in live if batch[i].job.refine is not None and batch[i].job.best_of == 1]
        refinements: dict[int, RefineResult] = {}
        if to_refine:
            assert self.refiner is not None
            requests = [self._refine_request(batch[i], outputs[i]) for i in to_refine]
            refinements = dict(zip(to_refine, self.refiner.refine(requests, checkpoint), strict=True))
        for outs in outputs:  # the caches are not needed past refinement: free them now
            for out in outs:
                out.prompt_cache = None
        refine_seconds = time.monotonic() - refine_started if to_refine else 0.0

        results = []
        for i in live:
            p = batch[i]
            candidates, objectives = best.get(i, (outputs[i], []))
            generation = candidates[0] if candidates else None
            refinement = refinements.get(i)
            text = (
                refinement.refined_text if refinement is not None else generation.text if generation else ""
            )
            result = JobResult(
                generation=generation,
                refinement=refinement,
                text=text,
                generate_seconds=generate_seconds if p.job.output_ids is None else 0.0,
                refine_seconds=refine_seconds if refinement is not None else 0.0,
                queue_seconds=started - p.submitted,
                batch_size=len(batch),
                best_of_sequences=candidates[1:] if p.job.best_of > 1 else [],
                best_of_objectives=objectives,
            )
            results.append((p, result))
        return results

    def _generate(
        self, batch: list[_Pending], checkpoint: Callable[[], None]
    ) -> tuple[list[list[GenerationOutput]], float]:
        """One ``generate`` call for every row of the batch: one per job, best_of rows per best_of job.

        Returns each job's outputs (empty for jobs with ``output_ids``) and the call's wall time.
        """
        owners: list[_Pending] = []  # the job of each generation row
        params: list[SamplingParams] = []
        for p in batch:
            if p.job.output_ids is None:
                for k in range(p.job.best_of):
                    seed = p.params.seed + k if p.params.seed is not None else None
                    owners.append(p)
                    params.append(replace(p.params, seed=seed))
        if not owners:
            return [[] for _ in batch], 0.0

        detokenizers = {
            id(p): IncrementalDetokenizer(self.loaded.tokenizer) for p in owners if p.events is not None
        }
        sent = {id(p): 0 for p in owners}

        def on_token(row: int, token_id: int, logprob: float) -> None:
            p = owners[row]
            if p.events is None or p.cancelled:
                return
            text = detokenizers[id(p)].push(token_id)
            sent[id(p)] += 1
            if sent[id(p)] > p.streamed:  # tokens of an earlier, failed attempt were already sent
                p.streamed += 1
                self._emit(p, TokenEvent(token_id, logprob, text))

        def cancelled(row: int) -> bool:
            p = owners[row]
            return p.cancelled or time.monotonic() > p.deadline

        # Refinement reuses the prompts' KV caches from generation instead of running them again.
        keep = any(p.job.refine is not None and p.job.best_of == 1 for p in owners)
        started = time.monotonic()
        outs = self.generator.generate(
            [p.job.prompt_ids for p in owners], params, on_token, cancelled, keep, checkpoint
        )
        seconds = time.monotonic() - started
        by_job: dict[int, list[GenerationOutput]] = {id(p): [] for p in batch}
        for p, out in zip(owners, outs, strict=True):
            if out.finish_reason != FINISH_CANCELLED:
                by_job[id(p)].append(out)
            metrics.GENERATED_TOKENS.inc(len(out.token_ids))
        return [by_job[id(p)] for p in batch], seconds

    def _rank(
        self, p: _Pending, candidates: list[GenerationOutput]
    ) -> tuple[list[GenerationOutput], list[dict]]:
        """Order best_of candidates by the objective, best first (ties keep the lower seed)."""
        assert self.refiner is not None
        config = p.job.refine or RefineConfig()
        objectives = self.refiner.score(p.job.prompt_ids, [c.token_ids for c in candidates], config)
        metrics.CANDIDATES_SCORED.inc(len(candidates))
        order = sorted(range(len(candidates)), key=lambda k: -objectives[k]["total"])
        return [candidates[k] for k in order], [objectives[k] for k in order]

    @staticmethod
    def _refine_request(p: _Pending, outputs: list[GenerationOutput]) -> RefineRequest:
        assert p.job.refine is not None
        if p.job.output_ids is not None:  # the client sent the output to refine
            return RefineRequest(p.job.prompt_ids, list(p.job.output_ids), p.job.refine)
        # The refined text ends at the request's stop sequences as the generated one does.
        config = replace(p.job.refine, stop=p.job.params.stop)
        return RefineRequest(p.job.prompt_ids, list(outputs[0].token_ids), config, outputs[0].prompt_cache)

    @staticmethod
    def _record(result: JobResult) -> None:
        if result.generation is not None:
            metrics.GENERATION_DURATION.observe(result.generate_seconds)
        r = result.refinement
        if r is not None:
            metrics.REFINEMENT_DURATION.labels(method=r.method).observe(result.refine_seconds)
            metrics.OBJECTIVE_GAIN.labels(method=r.method).observe(
                r.objective_after["total"] - r.objective_before["total"]
            )
            metrics.CANDIDATES_SCORED.inc(r.candidates_scored)
            for edit in r.edits:
                metrics.ACCEPTED_EDITS.labels(method=r.method, op=str(edit.get("op", "unknown"))).inc()

    @staticmethod
    def _free_memory() -> None:
        # After an out-of-memory error, give the cached blocks back before the retries.
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
