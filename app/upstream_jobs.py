"""Jobs whose initial output comes from the upstream generator, refined by the local engine.

``UpstreamJobs`` has the ``Engine``'s ``submit`` and ``stream`` (``app.engine.JobRunner``), so routes
hand it the same jobs. For each job it sends the prompt text upstream (``app.upstream``), tokenises
the answer with the local tokenizer, and submits a refine-only job (``Job.output_ids``, the path of
``POST /refine``) to the engine, which batches the refinements of requests that arrive together. The
result is the engine's, with the upstream's output as ``generation`` and the upstream's seconds as
``generate_seconds`` (so ``details.refinement`` reports both halves of the latency).

What the upstream cannot give is refused or left out: ``best_of`` > 1 is a 422 (the candidates would
have to be generated upstream and ranked here, one request each); token log-probabilities are None.
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import time
from collections.abc import AsyncIterator
from dataclasses import replace

from transformers import PreTrainedTokenizerBase

from app.engine import Engine, Job, JobResult, RequestTimeoutError, TokenEvent
from app.upstream import UpstreamClient, UpstreamOutput, UpstreamPiece
from refiners.errors import InvalidRequestError
from refiners.generation import FINISH_EOS, GenerationOutput, SamplingParams

# Seeds chosen here for sampled requests that gave none: 31 bits, which every engine accepts
# (llama.cpp keeps 32, vLLM 64), and reported back as the request's seed.
SEED_BITS = 31


class UpstreamJobs:
    """Runs jobs with the initial output from ``client`` and the refinement in ``engine``.

    Args:
        client: the upstream generator.
        engine: the local engine; it refines, and runs jobs that carry their output (``/refine``).
        tokenizer: the local model's tokenizer (the upstream's text is tokenised with it).
        request_timeout_s: a job's time limit, upstream generation included.
    """

    def __init__(
        self,
        client: UpstreamClient,
        engine: Engine,
        tokenizer: PreTrainedTokenizerBase,
        request_timeout_s: float,
    ) -> None:
        self.client, self.engine, self.tokenizer = client, engine, tokenizer
        self.request_timeout_s = request_timeout_s

    async def submit(self, job: Job) -> JobResult:
        """The job's result: generated upstream, refined here. Raises ``UpstreamError`` when the
        upstream fails, and whatever ``Engine.submit`` raises."""
        if job.output_ids is not None:
            return await self.engine.submit(job)
        params, started = self._params(job), time.monotonic()
        output = await self.client.generate(self._prompt(job), params)
        return await self._refine(job, output, started)

    def stream(self, job: Job) -> AsyncIterator[TokenEvent | JobResult]:
        """The upstream's pieces as ``TokenEvent``s as they come, then the refined ``JobResult``."""
        if job.output_ids is not None:
            return self.engine.stream(job)
        self._params(job)  # refuse what cannot be done before any response starts
        return self._events(job)

    async def _events(self, job: Job) -> AsyncIterator[TokenEvent | JobResult]:
        params, started = self._params(job), time.monotonic()
        output: UpstreamOutput | None = None
        # aclosing: a client that leaves closes the upstream's connection now, not when collected.
        async with contextlib.aclosing(self.client.stream(self._prompt(job), params)) as items:
            async for item in items:
                if isinstance(item, UpstreamPiece):
                    yield self._token_event(item)
                else:
                    output = item
        assert output is not None  # the client's stream always ends with the output
        yield await self._refine(job, output, started)

    def _params(self, job: Job) -> SamplingParams:
        """The job's sampling parameters, with a seed chosen when it samples without one."""
        if job.best_of > 1:
            raise InvalidRequestError(
                "best_of > 1 is not available when another engine generates (REFINER_GENERATOR): "
                "set best_of to 1"
            )
        params = job.params
        if params.do_sample and params.seed is None:
            params = replace(params, seed=secrets.randbits(SEED_BITS))
        return params

    def _prompt(self, job: Job) -> str:
        """The prompt as text: the route's, else the decoded ids (special tokens kept as text)."""
        if job.prompt_text is not None:
            return job.prompt_text
        return self.tokenizer.decode(
            job.prompt_ids, skip_special_tokens=False, clean_up_tokenization_spaces=False
        )

    def _token_event(self, piece: UpstreamPiece) -> TokenEvent:
        """A streamed piece as the engine's token event; its id is the local tokenizer's first for it."""
        ids = self.tokenizer.encode(piece.text, add_special_tokens=False)
        return TokenEvent(ids[0] if ids else self.tokenizer.eos_token_id or 0, piece.logprob, piece.text)

    def _output_ids(self, output: UpstreamOutput) -> list[int]:
        """The upstream's text in local token ids, ending with EOS when the upstream stopped on it, as a
        locally generated output does."""
        ids = self.tokenizer.encode(output.text, add_special_tokens=False)
        eos = self.tokenizer.eos_token_id
        return ids + [eos] if output.finish_reason == FINISH_EOS and eos is not None else ids

    async def _refine(self, job: Job, output: UpstreamOutput, started: float) -> JobResult:
        """Refine the upstream's output in the engine (unless the job does not refine) and report the
        upstream's output and seconds as the job's generation."""
        ids = await asyncio.to_thread(self._output_ids, output)
        generation = GenerationOutput(
            token_ids=ids,
            text=output.text,
            finish_reason=output.finish_reason,
            logprobs=[None] * len(ids),
            seed=output.seed,
            prompt_tokens=len(job.prompt_ids),
        )
        if job.refine is None or not ids:
            return JobResult(generation, None, output.text, output.seconds, 0.0, 0.0, batch_size=1)
        limit = job.timeout_s if job.timeout_s is not None else self.request_timeout_s
        left = started + limit - time.monotonic()
        if left <= 0:
            raise RequestTimeoutError(f"the upstream generation alone took longer than the {limit:g} s limit")
        result = await self.engine.submit(replace(job, output_ids=ids, timeout_s=left))
        return replace(result, generation=generation, generate_seconds=output.seconds)
