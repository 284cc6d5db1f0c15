"""Admission control: what a job will cost, and whether the server takes it now.

Before a job is queued, ``Admission.admit`` estimates its peak memory and its work (``refiners.cost``;
work in seconds through the speeds measured at warm-up) and

- refuses it with ``RequestTooCostlyError`` (422) when it is over the per-request budget, naming the
  parameter to lower and a value that fits;
- refuses it with ``MemoryPressureError`` (503 + Retry-After) when the process's resident memory plus
  the estimate would pass the memory ceiling: the server never grows into the kernel's OOM killer;
- otherwise says whether it is small: small jobs are batched together and may run while a large job
  pauses between its passes (``app.engine``).
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import os
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

from refiners.config import RefineConfig
from refiners.cost import Cost, CostModel
from refiners.errors import InvalidRequestError

MB = 2**20
# Share of the machine's memory (or of the container's limit) the server lets itself grow to by
# default: the rest is for the kernel, the page cache and whatever runs beside it.
DEFAULT_MEMORY_SHARE = 0.8
# Share of the worker's time that small jobs may take while a large job runs (in its pauses): a large
# job then takes at most 1 / (1 - SMALL_SHARE) times its own work, and is admitted only if that fits.
SMALL_SHARE = 0.5
# Share of the ceiling one request may need by default: a few maximal requests can be admitted side
# by side (one runs, small ones run in its pauses) without passing the ceiling.
DEFAULT_REQUEST_SHARE = 0.25


class RequestTooCostlyError(InvalidRequestError):
    """The request is valid but would need more memory or time than one request may take (422)."""


class MemoryPressureError(RuntimeError):
    """The server is near its memory ceiling: retry shortly, or on another replica (503)."""


def resident_bytes() -> int:
    """This process's resident memory (0 where /proc is not available)."""
    try:
        pages = int(Path("/proc/self/statm").read_text().split()[1])
    except (OSError, IndexError, ValueError):
        return 0
    return pages * os.sysconf("SC_PAGE_SIZE")


def machine_memory_bytes() -> int:
    """The memory this process may use: the machine's, or its container's limit when lower."""
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    for limit_file in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        with contextlib.suppress(OSError, ValueError):
            total = min(total, int(Path(limit_file).read_text().strip()))  # "max": no limit
    return total


def _glibc_trim() -> Callable[[], None]:
    name = ctypes.util.find_library("c")
    libc = ctypes.CDLL(name) if name else None
    trim = getattr(libc, "malloc_trim", None)
    return (lambda: trim(0)) if trim is not None else (lambda: None)


# glibc keeps freed blocks of large tensors in its heaps: the resident size stays at the peak of the
# largest request unless they are handed back to the kernel.
release_free_memory = _glibc_trim()


@dataclass
class Speed:
    """How fast this server runs the model, measured at warm-up (``Engine.warm_up``).

    Attributes:
        decode_step_s: one generation step (one token for every row of a small batch).
        decode_context_token_s: what each context token adds to a decode step.
        token_row_s: one token through the model in a batched pass.
        context_token_s: what each context token adds to an output run after it in a pass (copying
            and attending to its keys).
        text_token_s: decoding and encoding one token of a candidate's text.
    """

    decode_step_s: float = 0.0
    decode_context_token_s: float = 0.0
    token_row_s: float = 0.0
    context_token_s: float = 0.0
    text_token_s: float = 0.0

    def seconds(self, cost: Cost) -> float:
        # A decode step reads the prompt and, on average, half the output generated so far.
        decode_context = cost.prefill_token_rows // max(1, cost.decode_rows) + cost.decode_steps // 2
        decode = cost.decode_steps * (self.decode_step_s + decode_context * self.decode_context_token_s)
        rows = cost.prefill_token_rows + cost.refine_token_rows
        context = cost.refine_context_rows * cost.context_tokens
        text = cost.text_tokens * self.text_token_s
        return decode + rows * self.token_row_s + context * self.context_token_s + text


@dataclass
class JobShape:
    """What sets a job's cost (the engine's ``Job`` reduced to sizes)."""

    prompt_tokens: int
    output_tokens: int
    refine: RefineConfig | None
    best_of: int = 1
    generate: bool = True
    keyword_tokens: int = 0


@dataclass
class JobCost:
    """``seconds``: the job's own work; ``wall_seconds``: the longest it may take on the worker (a
    large job shares it with small ones, see ``SMALL_SHARE``)."""

    memory_bytes: int
    seconds: float
    small: bool

    @property
    def wall_seconds(self) -> float:
        return self.seconds if self.small else self.seconds / (1 - SMALL_SHARE)


class Admission:
    """Budgets of one server.

    Args:
        cost_model: the refiner's ``CostModel``.
        memory_limit_bytes: the process's memory ceiling.
        request_memory_bytes: the most one request may need.
        request_seconds: the most work one request may take (its time limit).
        small_seconds: jobs estimated at most this are small.
        speed: the measured speed (``Engine.warm_up`` fills it in).
    """

    def __init__(
        self,
        cost_model: CostModel,
        memory_limit_bytes: int,
        request_memory_bytes: int,
        request_seconds: float,
        small_seconds: float,
        speed: Speed | None = None,
    ) -> None:
        self.cost_model = cost_model
        self.memory_limit_bytes = memory_limit_bytes
        self.request_memory_bytes = request_memory_bytes
        self.request_seconds = request_seconds
        self.small_seconds = small_seconds
        self.speed = speed or Speed()

    def estimate(self, shape: JobShape) -> JobCost:
        cost = self.cost_model.estimate(
            shape.prompt_tokens,
            shape.output_tokens,
            shape.refine,
            best_of=shape.best_of,
            generate=shape.generate,
            keyword_tokens=shape.keyword_tokens,
        )
        seconds = self.speed.seconds(cost)
        return JobCost(cost.memory_bytes, seconds, small=seconds <= self.small_seconds)

    def admit(self, shape: JobShape) -> JobCost:
        """The job's cost, or raise: ``RequestTooCostlyError`` (over budget), ``MemoryPressureError``."""
        cost = self.estimate(shape)
        if not self._fits(cost):
            raise RequestTooCostlyError(self._refusal(shape, cost))
        if resident_bytes() + cost.memory_bytes > self.memory_limit_bytes:
            raise MemoryPressureError(
                f"the server is near its memory ceiling ({self.memory_limit_bytes / MB:.0f} MB): retry "
                "shortly or with a smaller request"
            )
        return cost

    def holds_too_much(self) -> bool:
        """Whether the resident memory leaves less than one maximal request below the ceiling: only then
        is memory the allocator keeps for reuse worth handing back (``release_free_memory``). Handed
        back after every large job, it was faulted in again by the next one: a 64-token refinement
        took 1.35x its in-process time through the server (README, "Speed")."""
        return resident_bytes() + self.request_memory_bytes > self.memory_limit_bytes

    def _fits(self, cost: JobCost) -> bool:
        return cost.memory_bytes <= self.request_memory_bytes and cost.wall_seconds <= self.request_seconds

    def _refusal(self, shape: JobShape, cost: JobCost) -> str:
        over = []
        if cost.memory_bytes > self.request_memory_bytes:
            over.append(
                f"about {cost.memory_bytes / MB:.0f} MB of memory (a request may use "
                f"{self.request_memory_bytes / MB:.0f} MB)"
            )
        if cost.wall_seconds > self.request_seconds:
            shared = "" if cost.small else f", up to {1 / (1 - SMALL_SHARE):g}x that beside small requests"
            over.append(
                f"about {cost.seconds:.0f} s of work on this server{shared} (a request may take "
                f"{self.request_seconds:g} s)"
            )
        knobs = self._knobs(shape)
        alone = [f"{name} to {value}" for name, current, value in knobs if value is not None]
        if alone:
            advice = "lower " + " or ".join(alone)
        else:  # no single parameter is enough
            advice = "lower several of " + ", ".join(f"{name} (now {current})" for name, current, _ in knobs)
        return f"this request would need {' and '.join(over)}: {advice}"

    def _knobs(self, shape: JobShape) -> list[tuple[str, int, int | None]]:
        """(name, current value, the largest value that alone brings the job within budget or None)
        for each parameter that sets the job's cost."""
        knobs: list[tuple[str, int, Callable[[int], JobShape]]] = [
            (
                "max_new_tokens" if shape.generate else "the output's tokens",
                shape.output_tokens,
                lambda v: replace(shape, output_tokens=v),
            ),
            (
                "the input (parameters.truncate)",
                shape.prompt_tokens,
                lambda v: replace(shape, prompt_tokens=v),
            ),
        ]
        if shape.best_of > 1:
            knobs.append(("best_of", shape.best_of, lambda v: replace(shape, best_of=v)))
        if shape.refine is not None and shape.best_of == 1:
            refine = shape.refine
            knobs += [
                (
                    "refine.candidates",
                    refine.candidates,
                    lambda v: replace(shape, refine=replace(refine, candidates=v)),
                ),
                ("refine.steps", refine.steps, lambda v: replace(shape, refine=replace(refine, steps=v))),
            ]
            if refine.weights.get("prompt_coverage", 0) > 0:  # a switch: its attention maps or none
                weights = {**refine.weights, "prompt_coverage": 0.0}
                without = replace(shape, refine=replace(refine, weights=weights))
                knobs.append(("refine.weights.prompt_coverage", 1, lambda v: shape if v else without))
        return [
            (
                name,
                current,
                self._largest_fitting(current, shaped, lowest=0 if name.startswith("refine.w") else 1),
            )
            for name, current, shaped in knobs
        ]

    def _largest_fitting(self, current: int, shaped: Callable[[int], JobShape], lowest: int) -> int | None:
        """Binary search of the largest value in [lowest, current) whose job fits the budget (costs
        grow with every knob), or None."""
        low, high = lowest, current - 1
        if high < low or not self._fits(self.estimate(shaped(low))):
            return None
        while low < high:
            middle = (low + high + 1) // 2
            if self._fits(self.estimate(shaped(middle))):
                low = middle
            else:
                high = middle - 1
        return low
